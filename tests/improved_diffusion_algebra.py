"""improved-diffusion's own algebra for the decoder likelihood, to tie the reference to its outputs.

improved-diffusion computes the bin mass as cdf(y+) - cdf(y-) with cdf = 0.5 (1 + tanh(...)). Far from
the mean both cdfs round to 0 or 1 in float32 and the difference cancels: on the golden inputs (tests/data/) its
float32 decoder term is off by up to 4% of the value that the same formula has in float64. ddpm_fast's
reference computes the same function without that cancellation (reference._discretized_gaussian_log_likelihood).
To compare against improved-diffusion's float32 numbers, the golden tests swap this algebra in.
"""
import math

import torch

from ddpm_fast import reference


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """improved-diffusion's discretized_gaussian_log_likelihood, as it computes it."""
    def cdf(y):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3))))

    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def use_improved_diffusions_decoder(monkeypatch):
    """Make ddpm_fast.reference compute the decoder likelihood with improved-diffusion's algebra."""
    monkeypatch.setattr(reference, "_discretized_gaussian_log_likelihood", discretized_gaussian_log_likelihood)
