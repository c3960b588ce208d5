"""The one source of every option name, its integer id and the packed schedule table's columns.

An option's id is its position in its tuple: the compiled kernels (csrc/*.h enums MeanType, VarType,
LossType, Weighting, Col; tests/test_options.py checks them against this module) and the Triton kernels
receive these ids. ddpm_fast.reference, ddpm_fast.ops, the native and Triton backends and the schedule
import them from here; ``describe(kind)`` gives the docstrings' text for an option kind.
"""
from __future__ import annotations

# -- option values, in id order -------------------------------------------------------------------
MEAN_TYPES = ("epsilon", "x0", "x_prev", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")  # model_output carries a variance half (2C channels)
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
KL_LOSS_TYPES = ("kl", "rescaled_kl")  # the vb term alone, no mse
WEIGHTINGS = ("simple", "elbo", "min_snr")

# Columns of the packed schedule table, one row per timestep; kernels index them by position.
COLUMNS = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixed_large_variance",
    "fixed_large_log_variance",
    "sqrt_alphas_cumprod_prev",
    "sqrt_one_minus_alphas_cumprod_prev",
    "snr",
    "alphas_cumprod_next",
    "log_one_minus_alphas_cumprod",
)


def ids(values: tuple) -> dict:
    """{value: its id}, the id being the value's position."""
    return {value: i for i, value in enumerate(values)}


COLUMN = ids(COLUMNS)
MEAN_IDS = ids(MEAN_TYPES)
VAR_IDS = ids(VAR_TYPES)
LOSS_IDS = ids(LOSS_TYPES)
WEIGHTING_IDS = ids(WEIGHTINGS)
LEARNED_VAR_IDS = tuple(VAR_IDS[v] for v in LEARNED_VAR_TYPES)

# The option kinds an op takes (keyword argument name -> its values), and the C++ enum of each
# (plus the table columns, Col): the enumerators are k + the value in CamelCase (kLearnedRange).
OPTIONS = {"mean_type": MEAN_TYPES, "var_type": VAR_TYPES, "loss_type": LOSS_TYPES, "weighting": WEIGHTINGS}
CPP_ENUMS = {"MeanType": MEAN_TYPES, "VarType": VAR_TYPES, "LossType": LOSS_TYPES, "Weighting": WEIGHTINGS,
             "Col": COLUMNS}

# What each value means, for the docstrings (the first value is the default).
MEANINGS = {
    "mean_type": {
        "epsilon": "the noise",
        "x0": "the clean sample",
        "x_prev": "the posterior mean of x_{t-1}",
        "v": "sqrt(abar) eps - sqrt(1 - abar) x0",
    },
    "var_type": {
        "fixed_small": "the posterior variance",
        "fixed_large": "beta_t; improved-diffusion's create_gaussian_diffusion default",
        "learned": "model_output's second channel half is the log variance",
        "learned_range": "the second half v in [-1, 1] interpolates log beta_t and the clipped posterior log "
                         "variance",
    },
    "loss_type": {
        "mse": "with a learned variance the hybrid loss: mse plus the vb term, which sees the model's mean "
               "through a stop-gradient",
        "rescaled_mse": "as mse, the vb term scaled by T / 1000",
        "kl": "the vb term alone",
        "rescaled_kl": "kl times T",
    },
    "weighting": {
        "simple": "1",
        "elbo": "the true ELBO weight, making the mse the KL term in bits/dim up to a constant",
        "min_snr": "Hang et al. 2023, min(SNR, min_snr_gamma) based; not for mean_type \"x_prev\"",
    },
}


def describe(kind: str) -> str:
    """'"a" (default, what a means), "b" (what b means) or "c" (...)' for option ``kind`` (e.g. "var_type")."""
    values = OPTIONS[kind]
    parts = [f'"{v}" ({"default, " if i == 0 else ""}{MEANINGS[kind][v]})' for i, v in enumerate(values)]
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def check(kind: str, value) -> str:
    """``value`` if it is an option of ``kind``, else ValueError naming the argument."""
    values = OPTIONS[kind]
    if value not in values:
        raise ValueError(f"{kind}: unknown {value!r}; expected one of {values}")
    return value


def cpp_enumerator(value: str) -> str:
    """The C++ enumerator of an option value: "learned_range" -> "kLearnedRange", "x0" -> "kX0"."""
    return "k" + "".join(part[:1].upper() + part[1:] for part in value.split("_"))


def loss_terms(loss_type: str, var_type: str, loss, mse, vb) -> dict:
    """The terms training_losses returns for these options: "loss" and "vb" for kl losses; "mse" and "loss",
    plus "vb" with a learned variance, for mse losses (each a [B] tensor). mse None: the mse is the loss itself
    (a fixed variance and "simple" weighting; the backends then make no separate tensor), returned as "mse"."""
    if loss_type in KL_LOSS_TYPES:
        return {"loss": loss, "vb": vb}
    terms = {"mse": loss if mse is None else mse, "loss": loss}
    if var_type in LEARNED_VAR_TYPES:
        terms["vb"] = vb
    return terms
