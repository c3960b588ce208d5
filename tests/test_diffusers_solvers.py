"""The drop-in solver schedulers (ddpm_fast.compat.diffusers_solvers) against diffusers' own.

Full sampling loops (10 / 20 / 25 / 50 steps) with a deterministic stand-in model, every fused
configuration, fp32 / fp16 / bf16, by the flash-attention rule (docs/design.md): against the parent run in
float64, our error is at most 2x the parent's error in the tested dtype plus a floor. The float64 parent:
its sigmas in float64 and its module's ``torch.float32`` read as float64 (the parents upcast the sample
to float32 inside step). Noise: the same draws for all three runs (diffusers' randn_tensor replaced).
"""
import math
import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (extra 'diffusers')")
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                       EulerDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers import (scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete,  # noqa: E402
                                  scheduling_euler_discrete, scheduling_unipc_multistep)

from _helpers import CountParentSteps  # noqa: E402
from ddpm_fast.compat import diffusers_solvers as compat  # noqa: E402
from ddpm_fast.compat.diffusers_solvers import (FastDPMSolverMultistepScheduler,  # noqa: E402
                                                FastEulerAncestralDiscreteScheduler, FastEulerDiscreteScheduler,
                                                FastUniPCMultistepScheduler)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
PAIRS = {
    "dpm": (DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler, scheduling_dpmsolver_multistep),
    "unipc": (UniPCMultistepScheduler, FastUniPCMultistepScheduler, scheduling_unipc_multistep),
    "euler": (EulerDiscreteScheduler, FastEulerDiscreteScheduler, scheduling_euler_discrete),
    "euler_a": (EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler,
                scheduling_euler_ancestral_discrete),
}
SHAPE = (2, 3, 6, 6)
NUM_TRAIN = 1000


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Torch64(types.SimpleNamespace):
    """The parent module's ``torch`` with float32 read as float64: its step's sample.to(torch.float32)."""
    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


class Draws:
    """diffusers' randn_tensor replaced in the parent's module and ours: a fixed float32 draw per call (the
    same sequence in every run), rounded through ``via`` (the tested dtype, for the float64 run)."""

    def __init__(self, seed=0, via=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.via = via
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, **kw):
        self.calls += 1
        z = torch.randn(tuple(shape), generator=self.gen)
        if self.via is not None:
            z = z.to(self.via)
        return z.to(device=device, dtype=dtype or torch.float32)


def to64(s):
    """After set_timesteps: the parent's sigmas (the float32 schedule both compute from) in float64."""
    s.sigmas = s.sigmas.double()
    return s


class StandIn:
    """A deterministic denoiser: x0 = 0.8 tanh(pattern + 0.3 x), the output of the configured prediction
    type at timestep t (alphas_cumprod interpolated at a fractional t), computed in x's dtype."""

    def __init__(self, prediction_type="epsilon", channels_out=None, x0_scale=0.8):
        betas = torch.linspace(0.0001, 0.02, NUM_TRAIN, dtype=torch.float64)
        self.abar = torch.cumprod(1 - betas, 0).numpy()
        self.pattern = torch.sin(torch.arange(math.prod(SHAPE[1:]), dtype=torch.float64) * 0.37).reshape(SHAPE[1:])
        self.prediction_type = prediction_type
        self.channels_out = channels_out
        self.x0_scale = x0_scale  # > 1: thresholding has work to do

    def __call__(self, x, t):
        if self.prediction_type == "flow_prediction":  # x_t = (1 - s) x0 + s eps, t = s * 1000
            s = min(max(float(t) / NUM_TRAIN, 1e-3), 1 - 1e-3)
            a = 1 - s
        else:
            abar = float(np.interp(float(t), np.arange(NUM_TRAIN), self.abar))
            a, s = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = self.x0_scale * torch.tanh(self.pattern.to(x.dtype) + 0.3 * x)
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "sample": x0, "original_sample": x0, "v_prediction": a * eps - s * x0,
               "flow_prediction": eps - x0}[self.prediction_type]
        if self.channels_out:  # a learned-variance model: eps and the variance channels
            out = torch.cat([out, torch.zeros_like(out)[:, : self.channels_out - out.shape[1]]], 1)
        return out


def run_loop(scheduler, n, dtype, *, model, draws, module, monkeypatch, begin=0, **step_kw):
    """A pipeline-style loop; returns (final sample, the per-step prev_samples)."""
    monkeypatch.setattr(module, "randn_tensor", draws, raising=False)
    monkeypatch.setattr(compat, "randn_tensor", draws)
    scheduler.set_timesteps(n)
    if dtype == torch.float64:
        to64(scheduler)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x * float(scheduler.init_noise_sigma)
    if draws.via is not None:  # the float64 run starts from the tested dtype's rounding of x, as the others
        x = x.to(draws.via)
    x = x.to(dtype)
    timesteps = scheduler.timesteps
    if begin:
        scheduler.set_begin_index(begin)
        timesteps = timesteps[begin:]
    outs = []
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(x_in, t), t, x, **step_kw).prev_sample
        outs.append(x)
    monkeypatch.undo()
    return x, outs


def check(ours, parent, gold, what):
    assert ours.dtype == parent.dtype and ours.shape == parent.shape, f"{what}: {ours.dtype} vs {parent.dtype}"
    gold = gold.double()
    assert torch.isfinite(gold).all(), what
    err_ours = (ours.double() - gold).abs().max().item()
    err_parent = (parent.double() - gold).abs().max().item()
    floor = FLOOR[ours.dtype] * max(gold.abs().max().item(), 1.0)
    assert err_ours <= 2 * err_parent + floor, f"{what}: error {err_ours:.3g} vs parent {err_parent:.3g}"


def compare(kind, cfg, n, dtype, monkeypatch, begin=0, expect_fused=True, **step_kw):
    parent_cls, fast_cls, module = PAIRS[kind]
    cfg = {"num_train_timesteps": NUM_TRAIN, **cfg}
    model = StandIn(cfg.get("prediction_type", "epsilon"), channels_out=6 if cfg.get("variance_type") else None,
                    x0_scale=1.6 if cfg.get("thresholding") else 0.8)
    spy = CountParentSteps(monkeypatch, parent_cls)
    ours, our_steps = run_loop(fast_cls(**cfg), n, dtype, model=model, draws=Draws(1), module=module,
                               monkeypatch=monkeypatch, begin=begin, **step_kw)
    assert (spy.n == 0) == expect_fused, f"{kind} {cfg}: parent steps {spy.n}"
    parent, parent_steps = run_loop(parent_cls(**cfg), n, dtype, model=model, draws=Draws(1), module=module,
                                    monkeypatch=monkeypatch, begin=begin, **step_kw)
    monkeypatch.setattr(module, "torch", _Torch64())
    gold, gold_steps = run_loop(parent_cls(**cfg), n, torch.float64, model=model, draws=Draws(1, via=dtype),
                                module=module, monkeypatch=monkeypatch, begin=begin, **step_kw)
    what = f"{kind} {cfg} n={n} {dtype} {step_kw}"
    for i in sorted({0, len(gold_steps) // 2, len(gold_steps) - 1}):
        check(our_steps[i], parent_steps[i], gold_steps[i], f"{what} step {i}")
    return ours, parent


# every fused configuration; the step counts rotate over 10 / 20 / 25 / 50
DPM_CONFIGS = [
    {},
    {"solver_order": 3},
    {"solver_order": 1},
    {"solver_type": "heun"},
    {"solver_order": 3, "prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
    {"algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "solver_order": 3},
    {"use_karras_sigmas": True, "solver_order": 3},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, "solver_order": 3},
    {"use_lu_lambdas": True},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False, "solver_order": 3},
    {"euler_at_final": True, "lower_order_final": False},
    {"timestep_spacing": "leading", "steps_offset": 1, "solver_order": 3},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "solver_order": 3, "algorithm_type": "sde-dpmsolver++"},
    {"variance_type": "learned_range"},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0, "solver_order": 3},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "algorithm_type": "sde-dpmsolver++"},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5, "solver_order": 3},
    {"thresholding": True, "prediction_type": "v_prediction"},
    # the noise-prediction DPM-Solver (epsilon in the history; diffusers refuses final_sigmas_type "zero")
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "prediction_type": "sample"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "use_karras_sigmas": True, "solver_order": 3,
     "euler_at_final": True},  # (Karras ends on sigma_min twice: h = 0, NaN above order 1, the parent's too)
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"},
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
]
UNIPC_CONFIGS = [
    {},
    {"solver_order": 3},
    {"solver_order": 1},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"predict_x0": False, "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"prediction_type": "v_prediction", "solver_order": 3},
    {"prediction_type": "sample"},
    {"disable_corrector": [0, 3, 4], "solver_order": 3},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},  # (to sigma 0: the parent's inf)
    {"use_karras_sigmas": True, "solver_order": 3},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 5.0},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "solver_order": 3, "solver_type": "bh1",
     "final_sigmas_type": "sigma_min"},
    {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5, "solver_order": 3},
    {"thresholding": True, "predict_x0": False, "final_sigmas_type": "sigma_min"},  # (no effect there)
]
EULER_CONFIGS = [
    {},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"interpolation_type": "log_linear"},
    {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"timestep_type": "continuous", "prediction_type": "v_prediction", "use_karras_sigmas": True,
     "fp32_only": True},  # (the stand-in overflows in 16 bits at these timesteps, in the parent too)
]
EULER_A_CONFIGS = [
    {},
    {"prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
]
STEPS = (10, 20, 25, 50)
CASES = ([("dpm", c) for c in DPM_CONFIGS] + [("unipc", c) for c in UNIPC_CONFIGS]
         + [("euler", c) for c in EULER_CONFIGS] + [("euler_a", c) for c in EULER_A_CONFIGS])


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp32", "fp16", "bf16"))
def test_full_loops_match_the_float64_parent(monkeypatch, dtype):
    """Every fused configuration, one step count each (rotating), against the float64 parent."""
    for i, (kind, cfg) in enumerate(CASES):
        n = STEPS[i % 4] if dtype == torch.float32 else STEPS[i % 3]  # 16-bit: up to 25 steps (runtime)
        if cfg.get("fp32_only") and dtype != torch.float32:
            continue
        compare(kind, {k: v for k, v in cfg.items() if k != "fp32_only"}, n, dtype, monkeypatch)


@pytest.mark.parametrize("n", STEPS)
def test_euler_churn_loops(monkeypatch, n):
    """s_churn / s_tmin / s_tmax / s_noise: gamma > 0 on part of the loop only (noise drawn only there)."""
    compare("euler", {}, n, torch.float32, monkeypatch, s_churn=1.0, s_tmin=0.5, s_tmax=20.0, s_noise=1.003)


@pytest.mark.parametrize("kind", ["dpm", "unipc", "euler", "euler_a"])
def test_begin_index_loop(monkeypatch, kind):
    """img2img: set_begin_index(k) and the loop over timesteps[k:] (the multistep warm-up starts there)."""
    cfg = {"solver_order": 3} if kind in ("dpm", "unipc") else {}
    compare(kind, cfg, 20, torch.float32, monkeypatch, begin=6)


@pytest.mark.parametrize("cfg", [{"algorithm_type": "sde-dpmsolver++"},
                                 {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}])
def test_sde_noise_from_the_generator_and_variance_noise(cfg):
    """Without randn_tensor replaced: the same generator seed draws the parent's noise."""
    a = DPMSolverMultistepScheduler(**cfg)
    b = FastDPMSolverMultistepScheduler.from_config(a.config)
    model = StandIn()
    for s in (a, b):
        s.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    xa, xb = x, x
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(a.timesteps):
        kw = {"variance_noise": torch.ones(SHAPE)} if i == 4 else {}
        xa = a.step(model(xa, t), t, xa, generator=ga, **kw).prev_sample
        xb = b.step(model(xb, t), t, xb, generator=gb, **kw).prev_sample
    torch.testing.assert_close(xb, xa, rtol=1e-4, atol=1e-4)


def test_parent_state_kept():
    """step_index, lower_order_nums, model_outputs (newest = the parent's x0, or its epsilon for 'dpmsolver'),
    UniPC's this_order."""
    model = StandIn()
    for kind, cfg in (("dpm", {}), ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
                      ("unipc", {})):
        parent_cls, fast_cls, _ = PAIRS[kind]
        a, b = parent_cls(solver_order=3, **cfg), fast_cls(solver_order=3, **cfg)
        for s in (a, b):
            s.set_timesteps(8)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for step, t in enumerate(a.timesteps):
            a.step(model(x, t), t, x)
            b.step(model(x, t), t, x)
            assert a.step_index == b.step_index and a.lower_order_nums == b.lower_order_nums, kind
            assert [m is None for m in a.model_outputs] == [m is None for m in b.model_outputs], (kind, step)
            assert b.__dict__["_ddpm_fast"]["table"] is not None, (kind, cfg)  # (fused)
            torch.testing.assert_close(b.model_outputs[-1], a.model_outputs[-1], rtol=1e-4, atol=1e-4)
            if kind == "unipc":
                assert a.this_order == b.this_order and a.timestep_list == b.timestep_list
    e, f = EulerDiscreteScheduler(), FastEulerDiscreteScheduler()
    for s in (e, f):
        s.set_timesteps(5)
    t = e.timesteps[2]
    assert f.scale_model_input(torch.ones(SHAPE), t).dtype == torch.float32
    e.scale_model_input(torch.ones(SHAPE), t)
    assert e.step_index == f.step_index == 2 and f.is_scale_input_called


@pytest.mark.parametrize("kind, cfg", [
    ("dpm", {"thresholding": True, "sample_max_value": 0.8}),
    ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True}),
    ("dpm", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True,
             "solver_type": "heun"}),
    ("unipc", {"thresholding": True, "sample_max_value": 0.8}),
    ("unipc", {"solver_p": DPMSolverMultistepScheduler()}),
])
def test_unfused_configs_run_the_parent(monkeypatch, kind, cfg):
    """Outside the fused steps the parent's own step runs: identical results."""
    ours, parent = compare_exact(kind, cfg, monkeypatch)
    torch.testing.assert_close(ours, parent, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [
    {"algorithm_type": "sde-dpmsolver", "solver_order": 3},  # no third-order sde-dpmsolver step: at step 2
    {"algorithm_type": "dpmsolver", "prediction_type": "flow_prediction", "use_flow_sigmas": True},  # at step 0
])
def test_unfused_configs_the_parent_raises_on(monkeypatch, cfg):
    """Where the parent's loop raises, the drop-in runs the parent's step: the same exception at the same step."""
    cfg = {"final_sigmas_type": "sigma_min", **cfg}
    seen = []
    for cls in (DPMSolverMultistepScheduler, FastDPMSolverMultistepScheduler):
        spy = CountParentSteps(monkeypatch, DPMSolverMultistepScheduler)
        s = cls(**cfg)
        s.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        with pytest.raises(Exception) as raised:
            for t in s.timesteps:
                x = s.step(torch.tanh(x), t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        seen.append((type(raised.value), spy.n))
        monkeypatch.undo()
    assert seen[0] == seen[1] and seen[0][1] < 10, seen


def compare_exact(kind, cfg, monkeypatch):
    parent_cls, fast_cls, module = PAIRS[kind]
    model = StandIn(cfg.get("prediction_type", "epsilon") if cfg.get("prediction_type") != "flow_prediction"
                    else "sample")
    spy = CountParentSteps(monkeypatch, parent_cls)
    ours, _ = run_loop(fast_cls(**cfg), 10, torch.float32, model=model, draws=Draws(1), module=module,
                       monkeypatch=monkeypatch)
    assert spy.n == 10
    parent, _ = run_loop(parent_cls(**cfg), 10, torch.float32, model=model, draws=Draws(1), module=module,
                         monkeypatch=monkeypatch)
    return ours, parent


@pytest.mark.parametrize("kind, cfg", [("dpm", {}), ("unipc", {}),
                                       ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"})])
def test_hand_over_to_the_parent_mid_loop(kind, cfg):
    """A call the fused step does not take (DPM: model_output in float64 from step 5 on, which the parent
    runs; UniPC's parent cannot change dtype midway, so the hand-over is called directly) gives the parent
    its state (x0, or epsilon for 'dpmsolver'): the rest of the loop is the parent's and matches a parent run
    throughout."""
    parent_cls, fast_cls, _ = PAIRS[kind]
    a, b = parent_cls(solver_order=3, **cfg), fast_cls(solver_order=3, **cfg)
    model = StandIn()
    for s in (a, b):
        s.set_timesteps(10)
    xa = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(a.timesteps):
        cast = (lambda m: m.double()) if i >= 5 and kind == "dpm" else (lambda m: m)
        if i == 5 and kind == "unipc":
            b._hand_over(b.__dict__["_ddpm_fast"])
            assert b.last_sample.dtype == a.last_sample.dtype
            assert [m.dtype for m in b.model_outputs] == [m.dtype for m in a.model_outputs]
        xa = a.step(cast(model(xa, t)), t, xa).prev_sample
        xb = b.step(cast(model(xb, t)), t, xb).prev_sample
        assert xa.dtype == xb.dtype
        torch.testing.assert_close(xb, xa, rtol=2e-4, atol=2e-4)


def test_parent_errors_kept():
    """Never raise where the parent does not -- and raise where it does."""
    e = FastEulerDiscreteScheduler()
    e.set_timesteps(5)
    with pytest.raises(ValueError, match="integer indices"):
        e.step(torch.zeros(SHAPE), 3, torch.zeros(SHAPE))
    d = FastDPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(torch.zeros(SHAPE), 1, torch.zeros(SHAPE))
    with pytest.raises(NotImplementedError):
        a = FastEulerAncestralDiscreteScheduler(prediction_type="sample")
        a.set_timesteps(5)
        a.step(torch.zeros(SHAPE), a.timesteps[0], torch.zeros(SHAPE))
    u = FastUniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", predict_x0=False)
    u.set_timesteps(5)
    with pytest.raises(ValueError, match="prediction_type"):
        u.step(torch.zeros(SHAPE), u.timesteps[0], torch.zeros(SHAPE))
    # a timestep that is not a view of self.timesteps: the parent's lookup (values equal: same index)
    d.set_timesteps(10)
    out = d.step(torch.zeros(SHAPE), d.timesteps[3].clone(), torch.zeros(SHAPE))
    assert d.step_index == 4 and out.prev_sample.shape == SHAPE


def test_no_host_sync_after_set_timesteps():
    """The loops (timesteps from self.timesteps, the Euler pair's scale_model_input included) run under
    a dispatch mode that fails on .item() / nonzero (test_no_host_sync.NoHostSync)."""
    from test_no_host_sync import NoHostSync

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    configs = {"dpm": ({}, {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"},
                       {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
               "unipc": ({}, {"solver_order": 3}), "euler": ({}, {"prediction_type": "v_prediction"}),
               "euler_a": ({}, {"prediction_type": "v_prediction"})}
    for kind in PAIRS:
        fast_cls = PAIRS[kind][1]
        for cfg in configs[kind]:
            s = fast_cls(**cfg)
            s.set_timesteps(12, device=dev)
            x = torch.randn(SHAPE, device=dev)
            gen = torch.Generator(dev).manual_seed(0)
            kw = {} if kind == "unipc" else {"generator": gen}
            with NoHostSync():
                for t in s.timesteps:
                    x_in = s.scale_model_input(x, t)
                    x = s.step(torch.tanh(x_in), t, x, **kw).prev_sample
            assert torch.isfinite(x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_captured_loop():
    """The whole sampling loop captured in one CUDA graph and replayed equals the eager loop."""
    def run(s, x):
        for t in s.timesteps:
            x = s.step(torch.tanh(s.scale_model_input(x, t)), t, x).prev_sample
        return x

    for kind in ("dpm", "unipc", "euler"):  # (Euler ancestral draws fresh noise each step)
        fast_cls = PAIRS[kind][1]
        make = (lambda: fast_cls(solver_order=3)) if kind in ("dpm", "unipc") else fast_cls
        x_start = torch.randn(SHAPE, device="cuda")
        eager_scheduler = make()
        eager_scheduler.set_timesteps(10, device="cuda")
        eager = run(eager_scheduler, x_start.clone())
        s = make()
        static_x = x_start.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            s.set_timesteps(10, device="cuda")
            run(s, static_x.clone())  # warm-up
        torch.cuda.current_stream().wait_stream(stream)
        s.set_timesteps(10, device="cuda")  # the table goes to the device here, before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run(s, static_x)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)


def test_timesteps_reassigned_after_set_timesteps():
    """A pipeline assigning scheduler.timesteps (a slice) after set_timesteps: the parent looks the first
    timestep up in the new tensor; so do we (the host copy is refreshed, no device read in the step)."""
    model = StandIn()
    for kind in ("dpm", "euler"):
        parent_cls, fast_cls, _ = PAIRS[kind]
        results = []
        for cls in (parent_cls, fast_cls):
            s = cls()
            s.set_timesteps(12)
            s.timesteps = s.timesteps[3:]
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
            for t in s.timesteps[:5]:
                x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
            results.append((x, s.step_index))
        assert results[0][1] == results[1][1], kind
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)


def test_samplers_bench_runs():
    """ddpm_fast.bench.samplers (`ddpm-fast bench --samplers`, which replaced solvers/host_bench): one row of
    a smoke run (its numbers are for reports, not checked; tests/test_samplers_bench.py runs the CLI)."""
    from ddpm_fast.bench import samplers

    name, parent_cls, fast_cls, config = samplers.samplers()[-1]
    row = samplers.time_step(name, parent_cls, fast_cls, config, (1, 4, 8, 8), None, steps=6, loops=1,
                             device=torch.device("cpu"), seed=0)
    assert row["sampler"] == "UniPC bh2 o3" and row["ours_ops"]["host_reads"] == 0
    assert row["parent_steps_timed"] == row["ours_steps_timed"] == 6


def test_unipc_bh1_to_sigma_zero_is_finite():
    """The documented difference: the parent's bh1 last step to sigma 0 is NaN (-inf * 0); ours is the
    order-1 step there, the x0 prediction (for a sample-predicting model: its output)."""
    a, b = UniPCMultistepScheduler(solver_type="bh1"), FastUniPCMultistepScheduler(solver_type="bh1",
                                                                                  prediction_type="sample")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for s in (a, b):
        s.set_timesteps(6)
    xa = xb = x
    for t in a.timesteps:
        xa = a.step(torch.tanh(xa), t, xa).prev_sample
        last_output = torch.tanh(xb)
        xb = b.step(last_output, t, xb).prev_sample
    assert torch.isnan(xa).any()
    torch.testing.assert_close(xb, last_output, rtol=1e-6, atol=1e-6)


# -- classifier-free guidance in step (keyword-only arguments the parents do not have) ----------------------
GUIDED = [("dpm", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}), ("dpm", {"thresholding": True}),
          ("dpm", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"}),
          ("unipc", {"solver_order": 3}), ("euler", {"prediction_type": "v_prediction"}), ("euler_a", {})]


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("kind, cfg", GUIDED)
def test_guidance_in_step_equals_the_pipeline_arithmetic(kind, cfg, rescale):
    """step(model_output [2B], ..., guidance_scale=s, guidance_rescale=r) = the parent's step of diffusers'
    pipeline arithmetic (uncond + s (cond - uncond), then rescale_noise_cfg), over a 10-step loop, fp32;
    without guidance_scale the keywords change nothing; a configuration the parent runs gets the combination."""
    parent_cls, fast_cls, _ = PAIRS[kind]
    ours, parent = fast_cls(**cfg), parent_cls(**cfg)
    for s in (ours, parent):
        s.set_timesteps(10)
    gen = torch.Generator().manual_seed(5)
    xa = xb = torch.randn(SHAPE, generator=gen) * float(parent.init_noise_sigma)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    kw_a = {} if kind == "unipc" else {"generator": ga}
    kw_b = {} if kind == "unipc" else {"generator": gb}
    model = StandIn(cfg.get("prediction_type", "epsilon"))
    both = lambda x_in, t: torch.cat([model(x_in, t), model(0.5 * x_in, t)])  # noqa: E731  (uncond, cond)
    for i, t in enumerate(parent.timesteps):
        out_a, out_b = both(ours.scale_model_input(xa, t), t), both(parent.scale_model_input(xb, t), t)
        uncond, cond = out_b.chunk(2)
        guided = uncond + 6.0 * (cond - uncond)
        if rescale:  # diffusers' rescale_noise_cfg (its pipelines' module needs transformers)
            dims = list(range(1, guided.ndim))
            rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
            guided = rescale * rescaled + (1 - rescale) * guided
        xa = ours.step(out_a, t, xa, guidance_scale=6.0, guidance_rescale=rescale, **kw_a).prev_sample
        xb = parent.step(guided, t, xb, **kw_b).prev_sample
        scale = max(xb.abs().max().item(), 1.0)
        assert (xa - xb).abs().max().item() <= 1e-4 * scale, (kind, cfg, i)
    assert xa.shape == SHAPE


def test_guidance_where_the_parent_runs():
    """A configuration the fused steps do not take (DPM-Solver's 'dpmsolver' with thresholding): the parent
    steps the combined output; an odd batch with guidance_scale is our argument's error, named."""
    cfg = {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True}
    ours, parent = FastDPMSolverMultistepScheduler(**cfg), DPMSolverMultistepScheduler(**cfg)
    for s in (ours, parent):
        s.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = torch.randn((2 * SHAPE[0], *SHAPE[1:]), generator=torch.Generator().manual_seed(1))
    t = parent.timesteps[0]
    got = ours.step(out, t, x, guidance_scale=3.0).prev_sample
    uncond, cond = out.chunk(2)
    want = parent.step(uncond + 3.0 * (cond - uncond), t, x).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fresh = FastDPMSolverMultistepScheduler()
    fresh.set_timesteps(5)
    with pytest.raises(ValueError, match="model_output"):
        fresh.step(out[:3], fresh.timesteps[0], x, guidance_scale=3.0)


# -- per-sample timesteps in step (a [B] timestep tensor, where the parent raises) ----------------------------
@pytest.mark.parametrize("kind, cfg", [("dpm", {"solver_order": 3}), ("unipc", {"solver_order": 3}),
                                       ("euler", {}), ("euler_a", {}),
                                       ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                                "solver_order": 3})])
def test_per_sample_timesteps_in_step(kind, cfg, monkeypatch):
    """A loop whose timestep is given per sample ([B], every sample at the loop's step) equals the loop with
    the scalar timestep (the parent raises on the [B] tensor); the Euler pair also takes samples at different
    steps (each equals its own scalar-timestep step, begun there with set_begin_index)."""
    parent_cls, fast_cls, _ = PAIRS[kind]
    parent = parent_cls(**cfg)
    parent.set_timesteps(10)
    with pytest.raises(Exception):
        parent.step(torch.zeros(SHAPE), parent.timesteps[:1].expand(SHAPE[0]).clone(), torch.zeros(SHAPE))
    model = StandIn()
    runs = []
    for per_sample in (False, True):
        s = fast_cls(**cfg)
        s.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(s.init_noise_sigma)
        gen = torch.Generator().manual_seed(2)
        kw = {} if kind == "unipc" else {"generator": gen}
        for t in s.timesteps:
            t_in = t.reshape(1).expand(SHAPE[0]).clone() if per_sample else t
            x = s.step(model(s.scale_model_input(x, t_in), t), t_in, x, **kw).prev_sample
        runs.append(x)
        assert (s.step_index is None) == per_sample
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-6)
    if kind not in ("euler", "euler_a"):
        return
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(compat, "randn_tensor", lambda *a, **k: noise.clone())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 3
    index = [2, 7]
    out = []
    for begin in (None, *index):
        s = fast_cls(**cfg)
        s.set_timesteps(10)
        if begin is None:
            t_in = s.timesteps[torch.tensor(index)]
        else:
            s.set_begin_index(begin)
            t_in = s.timesteps[begin]
        out.append(s.step(model(s.scale_model_input(x, t_in), 500), t_in, x).prev_sample)
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[2][1], rtol=1e-6, atol=1e-6)


# -- the Euler pair's steady step (a running loop's step without the general path's per-step work) ------------
def _steady_and_general(kind, cfg, dtype, guidance, return_dict=True):
    """The same 6-step loop twice: the drop-in as it is, and with its steady path switched off; (steps taken
    by the steady path, [step outputs of each run])."""
    _, fast_cls, _ = PAIRS[kind]
    model = StandIn(cfg.get("prediction_type", "epsilon"))
    runs, steady_steps = [], 0
    for steady in (True, False):
        scheduler = fast_cls(**cfg)
        if not steady:
            scheduler._steady = lambda *args: None
        else:
            real = scheduler._steady

            def counting(*args):
                nonlocal steady_steps
                got = real(*args)
                steady_steps += got is not None
                return got
            scheduler._steady = counting
        scheduler.set_timesteps(6)
        x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 10).to(dtype)
        gen = torch.Generator().manual_seed(4)
        kw = {"generator": gen}
        if guidance:
            kw["guidance_scale"] = guidance
        outs = []
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            out = model(x_in, t)
            if guidance:
                out = torch.cat([out, model(0.5 * x_in, t)])
            got = scheduler.step(out, t, x, return_dict=return_dict, **kw)
            prev, x0 = (got.prev_sample, got.pred_original_sample) if return_dict else got
            outs.append((prev, x0 if x0 is not out else "the model output"))
            x = prev
        runs.append(outs)
    return steady_steps, runs


@pytest.mark.parametrize("guidance", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind, cfg", [("euler", {}), ("euler", {"prediction_type": "sample"}),
                                       ("euler", {"prediction_type": "v_prediction"}), ("euler_a", {})])
def test_euler_steady_step_equals_the_general_path(kind, cfg, dtype, guidance):
    """Every step of a pipeline-style loop takes the steady path (scale_model_input located the step index); its
    prev_sample and
    pred_original_sample (dtype, values; the model output itself where the parent returns it) are the general
    path's, bit for bit: the same op call. return_dict=False gives the same tuple."""
    taken, (steady, general) = _steady_and_general(kind, cfg, dtype, guidance)
    assert taken == 6
    for (prev_a, x0_a), (prev_b, x0_b) in zip(steady, general):
        assert torch.isfinite(prev_a).all()
        assert prev_a.dtype == prev_b.dtype == dtype and torch.equal(prev_a, prev_b)
        if isinstance(x0_b, str):
            assert x0_a == x0_b
        else:
            assert x0_a.dtype == x0_b.dtype and torch.equal(x0_a, x0_b)
    _, (as_tuples, _) = _steady_and_general(kind, cfg, dtype, guidance, return_dict=False)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(as_tuples, steady))


def test_euler_steady_step_leaves_the_rest_to_the_general_path():
    """What the steady path does not take goes to the general path, which keeps the parent's behaviour: an
    integer timestep (the parent raises), no scale_model_input call (the parent warns), inputs that require grad,
    churn, guidance_rescale, a mismatched model output, reassigned sigmas."""
    s = FastEulerDiscreteScheduler()
    s.set_timesteps(8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 10
    t0, t1 = s.timesteps[0], s.timesteps[1]
    s.step(s.scale_model_input(x, t0) * 0, t0, x)  # the step index is set
    assert s._steady(x, t1, x, None, 0.0) is not None
    with pytest.raises(ValueError, match="integer"):
        s.step(x, 5, x)
    assert s._steady(x, torch.tensor(5), x, None, 0.0) is None
    assert s._steady(x.requires_grad_(True), t1, x, None, 0.0) is None
    x = x.detach()
    assert s._steady(x, t1, x, 2.0, 0.5) is None  # guidance_rescale
    assert s._steady(x, t1, x, 2.0, 0.0) is None  # not [2B, ...]
    assert s._steady(torch.cat([x, x]), t1, x, 2.0, 0.0) is not None
    assert s._steady(x.double(), t1, x, None, 0.0) is None
    s.sigmas = s.sigmas.clone()
    assert s._steady(x, t1, x, None, 0.0) is None  # the general path rebuilds the table first
    fresh = FastEulerDiscreteScheduler()
    fresh.set_timesteps(8)
    fresh._step_index = 1
    assert fresh._steady(x, t1, x, None, 0.0) is None  # scale_model_input not called: the general path warns
    s.scale_model_input(x, t1)
    churned = s.step(x * 0, t1, x, s_churn=5.0, generator=torch.Generator().manual_seed(1))
    assert churned.prev_sample.shape == SHAPE


# -- in_kernel_noise: the opt-in noise drawn inside the fused op -------------------------------------------------
NOISY = [("euler_a", {}, {}), ("dpm", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {}),
         ("dpm", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
         ("euler", {}, {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 50.0})]


def _noisy_loop(kind, cfg, step_kw, *, in_kernel, generator, steady=True, n=8):
    """An 8-step pipeline-style loop of the drop-in with in_kernel_noise as given; generator: a seed (one
    torch.Generator) or a list of seeds (one generator per sample). Returns the per-step prev_samples."""
    scheduler = PAIRS[kind][1](**cfg)
    scheduler.in_kernel_noise = in_kernel
    if not steady:
        scheduler._steady = lambda *args: None
    scheduler.set_timesteps(n)
    gen = ([torch.Generator().manual_seed(s) for s in generator] if isinstance(generator, list)
           else torch.Generator().manual_seed(generator))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * float(scheduler.init_noise_sigma)
    model, outs = StandIn(), []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(x_in, t), t, x, generator=gen, **step_kw).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("kind, cfg, step_kw", NOISY)
def test_in_kernel_noise_is_opt_in_reproducible_and_not_the_parents_draw(kind, cfg, step_kw):
    """Off by default and outside the config (saved configs stay the parent's). On: the same generator seed gives
    the same loop bit for bit, another seed another loop, and neither is the parent's randn_tensor draw; the
    Euler pair's steady step draws as the general path does. A list of generators keeps the parent's draw."""
    cls = PAIRS[kind][1]
    assert cls(**cfg).in_kernel_noise is False and "in_kernel_noise" not in cls(**cfg).config
    first = _noisy_loop(kind, cfg, step_kw, in_kernel=True, generator=5)
    assert all(torch.isfinite(x).all() for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, _noisy_loop(kind, cfg, step_kw, in_kernel=True, generator=5)))
    assert not torch.equal(first[-1], _noisy_loop(kind, cfg, step_kw, in_kernel=True, generator=6)[-1])
    assert not torch.equal(first[-1], _noisy_loop(kind, cfg, step_kw, in_kernel=False, generator=5)[-1])
    if kind.startswith("euler"):
        general = _noisy_loop(kind, cfg, step_kw, in_kernel=True, generator=5, steady=False)
        assert all(torch.equal(a, b) for a, b in zip(first, general))
    per_sample = _noisy_loop(kind, cfg, step_kw, in_kernel=True, generator=[7, 8])
    parents = _noisy_loop(kind, cfg, step_kw, in_kernel=False, generator=[7, 8])
    assert all(torch.equal(a, b) for a, b in zip(per_sample, parents))


def test_in_kernel_noise_is_the_functional_steps_draw():
    """With in_kernel_noise, a drop-in step draws what ddpm_fast.solvers' functional step draws from the same
    generator state (whose noise tests/test_solvers.py checks is a standard normal): Euler ancestral through
    the steady path and the general path, DPM-Solver++ SDE at its first step."""
    from ddpm_fast.solvers import dpm_solver_step, euler_ancestral_step, new_history

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 10
    for steady in (True, False):
        s = FastEulerAncestralDiscreteScheduler()
        s.in_kernel_noise = True
        if not steady:
            s._steady = lambda *args: None
        s.set_timesteps(8)
        t = s.timesteps[0]
        out = StandIn()(s.scale_model_input(x, t), t)
        want, _ = euler_ancestral_step(out, x, 0, s._ddpm_fast["table"], generator=torch.Generator().manual_seed(9))
        got = s.step(out, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
        assert torch.equal(got, want), steady
    s = FastDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    s.in_kernel_noise = True
    s.set_timesteps(8)
    t = s.timesteps[0]
    out = StandIn()(x, t)
    table = s._ddpm_fast["table"]
    want = dpm_solver_step(out, x, 0, table, new_history(table, x), steps_done=0,
                           generator=torch.Generator().manual_seed(9))
    got = s.step(out, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
    assert torch.equal(got, want)


def test_in_kernel_noise_seeds_from_a_generator_on_another_device():
    """A generator on another device than the samples (a CPU generator for CUDA latents; "meta" samples stand in
    here) gives the op one seed drawn from it on the host: the draw philox_seed makes."""
    s = FastEulerAncestralDiscreteScheduler()
    s.in_kernel_noise = True
    got = s._noise(torch.Generator().manual_seed(4), torch.empty(2, 3, device="meta"), draw=None)
    want = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(4)))
    assert got == {"draw_noise": True, "seed": want}
