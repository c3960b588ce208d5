"""ddpm_fast.solvers: the coefficient tables and the functional steps.

- in float64 the functional steps reproduce diffusers' own step formulas (its float64 run) to ~1e-12:
  every coefficient of every order / variant is checked, not only a loop's end;
- per-sample step indices [B] give, for each sample, the host-index step at that sample's index;
- classifier-free guidance inside a step equals cfg_combine then the step; cfg_combine and the rescale
  against diffusers' formula;
- dtypes (fp16 / bf16 in, float32 math, the input dtype out), bad input raising a named error, and no
  host sync on the per-sample device path;
- the noise the steps draw themselves (noise None: solver_update's draw_noise from seed / generator):
  deterministic per seed, a standard normal, the op's own draw, only where Euler's gamma > 0.
"""
import math

import numpy as np
import pytest
import torch

from ddpm_fast.solvers import (cfg_combine, dpm_solver_step, dpm_solver_table, euler_ancestral_step,
                               euler_ancestral_table, euler_step, euler_table, new_history, unipc_step,
                               unipc_table)

SHAPE = (3, 2, 4, 4)


def sigmas_of(n, final_zero=True):
    """A linear-schedule sigma ladder [n + 1] like diffusers' linspace spacing."""
    betas = np.linspace(0.0001, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    t = np.linspace(0, 999, n + 1).round()[::-1][:-1].astype(np.int64)
    sig = np.sqrt((1 - abar[t]) / abar[t])
    return np.concatenate([sig, [0.0 if final_zero else math.sqrt((1 - abar[0]) / abar[0])]]).astype(np.float32)


def model(x, i):
    return torch.tanh(0.5 * x + 0.01 * i) + 0.1 * torch.cos(x)


def run_host(kind, table, x, n, noises, begin=0):
    """The loop with host step indices (from step begin on); snapshots before every step and at the end
    (snaps[i - begin] is before step i)."""
    history = new_history(table, x) if kind in ("dpm", "unipc") else None
    last = torch.zeros_like(x, dtype=history.dtype) if kind == "unipc" else None
    snaps = []
    for i in range(begin, n):
        snaps.append((x.clone(), None if history is None else history.clone(),
                      None if last is None else last.clone()))
        kw = {"steps_done": i - begin} if kind in ("dpm", "unipc") else {}
        x = step(kind, model(x, i), x, i, table, history, last, noises[i], **kw)
    snaps.append((x.clone(), None if history is None else history.clone(), None if last is None else last.clone()))
    return snaps


def step(kind, mo, x, index, table, history, last, noise, **kw):
    if kind not in ("dpm", "unipc"):
        kw.pop("dynamic_threshold", None)
    if kind == "dpm":
        return dpm_solver_step(mo, x, index, table, history, noise=noise, **kw)
    if kind == "unipc":
        return unipc_step(mo, x, index, table, history, last, **kw)
    if kind == "euler":
        return euler_step(mo, x, index, table, s_churn=2.0, s_tmin=0.3, s_tmax=5.0, noise=noise, **kw)[0]
    return euler_ancestral_step(mo, x, index, table, noise=noise, **kw)[0]


TABLES = {
    "dpm": lambda n: dpm_solver_table(sigmas_of(n), solver_order=3, algorithm_type="sde-dpmsolver++",
                                      solver_type="heun"),
    "unipc": lambda n: unipc_table(sigmas_of(n), solver_order=3, disable_corrector=[2]),
    "euler": lambda n: euler_table(sigmas_of(n), prediction_type="v_prediction"),
    "euler_a": lambda n: euler_ancestral_table(sigmas_of(n)),
}


@pytest.mark.parametrize("kind", list(TABLES))
def test_per_sample_step_indices_match_host_steps(kind):
    """Each sample at its own step index (a tensor [B]) gives that sample's host-index step."""
    n = 10
    table = TABLES[kind](n)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(n)]
    snaps = run_host(kind, table, x, n, noises)
    index = torch.tensor([0, 4, 9])
    x_in = torch.stack([snaps[i][0][j] for j, i in enumerate(index.tolist())])
    mo = torch.stack([model(snaps[i][0], i)[j] for j, i in enumerate(index.tolist())])
    noise = torch.stack([noises[i][j] for j, i in enumerate(index.tolist())])
    history = last = None
    if snaps[0][1] is not None:
        history = torch.stack([snaps[i][1][:, j] for j, i in enumerate(index.tolist())], 1)
    if snaps[0][2] is not None:
        last = torch.stack([snaps[i][2][j] for j, i in enumerate(index.tolist())])
    out = step(kind, mo, x_in, index, table, history, last, noise)
    for j, i in enumerate(index.tolist()):
        torch.testing.assert_close(out[j], snaps[i + 1][0][j], rtol=1e-6, atol=1e-6)
        if history is not None:
            torch.testing.assert_close(history[:, j], snaps[i + 1][1][:, j], rtol=1e-6, atol=1e-6)
        if last is not None:
            torch.testing.assert_close(last[j], snaps[i + 1][2][j], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["dpm", "unipc"])
def test_per_sample_loops_begun_at_different_steps(kind):
    """Samples whose loops began at different steps (img2img strengths): step_index [B] and steps_done [B]
    give each sample its own loop's host-index step (warm-up orders and UniPC's first-step corrector)."""
    n = 10
    table = TABLES[kind](n)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=gen)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(n)]
    begins, index = [0, 3, 6], [5, 4, 6]  # steps done: 5, 1, 0
    runs = [run_host(kind, table, x, n, noises, begin=b) for b in begins]
    pick = lambda j, what: runs[j][index[j] - begins[j]][what][j]  # noqa: E731
    x_in = torch.stack([pick(j, 0) for j in range(3)])
    history = torch.stack([runs[j][index[j] - begins[j]][1][:, j] for j in range(3)], 1)
    last = torch.stack([pick(j, 2) for j in range(3)]) if kind == "unipc" else None
    mo = torch.stack([model(runs[j][index[j] - begins[j]][0], index[j])[j] for j in range(3)])
    noise = torch.stack([noises[index[j]][j] for j in range(3)])
    steps_done = torch.tensor([i - b for i, b in zip(index, begins)])
    out = step(kind, mo, x_in, torch.tensor(index), table, history, last, noise, steps_done=steps_done)
    for j in range(3):
        torch.testing.assert_close(out[j], runs[j][index[j] - begins[j] + 1][0][j], rtol=1e-6, atol=1e-6)


def test_per_sample_steps_done_warm_up():
    """steps_done lowers the order as the parent's lower_order_nums does (a loop begun later)."""
    table = TABLES["dpm"](10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.zeros(SHAPE)
    hist_a, hist_b = new_history(table, x), new_history(table, x)
    hist_a[:] = torch.randn(hist_a.shape, generator=torch.Generator().manual_seed(2))
    hist_b.copy_(hist_a)
    first_order = dpm_solver_step(model(x, 5), x, 5, table, hist_a, steps_done=0, noise=noise)
    per_sample = dpm_solver_step(model(x, 5), x, torch.full((3,), 5), table, hist_b, steps_done=torch.zeros(3,
                                 dtype=torch.int64), noise=noise)
    torch.testing.assert_close(per_sample, first_order, rtol=0, atol=0)
    # order 1: the older slots (other values there) change nothing
    hist_c = hist_a.clone()
    hist_c[(5 - 1) % 3] += 1.0
    hist_c[(5 - 2) % 3] -= 2.0
    again = dpm_solver_step(model(x, 5), x, 5, table, hist_c, steps_done=0, noise=noise)
    torch.testing.assert_close(again, first_order, rtol=0, atol=0)
    second_order = dpm_solver_step(model(x, 5), x, 5, table, hist_c.clone(), steps_done=1, noise=noise)
    assert not torch.equal(second_order, first_order)


# -- float64: the formulas of diffusers' own steps ----------------------------------------------------
def _parent64(kind, cfg):
    diffusers_solvers_tests = pytest.importorskip("test_diffusers_solvers")
    pair = diffusers_solvers_tests.PAIRS[kind]
    return pair[0](**cfg), pair[2], diffusers_solvers_tests


PARENT_CASES = [
    ("dpm", {"solver_order": 3}),
    ("dpm", {"solver_order": 2, "solver_type": "heun", "prediction_type": "v_prediction"}),
    ("dpm", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min"}),
    ("dpm", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    ("dpm", {"solver_order": 3, "use_karras_sigmas": True, "prediction_type": "sample"}),
    ("dpm", {"solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
             "lower_order_final": False}),
    ("dpm", {"solver_order": 2, "algorithm_type": "dpmsolver", "solver_type": "heun", "prediction_type": "v_prediction",
             "final_sigmas_type": "sigma_min"}),
    ("dpm", {"solver_order": 3, "algorithm_type": "dpmsolver", "use_karras_sigmas": True, "prediction_type": "sample",
             "final_sigmas_type": "sigma_min"}),
    ("dpm", {"solver_order": 2, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpm", {"solver_order": 2, "algorithm_type": "sde-dpmsolver", "solver_type": "heun", "prediction_type": "sample",
             "final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_order": 3}),
    ("unipc", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_order": 3, "predict_x0": False, "final_sigmas_type": "sigma_min", "prediction_type": "sample"}),
    ("unipc", {"solver_order": 2, "prediction_type": "v_prediction", "disable_corrector": [1, 4]}),
    ("dpm", {"solver_order": 3, "use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}),
    ("unipc", {"solver_order": 3, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    ("euler", {"prediction_type": "v_prediction"}), ("euler", {"use_karras_sigmas": True}),
    ("euler_a", {}), ("euler_a", {"prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize("kind, cfg", PARENT_CASES)
def test_float64_steps_equal_the_parent_formulas(monkeypatch, kind, cfg):
    """Every step of a 12-step loop, float64 on both sides: agreement to ~1e-12 of the scale."""
    parent, module, helpers = _parent64(kind, cfg)
    monkeypatch.setattr(module, "torch", helpers._Torch64())
    draws = helpers.Draws(7)
    monkeypatch.setattr(module, "randn_tensor", draws, raising=False)
    parent.set_timesteps(12)
    helpers.to64(parent)
    c = parent.config
    if kind == "dpm":
        table = dpm_solver_table(parent.sigmas, solver_order=c.solver_order, algorithm_type=c.algorithm_type,
                                 solver_type=c.solver_type, prediction_type=c.prediction_type,
                                 lower_order_final=c.lower_order_final, final_sigmas_type=c.final_sigmas_type,
                                 flow_sigmas=c.use_flow_sigmas)
    elif kind == "unipc":
        table = unipc_table(parent.sigmas, solver_order=c.solver_order, solver_type=c.solver_type,
                            predict_x0=c.predict_x0, prediction_type=c.prediction_type,
                            disable_corrector=c.disable_corrector, flow_sigmas=c.use_flow_sigmas)
    elif kind == "euler":
        table = euler_table(parent.sigmas, prediction_type=c.prediction_type)
    else:
        table = euler_ancestral_table(parent.sigmas, prediction_type=c.prediction_type)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    ours = x.clone()
    history = new_history(table, x) if kind in ("dpm", "unipc") else None
    last = torch.zeros_like(x)
    noise_gen = torch.Generator().manual_seed(7)
    for i, t in enumerate(parent.timesteps):
        noise = torch.randn(SHAPE, generator=noise_gen).double()  # the draw the parent's randn_tensor makes
        mo = model(parent.scale_model_input(x, t), i)
        x = parent.step(mo, t, x).prev_sample
        if kind in ("euler", "euler_a"):
            mo_ours = model(ours * float(table.coef[i, 0, 2 if kind == "euler" else 3]), i)
        else:
            mo_ours = model(ours, i)
        if kind == "unipc":
            noise = None
        ours = step(kind, mo_ours, ours, i, table, history, last, noise) if kind != "euler" else \
            euler_step(mo_ours, ours, i, table)[0]
        scale = max(x.abs().max().item(), 1.0)
        assert (ours - x).abs().max().item() <= 1e-11 * scale, f"{kind} {cfg} step {i}"


# -- classifier-free guidance ---------------------------------------------------------------------------
def test_cfg_combine_and_rescale():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(6, 2, 3, 3, generator=gen)
    uncond, cond = out.chunk(2)
    torch.testing.assert_close(cfg_combine(out, 5.0), uncond + 5.0 * (cond - uncond))
    guided = uncond + 5.0 * (cond - uncond)
    ratio = cond.std(dim=[1, 2, 3], keepdim=True) / guided.std(dim=[1, 2, 3], keepdim=True)
    expected = 0.7 * guided * ratio + 0.3 * guided
    torch.testing.assert_close(cfg_combine(out, 5.0, 0.7), expected)
    assert cfg_combine(out.half(), 2.0).dtype == torch.float16
    with pytest.raises(ValueError, match="model_output"):
        cfg_combine(out[:5], 2.0)
    with pytest.raises(TypeError, match="guidance_scale"):
        cfg_combine(out, "7")


@pytest.mark.parametrize("kind", list(TABLES))
def test_guidance_inside_the_step(kind):
    """guidance_scale / guidance_rescale in the step = cfg_combine, then the step."""
    table = TABLES[kind](10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    out2 = torch.randn((6, *SHAPE[1:]), generator=gen)
    noise = torch.randn(SHAPE, generator=gen)
    results = []
    for inside in (True, False):
        history = new_history(table, x) if kind in ("dpm", "unipc") else None
        last = torch.zeros_like(x)
        kw = {"guidance_scale": 4.0, "guidance_rescale": 0.5} if inside else {}
        mo = out2 if inside else cfg_combine(out2, 4.0, 0.5)
        results.append(step(kind, mo, x, 3, table, history, last, noise, **kw))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


# -- dtypes, errors, syncs ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    table = TABLES["dpm"](10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    history = new_history(table, x)
    assert history.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out = dpm_solver_step(model(x, 0), x, 0, table, history, noise=torch.zeros(SHAPE))
    assert out.dtype == dtype
    if dtype == torch.float64:
        return
    # float32 math for 16-bit inputs: the float32 step of the same inputs, rounded once
    x32 = x.float()
    ref = dpm_solver_step(model(x, 0).float(), x32, 0, table, new_history(table, x32), noise=torch.zeros(SHAPE))
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


def test_bad_input_names_the_argument():
    table = TABLES["dpm"](10)
    x = torch.zeros(SHAPE)
    history = new_history(table, x)
    with pytest.raises(ValueError, match="solver_order"):
        dpm_solver_table(sigmas_of(10), solver_order=4)
    with pytest.raises(ValueError, match="algorithm_type"):
        dpm_solver_table(sigmas_of(10), algorithm_type="deis")
    positive_end = sigmas_of(10, final_zero=False)
    with pytest.raises(ValueError, match="algorithm_type"):  # diffusers has no third-order sde-dpmsolver step
        dpm_solver_table(positive_end, algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="final_sigmas_type"):  # diffusers refuses it for dpmsolver
        dpm_solver_table(positive_end, algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="sigmas"):
        dpm_solver_table(sigmas_of(10), algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="prediction_type"):
        dpm_solver_table(positive_end, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                         prediction_type="flow_prediction")
    eps_dpm = dpm_solver_table(positive_end, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    assert not eps_dpm.predict_x0 and not eps_dpm.sde
    with pytest.raises(ValueError, match="dynamic_threshold"):
        dpm_solver_step(x, x, 0, eps_dpm, new_history(eps_dpm, x), dynamic_threshold=0.9)
    with pytest.raises(ValueError, match="sigmas"):
        unipc_table([1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="prediction_type"):
        euler_ancestral_table(sigmas_of(5), prediction_type="sample")
    with pytest.raises(ValueError, match="step_index"):
        dpm_solver_step(x, x, 10, table, history)
    with pytest.raises(ValueError, match="step_index"):
        dpm_solver_step(x, x, torch.tensor([0, 1, 10]), table, history)
    with pytest.raises(TypeError, match="step_index"):
        dpm_solver_step(x, x, 1.0, table, history)
    with pytest.raises(ValueError, match="history"):
        dpm_solver_step(x, x, 0, table, history[:2])
    with pytest.raises(ValueError, match="table"):
        unipc_step(x, x, 0, table, history, x)
    with pytest.raises(ValueError, match="model_output"):
        dpm_solver_step(x[:2], x, 0, table, history)
    with pytest.raises(ValueError, match="model_output"):
        dpm_solver_step(torch.zeros(5, *SHAPE[1:]), x, 0, table, history, guidance_scale=3.0)
    with pytest.raises(TypeError, match="sample"):
        dpm_solver_step(x, x.long(), 0, table, history)
    with pytest.raises(ValueError, match="last_sample"):
        unipc_step(x, x, 0, TABLES["unipc"](10), new_history(TABLES["unipc"](10), x), x[:1])
    with pytest.raises(ValueError, match="dynamic_threshold"):
        dpm_solver_step(x, x, 0, table, history, dynamic_threshold=1.5)
    with pytest.raises(ValueError, match="sample_max_value"):
        dpm_solver_step(x, x, 0, table, history, dynamic_threshold=0.9, sample_max_value=0.5)
    eps_table = unipc_table(sigmas_of(10, final_zero=False), predict_x0=False)
    with pytest.raises(ValueError, match="dynamic_threshold"):
        unipc_step(x, x, 0, eps_table, new_history(eps_table, x), x.clone(), dynamic_threshold=0.9)
    with pytest.raises(TypeError, match="s_churn"):
        euler_step(x, x, 0, TABLES["euler"](10), s_churn=None)


def test_per_sample_path_without_host_sync():
    """The device path (index tensors, validate=False) makes no .item() / nonzero."""
    from test_no_host_sync import NoHostSync

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(SHAPE, device=dev)
    index = torch.tensor([0, 3, 7], device=dev)
    for kind, make in TABLES.items():
        table = make(10)
        table.on(dev)  # set_timesteps time: the copy to the device
        history = new_history(table, x) if kind in ("dpm", "unipc") else None
        last = torch.zeros_like(x)
        with NoHostSync():
            for _ in range(3):  # noise None: drawn on the device (DPM's SDE variant, the Euler pair)
                out = step(kind, torch.tanh(x), x, index, table, history, last, None, validate=False,
                           dynamic_threshold=0.9)
        assert out.shape == x.shape and torch.isfinite(out).all()


# -- the fused op: ddpm_fast.ops.solver_update -----------------------------------------------------------------
import ddpm_fast as F  # noqa: E402
from ddpm_fast import reference as R  # noqa: E402
from ddpm_fast.solvers.tables import FUSED_COLUMNS  # noqa: E402


def _composed(kind, table, mo, x, i, history, last, noise, steps_done, guidance=(None, 0.0), threshold=None,
              churn=(2.0, 0.3, 5.0, 1.0)):
    """The steps as they were composed before the fused op (host step index): the old formulas, kept as the
    oracle of the fused path. Updates history / last in place; returns (x_prev, x0 or None)."""
    dtype = R.compute_dtype(x.dtype)
    col = lambda a, *k: torch.tensor(float(a[k]), dtype=dtype)  # noqa: E731
    if guidance[0] is not None:
        uncond, cond = mo.to(dtype).chunk(2)
        out = uncond + guidance[0] * (cond - uncond)
        if guidance[1]:
            dims = list(range(1, out.ndim))
            ratio = cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
            out = guidance[1] * (out * ratio) + (1.0 - guidance[1]) * out
    else:
        out = mo.to(dtype)
    xc = x.to(dtype)
    size = None if history is None else history.shape[0]
    order = None if table.solver_order == 0 else min(int(table.max_order[i]), steps_done + 1)
    if kind == "dpm":
        c = [col(table.coef, i, order - 1, k) for k in range(7)]
        x0 = c[0] * xc + c[1] * out
        if threshold is not None:
            x0 = R._process_xstart(x0, False, threshold, 1.0)
        x_prev = c[2] * xc + c[3] * x0
        for back in range(1, table.solver_order):
            x_prev = x_prev + c[3 + back] * history[(i - back) % size]
        if table.sde:
            x_prev = x_prev + c[6] * noise.to(dtype)
        history[i % size] = x0
        return x_prev.to(x.dtype), None
    if kind == "unipc":
        corr_order = 0 if steps_done == 0 or i == 0 else min(int(table.max_order[i - 1]), steps_done)
        cc = [col(table.corrector, i, corr_order, k) for k in range(6)]
        p = [col(table.coef, i, order - 1, k) for k in range(6)]
        m = p[0] * xc + p[1] * out
        if threshold is not None:
            m = R._process_xstart(m, False, threshold, 1.0)
        corrected = cc[0] * xc + cc[1] * last + cc[2] * m
        for back in range(1, table.solver_order + 1):
            corrected = corrected + cc[2 + back] * history[(i - back) % size]
        x_prev = p[2] * corrected + p[3] * m
        for back in range(1, table.solver_order):
            x_prev = x_prev + p[3 + back] * history[(i - back) % size]
        history[i % size] = m
        last.copy_(corrected)
        return x_prev.to(x.dtype), None
    sigma = col(table.coef, i, 0, 0)
    input_scale = col(table.coef, i, 0, 2 if kind == "euler" else 3)
    sigma_hat = sigma
    if kind == "euler":
        s_churn, s_tmin, s_tmax, s_noise = churn
        gamma = min(s_churn / (table.num_sigmas - 1), 2 ** 0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            xc = xc + noise.to(dtype) * s_noise * (sigma_hat ** 2 - sigma ** 2).sqrt()
    if table.prediction_type == "epsilon":
        x0 = xc - sigma_hat * out
    elif table.prediction_type == "v_prediction":
        x0 = out * (-sigma * input_scale) + xc * (input_scale * input_scale)
    else:
        x0 = out
    target = col(table.coef, i, 0, 1) if kind == "euler" else col(table.coef, i, 0, 2)
    x_prev = xc + (xc - x0) / sigma_hat * (target - sigma_hat)
    if kind == "euler_a":
        x_prev = x_prev + noise.to(dtype) * col(table.coef, i, 0, 1)
    return x_prev.to(x.dtype), x0


# "table": a DPM table of another algorithm_type than TABLES["dpm"]'s (noise prediction: epsilon in the history)
EPS_DPM_TABLES = {
    "dpmsolver": lambda n: dpm_solver_table(sigmas_of(n, final_zero=False), solver_order=3, algorithm_type="dpmsolver",
                                            solver_type="heun", prediction_type="v_prediction",
                                            final_sigmas_type="sigma_min"),
    "sde-dpmsolver": lambda n: dpm_solver_table(sigmas_of(n, final_zero=False), solver_order=2,
                                                algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
}
FUSED_CASES = [("dpm", {}), ("dpm", {"guidance": (5.0, 0.7)}), ("dpm", {"threshold": 0.9}),
               ("dpm", {"table": "dpmsolver", "guidance": (5.0, 0.7)}), ("dpm", {"table": "sde-dpmsolver"}),
               ("unipc", {}), ("unipc", {"guidance": (3.0, 0.0), "threshold": 0.8}),
               ("euler", {}), ("euler", {"guidance": (4.0, 0.5)}), ("euler_a", {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind, options", FUSED_CASES)
def test_fused_steps_equal_the_composed_formulas(kind, options, dtype):
    """A 10-step loop of each step (one fused op) against the formulas the steps composed before it
    (the same table coefficients, one op per term): float32 to rounding, float64 to 1e-12."""
    n = 10
    table = EPS_DPM_TABLES[options["table"]](n) if "table" in options else TABLES[kind](n)
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(SHAPE, generator=gen) * 3).to(dtype)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(n)]
    guidance, threshold = options.get("guidance", (None, 0.0)), options.get("threshold")
    theirs = x.clone()
    multistep = kind in ("dpm", "unipc")
    hist_ours, hist_theirs = (new_history(table, x), new_history(table, x)) if multistep else (None, None)
    compute = R.compute_dtype(dtype)
    last_ours, last_theirs = torch.zeros(SHAPE, dtype=compute), torch.zeros(SHAPE, dtype=compute)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for i in range(n):
        mo = model(theirs, i)
        if guidance[0] is not None:
            mo = torch.cat([mo, model(theirs * 0.5, i + 1)])
        want, x0_want = _composed(kind, table, mo, theirs, i, hist_theirs, last_theirs, noises[i], i, guidance,
                                  threshold)
        kw = {} if guidance[0] is None else {"guidance_scale": guidance[0], "guidance_rescale": guidance[1]}
        if threshold is not None:
            kw["dynamic_threshold"] = threshold
        got = step(kind, mo, theirs, i, table, hist_ours, last_ours, noises[i], **kw)
        if kind == "euler":
            got, x0 = euler_step(mo, theirs, i, table, s_churn=2.0, s_tmin=0.3, s_tmax=5.0, noise=noises[i], **kw)
            torch.testing.assert_close(x0, x0_want, rtol=tol, atol=tol)
        assert got.dtype == dtype
        scale = max(want.double().abs().max().item(), 1.0)
        if dtype == torch.bfloat16:  # both round one float32 result to bfloat16: at most one unit apart
            assert (got.double() - want.double()).abs().max().item() <= 2 ** -7 * scale, (kind, i)
        else:
            assert (got.double() - want.double()).abs().max().item() <= tol * scale, (kind, i)
        if multistep:
            torch.testing.assert_close(hist_ours, hist_theirs, rtol=tol, atol=tol * scale)
        if kind == "unipc":
            torch.testing.assert_close(last_ours, last_theirs, rtol=tol, atol=tol * scale)
        theirs = want  # both sides continue from the composed result: each step is compared on its own
        hist_ours.copy_(hist_theirs) if multistep else None
        last_ours.copy_(last_theirs)


def _update_inputs(B=3, shape=(2, 5, 4), dtype=torch.float32, seed=0, R_rows=4):
    g = torch.Generator().manual_seed(seed)
    compute = R.compute_dtype(dtype)
    full = (B, *shape)
    rnd = lambda dt=dtype: torch.randn(full, generator=g).to(dt)  # noqa: E731
    rows = torch.randn(R_rows, len(FUSED_COLUMNS), generator=g, dtype=torch.float64).to(compute)
    return dict(x=rnd(), model_output=rnd(), model_cond=rnd(), rows=rows,
                row_index=torch.randint(0, R_rows, (B,), generator=g), cfg_factor=torch.rand(B, generator=g).to(compute) + 0.5,
                thresh=torch.rand(B, generator=g).to(compute) + 1.0, history=(rnd(compute), rnd(compute), rnd(compute)),
                last_sample=rnd(compute), noise=rnd())


def _run_update(a, backend, **override):
    a = dict(a, **override)
    compute = R.compute_dtype(a["x"].dtype)
    m_out = torch.full(a["x"].shape, float("nan"), dtype=compute)
    last = None if a["last_sample"] is None else a["last_sample"].clone()
    x_prev = F.solver_update(a["x"], a["model_output"], a["rows"], a["row_index"], m_out, model_cond=a["model_cond"],
                             guidance_scale=2.5, cfg_factor=a["cfg_factor"], thresh=a["thresh"], history=a["history"],
                             last_sample=last, noise=a["noise"], backend=backend)
    return x_prev, m_out, last


def test_solver_update_reference_is_the_documented_formula():
    """Every column enters as FUSED_COLUMNS says (float64, by hand); m_out and last_sample are written in place."""
    a = _update_inputs(dtype=torch.float64)
    x_prev, m_out, last = _run_update(a, "reference")
    c = {name: a["rows"][a["row_index"], k].reshape(-1, 1, 1, 1) for k, name in enumerate(FUSED_COLUMNS)}
    u, cond, z = a["model_output"], a["model_cond"], a["noise"]
    h1, h2, h3 = a["history"]
    g = (u + 2.5 * (cond - u)) * a["cfg_factor"].reshape(-1, 1, 1, 1)
    x_s = a["x"] + c["churn"] * z
    s = a["thresh"].reshape(-1, 1, 1, 1)
    m = (c["conv_sample"] * x_s + c["conv_model"] * g).clamp(-s, s) / s
    corrected = (c["c_this"] * x_s + c["c_last"] * a["last_sample"] + c["c_model"] * m + c["c_h1"] * h1
                 + c["c_h2"] * h2 + c["c_h3"] * h3)
    want = c["p_corr"] * corrected + c["p_m0"] * m + c["p_h1"] * h1 + c["p_h2"] * h2 + c["p_noise"] * z
    torch.testing.assert_close(x_prev, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(m_out, m, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(last, corrected, rtol=1e-13, atol=1e-13)


def _compiled_backends():
    return [b for b in ("cpu", "cuda_emu") if F.availability()[b][0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", _compiled_backends() or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="no compiled backend here"))])
def test_solver_update_compiled_equals_the_reference(backend, dtype):
    """Every option at once and each optional input absent, against the reference (float32 math both)."""
    a = _update_inputs(dtype=dtype, seed=1)
    variants = [{}, {"model_cond": None}, {"cfg_factor": None, "thresh": None}, {"last_sample": None},
                {"history": (a["history"][0], None, None)}, {"noise": None},
                {"model_output": a["model_output"].float(), "noise": a["noise"].float()}]
    tol = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    for override in variants:
        got = _run_update(a, backend, **override)
        want = _run_update(a, "reference", **override)
        for k, (g_, w_) in enumerate(zip(got, want)):
            if w_ is None:
                assert g_ is None
                continue
            assert g_.dtype == w_.dtype and g_.shape == w_.shape
            torch.testing.assert_close(g_, w_, rtol=tol, atol=tol * 4, msg=lambda m: f"{override.keys()} [{k}] {m}")


@pytest.mark.parametrize("backend", ["reference"] + _compiled_backends())
def test_solver_update_reads_every_input_before_writing(backend):
    """m_out may be the memory of a history entry (UniPC at order == solver_order reads the slot it writes):
    the result is that of a separate m_out; last_sample is read, then overwritten."""
    a = _update_inputs(seed=2)
    h1, h2, h3 = (h.clone() for h in a["history"])
    want = _run_update(a, backend, history=(h1.clone(), h2.clone(), h3.clone()))
    for alias in (0, 2):
        hist = [h1.clone(), h2.clone(), h3.clone()]
        last = a["last_sample"].clone()
        x_prev = F.solver_update(a["x"], a["model_output"], a["rows"], a["row_index"], hist[alias],
                                 model_cond=a["model_cond"], guidance_scale=2.5, cfg_factor=a["cfg_factor"],
                                 thresh=a["thresh"], history=tuple(hist), last_sample=last, noise=a["noise"],
                                 backend=backend)
        torch.testing.assert_close(x_prev, want[0], rtol=0, atol=0)
        torch.testing.assert_close(hist[alias], want[1], rtol=0, atol=0)
        torch.testing.assert_close(last, want[2], rtol=0, atol=0)


def test_solver_update_draws_noise_as_p_sample_step():
    """draw_noise with a seed: the reference draws torch.Generator(seed)'s standard normal (p_sample_step's
    convention); without draw_noise and noise there is no noise term."""
    a = _update_inputs(seed=3)
    m_out = torch.empty(a["x"].shape)
    rows = a["rows"]
    drawn = F.solver_update(a["x"], a["model_output"], rows, a["row_index"], m_out, draw_noise=True, seed=5,
                            backend="reference")
    z = torch.randn(a["x"].shape, generator=torch.Generator().manual_seed(5))
    given = F.solver_update(a["x"], a["model_output"], rows, a["row_index"], m_out, noise=z, backend="reference")
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)
    none = F.solver_update(a["x"], a["model_output"], rows, a["row_index"], m_out, backend="reference")
    zero = F.solver_update(a["x"], a["model_output"], rows, a["row_index"], m_out, noise=torch.zeros_like(z),
                           backend="reference")
    torch.testing.assert_close(none, zero, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference"] + _compiled_backends())
def test_solver_update_bad_input_names_the_argument(backend):
    a = _update_inputs(seed=4)
    x, mo, rows, index = a["x"], a["model_output"], a["rows"], a["row_index"]
    m_out = torch.empty(x.shape)
    call = lambda **kw: F.solver_update(**({"x": x, "model_output": mo, "rows": rows, "row_index": index,  # noqa: E731
                                             "m_out": m_out, "backend": backend} | kw))
    cases = [
        (dict(rows=rows.double()), TypeError, "rows"),
        (dict(rows=rows[:, :13].contiguous()), ValueError, "rows"),
        (dict(row_index=index.int()), TypeError, "row_index"),
        (dict(row_index=index[:2]), ValueError, "row_index"),
        (dict(row_index=torch.tensor([0, 1, 4])), ValueError, "row_index"),
        (dict(m_out=torch.empty(x.shape, dtype=torch.float64)), TypeError, "m_out"),
        (dict(m_out=torch.empty(x.shape)[:2]), ValueError, "m_out"),
        (dict(last_sample=x.half()), TypeError, "last_sample"),
        (dict(history=(x[:, :1],)), ValueError, "h"),
        (dict(cfg_factor=torch.ones(2)), ValueError, "cfg_factor"),
        (dict(thresh=torch.ones(3, dtype=torch.float64)), TypeError, "thresh"),
        (dict(model_cond=x.double()), TypeError, "model_cond"),
        (dict(guidance_scale="2"), TypeError, "guidance_scale"),
        (dict(draw_noise=True, seed=-1), ValueError, "seed"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            call(**kw)
    with pytest.raises(ValueError, match="history"):
        call(history=(None, None, None, None))


def test_solver_update_gradients_run_on_the_reference():
    """The kernels have no gradient: an input that requires grad takes the reference (ordinary autograd)."""
    a = _update_inputs(seed=5)
    mo = a["model_output"].clone().requires_grad_()
    h1 = a["history"][0].clone().requires_grad_()
    m_out = torch.empty(a["x"].shape)
    x_prev = F.solver_update(a["x"], mo, a["rows"], a["row_index"], m_out, history=(h1,))
    grads = torch.autograd.grad(x_prev.sum(), (mo, h1))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_host_index_steps_reuse_their_device_tensors():
    """A host step index: the fused rows and the row index are made once (cached), not per step."""
    table = TABLES["dpm"](10)
    x = torch.randn(SHAPE)
    history = new_history(table, x)
    dpm_solver_step(model(x, 2), x, 2, table, history, noise=torch.zeros(SHAPE))
    rows, index = table.fused("cpu"), table.row_index(table.row_of(2, 2), SHAPE[0], x.device)
    dpm_solver_step(model(x, 2), x, 2, table, history, noise=torch.zeros(SHAPE))
    assert table.fused("cpu") is rows and table.row_index(table.row_of(2, 2), SHAPE[0], x.device) is index
    assert table.fused_rows().shape == (10 * 3, len(FUSED_COLUMNS))
    unipc = TABLES["unipc"](10)
    assert unipc.fused_rows().shape == (10 * 3 * 4, len(FUSED_COLUMNS))
    assert unipc.row_of(torch.tensor([2]), torch.tensor([3]), torch.tensor([1])).item() == unipc.row_of(2, 3, 1)


def test_host_index_steps_with_guidance_without_host_sync():
    """The host-index path (the drop-ins' loop) with guidance and its rescale: no .item() / nonzero either."""
    from test_no_host_sync import NoHostSync

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(SHAPE, device=dev)
    out2 = torch.randn((2 * SHAPE[0], *SHAPE[1:]), device=dev)
    for kind, make in TABLES.items():
        table = make(10)
        table.on(dev), table.fused(dev)  # set_timesteps time: the copies to the device
        history = new_history(table, x) if kind in ("dpm", "unipc") else None
        last = torch.zeros_like(x)
        for i in range(3):  # set-up, outside the check: the first step makes the [R, B] row-index tensor
            step(kind, out2, x, i, table, history, last, torch.zeros_like(x), guidance_scale=5.0, guidance_rescale=0.5)
        with NoHostSync():
            for i in range(3, 6):
                out = step(kind, out2, x, i, table, history, last, None, guidance_scale=5.0, guidance_rescale=0.5,
                           validate=False)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_solver_update_checked_equals_solver_update():
    """The steps' entry (ddpm_fast.ops.solvers.solver_update_checked: the compiled op without a second Python
    check on CPU tensors) gives solver_update's outputs for each history length and with draw_noise (seed or
    generator), and an input that requires grad still takes the reference (a gradient)."""
    from ddpm_fast.ops.solvers import solver_update_checked

    a = _update_inputs(seed=6)
    for history in ((), a["history"][:1], a["history"][:2], a["history"]):
        kw = dict(model_cond=a["model_cond"], guidance_scale=2.5, cfg_factor=a["cfg_factor"], history=history,
                  noise=a["noise"])
        want_m, got_m = torch.empty(a["x"].shape), torch.empty(a["x"].shape)
        want_last, got_last = a["last_sample"].clone(), a["last_sample"].clone()
        want = F.solver_update(a["x"], a["model_output"], a["rows"], a["row_index"], want_m, last_sample=want_last,
                               **kw)
        got = solver_update_checked(a["x"], a["model_output"], a["rows"], a["row_index"], got_m,
                                    last_sample=got_last, **kw)
        for w, g in ((want, got), (want_m, got_m), (want_last, got_last)):
            assert torch.equal(w, g), f"history of {len(history)}"
    for draw in ("seed", "generator"):  # draw_noise: the in-kernel draw of solver_update's own path
        kw = [dict(seed=5) if draw == "seed" else dict(generator=torch.Generator().manual_seed(5)) for _ in "ab"]
        want = F.solver_update(a["x"], a["model_output"], a["rows"], a["row_index"], torch.empty(a["x"].shape),
                               draw_noise=True, **kw[0])
        got = solver_update_checked(a["x"], a["model_output"], a["rows"], a["row_index"], torch.empty(a["x"].shape),
                                    draw_noise=True, **kw[1])
        assert torch.equal(want, got), draw
    mo = a["model_output"].clone().requires_grad_()
    x_prev = solver_update_checked(a["x"], mo, a["rows"], a["row_index"], torch.empty(a["x"].shape))
    (grad,) = torch.autograd.grad(x_prev.sum(), (mo,))
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_solver_update_checked_takes_the_compiled_op_where_solver_update_routes_to_it(monkeypatch):
    """_compiled_kernel: the compiled op's Kernel exactly when backend "auto" routes solver_update to the compiled
    adapter for that device type (CPU here; CUDA the same way, from its own plan), else None (the checked path)."""
    from ddpm_fast import backends
    from ddpm_fast.ops import _checks as check_module
    from ddpm_fast.ops import solvers as solver_ops

    from ddpm_fast import _build, native

    fn = backends.plan("auto", "cpu", "solver_update", torch.float32)[0][0]
    compiled = getattr(fn, "func", None) is solver_ops._solver_update_compiled
    eager = native.eager_kernels.solver_update.args[0]  # outside torch.compile: the op's direct binding
    kernel = solver_ops._compiled_kernel("cpu", torch.float32)
    assert (kernel is eager) if compiled else kernel is None
    if compiled:
        assert kernel.op is _build.direct_bindings(False).solver_update and kernel.name == fn.args[0].name
    assert solver_ops._compiled_kernel("meta", torch.float32) is None  # no compiled op there: no plan asked
    asked = []
    monkeypatch.setattr(backends, "plan", lambda *key: asked.append(key) or ((fn, ""), (), None))
    assert solver_ops._compiled_kernel("cuda", torch.float16) is (eager if compiled else None)
    assert asked == [("auto", "cuda", "solver_update", torch.float16)]
    monkeypatch.setattr(check_module, "is_compiling", lambda: True)  # under torch.compile: the traceable Kernel
    assert solver_ops._compiled_kernel("cpu", torch.float32) is (fn.args[0] if compiled else None)


# -- the steps' own noise draw: solver_update's draw_noise (in-kernel Philox on the compiled backends) ---------
NOISE_SHAPE = (2, 4, 64, 64)  # n = 32768 draws for the distribution checks


def _noise_step(kind, x, index, table, history=None, **kw):
    """x_prev of one step with a fresh history (DPM: order 1, steps_done 0) and noise keywords kw."""
    mo = model(x, 0)
    if kind == "dpm":
        history = new_history(table, x) if history is None else history
        return dpm_solver_step(mo, x, index, table, history, steps_done=0, **kw)
    if kind == "euler":
        return euler_step(mo, x, index, table, s_churn=kw.pop("s_churn", 2.0), s_tmin=kw.pop("s_tmin", 0.3),
                          s_tmax=kw.pop("s_tmax", 5.0), **kw)[0]
    return euler_ancestral_step(mo, x, index, table, **kw)[0]


NOISY = ("dpm", "euler", "euler_a")  # the steps that add noise (DPM: the sde-dpmsolver++ table of TABLES)
STEP = 6  # sigma 2.04 of TABLES' 10 steps: inside euler's churn range [0.3, 5]


@pytest.mark.parametrize("kind", NOISY)
def test_seeded_steps_are_deterministic(kind):
    """The same seed gives the same x_prev on every call, another seed another one; a generator in the same
    state gives the same x_prev; the seed takes precedence over the generator."""
    table = TABLES[kind](10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(20)) * 2
    a, b = _noise_step(kind, x, STEP, table, seed=5), _noise_step(kind, x, STEP, table, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, _noise_step(kind, x, STEP, table, seed=6))
    assert torch.equal(a, _noise_step(kind, x, STEP, table, seed=5, generator=torch.Generator().manual_seed(1)))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    from_g1 = _noise_step(kind, x, STEP, table, generator=g1)
    assert torch.equal(from_g1, _noise_step(kind, x, STEP, table, generator=g2))
    assert not torch.equal(from_g1, _noise_step(kind, x, STEP, table, generator=g1))  # g1 advanced
    assert not torch.equal(from_g1, _noise_step(kind, x, STEP, table, noise=torch.zeros(SHAPE)))


def _recovered_noise(kind, table, index, x, **kw):
    """z = (x_prev(drawn) - x_prev(noise 0)) / (x_prev(noise 1) - x_prev(noise 0)): the step is affine in its
    noise, so this is the standard normal the step drew, element by element."""
    drawn = _noise_step(kind, x, index, table, **kw).double()
    zero = _noise_step(kind, x, index, table, noise=torch.zeros_like(x)).double()
    one = _noise_step(kind, x, index, table, noise=torch.ones_like(x)).double()
    coefficient = one - zero
    assert coefficient.abs().min() > 0.1  # the noise enters every element with weight (this step's sigma_up, ...)
    return (drawn - zero) / coefficient


@pytest.mark.parametrize("kind", NOISY)
def test_drawn_noise_is_standard_normal(kind):
    """The draw recovered from x_prev over n = 32768 elements (2 samples) is N(0, 1) and independent.

    Bounds are 5 standard errors of each statistic under the null (a false failure has probability < 1e-6
    per check): mean: SE 1/sqrt(n); sample std s: Var(s^2) = 2/n for normal data and s - 1 ~ (s^2 - 1) / 2,
    so SE 1/sqrt(2n); the fraction with |z| < 1 (0.6827 for N(0, 1); a uniform or a two-point variable of
    std 1 gives 0.577 / 0): binomial SE sqrt(p (1 - p) / n); the correlation of neighbouring elements and
    of the two samples' draws (a repeated stream): SE 1/sqrt(n) (1/sqrt(n/2) for the halves)."""
    table = TABLES[kind](10)
    x = torch.randn(NOISE_SHAPE, generator=torch.Generator().manual_seed(21)) * 2
    z = _recovered_noise(kind, table, STEP, x, seed=1234)
    n = z.numel()
    flat = z.reshape(-1)
    assert abs(float(flat.mean())) < 5 / math.sqrt(n)
    assert abs(float(flat.std()) - 1) < 5 / math.sqrt(2 * n)
    p = math.erf(1 / math.sqrt(2))
    assert abs(float((flat.abs() < 1).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 5 / math.sqrt(n - 1)
    halves = z.reshape(2, -1)
    assert abs(float(torch.corrcoef(halves)[0, 1])) < 5 / math.sqrt(n / 2)


@pytest.mark.skipif("cpu" not in _compiled_backends(), reason="no compiled CPU backend here")
@pytest.mark.parametrize("kind", NOISY)
def test_seeded_step_is_one_solver_update_draw(kind):
    """On the compiled CPU path the step's seeded (or generator) draw is solver_update's own draw_noise with the
    same rows: the step adds no noise of its own."""
    table = TABLES[kind](10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(22)) * 2
    index, batch = STEP, SHAPE[0]
    churn = (2.0, 0.3, 5.0, 1.0) if kind == "euler" else None
    history = new_history(table, x)
    if kind == "dpm":  # order 1 (steps_done 0): the row row_of(STEP, 1), its history slots read
        rows, row_index = table.fused(x.device), table.row_index(table.row_of(index, 1), batch, x.device)
        previous = (history[(index - 1) % 3], history[(index - 2) % 3])
    else:
        rows, row_index = table.host_rows(x.device, torch.float32, batch, churn)[index]
        previous = ()
    for noise_kw in (dict(seed=77), dict(generator=torch.Generator().manual_seed(3))):
        got = _noise_step(kind, x, index, table, history=history.clone(), **noise_kw)
        draw_kw = {k: (torch.Generator().manual_seed(3) if k == "generator" else v) for k, v in noise_kw.items()}
        want = F.solver_update(x, model(x, 0), rows, row_index, torch.empty(SHAPE), history=previous,
                               draw_noise=True, backend="cpu", **draw_kw)
        assert torch.equal(got, want), noise_kw


def test_euler_churn_draws_only_where_gamma_is_positive():
    """gamma = 0 at the step (s_churn 0, or sigma outside [s_tmin, s_tmax]): the seed changes nothing, the
    result is the noise-free one; gamma > 0: the seed's draw enters. A per-sample index with s_churn > 0 draws
    for the whole batch, and the kernel weights each sample's draw by its row's churn coefficient (0 outside
    the range)."""
    table = TABLES["euler"](10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(23)) * 2
    sigmas = table.coef[:, 0, 0]
    inside = next(i for i in range(table.num_steps) if 0.3 <= sigmas[i] <= 5.0)
    outside = next(i for i in range(table.num_steps) if not 0.3 <= sigmas[i] <= 5.0)
    for index, churn in ((inside, dict(s_churn=0.0)), (outside, {})):
        free = _noise_step("euler", x, index, table, noise=torch.zeros(SHAPE), **churn)
        for seed in (1, 2):
            assert torch.equal(_noise_step("euler", x, index, table, seed=seed, **churn), free), (index, churn)
        g = torch.Generator().manual_seed(4)
        state = g.get_state()
        assert torch.equal(_noise_step("euler", x, index, table, generator=g, **churn), free)
        assert torch.equal(g.get_state(), state)  # nothing drawn: the generator did not advance
    free = _noise_step("euler", x, inside, table, noise=torch.zeros(SHAPE))
    a = _noise_step("euler", x, inside, table, seed=1)
    assert torch.equal(a, _noise_step("euler", x, inside, table, seed=1))
    assert not torch.equal(a, free) and not torch.equal(a, _noise_step("euler", x, inside, table, seed=2))
    per_sample = torch.tensor([inside, outside, inside])
    got = _noise_step("euler", x, per_sample, table, seed=1)
    assert torch.equal(got[1], _noise_step("euler", x, outside, table, noise=torch.zeros(SHAPE))[1])
    assert torch.equal(got[0], a[0]) and torch.equal(got[2], a[2])


@pytest.mark.parametrize("kind", NOISY)
def test_per_sample_index_with_seed_matches_host_steps(kind):
    """A per-sample step index [B] with a seed: each sample gets the host-index step at its index with the
    same seed (the draw depends on the seed and the element, not on the rows)."""
    table = TABLES[kind](10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(24)) * 2
    index = torch.tensor([1, STEP, 8])
    got = _noise_step(kind, x, index, table, seed=11)
    for b, i in enumerate(index.tolist()):
        want = _noise_step(kind, x, i, table, seed=11)
        assert torch.equal(got[b], want[b]), (b, i)
    assert not torch.equal(got, _noise_step(kind, x, index, table, seed=12))


@pytest.mark.parametrize("kind", NOISY)
def test_bad_seed_or_generator_names_it(kind):
    table = TABLES[kind](10)
    x = torch.randn(SHAPE)
    for seed in (-1, 2 ** 63, 1.5, True):
        with pytest.raises((ValueError, TypeError), match="seed"):
            _noise_step(kind, x, STEP, table, seed=seed)
    with pytest.raises(TypeError, match="generator"):
        _noise_step(kind, x, STEP, table, generator=7)


def test_drawing_steps_without_host_sync():
    """seed, generator and the default generator: the steps' draw reads nothing on the host."""
    from test_no_host_sync import NoHostSync

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(SHAPE, device=dev)
    for kind in NOISY:
        table = TABLES[kind](10)
        table.on(dev), table.fused(dev)
        _noise_step(kind, x, STEP, table, noise=torch.zeros_like(x))  # set-up: the cached row-index tensors
        for noise_kw in (dict(seed=3), dict(generator=torch.Generator(dev).manual_seed(0)), {}):
            with NoHostSync():
                for index in (STEP, torch.tensor([0, STEP, 7], device=dev)):
                    out = _noise_step(kind, x, index, table, validate=False, **noise_kw)
            assert out.shape == x.shape and torch.isfinite(out).all()
