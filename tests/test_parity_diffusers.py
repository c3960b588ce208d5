"""Parity sweep: FastDDPMScheduler / FastDDIMScheduler against diffusers' own classes over their config space.

Every config option of each parent appears (sampled by rotation, not the full product: each value of each
option is paired with every value of the two main options), every timestep spacing, float32 / float16 /
bfloat16, one timestep for the batch and a per-sample timestep tensor, the first, a middle and the last
step, and full loops of 50 and 1000 steps.

The yardstick is the flash-attention rule (docs/design.md): the parent run in float64 (its own float32 betas,
cumprod and inputs cast to float64) is the truth; ours may be off it by at most twice the parent's own
error in the tested dtype, plus a floor of one unit in the last place of that dtype at the output's scale
(float32: 1e-6, a few float32 roundings). Where the parent's result is not finite (zero terminal SNR with
an epsilon model and no clipping), ours must be the same non-finite value.

Variance noise: all three runs use one float32 draw per call (cast to the run's dtype), so the comparison
sees the math, not three different random streams.
"""
import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (extra 'diffusers')")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm  # noqa: E402

from ddpm_fast.compat import diffusers as compat  # noqa: E402
from ddpm_fast.compat.diffusers import FastDDIMScheduler, FastDDPMScheduler  # noqa: E402
from _helpers import make_schedulers, scheduler_model_output, to64  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
T = 100
B, C = 3, 2

BETAS = ({"beta_schedule": "linear"}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
         {"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "sigmoid"},
         {"trained_betas": np.linspace(1e-4, 0.2, T).tolist()})
CLIPS = ({"clip_sample": False}, {"clip_sample": True}, {"clip_sample": True, "clip_sample_range": 1.7},
         {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
         {"thresholding": True, "sample_max_value": 0.5})
SPACINGS = (None, {"timestep_spacing": "leading"}, {"timestep_spacing": "leading", "steps_offset": 1},
            {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}, "custom")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
DDPM_VARS = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range", "other")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


class Draws:
    """Replaces diffusers' randn_tensor (in the parent's module and ours): a fixed float32 tensor per call,
    cast to the requested dtype. ``sl`` selects samples (the parent stepping one sample of a batch)."""

    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.z = None
        self.sl = slice(None)
        self.fixed = False
        self.via = None  # for the float64 run: the tested dtype's rounding of the draw


    def next(self, shape):
        if not self.fixed:
            self.z = torch.randn(shape, generator=self.gen)
        return self.z

    def __call__(self, shape, generator=None, device=None, dtype=None, **kw):
        z = self.next(tuple(shape))[self.sl]
        if self.via is not None:
            z = z.to(self.via)
        return z.to(dtype or torch.float32)

    def install(self, monkeypatch):
        for mod in (scheduling_ddpm, scheduling_ddim, compat):
            monkeypatch.setattr(mod, "randn_tensor", self)
        return self


def check(ours, parent, gold, what, known_gap=0.0):
    """The flash-attention rule against the float64 parent (see the module docstring). known_gap: the one
    reported difference (epsilon_x0_gap), added to the bound only where it applies."""
    assert ours.dtype == parent.dtype and ours.shape == parent.shape, f"{what}: {ours.dtype} {tuple(ours.shape)}"
    gold = gold.double()
    if not torch.isfinite(gold).all():
        torch.testing.assert_close(ours, parent, equal_nan=True, rtol=0, atol=0, msg=what)
        return
    err_ours = (ours.double() - gold).abs().max()
    err_parent = (parent.double() - gold).abs().max()
    floor = FLOOR[ours.dtype] * max(gold.abs().max().item(), 1.0)
    assert err_ours <= 2 * err_parent + floor + known_gap, f"{what}: error {err_ours:.3g} vs parent {err_parent:.3g}"


def epsilon_x0_gap(s, mo, x, t, dtype):
    """A difference the audit found and reports (docs/compatibility.md): x_0 from an epsilon model where
    alphas_cumprod -> 0. The fused ops compute it as improved-diffusion does, sqrt(1/abar) x - sqrt(1/abar - 1)
    eps: two products of size |x| / sqrt(abar) that cancel, each off by its float32 rounding; diffusers'
    (x - sqrt(1 - abar) eps) / sqrt(abar) rounds once at the size of the result. Where 1/sqrt(abar) is large
    (abar_t < 1e-3: the last steps of a cosine or zero-SNR-like schedule) ours may then exceed 2x the parent's
    float32 error, by at most those two roundings: 2 * 2^-24 * max(|x| + |eps|) / sqrt(abar). Elsewhere 0."""
    if s.config.prediction_type != "epsilon" or dtype != torch.float32:
        return 0.0
    abar = float(torch.cumprod(1 - s.betas.double(), 0)[int(t)])
    if abar >= 1e-3 or abar == 0.0:  # abar = 0: the parent's own code runs there
        return 0.0
    return 2 * 2.0**-24 * (x.double().abs() + mo[:, :x.shape[1]].double().abs()).max().item() / abar**0.5


def make(parent_cls, fast_cls, cfg, spacing, n=10):
    """(parent, ours, the parent in float64) over T training steps (unless cfg says), n inference steps."""
    return make_schedulers(parent_cls, fast_cls, cfg, spacing, n, T)


def model_output(var, gen, batch=B):
    """[batch, C or 2C, 4, 4] for diffusers' variance_type var."""
    return scheduler_model_output(var, gen, batch, C)


def steps_of(s):
    ts = s.timesteps
    return [ts[0], ts[len(ts) // 2], ts[-1]]


def compare_step(a, b, g, draws, mo, x, t, dtype, what, **kw):
    """One step of all three at timestep t (a scalar) in dtype; noise: one float32 draw shared by all."""
    draws.fixed = False
    draws.next(x.shape)
    draws.fixed = True
    mo_d, x_d = mo.to(dtype), x.to(dtype)
    extra = dict(kw)
    if "variance_noise" in extra:
        extra["variance_noise"] = extra["variance_noise"].to(dtype)
    rb = b.step(mo_d, t, x_d, **extra)
    ra = a.step(mo_d, t, x_d, **extra)
    if "variance_noise" in extra:
        extra["variance_noise"] = extra["variance_noise"].to(dtype).double()
    draws.via = dtype
    rg = g.step(mo_d.double(), t, x_d.double(), **extra)
    draws.fixed, draws.via = False, None
    check(rb.prev_sample, ra.prev_sample, rg.prev_sample, what + " prev_sample")
    check(rb.pred_original_sample, ra.pred_original_sample, rg.pred_original_sample, what + " x0",
          known_gap=epsilon_x0_gap(a, mo_d, x_d, t, dtype))
    return rb


def test_ddpm_step_sweep(monkeypatch):
    """variance_type x prediction_type in full; beta schedule, clip mode, spacing, zero-SNR rescaling rotate;
    every dtype and the first, a middle and the last step for each."""
    draws = Draws().install(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, 4, 4, generator=gen) * 1.5
    for i, (var, pred) in enumerate(itertools.product(DDPM_VARS, PREDICTIONS)):
        cfg = {"variance_type": var, "prediction_type": pred, **BETAS[i % 5], **CLIPS[i % 5],
               "rescale_betas_zero_snr": i % 4 == 3}
        spacing = SPACINGS[i % 6]
        a, b, g = make(DDPMScheduler, FastDDPMScheduler, cfg, spacing)
        mo = model_output(var, gen)
        for t in steps_of(a):
            for dtype in DTYPES:
                compare_step(a, b, g, draws, mo, x, t, dtype, f"{cfg} {spacing} t={int(t)} {dtype}")


def test_ddpm_per_sample_timesteps_sweep(monkeypatch):
    """A per-sample timestep tensor (first, middle, last step in one batch) equals the parent stepping each
    sample alone, for every variance type and spacing, in every dtype."""
    draws = Draws().install(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, 4, 4, generator=gen)
    for i, var in enumerate(DDPM_VARS[:-1]):
        if var == "fixed_large_log":
            continue  # the parent's step (NaN noise scale) runs for it: not a per-sample config
        spacing = SPACINGS[i % 6]
        cfg = {"variance_type": var, "prediction_type": PREDICTIONS[i % 3], **CLIPS[i % 4]}
        a, b, g = make(DDPMScheduler, FastDDPMScheduler, cfg, spacing)
        mo = model_output(var, gen)
        t = torch.stack(steps_of(a))
        for dtype in DTYPES:
            draws.fixed = False
            draws.next(x.shape)
            draws.fixed = True
            out = b.step(mo.to(dtype), t, x.to(dtype))
            for j in range(B):
                draws.sl = slice(j, j + 1)
                ra = a.step(mo[j:j + 1].to(dtype), t[j], x[j:j + 1].to(dtype))
                draws.via = dtype
                rg = g.step(mo[j:j + 1].to(dtype).double(), t[j], x[j:j + 1].to(dtype).double())
                draws.via = None
                what = f"{cfg} {spacing} t={int(t[j])} {dtype}"
                check(out.prev_sample[j:j + 1], ra.prev_sample, rg.prev_sample, what + " prev_sample")
                check(out.pred_original_sample[j:j + 1], ra.pred_original_sample, rg.pred_original_sample, what,
                      known_gap=epsilon_x0_gap(a, mo[j:j + 1], x[j:j + 1], t[j], dtype))
            draws.sl = slice(None)
            draws.fixed = False


def test_ddim_step_sweep(monkeypatch):
    """prediction_type x clip mode x set_alpha_to_one in full; beta schedule, spacing, eta,
    use_clipped_model_output, zero-SNR rotate; every dtype, first / middle / last step, scalar and
    per-sample timesteps."""
    draws = Draws().install(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, C, 4, 4, generator=gen) * 1.5
    spacings = SPACINGS[1:5]
    for i, (pred, clip, one) in enumerate(itertools.product(PREDICTIONS, CLIPS, (True, False))):
        cfg = {"prediction_type": pred, **clip, "set_alpha_to_one": one, **BETAS[(0, 1, 2, 4)[i % 4]],
               "rescale_betas_zero_snr": i % 5 == 4}
        spacing = spacings[i % 4]
        eta, use_clipped = (0.0, 0.5, 1.0)[i % 3], bool(i % 2)
        a, b, g = make(DDIMScheduler, FastDDIMScheduler, cfg, spacing)
        mo = torch.randn(B, C, 4, 4, generator=gen)
        z = torch.randn(B, C, 4, 4, generator=gen)
        for t in steps_of(a):
            for dtype in DTYPES:
                kw = {"eta": eta, "use_clipped_model_output": use_clipped, "variance_noise": z}
                compare_step(a, b, g, draws, mo, x, t, dtype, f"{cfg} {spacing} eta={eta} {use_clipped} t={int(t)} "
                             f"{dtype}", **kw)
        if b._plan().all_ok and clip.get("sample_max_value", 1) >= 1:
            t = torch.stack(steps_of(a))
            for dtype in DTYPES:
                out = b.step(mo.to(dtype), t, x.to(dtype), eta=eta, use_clipped_model_output=use_clipped,
                             variance_noise=z.to(dtype))
                for j in range(B):
                    kw = {"eta": eta, "use_clipped_model_output": use_clipped}
                    ra = a.step(mo[j:j + 1].to(dtype), t[j], x[j:j + 1].to(dtype), variance_noise=z[j:j + 1].to(dtype),
                                **kw)
                    rg = g.step(mo[j:j + 1].to(dtype).double(), t[j], x[j:j + 1].to(dtype).double(),
                                variance_noise=z[j:j + 1].to(dtype).double(), **kw)
                    check(out.prev_sample[j:j + 1], ra.prev_sample, rg.prev_sample, f"per-sample {cfg} {dtype}")


def test_add_noise_velocity_sweep():
    """Every beta schedule, zero-SNR rescaling, dtype and timestep form diffusers takes: [B], [1], 0-dim,
    [B, 1]; and betas past 1 (diffusers' test config beta_end=2), which run the parent's code."""
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(4, C, 4, 4, generator=gen) * 2 - 1, torch.randn(4, C, 4, 4, generator=gen)
    forms = (torch.tensor([0, 1, 50, T - 1]), torch.tensor([37]), torch.tensor(T - 1), torch.tensor([[3], [9], [0], [99]]))
    for (betas, zero_snr, (parent_cls, fast_cls)) in itertools.product(
            BETAS + ({"beta_start": 0.1, "beta_end": 2.0},), (False, True),
            ((DDPMScheduler, FastDDPMScheduler), (DDIMScheduler, FastDDIMScheduler))):
        if parent_cls is DDIMScheduler and betas.get("beta_schedule") == "sigmoid":
            continue  # DDIMScheduler has no sigmoid schedule
        a, b, g = make(parent_cls, fast_cls, {**betas, "rescale_betas_zero_snr": zero_snr}, None)
        for t in forms:
            for dtype in DTYPES:
                xd, nd = x0.to(dtype), noise.to(dtype)
                what = f"{parent_cls.__name__} {betas} zero_snr={zero_snr} t={t.tolist()} {dtype}"
                check(b.add_noise(xd, nd, t), a.add_noise(xd, nd, t), g.add_noise(xd.double(), nd.double(), t),
                      what + " add_noise")
                check(b.get_velocity(xd, nd, t), a.get_velocity(xd, nd, t),
                      g.get_velocity(xd.double(), nd.double(), t), what + " velocity")
    # mixed dtypes: the parent's result dtype (promotion), our accuracy
    a, b, g = make(DDPMScheduler, FastDDPMScheduler, {}, None)
    t = forms[0]
    out = b.add_noise(x0.half(), noise, t)
    assert out.dtype == a.add_noise(x0.half(), noise, t).dtype == torch.float32
    check(out, a.add_noise(x0.half(), noise, t), g.add_noise(x0.half().double(), noise.double(), t), "mixed dtypes")


def _loop(s, steps, x, model, dtype, **kw):
    x = x.to(dtype)
    for t in steps:
        x = s.step(model(x, t), t, x, **kw).prev_sample
    return x


def _eps_model(x, t):
    """A smooth stand-in for a network (diffusers' tests use the same form)."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return x * t / (t + 1)


LOOP_1000 = ({"num_train_timesteps": 1000},
             {"num_train_timesteps": 1000, "prediction_type": "v_prediction", "variance_type": "fixed_large",
              "clip_sample": False})


@pytest.mark.parametrize("cfg, dtype", [(LOOP_1000[0], d) for d in DTYPES] + [(LOOP_1000[1], torch.float32)],
                         ids=("default-fp32", "default-fp16", "default-bf16", "v-fixed_large-fp32"))
def test_ddpm_full_loop_1000_steps(monkeypatch, cfg, dtype):
    """diffusers' own full-loop setting (1000 steps, clip_sample=True, fixed_small) with the variance noise,
    in every dtype, and v-prediction with fixed_large; final sample by the flash-attention rule."""
    a, b, g = DDPMScheduler(**cfg), FastDDPMScheduler(**cfg), to64(DDPMScheduler(**cfg))
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(4))
    outs = []
    for s, d in ((b, dtype), (a, dtype), (g, torch.float64)):
        draws = Draws(seed=5).install(monkeypatch)  # the same noise sequence for each loop
        draws.via = dtype  # the float64 run sees the tested dtype's rounding of the same draws
        outs.append(_loop(s, range(999, -1, -1), x.to(dtype), _eps_model, d))
    check(*outs, f"DDPM 1000-step loop {cfg} {dtype}")


@pytest.mark.parametrize("spacing", ("leading", "trailing", "linspace"))
def test_ddim_and_ddpm_full_loop_50_steps(monkeypatch, spacing):
    """DDIM (eta 0 and 1, diffusers' default clip_sample=True) and DDPM over 50 respaced steps, every dtype."""
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(6))
    for parent_cls, fast_cls, kw in ((DDIMScheduler, FastDDIMScheduler, {"eta": 0.0}),
                                     (DDIMScheduler, FastDDIMScheduler, {"eta": 1.0}),
                                     (DDPMScheduler, FastDDPMScheduler, {})):
        cfg = {"num_train_timesteps": 1000, "timestep_spacing": spacing}
        for dtype in DTYPES:
            outs = []
            for s, d in ((fast_cls(**cfg), dtype), (parent_cls(**cfg), dtype), (to64(parent_cls(**cfg)), torch.float64)):
                s.set_timesteps(50)
                draws = Draws(seed=7).install(monkeypatch)
                draws.via = dtype
                outs.append(_loop(s, s.timesteps, x, _eps_model, d, **kw))
            check(*outs, f"{parent_cls.__name__} 50-step loop {spacing} {kw} {dtype}")


def test_parent_behaviours_kept():
    """What diffusers' own suite checks of the parent, on the Fast classes: no raise where the parent runs."""
    x, mo = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8) * 0.1
    # betas above 1 (beta_end=2): the parent runs them; so do we (its code), with its result
    for cls, fast in ((DDPMScheduler, FastDDPMScheduler), (DDIMScheduler, FastDDIMScheduler)):
        a, b = cls(beta_start=0.1, beta_end=2.0), fast(beta_start=0.1, beta_end=2.0)
        if cls is DDIMScheduler:
            a.set_timesteps(50), b.set_timesteps(50)
        torch.testing.assert_close(b.step(mo, 0, x).prev_sample, a.step(mo, 0, x).prev_sample, equal_nan=True)
    # an unknown variance_type: the parent's fixed_small
    a, b = DDPMScheduler(variance_type="other"), FastDDPMScheduler(variance_type="other")
    for t in (0, 500, 999):
        ra = a.step(mo, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        rb = b.step(mo, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        torch.testing.assert_close(rb, ra, rtol=2e-5, atol=2e-6)
    # zero terminal SNR with an epsilon model: finite at t = 0; at the last step the parent's value
    # (finite with clipping, non-finite without), never an exception
    for clip in (True, False):
        a = DDPMScheduler(rescale_betas_zero_snr=True, clip_sample=clip)
        b = FastDDPMScheduler(rescale_betas_zero_snr=True, clip_sample=clip)
        assert torch.isfinite(b.step(mo, 0, x).prev_sample).all()
        ra, rb = a.step(mo, 999, x, generator=torch.Generator().manual_seed(0)), b.step(
            mo, 999, x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(rb.prev_sample, ra.prev_sample, equal_nan=True)
        assert torch.isfinite(rb.prev_sample).all() == clip
        a = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=clip)
        b = FastDDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=clip)
        a.set_timesteps(10), b.set_timesteps(10)
        for t in a.timesteps:
            torch.testing.assert_close(b.step(mo, t, x).prev_sample, a.step(mo, t, x).prev_sample, equal_nan=True)
        with pytest.raises(ValueError, match="timestep"):
            b.step(mo, a.timesteps[:4], x)  # per-sample (our extension) where a step is the parent's: says so
    with pytest.raises(ValueError, match="timestep"):  # likewise in a configuration the parent runs
        FastDDPMScheduler(thresholding=True, sample_max_value=0.5).step(mo, torch.tensor([5, 4, 3, 2]), x)
    # one-element timestep tensors broadcast over the batch, in add_noise and step
    for cls, fast in ((DDPMScheduler, FastDDPMScheduler), (DDIMScheduler, FastDDIMScheduler)):
        a, b = cls(), fast()
        a.set_timesteps(100), b.set_timesteps(100)
        t = a.timesteps[5][None]
        torch.testing.assert_close(b.add_noise(x, mo, t), a.add_noise(x, mo, t), rtol=1e-5, atol=1e-6)
        kw = lambda: {"generator": torch.Generator().manual_seed(0)} if cls is DDPMScheduler else {}  # noqa: E731
        torch.testing.assert_close(b.step(mo, t, x, **kw()).prev_sample, a.step(mo, t, x, **kw()).prev_sample,
                                   rtol=1e-5, atol=1e-5)
    # DDIM eta < 0 (no noise, shorter direction): the parent's
    a, b = DDIMScheduler(), FastDDIMScheduler()
    a.set_timesteps(10), b.set_timesteps(10)
    torch.testing.assert_close(b.step(mo, 500, x, eta=-0.5).prev_sample, a.step(mo, 500, x, eta=-0.5).prev_sample)
    # trained_betas shorter than num_train_timesteps: steps inside the betas run; outside, the parent raises
    a = DDPMScheduler(trained_betas=[0.1, 0.3])
    b = FastDDPMScheduler(trained_betas=[0.1, 0.3])
    torch.testing.assert_close(b.step(mo, 1, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                               a.step(mo, 1, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    with pytest.raises(IndexError):
        a.step(mo, 5, x)
    with pytest.raises(IndexError):
        b.step(mo, 5, x)


def test_timesteps_assigned_after_set_up():
    """A pipeline may assign a slice of self.timesteps (img2img): the parent's DDPM then steps to the next
    entry of the new tensor, and its last entry to t = -1; ours follows."""
    a, b, g = make(DDPMScheduler, FastDDPMScheduler, {"clip_sample": False}, {"timestep_spacing": "leading"})
    x, mo = torch.randn(B, C, 4, 4), torch.randn(B, C, 4, 4)
    b.step(mo, a.timesteps[0], x)  # plan built from the full tensor
    for s in (a, b, g):
        s.timesteps = s.timesteps[:4]  # ends at t > 0: that step goes to abar_prev = 1
    t = a.timesteps[-1]
    kw = lambda: {"generator": torch.Generator().manual_seed(0)}  # noqa: E731
    check(b.step(mo, t, x, **kw()).prev_sample, a.step(mo, t, x, **kw()).prev_sample,
          g.step(mo.double(), t, x.double(), **kw()).prev_sample, "assigned timesteps")


def test_learned_variance_without_its_half_and_the_debug_note(caplog):
    """A learned variance type given only the mean half: the parent runs at t = 0 (no variance read) and
    raises at t > 0; so do we, its code. The switch to the parent's code is logged once, at debug level."""
    x, mo = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    a, b = DDPMScheduler(variance_type="learned_range"), FastDDPMScheduler(variance_type="learned_range")
    with caplog.at_level("DEBUG", logger="ddpm_fast.compat.diffusers"):
        for _ in range(3):
            torch.testing.assert_close(b.step(mo, 0, x).prev_sample, a.step(mo, 0, x).prev_sample)
    notes = [r for r in caplog.records if r.name == "ddpm_fast.compat.diffusers"]
    assert len(notes) == 1 and "variance half" in notes[0].getMessage()
    with pytest.raises(TypeError):
        a.step(mo, 5, x)
    with pytest.raises(TypeError):
        b.step(mo, 5, x)
