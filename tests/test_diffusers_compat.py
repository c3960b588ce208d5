"""FastDDPMScheduler / FastDDIMScheduler against diffusers' own DDPMScheduler / DDIMScheduler.

Each result is compared by the flash-attention rule (docs/design.md): against the parent run in float64
(its float32 betas, cumprod and inputs in float64), our float32 error is at most 2x the float32
parent's error plus 1e-6 of the output's scale. Randomness: the same generator seed (the same
variance noise draw) or explicit variance_noise.
"""
import importlib
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (extra 'diffusers')")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from ddpm_fast.compat.diffusers import FastDDIMScheduler, FastDDPMScheduler  # noqa: E402
from _helpers import CountParentSteps, NoHostSync, make_schedulers, scheduler_model_output  # noqa: E402

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
DDPM_VARS = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
CLIP_MODES = ({"clip_sample": False}, {"clip_sample": True}, {"clip_sample": True, "clip_sample_range": 2.0},
              {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5})
SPACINGS = (None, {"timestep_spacing": "leading"}, {"timestep_spacing": "leading", "steps_offset": 1},
            {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}, "custom")
T = 100
B, C = 3, 2


def check(ours, parent32, parent64, what):
    gold = parent64.double()
    err_ours = (ours.double() - gold).abs().max()
    err_parent = (parent32.double() - gold).abs().max()
    assert ours.dtype == parent32.dtype and ours.shape == parent32.shape, what
    assert err_ours <= 2 * err_parent + 1e-6 * gold.abs().max(), f"{what}: {err_ours:.3g} vs parent {err_parent:.3g}"


def model_output(var, gen):
    """[B, C or 2C, 4, 4] for diffusers' variance_type var."""
    return scheduler_model_output(var, gen, B, C)


def make(parent_cls, fast_cls, cfg, spacing, n=7):
    """(parent, ours, the parent in float64) over T training steps, n inference steps."""
    return make_schedulers(parent_cls, fast_cls, cfg, spacing, n, T)


def test_ddpm_step_matches_parent(monkeypatch):
    """Every beta schedule x variance type x prediction type; clip modes and spacings rotate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, 4, 4, generator=gen) * 1.5
    i = 0
    for beta in BETA_SCHEDULES:
        for var in DDPM_VARS:
            for pred in PREDICTIONS:
                clip, spacing = CLIP_MODES[i % 4], SPACINGS[i % 6]
                i += 1
                a, b, g = make(DDPMScheduler, FastDDPMScheduler,
                               {"beta_schedule": beta, "variance_type": var, "prediction_type": pred, **clip}, spacing)
                mo = model_output(var, gen)
                ts = a.timesteps
                for t in (ts[0], ts[len(ts) // 2], ts[-2], ts[-1]):
                    spy = CountParentSteps(monkeypatch, DDPMScheduler)
                    rb = b.step(mo, t, x, generator=torch.Generator().manual_seed(1))
                    monkeypatch.undo()
                    assert spy.n == (1 if var == "fixed_large_log" else 0), "fused path expected"
                    ra = a.step(mo, t, x, generator=torch.Generator().manual_seed(1))
                    rg = g.step(mo.double(), t, x.double(), generator=torch.Generator().manual_seed(1))
                    what = f"{beta} {var} {pred} {clip} {spacing} t={int(t)}"
                    if var == "fixed_large_log":  # parent takes sqrt(log beta): NaN; we run the parent
                        torch.testing.assert_close(rb.prev_sample, ra.prev_sample, equal_nan=True)
                        continue
                    check(rb.prev_sample, ra.prev_sample, rg.prev_sample, what + " prev_sample")
                    check(rb.pred_original_sample, ra.pred_original_sample, rg.pred_original_sample, what + " x0")


def test_ddpm_final_step_noise_when_last_t_is_positive():
    """steps_offset=1: the parent's last step is t = 1 > 0 and still adds noise (fixed_large: beta)."""
    for var in ("fixed_large", "learned", "learned_range", "fixed_small"):
        a, b, g = make(DDPMScheduler, FastDDPMScheduler, {"variance_type": var, "clip_sample": False},
                       {"timestep_spacing": "leading", "steps_offset": 1})
        assert int(a.timesteps[-1]) == 1
        gen = torch.Generator().manual_seed(3)
        x, mo = torch.randn(B, C, 4, 4, generator=gen), model_output(var, gen)
        ra = a.step(mo, a.timesteps[-1], x, generator=torch.Generator().manual_seed(4))
        rb = b.step(mo, a.timesteps[-1], x, generator=torch.Generator().manual_seed(4))
        rg = g.step(mo.double(), a.timesteps[-1], x.double(), generator=torch.Generator().manual_seed(4))
        check(rb.prev_sample, ra.prev_sample, rg.prev_sample, var)


def test_ddim_step_matches_parent(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, C, 4, 4, generator=gen) * 1.5
    spacings = ({"timestep_spacing": "leading"}, {"timestep_spacing": "leading", "steps_offset": 1},
                {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"})
    i = 0
    for beta in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        for pred in PREDICTIONS:
            for clip in CLIP_MODES:
                spacing = spacings[i % 4]
                one = i % 3 != 0
                use_clipped, eta = bool(i % 2), (0.0, 0.6, 1.0)[i % 3]
                i += 1
                a, b, g = make(DDIMScheduler, FastDDIMScheduler,
                               {"beta_schedule": beta, "prediction_type": pred, "set_alpha_to_one": one, **clip},
                               spacing, n=10)
                mo = torch.randn(B, C, 4, 4, generator=gen)
                plan_ok = b._plan().all_ok
                ts = a.timesteps
                for t in (ts[0], ts[len(ts) // 2], ts[-2], ts[-1]):
                    z = torch.randn(B, C, 4, 4, generator=gen)
                    kw = dict(eta=eta, use_clipped_model_output=use_clipped, variance_noise=z)
                    spy = CountParentSteps(monkeypatch, DDIMScheduler)
                    rb = b.step(mo, t, x, **kw)
                    monkeypatch.undo()
                    if plan_ok:
                        assert spy.n == 0, "fused path expected"
                    ra = a.step(mo, t, x, **kw)
                    rg = g.step(mo.double(), t, x.double(), **{**kw, "variance_noise": z.double()})
                    what = f"{beta} {pred} {clip} {spacing} one={one} clipped_eps={use_clipped} eta={eta} t={int(t)}"
                    check(rb.prev_sample, ra.prev_sample, rg.prev_sample, what + " prev_sample")
                    check(rb.pred_original_sample, ra.pred_original_sample, rg.pred_original_sample, what + " x0")


def test_ddim_spacings_fused_or_parent(monkeypatch):
    """Every spacing runs fused, except set_alpha_to_one=False with a last step at t = 0 (abar_0 -> abar_0),
    which runs the parent at that step."""
    cases = (("leading", True, 0, True), ("trailing", True, 0, True), ("linspace", True, 0, True),
             ("leading", False, 1, True), ("leading", False, 0, False), ("linspace", False, 0, False))
    for spacing, one, offset, fused in cases:
        a, b, _ = make(DDIMScheduler, FastDDIMScheduler, {"set_alpha_to_one": one},
                       {"timestep_spacing": spacing, "steps_offset": offset}, n=10)
        assert b._plan().all_ok is fused, spacing
        x, mo = torch.randn(B, C, 4, 4), torch.randn(B, C, 4, 4)
        spy = CountParentSteps(monkeypatch, DDIMScheduler)
        for t in a.timesteps:
            b.step(mo, t, x)
        monkeypatch.undo()
        assert spy.n == (0 if fused else 1), (spacing, one, offset)
        if not fused:
            with pytest.raises(ValueError, match="timestep"):
                b.step(mo, a.timesteps[:B], x)


def test_ddim_direction_precise_near_abar_one():
    """The last DDIM step to abar_0 ~ 1: sqrt(1 - abar_prev - sigma^2) would cancel in float32; the ops
    compute it as sqrt(1 - abar_prev) sqrt(1 - eta^2 beta_t / (1 - abar_t)) and match the parent."""
    gen = torch.Generator().manual_seed(7)
    x, mo = torch.randn(B, C, 4, 4, generator=gen) * 1.5, torch.randn(B, C, 4, 4, generator=gen)
    a, b, g = make(DDIMScheduler, FastDDIMScheduler, {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
                                                      "clip_sample": False, "set_alpha_to_one": False},
                   {"timestep_spacing": "leading", "steps_offset": 1}, n=10)
    b.backend = "reference"  # the formula of reference.py (fused backends may differ)
    ra, rb, rg = (s.step(m, 1, xx) for s, m, xx in ((a, mo, x), (b, mo, x), (g, mo.double(), x.double())))
    check(rb.prev_sample, ra.prev_sample, rg.prev_sample, "DDIM last step to abar_0")


def test_ddim_eta_above_one_off_the_fused_step_runs_the_parent(monkeypatch):
    """eta > 1 where the step is composed of ops (use_clipped_model_output, clip_sample_range != 1): the parent's
    direction term takes the square root of a negative number (nan) where the op clamps it at 0, so the parent
    runs; on the fused step the op runs (no raise either way)."""
    a, b, _ = make(DDIMScheduler, FastDDIMScheduler, {"clip_sample": True, "clip_sample_range": 2.0}, None, n=10)
    for s in (a, b):
        s.set_timesteps(10)
    gen = torch.Generator().manual_seed(11)
    x, mo, z = (torch.randn(B, C, 4, 4, generator=gen) for _ in range(3))
    t = a.timesteps[3]
    spy = CountParentSteps(monkeypatch, DDIMScheduler)
    rb = b.step(mo, t, x, eta=1.5, use_clipped_model_output=True, variance_noise=z)
    monkeypatch.undo()
    assert spy.n == 1
    ra = a.step(mo, t, x, eta=1.5, use_clipped_model_output=True, variance_noise=z)
    torch.testing.assert_close(rb.prev_sample, ra.prev_sample, equal_nan=True, rtol=0, atol=0)
    spy = CountParentSteps(monkeypatch, DDIMScheduler)
    b.step(mo, t, x, eta=0.5, use_clipped_model_output=True, variance_noise=z)
    monkeypatch.undo()
    assert spy.n == 0, "the composed path expected for eta <= 1"


def test_compat_writes_no_ddim_update_of_its_own():
    """compat/diffusers.py composes ops for every DDIM variant: it reads none of the DDIM-only table columns
    (the direction term's sqrt(1 - abar_prev), beta) and has no eps formula."""
    import inspect

    from ddpm_fast.compat import diffusers as compat

    text = inspect.getsource(compat)
    for needle in ("sqrt_one_minus_alphas_cumprod_prev", '"betas"', "eta**2", "eta * eta", "/ sqrt_1m_abar"):
        assert needle not in text, needle


def test_fast_output_is_the_dataclass_output():
    """The outputs built without the dataclass __init__ behave as diffusers' own (keys, attributes, indexing,
    to_tuple, equality, replacement)."""
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

    from ddpm_fast.compat.diffusers import _output

    prev, pred = torch.randn(2, 3), torch.randn(2, 3)
    for cls in (DDPMSchedulerOutput, DDIMSchedulerOutput):
        ours, theirs = _output(cls, prev, pred), cls(prev_sample=prev, pred_original_sample=pred)
        assert type(ours) is cls and list(ours.keys()) == list(theirs.keys())
        assert ours.prev_sample is prev and ours.pred_original_sample is pred
        assert ours[0] is prev and ours["pred_original_sample"] is pred and ours.to_tuple() == (prev, pred)
        assert ours == theirs and repr(ours) == repr(theirs)
        ours.prev_sample = pred  # BaseOutput keeps the attribute and the item in step
        assert ours["prev_sample"] is pred


def test_outside_reads_the_range_once():
    from ddpm_fast.compat.diffusers import _outside

    for n in (1, 3, 64, 65, 500):
        t = torch.arange(n)
        assert not _outside(t, n) and _outside(t, n - 1)
        assert _outside(torch.cat([t, torch.tensor([-1])]), n + 1)
    assert not _outside(torch.tensor(4), 5) and _outside(torch.tensor(5), 5)
    assert not _outside(torch.zeros(0, dtype=torch.int64), 5)


def test_host_timestep_steps_repeat_exactly():
    """The cached row tensors and the host sqrt(abar_prev) of the clip swap: the same step twice gives the same
    result, equal to the per-sample (device-table) path's to float32 rounding."""
    a, b, g = make(DDIMScheduler, FastDDIMScheduler, {"clip_sample": True}, {"timestep_spacing": "leading"}, n=10)
    gen = torch.Generator().manual_seed(12)
    x, mo = torch.randn(B, C, 4, 4, generator=gen) * 3, torch.randn(B, C, 4, 4, generator=gen) * 3
    for t in a.timesteps:
        first, second = b.step(mo, t, x).prev_sample, b.step(mo, int(t), x).prev_sample
        assert torch.equal(first, second)
        per_sample = b.step(mo, t.repeat(B), x).prev_sample
        torch.testing.assert_close(first, per_sample, rtol=1e-6, atol=1e-6)
        check(first, a.step(mo, t, x).prev_sample, g.step(mo.double(), t, x.double()).prev_sample, f"t={int(t)}")


def test_per_sample_timesteps(monkeypatch):
    """A [B] timestep tensor steps each sample at its own t, equal to the parent's per-sample steps."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(B, C, 4, 4, generator=gen)
    for var in ("fixed_small", "learned_range"):
        a, b, _ = make(DDPMScheduler, FastDDPMScheduler, {"variance_type": var}, {"timestep_spacing": "trailing"})
        mo, z = model_output(var, gen), torch.randn(B, C, 4, 4, generator=gen)
        t = a.timesteps[[0, 3, 6]]  # 6 is the last step (t > 0 under trailing: extra noise there)
        out = b.step(mo, t, x, generator=torch.Generator().manual_seed(9))
        z = torch.randn(B, C, 4, 4, generator=torch.Generator().manual_seed(9))
        for i in range(B):
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, i=i, **kw: z[i:i + 1])
            ref = a.step(mo[i:i + 1], t[i], x[i:i + 1])
            monkeypatch.undo()
            torch.testing.assert_close(out.prev_sample[i:i + 1], ref.prev_sample, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.pred_original_sample[i:i + 1], ref.pred_original_sample,
                                       rtol=1e-5, atol=1e-5)
    a, b, _ = make(DDIMScheduler, FastDDIMScheduler, {}, {"timestep_spacing": "leading"}, n=10)
    mo, z = torch.randn(B, C, 4, 4, generator=gen), torch.randn(B, C, 4, 4, generator=gen)
    t = a.timesteps[[0, 4, 9]]
    out = b.step(mo, t, x, eta=0.5, variance_noise=z)
    for i in range(B):
        ref = a.step(mo[i:i + 1], t[i], x[i:i + 1], eta=0.5, variance_noise=z[i:i + 1])
        torch.testing.assert_close(out.prev_sample[i:i + 1], ref.prev_sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="timestep"):
        b.step(mo, torch.tensor([90, 3, 0]), x)  # 3 is not one of the scheduler's timesteps


def test_add_noise_and_velocity_match_parent():
    gen = torch.Generator().manual_seed(10)
    x0, noise = torch.rand(6, C, 4, 4, generator=gen) * 2 - 1, torch.randn(6, C, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 9, 50, 98, 99])
    for beta in BETA_SCHEDULES:
        for zero_snr in (False, True):
            for parent_cls, fast_cls in ((DDPMScheduler, FastDDPMScheduler), (DDIMScheduler, FastDDIMScheduler)):
                if parent_cls is DDIMScheduler and beta == "sigmoid":
                    continue  # DDIMScheduler has no sigmoid schedule
                a, b, g = make(parent_cls, fast_cls, {"beta_schedule": beta, "rescale_betas_zero_snr": zero_snr}, None)
                what = f"{parent_cls.__name__} {beta} zero_snr={zero_snr}"
                check(b.add_noise(x0, noise, t), a.add_noise(x0, noise, t), g.add_noise(x0.double(), noise.double(), t),
                      what + " add_noise")
                check(b.get_velocity(x0, noise, t), a.get_velocity(x0, noise, t),
                      g.get_velocity(x0.double(), noise.double(), t), what + " velocity")


def test_bf16_add_noise_keeps_float32_tables():
    """The parent casts alphas_cumprod to bf16 (1 - 1e-4 rounds to 1): x_t == x_0 at small t. Ours does not."""
    parent, ours = DDPMScheduler(), FastDDPMScheduler()
    x0 = (torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(11)) * 2 - 1).bfloat16()
    noise = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(12)).bfloat16()
    t = torch.arange(10)
    theirs, mine = parent.add_noise(x0, noise, t), ours.add_noise(x0, noise, t)
    assert torch.equal(theirs, x0)  # the parent drops the noise entirely
    assert mine.dtype == torch.bfloat16
    abar = torch.cumprod(1 - ours.betas.double(), 0)[t].reshape(-1, 1, 1, 1)  # float64 from the same betas
    exact = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    # Every sample moved off x_0, and we are at most bf16 rounding (2^-8 relative) from the exact x_t.
    for i in range(10):
        assert not torch.equal(mine[i], x0[i]), f"t={i}"
    assert ((mine.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-12).all()
    assert ((theirs.double() - exact).abs().max()) > ((mine.double() - exact).abs().max())


def test_config_roundtrip(tmp_path):
    a = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1)
    b = FastDDIMScheduler.from_config(a.config)
    assert isinstance(b, DDIMScheduler) and b.config.prediction_type == "v_prediction"
    b.save_config(tmp_path)
    c = FastDDPMScheduler.from_pretrained(tmp_path)
    assert isinstance(c, FastDDPMScheduler) and c.config.beta_schedule == "scaled_linear"


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "ddpm_fast.compat.diffusers")
    with pytest.raises(ImportError, match=r"ddpm-fast\[diffusers\]"):
        importlib.import_module("ddpm_fast.compat.diffusers")


def test_fused_paths_do_not_sync():
    """With per-sample timesteps (what a CUDA loop passes), step / add_noise / get_velocity read no tensor
    value on the host. validate=False stands in for CUDA (the CPU range check is a deliberate host read)."""
    x, z = torch.randn(B, C, 4, 4), torch.randn(B, C, 4, 4)
    for var in ("fixed_small", "learned_range"):
        a, b, _ = make(DDPMScheduler, FastDDPMScheduler, {"variance_type": var},
                       {"timestep_spacing": "leading", "steps_offset": 1})
        b.validate = False
        mo, t = model_output(var, torch.Generator().manual_seed(0)), a.timesteps[[0, 3, 6]]
        b.step(mo, a.timesteps[2], x)  # builds the respaced table (once per set_timesteps, on the host)
        with NoHostSync():
            b.step(mo, t, x, generator=torch.Generator().manual_seed(1))
            b.add_noise(x, z, t)
            b.get_velocity(x, z, t)
    a, b, _ = make(DDIMScheduler, FastDDIMScheduler, {}, {"timestep_spacing": "trailing"}, n=10)
    b.validate = False
    b.step(z, a.timesteps[0], x)
    for use_clipped in (False, True):
        with NoHostSync():
            b.step(z, a.timesteps[[0, 4, 9]], x, eta=0.5, use_clipped_model_output=use_clipped, variance_noise=z)
