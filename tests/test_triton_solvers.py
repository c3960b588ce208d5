"""backend="triton"'s solver_update (ddpm_fast/triton/solvers.py) against the formula of the op's contract
(reference.solver_update, csrc/ops/solvers.h), written here in float64: every optional input present and
absent, CFG, cfg_factor, dynamic thresholding, the in-place outputs (m_out, last_sample; m_out aliasing h3),
fp32 / fp16 (bf16 on a GPU) x with float32 history, layouts; in-kernel noise (the Philox stream of
p_sample_step and of the C++ op for a seed, standard normal); the torch.library op under opcheck and
torch.compile, and its ahead-of-time compile.

Comparisons follow the flash-attention rule of tests/test_triton_ops.py: |kernel - ref64| <= 2 |same - ref64|
+ floor, ref64 the formula in float64 and ``same`` the formula in float32 (the compute dtype), both from the
inputs the kernel reads. Without a GPU the kernel runs under the Triton interpreter (tests/conftest.py).
"""
import functools
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm_fast.backends import BackendUnavailableError

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no GPU and the Triton interpreter is off")

from test_triton_ops import DEV, DTYPES, assert_flash, layout  # noqa: E402  (after the skip marker's imports)

# the spec's column order
SPEC_COLUMNS = ("churn", "conv_sample", "conv_model", "c_this", "c_last", "c_model", "c_h1", "c_h2", "c_h3",
                "p_corr", "p_m0", "p_h1", "p_h2", "p_noise")
B, SHAPE, R = 3, (2, 3, 5), 4
ROW_INDEX = [3, 0, 3]  # a repeated row, and rows not in order


def make(seed=0):
    """float64 inputs of one step: x, u (model_output), c (model_cond), h1..h3, last, noise [B, 2, 3, 5];
    rows [R, 14]; row_index [B]; cfg_factor, thresh [B] (thresholds that clamp some of m)."""
    g = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
         for k in ("x", "u", "c", "h1", "h2", "h3", "last", "noise")}
    d["rows"] = torch.randn(R, len(SPEC_COLUMNS), generator=g, dtype=torch.float64)
    d["row_index"] = torch.tensor(ROW_INDEX)
    d["cfg_factor"] = torch.rand(B, generator=g, dtype=torch.float64) * 0.5 + 0.75
    d["thresh"] = torch.tensor([0.8, 1.3, 2.5], dtype=torch.float64)
    return d


def formula(d, use, dt, scale):
    """(x_prev, m, corrected) of the spec in dtype dt, from the inputs in d that ``use`` names (others absent)."""
    up = {k: (v.to(dt) if k in use and v is not None else None) for k, v in d.items()}
    row = d["rows"].to(dt)[d["row_index"]]

    def col(name):
        return row[:, SPEC_COLUMNS.index(name)].reshape(B, 1, 1, 1)

    zero = torch.zeros((), dtype=dt)
    x, noise, last = up["x"], up["noise"] if up["noise"] is not None else zero, up["last"]
    h1, h2, h3 = (up[k] if up[k] is not None else zero for k in ("h1", "h2", "h3"))
    g = up["u"] if up["c"] is None else up["u"] + scale * (up["c"] - up["u"])
    if up["cfg_factor"] is not None:
        g = g * up["cfg_factor"].reshape(B, 1, 1, 1)
    x_s = x + col("churn") * noise
    m = col("conv_sample") * x_s + col("conv_model") * g
    if up["thresh"] is not None:
        s = up["thresh"].reshape(B, 1, 1, 1)
        m = torch.minimum(torch.maximum(m, -s), s) / s
    corrected = (col("c_this") * x_s + col("c_last") * (last if last is not None else zero) + col("c_model") * m
                 + col("c_h1") * h1 + col("c_h2") * h2 + col("c_h3") * h3)
    x_prev = col("p_corr") * corrected + col("p_m0") * m + col("p_h1") * h1 + col("p_h2") * h2 + col("p_noise") * noise
    return x_prev, m, corrected


def quantized(d, x_dtype, u_dtype=None, noise_dtype=None):
    """d's values as the kernel reads them: x, u, c in x's dtype (or u_dtype), noise in noise_dtype (x's),
    the rest float32; still float64 tensors (the formulas' inputs)."""
    dtypes = {"x": x_dtype, "u": u_dtype or x_dtype, "c": u_dtype or x_dtype, "noise": noise_dtype or x_dtype}
    return {k: (v.to(dtypes.get(k, torch.float32)).double() if v.is_floating_point() else v) for k, v in d.items()}


def run_kernel(d, use, x_dtype, scale=1.0, u_dtype=None, noise_dtype=None, kind="contiguous", m_out=None,
               draw_noise=False, seed=None, generator=None):
    """ddpm_fast.triton.solver_update on d's inputs named by ``use``: (x_prev, m_out, last_sample after)."""
    from ddpm_fast import triton as TB

    dtypes = {"x": x_dtype, "u": u_dtype or x_dtype, "c": u_dtype or x_dtype, "noise": noise_dtype or x_dtype,
              "row_index": torch.int64}
    t = {k: layout(v.to(dtypes.get(k, torch.float32)), kind if v.ndim == 4 else "contiguous").to(DEV)
         if k in use else None for k, v in d.items()}
    m_out = torch.full(t["x"].shape, float("nan"), device=DEV) if m_out is None else m_out
    x_prev = TB.solver_update(t["x"], t["u"], t["rows"], t["row_index"], m_out, model_cond=t["c"],
                              guidance_scale=scale, cfg_factor=t["cfg_factor"], thresh=t["thresh"],
                              history=(t["h1"], t["h2"], t["h3"]), last_sample=t["last"], noise=t["noise"],
                              draw_noise=draw_noise, seed=seed, generator=generator)
    return x_prev, m_out, t["last"]


BASE = ("x", "u", "rows", "row_index")
OPTIONAL = ("c", "cfg_factor", "thresh", "h1", "h2", "h3", "last")


def check_case(d, use, x_dtype, scale=7.5, **kw):
    """The kernel's three outputs against the formula (flash rule), for the inputs ``use``."""
    x_prev, m_out, last = run_kernel(d, use, x_dtype, scale, **kw)
    q = quantized(d, x_dtype, kw.get("u_dtype"), kw.get("noise_dtype"))
    want64 = formula(q, use, torch.float64, scale)
    same = formula(q, use, torch.float32, scale)
    what = f"{x_dtype} {sorted(set(use) - set(BASE))}"
    assert x_prev.dtype == x_dtype and m_out.dtype == torch.float32
    assert_flash(x_prev.cpu(), same[0].to(x_dtype), want64[0], x_dtype, f"x_prev {what}")
    assert_flash(m_out.cpu(), same[1], want64[1], torch.float32, f"m_out {what}")
    if "last" in use:
        assert last.dtype == torch.float32
        assert_flash(last.cpu(), same[2], want64[2], torch.float32, f"last_sample {what}")
    return x_prev, m_out, last


# -- the formula: every optional input present and absent ----------------------------------------------------
HISTORIES = ((), ("h1",), ("h1", "h2"), ("h1", "h2", "h3"), ("h2",), ("h3",))  # as the steps fill it, and gaps


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_every_optional_input_present_and_absent(x_dtype):
    """Every combination of model_cond, cfg_factor, thresh and last_sample with each history pattern; the noise
    tensor present in half of them (when an odd number of the other inputs is), so each input meets both."""
    d = make(seed=1)
    for flags in itertools.product((False, True), repeat=4):
        for history in HISTORIES:
            extra = tuple(k for k, on in zip(("c", "cfg_factor", "thresh", "last"), flags) if on) + history
            check_case(d, BASE + extra + (("noise",) if len(extra) % 2 else ()), x_dtype)


def test_the_kernel_reads_each_input_and_row_column():
    """Each input and each row column changes the outputs it enters (so the formula test cannot pass on a
    kernel that drops a term): perturb one, compare with the unperturbed run."""
    d = make(seed=2)
    use = BASE + OPTIONAL + ("noise",)
    base = [o.clone() for o in run_kernel(d, use, torch.float32, 3.0)]
    for key in OPTIONAL + ("x", "u", "noise"):
        e = dict(d, **{key: d[key] * 1.5})
        got = run_kernel(e, use, torch.float32, 3.0)
        assert not torch.equal(got[0], base[0]), f"x_prev does not depend on {key}"
    for j, name in enumerate(SPEC_COLUMNS):
        rows = d["rows"].clone()
        rows[ROW_INDEX[0], j] += 0.5
        got = run_kernel(dict(d, rows=rows), use, torch.float32, 3.0)
        assert not torch.equal(got[0], base[0]), f"column {name} does not enter x_prev"


def test_columns_follow_the_spec_and_the_tables():
    from ddpm_fast.triton import solvers

    assert solvers.COLUMNS == SPEC_COLUMNS
    tables = pytest.importorskip("ddpm_fast.solvers.tables")
    if not hasattr(tables, "FUSED_COLUMNS"):
        pytest.skip("ddpm_fast.solvers.tables has no FUSED_COLUMNS yet (issue 19, part 2)")
    assert tuple(tables.FUSED_COLUMNS) == solvers.COLUMNS


@pytest.mark.parametrize("x_dtype", DTYPES)
def test_model_output_and_noise_in_float32_with_half_x(x_dtype):
    """model_output / model_cond and noise may come in the compute dtype S while x is half precision."""
    d = make(seed=3)
    check_case(d, BASE + OPTIONAL + ("noise",), x_dtype, u_dtype=torch.float32, noise_dtype=torch.float32)


def test_guidance_scale_one_and_zero():
    """scale 0: the unconditional output exactly; scale 1: the conditional one (to rounding: u + (c - u))."""
    d = make(seed=4)
    use = BASE + ("c", "h1")
    for scale, taken, exact in ((0.0, "u", True), (1.0, "c", False)):
        got = run_kernel(d, use, torch.float32, scale)
        plain = run_kernel(dict(d, u=d[taken]), BASE + ("h1",), torch.float32)
        tol = dict(rtol=0, atol=0) if exact else {}
        torch.testing.assert_close(got[0], plain[0], **tol)
        torch.testing.assert_close(got[1], plain[1], **tol)


def test_float64_rows_compute_in_float64():
    """Called directly with float64 tensors (the public op sends float64 to the reference), the kernel computes
    in float64: it meets the float64 formula to rounding."""
    from ddpm_fast.triton import solvers

    d = make(seed=5)
    use = BASE + OPTIONAL + ("noise",)
    t = {k: v.to(DEV) for k, v in d.items()}
    m_out = torch.empty_like(t["x"])
    last = t["last"].clone()
    x_prev = solvers.solver_update(t["x"], t["u"], t["rows"], t["row_index"], m_out, model_cond=t["c"],
                                   guidance_scale=2.0, cfg_factor=t["cfg_factor"], thresh=t["thresh"],
                                   history=(t["h1"], t["h2"], t["h3"]), last_sample=last, noise=t["noise"])
    want = formula(d, use, torch.float64, 2.0)
    for got, ref in zip((x_prev, m_out, last), want):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=1e-12)


# -- in-place outputs, aliasing, layouts -----------------------------------------------------------------------
def test_outputs_in_place_and_inputs_untouched():
    d = make(seed=6)
    use = BASE + OPTIONAL + ("noise",)
    from ddpm_fast import triton as TB

    t = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype).to(DEV) for k, v in d.items()}
    before = {k: v.clone() for k, v in t.items()}
    m_out = torch.zeros_like(t["x"])
    m_ptr, last_ptr = m_out.data_ptr(), t["last"].data_ptr()
    x_prev = TB.solver_update(t["x"], t["u"], t["rows"], t["row_index"], m_out, model_cond=t["c"],
                              guidance_scale=7.5, cfg_factor=t["cfg_factor"], thresh=t["thresh"],
                              history=(t["h1"], t["h2"], t["h3"]), last_sample=t["last"], noise=t["noise"])
    assert m_out.data_ptr() == m_ptr and t["last"].data_ptr() == last_ptr
    assert x_prev.data_ptr() not in (m_ptr, last_ptr, t["x"].data_ptr())
    q = quantized(d, torch.float32)
    want = formula(q, use, torch.float64, 7.5)
    torch.testing.assert_close(m_out.cpu().double(), want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["last"].cpu().double(), want[2], rtol=1e-5, atol=1e-5)
    for k in set(t) - {"last"}:
        assert torch.equal(t[k], before[k]), f"{k} was written"


def test_m_out_may_alias_h3():
    """UniPC at full order writes m into the history slot it reads as h3: every input is read first."""
    d = make(seed=7)
    use = BASE + OPTIONAL + ("noise",)
    separate = run_kernel(d, use, torch.float32, 2.0)
    h3 = d["h3"].float().to(DEV)
    aliased = run_kernel(dict(d, h3=h3), use, torch.float32, 2.0, m_out=h3)
    assert aliased[1] is h3
    for a, b in zip(aliased, separate):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["channels_last", "sliced"])
def test_layouts_give_the_same_bits(kind):
    """channels_last / strided inputs (and a strided m_out) give the contiguous run's results exactly, drawn
    noise included (it is drawn at the logical index)."""
    d = make(seed=8)
    use = BASE + OPTIONAL
    for extra in ((("noise",), {}), ((), {"draw_noise": True, "seed": 99})):
        contiguous = run_kernel(d, use + extra[0], torch.float32, 2.0, **extra[1])
        wide = torch.full((B, *SHAPE[:-1], 2 * SHAPE[-1]), float("nan"), device=DEV)
        m_out = wide[..., ::2] if kind == "sliced" else torch.empty(B, *SHAPE, device=DEV).contiguous(
            memory_format=torch.channels_last)
        other = run_kernel(d, use + extra[0], torch.float32, 2.0, kind=kind, m_out=m_out, **extra[1])
        for a, b in zip(other, contiguous):
            assert torch.equal(a, b)


def test_many_chunks_and_int64_indices_give_the_same_bits(monkeypatch):
    """Several programs per sample (tiny blocks) and int64 element indices: bit-identical outputs and noise."""
    from ddpm_fast.triton import _layout, _runtime as rt

    d = make(seed=9)
    use = BASE + OPTIONAL
    default = run_kernel(d, use, torch.float32, 2.0, draw_noise=True, seed=5)
    monkeypatch.setattr(rt, "block_for", lambda n: (16, 4))
    monkeypatch.setattr(rt, "INT32_INDEX_LIMIT", 0)
    _layout.clear_cache()
    try:
        small = run_kernel(d, use, torch.float32, 2.0, draw_noise=True, seed=5)
    finally:
        _layout.clear_cache()
    for a, b in zip(small, default):
        assert torch.equal(a, b)


def test_row_index_out_of_range_is_clamped():
    """A bad row index never reads outside rows (clamped into [0, R); asserted under TRITON_DEBUG=1)."""
    d = make(seed=10)
    use = BASE + ("h1",)
    high = run_kernel(dict(d, row_index=torch.tensor([R + 5, -2, 0])), use, torch.float32)
    want = run_kernel(dict(d, row_index=torch.tensor([R - 1, 0, 0])), use, torch.float32)
    assert torch.equal(high[0], want[0])


def test_empty_batch_and_bf16_on_the_interpreter():
    from ddpm_fast import triton as TB

    x = torch.zeros(0, 3, device=DEV)
    rows = torch.zeros(1, 14, device=DEV)
    out = TB.solver_update(x, x, rows, torch.zeros(0, dtype=torch.int64, device=DEV), torch.empty_like(x))
    assert out.shape == (0, 3)
    if DEV == "cpu":
        xb = torch.zeros(2, 3, dtype=torch.bfloat16)
        with pytest.raises(BackendUnavailableError, match="bfloat16"):
            TB.solver_update(xb, xb, rows, torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3))


# -- in-kernel noise ------------------------------------------------------------------------------------------
def _noise_only(seed=None, generator=None, shape=SHAPE, batch=B, kind="contiguous"):
    """x_prev = the drawn noise (p_noise 1, every other coefficient 0)."""
    from ddpm_fast import triton as TB

    rows = torch.zeros(1, 14, device=DEV)
    rows[0, SPEC_COLUMNS.index("p_noise")] = 1.0
    x = layout(torch.zeros(batch, *shape), kind).to(DEV)
    return TB.solver_update(x, x, rows, torch.zeros(batch, dtype=torch.int64, device=DEV), torch.empty_like(x),
                            draw_noise=True, seed=seed, generator=generator)


def test_drawn_noise_is_p_sample_steps_philox_stream():
    """The same seed draws the same numbers as Triton's p_sample_step (mean type x_prev with a zero output and
    learned log variance 0: sample = 1 * noise exactly), element for element."""
    import ddpm_fast as F

    sched = F.NoiseSchedule.named("linear", 100)
    mo = torch.zeros(B, 2 * SHAPE[0], *SHAPE[1:], device=DEV)
    step = F.p_sample_step(mo, torch.zeros(B, *SHAPE, device=DEV), torch.full((B,), 10, device=DEV), sched,
                           mean_type="x_prev", var_type="learned", seed=1234, backend="triton")["sample"]
    got = _noise_only(seed=1234)
    assert got.abs().max() > 0.5
    assert torch.equal(got, step)


def test_drawn_noise_enters_like_given_noise():
    """Drawing in-kernel is the same step as passing the drawn numbers as the noise tensor (churn and p_noise)."""
    d = make(seed=11)
    use = BASE + OPTIONAL
    drawn = run_kernel(d, use, torch.float32, 2.0, draw_noise=True, seed=77)
    z = _noise_only(seed=77).cpu().double()
    given = run_kernel(dict(d, noise=z), use + ("noise",), torch.float32, 2.0)
    for a, b in zip(drawn, given):
        assert torch.equal(a, b)
    without = run_kernel(d, use, torch.float32, 2.0)  # draw_noise False and no tensor: no noise
    assert not torch.equal(without[0], drawn[0])
    torch.testing.assert_close(without[1].cpu().double(), formula(quantized(d, torch.float32), use, torch.float64,
                                                                   2.0)[1], rtol=1e-5, atol=1e-5)


def test_drawn_noise_is_standard_normal_and_seeded():
    from scipy import stats

    shape, batch = (4, 16, 16), 2
    a, b, c = (_noise_only(seed=s, shape=shape, batch=batch) for s in (1234, 1234, 1235))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = lambda: torch.Generator(DEV).manual_seed(9)  # noqa: E731
    assert torch.equal(_noise_only(generator=gen(), shape=shape, batch=batch),
                       _noise_only(generator=gen(), shape=shape, batch=batch))
    assert torch.equal(_noise_only(seed=1234, shape=shape, batch=batch, kind="channels_last"), a)
    z = a.double().flatten().cpu().numpy()
    n = z.size
    assert abs(z.mean()) < 4 / np.sqrt(n)
    assert abs(z.var() - 1) < 4 * np.sqrt(2 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[: n // 2], z[n // 2:])[0, 1]) < 4 / np.sqrt(n // 2)  # the samples draw independently
    assert abs(np.corrcoef(z, c.double().flatten().cpu().numpy())[0, 1]) < 4 / np.sqrt(n)


def _cpp_solver_update():
    """torch.ops.ddpm_fast.solver_update when the compiled CPU extension has it (issue 19, part 1), else None."""
    from ddpm_fast import backends

    if not backends.available("cpu"):
        return None
    return getattr(torch.ops.ddpm_fast, "solver_update", None) if hasattr(torch.ops, "ddpm_fast") else None


def test_drawn_noise_and_results_match_the_cpp_op():
    """The C++ op (schema of the spec) draws the same Philox stream for a seed and computes the same step."""
    op = _cpp_solver_update()
    if op is None:
        pytest.skip("the compiled CPU op torch.ops.ddpm_fast.solver_update is not built here")
    d = make(seed=12)
    use = BASE + OPTIONAL
    kernel = run_kernel(d, use, torch.float32, 2.0, draw_noise=True, seed=4321)
    t = {k: (v.float() if v.is_floating_point() else v) for k, v in d.items()}
    m_out, last = torch.empty(B, *SHAPE), t["last"].clone()
    x_prev = op(t["x"], t["u"], t["c"], t["rows"], t["row_index"], 2.0, t["cfg_factor"], t["thresh"], t["h1"],
                t["h2"], t["h3"], last, None, True, 4321, None, m_out)
    for got, want in zip(kernel, (x_prev, m_out, last)):
        torch.testing.assert_close(got.cpu(), want)


# -- torch.library, torch.compile, ahead-of-time compile -----------------------------------------------------
def _op_args(d, seed=None, **absent):
    t = {k: (v.float() if v.is_floating_point() else v).to(DEV) for k, v in d.items()}
    t.update(absent)
    return (t["x"], t["u"], t["c"], t["rows"], t["row_index"], 3.0, t["cfg_factor"], t["thresh"], t["h1"], t["h2"],
            t["h3"], t["last"], t["noise"], seed, torch.empty_like(t["x"]))


def test_opcheck():
    """Schema (last_sample and m_out declared mutated), fake and the dispatcher routes of the library op."""
    from ddpm_fast.triton import solvers

    d = make(seed=13)
    seed = torch.tensor([5], device=DEV)
    for args in (_op_args(d), _op_args(d, c=None, cfg_factor=None, thresh=None, last=None, h2=None, h3=None),
                 _op_args(d, seed=seed, noise=None)):
        torch.library.opcheck(solvers.solver_update_op, args)
    schema = str(solvers.solver_update_op._opoverload._schema)
    assert re.search(r"Tensor\(a\d*!\)\? last_sample", schema) and re.search(r"Tensor\(a\d*!\) m_out", schema), schema
    assert len(re.findall("!", schema)) == 2, schema  # nothing else is declared written


def test_torch_compile_fullgraph_in_place():
    """torch.compile(fullgraph=True) of a step calling the op gives the eager results, in-place outputs included."""
    from ddpm_fast import triton as TB

    d = make(seed=14)
    t = {k: (v.float() if v.is_floating_point() else v).to(DEV) for k, v in d.items()}

    def step(x, u, c, h1, h2, h3, last, m_out):
        return TB.solver_update(x, u, t["rows"], t["row_index"], m_out, model_cond=c, guidance_scale=4.0,
                                cfg_factor=t["cfg_factor"], thresh=t["thresh"], history=(h1, h2, h3),
                                last_sample=last, noise=t["noise"]) * 2

    names = ("x", "u", "c", "h1", "h2", "h3")
    eager_last, compiled_last = t["last"].clone(), t["last"].clone()
    eager_m, compiled_m = torch.empty_like(t["x"]), torch.empty_like(t["x"])
    want = step(*(t[k] for k in names), eager_last, eager_m)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*(t[k] for k in names), compiled_last, compiled_m)
    for a, b in ((got, want), (compiled_m, eager_m), (compiled_last, eager_last)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


GRAPH_SCRIPT = r'''
import json, torch
from ddpm_fast.triton import solvers
from ddpm_fast.triton._runtime import INTERPRET
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

assert not INTERPRET
rows, row_index, seed = torch.randn(4, 14), torch.tensor([3, 0]), torch.tensor([7])


def step(x, u, c, h1, last, m_out):  # the op itself: check_device refuses CPU tensors off the interpreter
    return solvers.solver_update_op(x, u, c, rows, row_index, 3.0, None, None, h1, None, None, last, None, seed,
                                    m_out)


def targets(dynamic):
    """The call targets of the functionalized forward graph (AOTAutograd on fake tensors), as strings; a kernel
    as "kernel:<name>". The graph is not run (that needs a GPU): the forward compiler stops there."""
    seen = []

    def forward_compiler(graph, inputs):
        for node in (n for n in graph.graph.nodes if n.op == "call_function"):
            kernel = node.kwargs.get("kernel_idx") if "triton_kernel_wrapper" in str(node.target) else None
            seen.append(str(node.target) if kernel is None else
                        "kernel:" + kernel_side_table.get_kernel(kernel).fn.__name__)
        raise RuntimeError("captured")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic,
                             backend=lambda gm, ex: aot_module_simplified(gm, ex, fw_compiler=forward_compiler))
    try:
        compiled(*(torch.randn(2, 3, 4, 4) for _ in range(5)), torch.empty(2, 3, 4, 4))
    except Exception as exc:
        if "captured" not in str(exc):
            raise
    return sorted(set(seen))


print(json.dumps({str(dynamic): targets(dynamic) for dynamic in (False, True)}))
'''


def test_compile_traces_the_kernel_into_the_graph():
    """Off the interpreter the op is a triton_op: torch.compile (fake tensors, static and dynamic sizes) traces
    its body and holds the kernel as a triton_kernel_wrapper node, not an opaque op call (a subprocess without
    TRITON_INTERPRET; the graph is captured, not run: that needs a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"False", "True"}
    for dynamic, seen in result.items():
        assert "kernel:_solver_update_kernel" in seen, f"dynamic={dynamic}: {seen}"
        assert not [t for t in seen if "ddpm_fast_triton" in t], f"dynamic={dynamic}: the op stayed opaque: {seen}"


def test_aot_compile_no_spills_and_128_bit_loads():
    """The kernel's variants compile for sm_80 and sm_90 (a subprocess without the interpreter): no spills,
    ld.global.v4 in the contiguous (streaming) variants; every variant of the module is in the AOT list."""
    from ddpm_fast.triton import aot, solvers

    assert any(k is solvers._solver_update_kernel for _, k, *_ in aot._variants())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ddpm_fast.triton.aot", "--arch", "80", "90", "--json", "--only",
                           "solver_update"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    labels = {label for label, *_ in aot._variants() if label.startswith("solver_update")}
    assert {r["kernel"] for r in rows} == labels and len(rows) == 2 * len(labels)
    for r in rows:
        assert r["regs"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["v4_loads"] > 0 or not r["streaming"], r


def test_matches_reference_solver_update():
    """The same inputs through reference.solver_update (the one definition; issue 19, part 2): same outputs
    by the flash rule, whose float32 run is the reference's."""
    from ddpm_fast import reference

    if not hasattr(reference, "solver_update"):
        pytest.skip("reference.solver_update is not there yet (issue 19, part 2)")
    d = make(seed=15)
    use = BASE + OPTIONAL + ("noise",)
    kernel = run_kernel(d, use, torch.float32, 2.5)
    q = quantized(d, torch.float32)
    runs = {}
    for dt in (torch.float32, torch.float64):
        t = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in q.items()}
        m_out, last = torch.empty_like(t["x"]), t["last"].clone()
        x_prev = reference.solver_update(t["x"], t["u"], t["rows"], t["row_index"], m_out, model_cond=t["c"],
                                         guidance_scale=2.5, cfg_factor=t["cfg_factor"], thresh=t["thresh"],
                                         history=(t["h1"], t["h2"], t["h3"]), last_sample=last, noise=t["noise"])
        runs[dt] = (x_prev, m_out, last)
    for got, same, ref64, what in zip(kernel, runs[torch.float32], runs[torch.float64], ("x_prev", "m", "last")):
        assert_flash(got.cpu(), same, ref64, torch.float32, what)


@pytest.fixture
def auto_runs_triton(monkeypatch):
    """backend "auto" runs the Triton backend for this device's tensors (as for CUDA tensors where the extension
    has no CUDA kernels); every cached route decision is dropped before and after."""
    from ddpm_fast import backends
    from ddpm_fast.ops import _checks

    def forget():
        backends._PLANS.clear()
        _checks._cpu_plans.clear()

    forget()
    monkeypatch.setitem(backends._AUTO_ORDER, DEV, ("triton", "reference"))
    yield
    monkeypatch.undo()
    forget()


def test_checked_steps_call_the_triton_function_without_the_public_checks(auto_runs_triton, monkeypatch):
    """solver_update_checked (the functional steps' and drop-ins' call) on tensors that "auto" runs on Triton goes
    to the Triton backend's function itself, not through the public solver_update's Python checks; with an input
    that requires grad it goes through solver_update (the reference: the kernels have no gradient). Results: the
    public op's on the same backend, bit for bit."""
    from ddpm_fast import triton as TB
    from ddpm_fast.ops import solvers as S

    d = make(5)
    x, u, c, h1 = (d[k].float().to(DEV) for k in ("x", "u", "c", "h1"))
    rows, row_index = d["rows"].float().to(DEV), d["row_index"].to(DEV)
    calls = {"public": 0, "triton": 0}
    public, triton_fn = S.solver_update, TB.solver_update

    def count(name, fn):
        @functools.wraps(fn)  # (its __module__ too: how the route's function is known as Triton's)
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(S, "solver_update", count("public", public))
    monkeypatch.setattr(TB, "solver_update", count("triton", triton_fn))  # the function the backend plan finds
    from ddpm_fast import backends
    backends._PLANS.clear()  # the plan holds the function it found: find the counting one
    m_checked, m_public = torch.empty_like(x), torch.empty_like(x)
    got = S.solver_update_checked(x, u, rows, row_index, m_checked, model_cond=c, guidance_scale=3.0, history=(h1,),
                                  draw_noise=True, seed=11)
    assert calls == {"public": 0, "triton": 1}
    want = public(x, u, rows, row_index, m_public, model_cond=c, guidance_scale=3.0, history=(h1, None, None),
                  draw_noise=True, seed=11, backend="triton")
    assert torch.equal(got, want) and torch.equal(m_checked, m_public)
    calls.update(public=0, triton=0)
    S.solver_update_checked(x, u.clone().requires_grad_(), rows, row_index, torch.empty_like(x), history=(h1,))
    assert calls["public"] == 1 and calls["triton"] == 0
