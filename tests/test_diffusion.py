"""GaussianDiffusion / SpacedDiffusion / samplers against improved-diffusion's outputs and semantics.

- Golden: the methods (on the reference backend: the class's semantics), called with a fake model
  returning improved-diffusion's fixed model output, against tests/data/ (improved-diffusion's own
  numbers) for every mean, variance and loss type. Tolerance as tests/test_golden.py: 4e-6 of the
  array's scale (float32 rounding).
- Respaced: improved-diffusion defines SpacedDiffusion as GaussianDiffusion on the respaced betas
  with the model fed the original timesteps; we build that independently (numpy betas, a wrapper
  model) and compare, for every mean / variance / loss type.
- Backends: the methods on the default backend (the fused one where built) in float32 against the
  reference backend in float64 by the flash-attention rule (docs/design.md), gradients included.
"""
import enum
import pathlib

import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from _helpers import NoHostSync
from improved_diffusion_algebra import use_improved_diffusions_decoder
from ddpm_fast.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "improved_diffusion_golden.npz"
MEAN_TYPES = ("epsilon", "x0", "x_prev")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
REL = 4e-6


class FixedModel(torch.nn.Module):
    """Returns a fixed output whatever its input; records the timesteps it was called with."""

    def __init__(self, output):
        super().__init__()
        self.output = output
        self.seen = []

    def forward(self, x, t, **kwargs):
        self.seen.append(t)
        return self.output


def _golden():
    if not GOLDEN.exists():
        pytest.fail(f"golden file missing: {GOLDEN} (part of the repository; see tests/data/README.md)",
                    pytrace=False)
    return np.load(GOLDEN)


def assert_rel(actual, expected, key=""):
    expected = torch.as_tensor(expected)
    assert tuple(actual.shape) == tuple(expected.shape), key
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual.detach().to(expected.dtype) - expected).abs().max() / scale
    assert err <= REL, f"{key}: relative error {err:.3g}"


# -- golden ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", ("linear", "cosine"))
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_golden_methods(S, mean_type, var_type, monkeypatch):
    use_improved_diffusions_decoder(monkeypatch)  # as in tests/test_golden.py: their float32 decoder algebra
    G = _golden()
    g = lambda k: torch.from_numpy(G[k])  # noqa: E731
    x0, noise, z, t, mo2 = (g(f"{S}/input/{k}") for k in ("x0", "noise", "z", "t", "model_output_2c"))
    mo = mo2 if var_type.startswith("learned") else mo2[:, :3]
    prefix = f"{S}/{mean_type}/{var_type}"
    for loss_type in LOSS_TYPES:
        leaf = mo.clone().requires_grad_(True)
        d = GaussianDiffusion(betas=get_named_beta_schedule(S, 1000), model_mean_type=mean_type,
                              model_var_type=var_type, loss_type=loss_type, backend="reference")
        terms = d.training_losses(FixedModel(leaf), x0, t, noise=noise)
        lp = f"{prefix}/{loss_type}/training_losses"
        assert set(terms) == {k for k in ("loss", "mse", "vb") if f"{lp}/{k}" in G}, lp
        for k, v in terms.items():
            assert_rel(v, G[f"{lp}/{k}"], f"{lp}/{k}")
        terms["loss"].sum().backward()
        assert_rel(leaf.grad, G[f"{lp}/grad_model_output"], lp + "/grad")
    x_t = d.q_sample(x0, t, noise=noise)
    assert_rel(x_t, G[f"{S}/q_sample"], "q_sample")
    model = FixedModel(mo)
    for clip in (False, True):
        vb = d._vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip)
        assert_rel(vb["output"], G[f"{prefix}/vb_terms_bpd/clip={clip}"], "vb")
        out = d.p_sample(model, x_t, t, clip_denoised=clip, noise=z)
        for k in ("sample", "pred_xstart"):
            assert_rel(out[k], G[f"{prefix}/p_sample_step/clip={clip}/{k}"], f"p_sample {k}")
        pmv = d.p_mean_variance(model, x_t, t, clip_denoised=clip)
        assert pmv["variance"].shape == x_t.shape and pmv["log_variance"].shape == x_t.shape
        assert_rel(pmv["pred_xstart"], G[f"{prefix}/p_sample_step/clip={clip}/pred_xstart"], "pmv pred_xstart")


@pytest.mark.parametrize("S", ("linear", "cosine"))
def test_golden_forward_prior_ddim(S):
    G = _golden()
    g = lambda k: torch.from_numpy(G[k])  # noqa: E731
    x0, noise, z, t, mo2 = (g(f"{S}/input/{k}") for k in ("x0", "noise", "z", "t", "model_output_2c"))
    d = GaussianDiffusion(betas=get_named_beta_schedule(S, 1000), model_mean_type="epsilon",
                          model_var_type="fixed_small", loss_type="mse", backend="reference")
    x_t = g(f"{S}/q_sample")
    mean, var, logvar = d.q_posterior_mean_variance(x0, x_t, t)
    assert mean.shape == var.shape == logvar.shape == x0.shape
    assert_rel(mean, G[f"{S}/q_posterior/mean"])
    assert_rel(var[:, :1, :1, :1], G[f"{S}/q_posterior/variance"])
    assert_rel(logvar[:, :1, :1, :1], G[f"{S}/q_posterior/log_variance"])
    assert_rel(d._prior_bpd(x0), G[f"{S}/prior_bpd"])
    assert_rel(d.prior_bpd(x0), G[f"{S}/prior_bpd"])
    model = FixedModel(mo2[:, :3])
    for eta in (0.0, 1.0):
        for clip in (False, True):
            out = d.ddim_sample(model, x_t, t, clip_denoised=clip, eta=eta, noise=z)
            for k in ("sample", "pred_xstart"):
                assert_rel(out[k], G[f"{S}/ddim_step/eta={eta}/clip={clip}/{k}"], f"ddim {k}")
    # q_mean_variance: improved-diffusion's definition.
    m, v, lv = d.q_mean_variance(x0, t)
    abar = torch.from_numpy(d.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    assert_rel(m, (abar.sqrt() * x0.double()).float())
    assert_rel(v, (1 - abar).expand(x0.shape).float())
    assert_rel(lv, torch.log(1 - abar).expand(x0.shape).float())


@pytest.mark.parametrize("S", ("linear", "cosine"))
def test_golden_inputs_default_backend(S):
    """The default backend on improved-diffusion's inputs (image-like x0 hitting +-1), losses and gradients,
    by the flash-attention rule against the float64 reference."""
    G = _golden()
    g = lambda k: torch.from_numpy(G[k])  # noqa: E731
    x0, noise, _, t, mo2 = (g(f"{S}/input/{k}") for k in ("x0", "noise", "z", "t", "model_output_2c"))
    betas = get_named_beta_schedule(S, 1000)
    for mean_type in MEAN_TYPES:
        for var_type in VAR_TYPES:
            mo = mo2 if var_type.startswith("learned") else mo2[:, :3]
            for loss_type in LOSS_TYPES:
                res = {}
                for name, backend, dtype in (("fast", "auto", torch.float32), ("ref", "reference", torch.float32),
                                             ("gold", "reference", torch.float64)):
                    d = GaussianDiffusion(betas=betas, model_mean_type=mean_type, model_var_type=var_type,
                                          loss_type=loss_type, backend=backend)
                    leaf = mo.to(dtype).clone().requires_grad_(True)
                    terms = d.training_losses(FixedModel(leaf), x0.to(dtype), t, noise=noise.to(dtype))
                    terms["loss"].sum().backward()
                    res[name] = {**{k: v.detach() for k, v in terms.items()}, "grad": leaf.grad}
                for k, gold in res["gold"].items():
                    err_fast = (res["fast"][k].double() - gold).abs().max()
                    err_ref = (res["ref"][k].double() - gold).abs().max()
                    assert err_fast <= 2 * err_ref + 1e-6 * gold.abs().max(), (
                        f"{S}/{mean_type}/{var_type}/{loss_type} {k}: {err_fast:.3g} vs reference {err_ref:.3g}")


# -- respacing ------------------------------------------------------------------------------------------
def _respaced_betas(betas, use):
    """improved-diffusion's respacing, written out independently: new betas from abar at kept steps."""
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    keep = sorted(use)
    last, new = 1.0, []
    for i in keep:
        new.append(1.0 - abar[i] / last)
        last = abar[i]
    return np.array(new), keep


class MappedModel(torch.nn.Module):
    """improved-diffusion's _WrappedModel: feeds the original (optionally rescaled) timestep."""

    def __init__(self, inner, keep, rescale, original):
        super().__init__()
        self.inner, self.keep, self.rescale, self.original = inner, torch.tensor(keep), rescale, original

    def forward(self, x, t, **kw):
        t = self.keep[t]
        if self.rescale:
            t = t.float() * (1000.0 / self.original)
        return self.inner(x, t, **kw)


@pytest.mark.parametrize("mean_type", MEAN_TYPES + ("v",))
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_spaced_equals_gaussian_on_respaced_betas(mean_type, var_type):
    torch.manual_seed(0)
    base = get_named_beta_schedule("cosine", 200)
    use = space_timesteps(200, "10,7")
    new_betas, keep = _respaced_betas(base, use)
    B, C = 5, 2
    x0 = torch.rand(B, C, 3, 3) * 2 - 1
    noise, z = torch.randn_like(x0), torch.randn_like(x0)
    out_ch = 2 * C if var_type.startswith("learned") else C
    mo = torch.randn(B, out_ch, 3, 3)
    if var_type == "learned_range":
        mo[:, C:] = torch.tanh(mo[:, C:])
    t = torch.tensor([0, 1, 5, 16, 3])
    for loss_type in LOSS_TYPES:
        for rescale in (False, True):
            kw = dict(model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type,
                      rescale_timesteps=rescale)
            ours = SpacedDiffusion(use, betas=base, **kw)
            # improved-diffusion: the wrapper maps and rescales; the inner process does not rescale.
            theirs = GaussianDiffusion(betas=new_betas, **{**kw, "rescale_timesteps": False})
            assert ours.num_timesteps == len(keep) and ours.timestep_map == keep
            inner_a, inner_b = FixedModel(mo.clone().requires_grad_(True)), FixedModel(mo.clone().requires_grad_(True))
            ta = ours.training_losses(inner_a, x0, t, noise=noise)
            tb = theirs.training_losses(MappedModel(inner_b, keep, rescale, 200), x0, t, noise=noise)
            assert set(ta) == set(tb)
            for k in ta:
                torch.testing.assert_close(ta[k], tb[k], rtol=1e-6, atol=1e-6)
            ta["loss"].sum().backward(), tb["loss"].sum().backward()
            torch.testing.assert_close(inner_a.output.grad, inner_b.output.grad, rtol=1e-6, atol=1e-6)
            # The model saw the original timesteps (rescaled to [0, 1000) when asked).
            torch.testing.assert_close(inner_a.seen[-1], inner_b.seen[-1])
            expected_t = torch.tensor(keep)[t]
            if rescale:
                torch.testing.assert_close(inner_a.seen[-1], expected_t.float() * 5.0)
            else:
                assert torch.equal(inner_a.seen[-1], expected_t)
        x_t = ours.q_sample(x0, t, noise)
        fa, fb = FixedModel(mo), MappedModel(FixedModel(mo), keep, False, 200)
        for clip in (False, True):
            for name, kw in (("p_sample", dict(noise=z)), ("ddim_sample", dict(eta=0.7, noise=z)),
                             ("ddim_sample", dict(eta=0.0)), ("_vb_terms_bpd", {})):
                if name == "_vb_terms_bpd":
                    a = ours._vb_terms_bpd(fa, x0, x_t, t, clip_denoised=clip)
                    b = theirs._vb_terms_bpd(fb, x0, x_t, t, clip_denoised=clip)
                else:
                    a = getattr(ours, name)(fa, x_t, t, clip_denoised=clip, **kw)
                    b = getattr(theirs, name)(fb, x_t, t, clip_denoised=clip, **kw)
                for k in a:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=f"{name} {k}")


# -- backends: float32 default backend vs float64 reference ---------------------------------------------
FLOOR = 1e-6


@pytest.mark.parametrize("process", ("linear100-ddim20", "linear1000"))
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_default_backend_against_float64_reference(process, var_type, loss_type):
    torch.manual_seed(1)
    steps = 100 if process == "linear100-ddim20" else 1000
    use = space_timesteps(100, "ddim20") if steps == 100 else range(1000)
    B, C = 6, 3
    # Image-like data: 256 levels of [-1, 1], hitting the open edge bins at +-1 (the decoder's special cases).
    x0 = torch.randint(0, 256, (B, C, 4, 4)).double() / 127.5 - 1
    x0[:, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    noise, z = torch.randn_like(x0), torch.randn_like(x0)
    mo = torch.randn(B, (2 if var_type.startswith("learned") else 1) * C, 4, 4, dtype=torch.float64)
    if var_type == "learned_range":
        mo[:, C:] = torch.tanh(mo[:, C:])
    t = torch.tensor([0, 1, 7, 13, 19, 10])
    for mean_type in MEAN_TYPES:
        kw = dict(betas=get_named_beta_schedule("linear", steps), model_mean_type=mean_type, model_var_type=var_type,
                  loss_type=loss_type)
        fast = SpacedDiffusion(use, backend="auto", **kw)
        ref = SpacedDiffusion(use, backend="reference", **kw)

        def run(d, dtype):
            leaf = mo.detach().to(dtype).clone().requires_grad_(True)
            m = FixedModel(leaf)
            a = d.training_losses(m, x0.to(dtype), t, noise=noise.to(dtype))
            a["loss"].sum().backward()
            with torch.no_grad():
                x_t = d.q_sample(x0.to(dtype), t, noise.to(dtype))
                s = d.p_sample(m, x_t, t, noise=z.to(dtype))
                dd = d.ddim_sample(m, x_t, t, eta=0.5, noise=z.to(dtype))
                vb = d._vb_terms_bpd(m, x0.to(dtype), x_t, t)
            return {**{k: v.detach() for k, v in a.items()}, "grad": leaf.grad, "sample": s["sample"],
                    "pred_xstart": s["pred_xstart"], "ddim": dd["sample"], "vb_clip": vb["output"]}

        gold = run(ref, torch.float64)
        ref32, fast32 = run(ref, torch.float32), run(fast, torch.float32)
        for k in gold:
            err_fast = (fast32[k].double() - gold[k]).abs().max()
            err_ref = (ref32[k].double() - gold[k]).abs().max()
            scale = gold[k].abs().max()
            assert err_fast <= 2 * err_ref + FLOOR * scale, f"{mean_type} {k}: {err_fast:.3g} vs {err_ref:.3g}"


# -- loops, bpd, options ------------------------------------------------------------------------------------
class TinyEps(torch.nn.Module):
    def __init__(self, channels, learned):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels * (2 if learned else 1), 1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x))


def test_calc_bpd_loop_matches_its_terms():
    torch.manual_seed(2)
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="8")
    model = TinyEps(2, learned=True)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    torch.manual_seed(5)
    out = d.calc_bpd_loop(model, x0)
    T = d.num_timesteps
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (3, T)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    torch.testing.assert_close(out["prior_bpd"], d._prior_bpd(x0))
    # Replay the same noise: column j is t = T-1-j, as improved-diffusion.
    torch.manual_seed(5)
    for j, i in enumerate(reversed(range(T))):
        tb = torch.full((3,), i)
        noise = torch.randn_like(x0)
        x_t = d.q_sample(x0, tb, noise)
        vb = d._vb_terms_bpd(model, x0, x_t, tb, clip_denoised=True)
        torch.testing.assert_close(out["vb"][:, j], vb["output"])
        eps = d._predict_eps_from_xstart(x_t, tb, vb["pred_xstart"])
        torch.testing.assert_close(out["mse"][:, j], ((eps - noise) ** 2).mean(dim=(1, 2, 3)))


def test_loops_progress_and_ddim_reverse(capsys):
    torch.manual_seed(3)
    d = create_gaussian_diffusion(steps=50, timestep_respacing="ddim10")
    model = TinyEps(1, learned=False)
    x = d.p_sample_loop(model, (2, 1, 4, 4), progress=True)
    assert x.shape == (2, 1, 4, 4) and torch.isfinite(x).all()
    assert "10/10" in capsys.readouterr().err
    noise = torch.randn(2, 1, 4, 4)
    steps = list(d.ddim_sample_loop_progressive(model, (2, 1, 4, 4), noise=noise))
    assert len(steps) == 10
    torch.testing.assert_close(d.ddim_sample_loop(model, (2, 1, 4, 4), noise=noise), steps[-1]["sample"])
    # A deterministic DDIM step forward then backward recovers x_t for a model that ignores its input
    # (eps is then the same at both ends).
    fixed = FixedModel(torch.randn(2, 1, 4, 4) * 0.1)
    t = torch.tensor([3, 6])
    x_t = d.q_sample(torch.rand(2, 1, 4, 4) * 0.5, t)
    up = d.ddim_reverse_sample(fixed, x_t, t, clip_denoised=False)
    down = d.ddim_sample(fixed, up["sample"], t + 1, clip_denoised=False)
    torch.testing.assert_close(down["sample"], x_t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eta"):
        d.ddim_reverse_sample(fixed, x_t, t, eta=0.5)


def test_denoised_fn_is_applied_before_clipping():
    torch.manual_seed(4)
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 50), model_mean_type="x0",
                          model_var_type="fixed_large", loss_type="mse")
    x0_pred = torch.rand(3, 1, 2, 2) * 4 - 2
    model = FixedModel(x0_pred)
    t = torch.tensor([1, 10, 40])
    x = torch.randn(3, 1, 2, 2)
    out = d.p_mean_variance(model, x, t, clip_denoised=True, denoised_fn=lambda p: p * 0.5)
    torch.testing.assert_close(out["pred_xstart"], (x0_pred * 0.5).clamp(-1, 1))
    mean, _, _ = d.q_posterior_mean_variance(out["pred_xstart"], x, t)
    torch.testing.assert_close(out["mean"], mean)


@pytest.mark.parametrize("mean_type", ("epsilon", "x0", "x_prev"))
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_p_sample_with_denoised_fn_is_the_ancestral_step_of_its_mean(mean_type, var_type):
    """p_sample with a denoised_fn (the fused step of the processed x0): mean + [t > 0] exp(log_variance / 2)
    noise, with mean / log_variance from p_mean_variance under the same denoised_fn."""
    torch.manual_seed(6)
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 50), model_mean_type=mean_type,
                          model_var_type=var_type, loss_type="mse")
    learned = var_type.startswith("learned")
    output = torch.randn(3, 4 if learned else 2, 2, 2)
    if learned:
        output[:, 2:] = torch.tanh(output[:, 2:]) * (1.0 if var_type == "learned_range" else 3.0) - (
            0.0 if var_type == "learned_range" else 5.0)
    model = FixedModel(output)
    t = torch.tensor([0, 10, 40])
    x, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    fn = lambda p: p * 0.5 + 0.1  # noqa: E731
    out = d.p_sample(model, x, t, clip_denoised=True, denoised_fn=fn, noise=noise)
    pmv = d.p_mean_variance(model, x, t, clip_denoised=True, denoised_fn=fn)
    nonzero = (t != 0).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out["pred_xstart"], pmv["pred_xstart"])
    torch.testing.assert_close(out["sample"], pmv["mean"] + nonzero * torch.exp(0.5 * pmv["log_variance"]) * noise)


class ForeignMeanType(enum.Enum):
    """Stands in for improved_diffusion.gaussian_diffusion.ModelMeanType (a different class)."""

    PREVIOUS_X = enum.auto()
    START_X = enum.auto()
    EPSILON = enum.auto()


def test_options_by_name_and_errors():
    betas = get_named_beta_schedule("linear", 100)
    for mean in (ForeignMeanType.START_X, ModelMeanType.START_X, "START_X", "x0"):
        d = GaussianDiffusion(betas=betas, model_mean_type=mean, model_var_type=ModelVarType.LEARNED,
                              loss_type=LossType.RESCALED_MSE)
        assert d.model_mean_type is ModelMeanType.START_X and d.loss_type is LossType.RESCALED_MSE
    with pytest.raises(ValueError, match="model_mean_type"):
        GaussianDiffusion(betas=betas, model_mean_type="noise", model_var_type="learned", loss_type="mse")
    with pytest.raises(ValueError, match="loss_type"):
        GaussianDiffusion(betas=betas, model_mean_type="x0", model_var_type="learned", loss_type="l1")
    with pytest.raises(ValueError, match="backend"):
        GaussianDiffusion(betas=betas, model_mean_type="x0", model_var_type="learned", loss_type="mse", backend="gpu")


def test_create_gaussian_diffusion_options():
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, use_kl=False, rescale_learned_sigmas=True,
                                  timestep_respacing="ddim25", predict_xstart=True)
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 25 and d.original_num_steps == 100
    assert (d.model_var_type, d.loss_type, d.model_mean_type) == (
        ModelVarType.LEARNED_RANGE, LossType.RESCALED_MSE, ModelMeanType.START_X)
    d = create_gaussian_diffusion(steps=100, sigma_small=True, use_kl=True, noise_schedule="cosine")
    assert d.num_timesteps == 100 and d.model_var_type is ModelVarType.FIXED_SMALL
    assert d.loss_type is LossType.RESCALED_KL and not d.schedule.is_respaced
    # Respaced betas are re-derived from abar ratios (as improved-diffusion): equal to float64 rounding.
    np.testing.assert_allclose(d.betas, NoiseSchedule.named("cosine", 100).betas.numpy(), rtol=1e-10)


# -- timestep samplers --------------------------------------------------------------------------------
def test_uniform_sampler():
    d = create_gaussian_diffusion(steps=20)
    s = create_named_schedule_sampler("uniform", d)
    assert isinstance(s, UniformSampler)
    t, w = s.sample(4000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 20 and torch.equal(w, torch.ones(4000))
    counts = torch.bincount(t, minlength=20).double()
    assert (counts - 200).abs().max() < 70  # 5 sigma of a binomial(4000, 1/20) count is ~69
    with pytest.raises(ValueError, match="name"):
        create_named_schedule_sampler("lossaware", d)


def test_loss_second_moment_sampler():
    d = create_gaussian_diffusion(steps=4, noise_schedule="cosine")
    s = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(s, LossSecondMomentResampler)
    s2 = LossSecondMomentResampler(d, history_per_term=2, uniform_prob=0.1)
    np.testing.assert_array_equal(s2.weights(), np.ones(4))  # not warmed up
    # In-order updates; a full history shifts out its oldest value.
    s2.update_with_local_losses(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0]),
                                torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    np.testing.assert_array_equal(s2._loss_history[0], [1.0, 5.0])
    rms = np.sqrt([(1 + 25) / 2, 4, 9, 16])
    expected = rms / rms.sum() * 0.9 + 0.1 / 4
    np.testing.assert_allclose(s2.weights(), expected)
    t, w = s2.sample(3000, "cpu", generator=torch.Generator().manual_seed(1))
    p = torch.as_tensor(expected / expected.sum(), dtype=torch.float32)
    torch.testing.assert_close(w, 1.0 / (4 * p[t]))
    freq = torch.bincount(t, minlength=4).double() / 3000
    assert (freq - p.double()).abs().max() < 0.05
    with pytest.raises(ValueError, match="ts"):
        s2.update_with_all_losses([7], [1.0])


def test_training_and_sampling_steps_do_not_sync():
    """validate=False stands in for CUDA tensors (the CPU range check of t is a deliberate host read)."""
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim20", rescale_timesteps=True)
    d.validate = False
    model = TinyEps(2, learned=True)
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 3, 11, 19])
    model(x0, t.float())  # first call outside: lazy module initialisation is not under test
    d._model_timesteps(t)  # caches the timestep map on the device
    with NoHostSync():
        d.training_losses(model, x0, t)["loss"].mean().backward()
        x_t = d.q_sample(x0, t)
        d.p_sample(model, x_t, t)
        d.ddim_sample(model, x_t, t, eta=0.5)
        d._vb_terms_bpd(model, x0, x_t, t)


# -- CUDA-graph sampling loops ------------------------------------------------------------------------------
def _loop_pair(loop, d, model, shape, cuda_graph, seed, **kw):
    torch.manual_seed(seed)
    return loop(d, model, shape, cuda_graph=cuda_graph, **kw)


@pytest.mark.parametrize("loop,kw", [
    (GaussianDiffusion.p_sample_loop, {}),
    (GaussianDiffusion.ddim_sample_loop, {"eta": 0.0}),
    (GaussianDiffusion.ddim_sample_loop, {"eta": 0.7}),
], ids=["p_sample", "ddim_eta0", "ddim_eta0.7"])
def test_cuda_graph_loops_on_cpu_run_eagerly_with_the_same_result(loop, kw, monkeypatch):
    """cuda_graph=True on CPU tensors: the eager loop (no graph is built), bit for bit its result."""
    d = create_gaussian_diffusion(steps=40, learn_sigma=True, timestep_respacing="8")
    torch.manual_seed(0)
    model = TinyEps(2, learned=True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", None)  # building a graph here would fail loudly
    eager = _loop_pair(loop, d, model, (3, 2, 4, 4), False, 7, **kw)
    graphed = _loop_pair(loop, d, model, (3, 2, 4, 4), True, 7, **kw)
    assert torch.equal(eager, graphed)


def test_cuda_graph_progressive_loops_on_cpu_match_eager():
    d = create_gaussian_diffusion(steps=30, timestep_respacing="ddim6")
    model = TinyEps(1, learned=False)
    noise = torch.randn(2, 1, 4, 4)
    for progressive in (d.p_sample_loop_progressive, d.ddim_sample_loop_progressive):
        torch.manual_seed(1)
        eager = [o["sample"] for o in progressive(model, (2, 1, 4, 4), noise=noise)]
        torch.manual_seed(1)
        graphed = [o["sample"] for o in progressive(model, (2, 1, 4, 4), noise=noise, cuda_graph=True)]
        assert len(eager) == len(graphed) == 6
        assert all(torch.equal(a, b) for a, b in zip(eager, graphed))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in `ddpm-fast selftest`)")
@pytest.mark.parametrize("learned", [False, True])
def test_cuda_graph_loops_on_gpu_match_eager(learned):
    """One captured step replayed per timestep: the same samples as the eager loop (deterministic DDIM exactly
    up to float32 rounding; the ancestral loop too, its noise drawn in the graph from the default generator in
    the eager loop's order), and the progressive loop yields independent copies."""
    device = torch.device("cuda")
    d = create_gaussian_diffusion(steps=100, learn_sigma=learned, timestep_respacing="10")
    torch.manual_seed(0)
    model = TinyEps(3, learned=learned).to(device)
    shape = (4, 3, 8, 8)
    for loop, kw in ((d.ddim_sample_loop, {"eta": 0.0}), (d.ddim_sample_loop, {"eta": 1.0}), (d.p_sample_loop, {})):
        results = []
        for cuda_graph in (False, True):
            torch.manual_seed(3)
            results.append(loop(model, shape, device=device, cuda_graph=cuda_graph, **kw))
        eager, graphed = results
        assert graphed.device.type == "cuda" and graphed.shape == shape
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    torch.manual_seed(4)
    steps = [o["sample"] for o in d.ddim_sample_loop_progressive(model, shape, device=device, cuda_graph=True)]
    assert len(steps) == 10 and not any(torch.equal(steps[0], s) for s in steps[1:])


class _ReplayedGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture runs the body once (its outputs become the static
    buffers); replay runs it again and writes the outputs into those buffers, as a graph replay does."""

    def capture(self, body):
        self.body = body
        self.out = body()
        return self.out

    def replay(self):
        with torch.no_grad():
            for name, value in self.body().items():
                self.out[name].copy_(value)


def test_cuda_graph_buffering_and_rng_replay_with_a_stand_in_graph(monkeypatch):
    """The graph loop's own logic on the CPU (static x and t, the copy of each step's sample back into x, the
    generator restored after warm-up and capture, copies for the progressive loop, the last result outliving
    the buffers): with a stand-in graph that re-runs the captured step, every loop equals the eager one bit for
    bit."""
    import contextlib

    from ddpm_fast import diffusion

    class _Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(diffusion, "_graph_device", lambda x: True)
    monkeypatch.setattr(diffusion, "_capture", lambda graph, body: graph.capture(body))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _ReplayedGraph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: torch.set_rng_state(state))
    d = create_gaussian_diffusion(steps=40, learn_sigma=True, timestep_respacing="8")
    torch.manual_seed(0)
    model = TinyEps(2, learned=True)
    shape = (3, 2, 4, 4)
    for loop, kw in ((d.p_sample_loop, {}), (d.ddim_sample_loop, {"eta": 0.0}), (d.ddim_sample_loop, {"eta": 0.5})):
        torch.manual_seed(9)
        eager = loop(model, shape, **kw)
        torch.manual_seed(9)
        graphed = loop(model, shape, cuda_graph=True, **kw)
        assert torch.equal(eager, graphed), loop.__name__
    for progressive in (d.p_sample_loop_progressive, d.ddim_sample_loop_progressive):
        torch.manual_seed(2)
        eager = [o["sample"] for o in progressive(model, shape)]
        torch.manual_seed(2)
        graphed = [o["sample"] for o in progressive(model, shape, cuda_graph=True)]
        assert len(graphed) == 8 and all(torch.equal(a, b) for a, b in zip(eager, graphed))
