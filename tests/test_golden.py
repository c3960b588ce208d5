"""The reference path against improved-diffusion's own outputs (tests/data/, see its README).

improved-diffusion gathers float64 tables into float32 and computes in float32, as we do, so a
correct implementation agrees to float32 rounding: we allow 4e-6 of the array's scale (a few ulps
of the largest value) -- the observed worst case is 8.6e-7.

One exception, by design: improved-diffusion's decoder likelihood (the t = 0 term) cancels in float32
far from the mean, where ours does not (tests/improved_diffusion_algebra.py). The tests that reach it
swap improved-diffusion's algebra into the reference, so they still compare everything else to its
float32 numbers; test_decoder_term_is_accurate_where_improved_diffusions_cancels checks our algebra
against the float64 value of improved-diffusion's formula.
"""
import math
import pathlib

import numpy as np
import pytest
import torch

import ddpm_fast as F
from improved_diffusion_algebra import discretized_gaussian_log_likelihood as id_decoder
from improved_diffusion_algebra import use_improved_diffusions_decoder

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "improved_diffusion_golden.npz"


class _Golden:
    """The golden arrays, loaded on first use. The file ships with the repository: a missing one is a
    failure of every test that needs it (never a skip), so a broken checkout cannot pass quietly."""

    def __init__(self, path):
        self.path, self._npz = path, None

    def _load(self):
        if self._npz is None:
            if not self.path.exists():
                pytest.fail(f"golden file missing: {self.path} (it is part of the repository; see "
                            f"tests/data/README.md)", pytrace=False)
            self._npz = np.load(self.path)
        return self._npz

    def __getitem__(self, key):
        return self._load()[key]

    def __contains__(self, key):
        return key in self._load().files

    def keys(self):
        return self._load().files


G = _Golden(GOLDEN)
SCHEDULES = ("linear", "cosine")
MEAN_TYPES = ("epsilon", "x0", "x_prev")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
REL = 4e-6


def g(key):
    return torch.from_numpy(G[key])


def assert_golden(key, actual):
    expected = g(key)
    assert actual.shape == expected.shape, key
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual.detach().to(expected.dtype) - expected).abs().max() / scale
    assert err <= REL, f"{key}: relative error {err:.3g}"


def inputs(S):
    return [g(f"{S}/input/{k}") for k in ("x0", "noise", "z", "t", "model_output_2c")]


def model_output_for(mo, var_type):
    return mo if var_type.startswith("learned") else mo[:, :3]


@pytest.mark.parametrize("S", SCHEDULES)
def test_tables(S):
    schedule = F.NoiseSchedule.named(S, 1000)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2"):
        ours, theirs = getattr(schedule, name), g(f"{S}/table/{name}")
        assert ours.dtype == torch.float64
        # Both float64 from the same formulas: agreement to a few float64 ulps.
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("S", SCHEDULES)
def test_noising_posterior_prior(S):
    schedule = F.NoiseSchedule.named(S, 1000)
    x0, noise, _, t, _ = inputs(S)
    assert_golden(f"{S}/q_sample", F.q_sample(x0, t, noise, schedule, backend="reference"))
    x_t = g(f"{S}/q_sample")
    mean, var, logvar = F.q_posterior(x0, x_t, t, schedule, backend="reference")
    assert_golden(f"{S}/q_posterior/mean", mean)
    assert_golden(f"{S}/q_posterior/variance", var)
    assert_golden(f"{S}/q_posterior/log_variance", logvar)
    assert_golden(f"{S}/prior_bpd", F.prior_bpd(x0, schedule, backend="reference"))


@pytest.mark.parametrize("S", SCHEDULES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_vb_terms_and_p_sample(S, mean_type, var_type, monkeypatch):
    use_improved_diffusions_decoder(monkeypatch)
    schedule = F.NoiseSchedule.named(S, 1000)
    x0, _, z, t, mo = inputs(S)
    mo = model_output_for(mo, var_type)
    x_t = g(f"{S}/q_sample")
    prefix = f"{S}/{mean_type}/{var_type}"
    for clip in (False, True):
        vb = F.vb_terms_bpd(mo, x0, x_t, t, schedule, mean_type=mean_type, var_type=var_type,
                            clip_denoised=clip, backend="reference")
        assert_golden(f"{prefix}/vb_terms_bpd/clip={clip}", vb)
        out = F.p_sample_step(mo, x_t, t, schedule, mean_type=mean_type, var_type=var_type, clip_denoised=clip,
                              noise=z, backend="reference")
        assert_golden(f"{prefix}/p_sample_step/clip={clip}/sample", out["sample"])
        assert_golden(f"{prefix}/p_sample_step/clip={clip}/pred_xstart", out["pred_xstart"])


@pytest.mark.parametrize("S", SCHEDULES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_training_losses_and_gradient(S, mean_type, var_type, loss_type, monkeypatch):
    use_improved_diffusions_decoder(monkeypatch)
    schedule = F.NoiseSchedule.named(S, 1000)
    x0, noise, _, t, mo = inputs(S)
    mo = model_output_for(mo, var_type).clone().requires_grad_(True)
    terms = F.training_losses(mo, x0, t, noise, schedule, mean_type=mean_type, var_type=var_type,
                              loss_type=loss_type, backend="reference")
    terms["loss"].sum().backward()
    prefix = f"{S}/{mean_type}/{var_type}/{loss_type}/training_losses"
    compared = 0
    for key in ("loss", "mse", "vb"):
        if f"{prefix}/{key}" in G:
            assert_golden(f"{prefix}/{key}", terms[key])
            compared += 1
    assert compared >= 1
    assert_golden(f"{prefix}/grad_model_output", mo.grad)


@pytest.mark.parametrize("S", SCHEDULES)
@pytest.mark.parametrize("eta", (0.0, 1.0))
@pytest.mark.parametrize("clip", (False, True))
def test_ddim_step(S, eta, clip):
    schedule = F.NoiseSchedule.named(S, 1000)
    _, _, z, t, mo = inputs(S)
    x_t = g(f"{S}/q_sample")
    out = F.ddim_step(mo[:, :3], x_t, t, schedule, eta=eta, clip_denoised=clip, noise=z, backend="reference")
    assert_golden(f"{S}/ddim_step/eta={eta}/clip={clip}/sample", out["sample"])
    assert_golden(f"{S}/ddim_step/eta={eta}/clip={clip}/pred_xstart", out["pred_xstart"])


@pytest.mark.parametrize("S", SCHEDULES)
def test_decoder_term_is_accurate_where_improved_diffusions_cancels(S, monkeypatch):
    """The t = 0 vb term (the decoder NLL) on the golden inputs: our float32 reference against
    improved-diffusion's formula evaluated in float64 (its true value), to float32 rounding; while
    improved-diffusion's own float32 numbers, which the swapped-in algebra reproduces, are off by more."""
    schedule = F.NoiseSchedule.named(S, 1000)
    x0, _, _, t, mo = inputs(S)
    x_t = g(f"{S}/q_sample")
    worst_theirs = 0.0
    for mean_type in MEAN_TYPES:
        for var_type in VAR_TYPES:
            m = model_output_for(mo, var_type)
            kw = dict(mean_type=mean_type, var_type=var_type, backend="reference")
            ours = F.vb_terms_bpd(m, x0, x_t, t, schedule, **kw)[0]
            with monkeypatch.context() as mp:
                use_improved_diffusions_decoder(mp)
                exact = F.vb_terms_bpd(m.double(), x0.double(), x_t.double(), t, schedule, **kw)[0]
            theirs = g(f"{S}/{mean_type}/{var_type}/vb_terms_bpd/clip=False")[0]
            assert abs(ours.double() - exact) <= REL * abs(exact), (mean_type, var_type, ours, exact)
            worst_theirs = max(worst_theirs, abs(theirs.double() - exact).item() / abs(exact).item())
    assert worst_theirs > 100 * REL  # the premise of the swap: improved-diffusion's float32 cancels here


def test_decoder_algebra_equals_improved_diffusions_in_float64():
    """The two algebras are one function: equal in float64 wherever its bin mass is not tiny."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (4000,), generator=gen) / 127.5 - 1).double()
    means = x + 0.05 * torch.randn(4000, generator=gen, dtype=torch.float64)
    log_scales = torch.empty(4000, dtype=torch.float64).uniform_(-6.0, 0.0, generator=gen)
    ours = F.discretized_gaussian_log_likelihood(x, means, log_scales, backend="reference")
    theirs = id_decoder(x, means, log_scales)
    keep = theirs > math.log(1e-6)  # float64 differences of cdfs are exact to ~1e-16 absolute
    assert keep.sum() > 2000
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-9, atol=1e-9)


def test_every_golden_output_is_compared():
    """Guard: the parametrisations above cover every output key in the file."""
    covered = set()
    for S in SCHEDULES:
        covered |= {f"{S}/q_sample", f"{S}/prior_bpd"} | {f"{S}/q_posterior/{k}" for k in ("mean", "variance", "log_variance")}
        for m in MEAN_TYPES:
            for v in VAR_TYPES:
                for c in (False, True):
                    covered.add(f"{S}/{m}/{v}/vb_terms_bpd/clip={c}")
                    covered |= {f"{S}/{m}/{v}/p_sample_step/clip={c}/{k}" for k in ("sample", "pred_xstart")}
                for lt in LOSS_TYPES:
                    covered |= {f"{S}/{m}/{v}/{lt}/training_losses/{k}" for k in ("loss", "mse", "vb", "grad_model_output")}
        for e in (0.0, 1.0):
            for c in (False, True):
                covered |= {f"{S}/ddim_step/eta={e}/clip={c}/{k}" for k in ("sample", "pred_xstart")}
    outputs = {k for k in G.keys() if "/input/" not in k and "/table/" not in k}
    assert outputs and outputs <= covered, sorted(outputs - covered)[:5]
