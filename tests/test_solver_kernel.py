"""The compiled fused solver op torch.ops.ddpm_fast.solver_update (csrc/ops/solvers.{h,cpp}) on the cpu backend
and, when DDPM_FAST_CUDA_EMU=1, the emulated CUDA kernels' torch.ops.ddpm_fast_emu.solver_update, against the
formula of the op's contract written out here in float64 PyTorch (random rows; every optional input present or
absent; classifier-free guidance, cfg_factor, thresh; last_sample updated in place; m_out sharing h3's memory;
given and drawn noise; float32 / float16 / bfloat16 / float64 x with history in the compute dtype), the drawn
noise (seeded, the same on both backends and as p_sample_step's stream, standard normal) and the argument checks.

Tolerances come from the precision: each output may differ from the float64 formula by a few roundings of the
compute dtype relative to the magnitude of its terms (the formula evaluated on absolute values), plus, for an
fp16 / bf16 x_prev, the one rounding of that output to its dtype.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import ddpm_fast as F
from ddpm_fast import _build, native

COLUMNS = ("churn", "conv_sample", "conv_model", "c_this", "c_last", "c_model", "c_h1", "c_h2", "c_h3", "p_corr",
           "p_m0", "p_h1", "p_h2", "p_noise")  # a row's columns, in the op's order
OPTIONAL = ("model_cond", "cfg_factor", "thresh", "history", "last_sample", "noise")

_cpu_ok, _cpu_why = native.availability("cpu")
if not _cpu_ok:
    pytest.skip(f"the compiled extension is unavailable: {_cpu_why}", allow_module_level=True)


def backends():
    out = ["cpu"]
    if _build.emu_requested():
        out.append("cuda_emu")
    return out


def op_of(backend):
    if backend == "cpu":
        return torch.ops.ddpm_fast.solver_update
    ok, why = F.availability()["cuda_emu"]
    if not ok:  # requested but unavailable: a build failure fails the run (as tests/test_cuda_emu.py)
        pytest.fail(f"backend cuda_emu is unavailable: {why}", pytrace=False)
    return torch.ops.ddpm_fast_emu.solver_update


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(dtype, present, shape=(3, 2, 5, 7), R=5, seed=0, low_inputs_in_s=False):
    """Random inputs of one call: x and the model output's halves in x's dtype (or, low_inputs_in_s, in the compute
    dtype S), the history, last_sample, rows, cfg_factor and thresh in S; `present` names the optional inputs."""
    g = torch.Generator().manual_seed(seed)
    S = compute_dtype(dtype)
    B = shape[0]

    def rand(dt, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dt)

    in_dt = S if low_inputs_in_s else dtype
    a = dict(x=rand(dtype), model_output=rand(in_dt), model_cond=None, guidance_scale=1.0, cfg_factor=None,
             thresh=None, h1=None, h2=None, h3=None, last_sample=None, noise=None, draw_noise=False, seed=0,
             seed_key=None, m_out=torch.full(shape, float("nan"), dtype=S))
    a["rows"] = torch.randn(R, len(COLUMNS), generator=g, dtype=torch.float64).to(S)
    a["row_index"] = torch.randint(0, R, (B,), generator=g)
    if "model_cond" in present:
        a["model_cond"], a["guidance_scale"] = rand(in_dt), 7.5
    if "cfg_factor" in present:
        a["cfg_factor"] = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5).to(S)
    if "thresh" in present:
        a["thresh"] = (torch.rand(B, generator=g, dtype=torch.float64) * 2 + 0.5).to(S)
    if "history" in present:
        a["h1"], a["h2"], a["h3"] = rand(S), rand(S), rand(S)
    if "last_sample" in present:
        a["last_sample"] = rand(S)
    if "noise" in present:
        a["noise"] = rand(in_dt)
    return a


def formula(a, absolute=False):
    """(x_prev, m, corrected) of the contract in float64 from the inputs of `a` (as they are before the call);
    absolute: the same sums over the absolute values of every term (the magnitude the roundings scale with)."""
    x = a["x"].double()
    lead = (x.shape[0],) + (1,) * (x.dim() - 1)
    rows = a["rows"].double()[a["row_index"]]
    f = (lambda v: v.abs()) if absolute else (lambda v: v)
    col = {name: f(rows[:, k].reshape(lead)) for k, name in enumerate(COLUMNS)}

    def value(name):
        v = a.get(name)
        return f(v.double()) if v is not None else torch.zeros_like(x)

    noise, h1, h2, h3, last = (value(n) for n in ("noise", "h1", "h2", "h3", "last_sample"))
    x_s = f(x) + col["churn"] * noise
    guided = value("model_output")
    if a["model_cond"] is not None:
        scale = abs(a["guidance_scale"]) if absolute else a["guidance_scale"]
        if absolute:
            guided = guided + scale * (value("model_cond") + guided)
        else:
            guided = guided + scale * (value("model_cond") - guided)
    if a["cfg_factor"] is not None:
        guided = guided * f(a["cfg_factor"].double().reshape(lead))
    m = col["conv_sample"] * x_s + col["conv_model"] * guided
    if a["thresh"] is not None:
        s = a["thresh"].double().reshape(lead)
        m = m / s if absolute else torch.minimum(torch.maximum(m, -s), s) / s
    corrected = (col["c_this"] * x_s + col["c_last"] * last + col["c_model"] * m + col["c_h1"] * h1
                 + col["c_h2"] * h2 + col["c_h3"] * h3)
    x_prev = col["p_corr"] * corrected + col["p_m0"] * m + col["p_h1"] * h1 + col["p_h2"] * h2 + col["p_noise"] * noise
    return x_prev, m, corrected


OUTPUT_EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # half an ulp, relative
OUTPUT_TINY = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}  # half the smallest subnormal


def assert_formula(got, want, bound, S, what, out_dtype=None):
    """|got - want| <= 16 roundings of S relative to the terms' magnitude (+ the output's own rounding)."""
    eps = 2.0 ** -53 if S == torch.float64 else 2.0 ** -24
    tol = 16 * eps * bound + 1e-300
    if out_dtype in OUTPUT_EPS:
        tol = tol + OUTPUT_EPS[out_dtype] * (want.abs() + tol) + OUTPUT_TINY[out_dtype]
    err = (got.double() - want).abs()
    assert torch.isfinite(got).all(), what
    assert (err <= tol).all(), f"{what}: max error {err.max():.3g}, worst error / tolerance {(err / tol).max():.3g}"


def run_and_check(backend, a, what):
    """Call the op of `backend` on a copy of the case and check all three outputs against formula()."""
    want = formula(a)
    bound = formula(a, absolute=True)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in a.items()}
    x_prev = op_of(backend)(**a)
    S = compute_dtype(a["x"].dtype)
    assert x_prev.dtype == a["x"].dtype and x_prev.shape == a["x"].shape
    assert_formula(x_prev, want[0], bound[0], S, f"{what}: x_prev", a["x"].dtype)
    assert_formula(a["m_out"], want[1], bound[1], S, f"{what}: m_out")
    if a["last_sample"] is not None:
        assert_formula(a["last_sample"], want[2], bound[2], S, f"{what}: last_sample (corrected, in place)")
    for k in ("x", "model_output", "model_cond", "h1", "h2", "noise", "rows", "row_index"):
        if torch.is_tensor(a[k]) and a[k] is not a["m_out"]:
            assert torch.equal(a[k], before[k]), f"{what}: {k} was written"
    return x_prev


# ---- the formula ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
def test_every_subset_of_the_optional_inputs_float32(backend):
    for k, present in enumerate(itertools.chain.from_iterable(
            itertools.combinations(OPTIONAL, n) for n in range(len(OPTIONAL) + 1))):
        run_and_check(backend, make_case(torch.float32, set(present), seed=k), f"{backend} float32 {present}")


CASES = {
    "bare": (),
    "guided": ("model_cond",),
    "guided rescaled thresholded": ("model_cond", "cfg_factor", "thresh"),
    "history noise": ("history", "noise"),
    "unipc": ("history", "last_sample", "model_cond"),
    "all": OPTIONAL,
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", backends())
def test_dtypes(backend, dtype, case):
    if backend == "cuda_emu" and dtype == torch.float64:
        pytest.skip("the CUDA kernels compute in float32 (float64 takes the reference path)")
    for low_inputs_in_s in (False, True) if dtype in (torch.float16, torch.bfloat16) else (False,):
        a = make_case(dtype, set(CASES[case]), low_inputs_in_s=low_inputs_in_s)
        run_and_check(backend, a, f"{backend} {dtype} {case} (model output and noise in S: {low_inputs_in_s})")


# The samplers' launches, which the CPU loop runs with their inputs as constants (SolverUpdateElem::specialized),
# each with and without guidance, and sets it runs as given (DPM-Solver++ 2M SDE; with cfg_factor / thresh)
SAMPLER_SETS = {
    "euler": (),
    "euler churn, euler ancestral": ("noise",),
    "dpm++ 2m": ("h1",),
    "dpm++ 3m sde": ("h1", "h2", "noise"),
    "unipc order 3": ("h1", "h2", "h3", "last_sample"),
    "dpm++ 2m sde (not a constant set)": ("h1", "noise"),
    "euler rescaled (not a constant set)": ("cfg_factor",),
    "unipc order 2 thresholded (not a constant set)": ("h1", "h2", "last_sample", "thresh"),
}


@pytest.mark.parametrize("name", sorted(SAMPLER_SETS))
@pytest.mark.parametrize("backend", backends())
def test_sampler_input_sets(backend, name):
    """Each history entry present on its own (h1 without h3, ...), over a tail (70 elements a sample) and over
    several CPU chunks (4920), with and without guidance, in float32 and float64."""
    inputs = set(SAMPLER_SETS[name])
    for guided, dtype, shape in itertools.product((False, True), (torch.float32, torch.float64),
                                                  ((3, 2, 5, 7), (2, 3, 40, 41))):
        if backend == "cuda_emu" and dtype == torch.float64:
            continue
        present = (inputs - {"h1", "h2", "h3"}) | ({"history"} if inputs & {"h1", "h2", "h3"} else set())
        a = make_case(dtype, present | ({"model_cond"} if guided else set()), shape=shape)
        for h in ("h1", "h2", "h3"):
            if h not in inputs:
                a[h] = None
        run_and_check(backend, a, f"{backend} {name} guided={guided} {dtype} {shape}")


@pytest.mark.parametrize("backend", backends())
def test_m_out_may_be_h3_and_last_sample_is_updated_in_place(backend):
    """UniPC at order == solver_order reads history slot h3 and writes m into the same memory; last_sample is
    read and then overwritten with `corrected`: every input of an element is read before its outputs."""
    for dtype in (torch.float32, torch.float16):
        a = make_case(dtype, {"history", "last_sample", "noise"}, shape=(2, 3, 40, 41), seed=3)  # 2 CPU chunks
        want, bound = formula(a), formula(a, absolute=True)
        ring = torch.stack([a["h1"], a["h2"], a["h3"]])  # the history ring buffer
        a["h1"], a["h2"], a["h3"] = ring[0], ring[1], ring[2]
        a["m_out"] = ring[2]
        last = a["last_sample"]
        x_prev = op_of(backend)(**a)
        S = compute_dtype(dtype)
        assert_formula(x_prev, want[0], bound[0], S, f"{backend} {dtype} x_prev", dtype)
        assert_formula(ring[2], want[1], bound[1], S, f"{backend} {dtype} m written over h3")
        assert_formula(last, want[2], bound[2], S, f"{backend} {dtype} last_sample")
        assert a["last_sample"] is last


@pytest.mark.parametrize("backend", backends())
def test_layouts_channels_last_and_strided_outputs(backend):
    """x channels_last (the plan's order), history contiguous (gathered), m_out and last_sample strided views
    (not in the plan's layout: scattered on the CPU, copied back on the CUDA path)."""
    a = make_case(torch.float32, {"history", "last_sample", "model_cond"}, shape=(2, 3, 6, 5), seed=4)
    want, bound = formula(a), formula(a, absolute=True)
    a["x"] = a["x"].contiguous(memory_format=torch.channels_last)
    m_storage = torch.full((2, 3, 6, 10), float("nan"))
    a["m_out"] = m_storage[..., ::2]
    last_storage = torch.zeros(2, 3, 6, 10)
    last_storage[..., 1::2] = a["last_sample"]
    a["last_sample"] = last_storage[..., 1::2]
    x_prev = op_of(backend)(**a)
    assert x_prev.is_contiguous(memory_format=torch.channels_last)
    assert_formula(x_prev, want[0], bound[0], torch.float32, "x_prev")
    assert_formula(a["m_out"], want[1], bound[1], torch.float32, "strided m_out")
    assert torch.isnan(m_storage[..., 1::2]).all()  # nothing written between its elements
    assert_formula(a["last_sample"], want[2], bound[2], torch.float32, "strided last_sample")
    assert (last_storage[..., ::2] == 0).all()


def test_the_check_fails_on_a_wrong_coefficient():
    """The formula check can fail: a row with churn and p_h2 swapped is caught."""
    a = make_case(torch.float32, set(OPTIONAL), seed=9)
    want, bound = formula(a), formula(a, absolute=True)
    swapped = dict(a, rows=a["rows"][:, [12 if k == 0 else 0 if k == 12 else k for k in range(14)]].contiguous())
    x_prev = op_of("cpu")(**swapped)
    with pytest.raises(AssertionError):
        assert_formula(x_prev, want[0], bound[0], torch.float32, "x_prev")


# ---- drawn noise ------------------------------------------------------------------------------------------
def noise_rows(S=torch.float32):
    """One row: m = x + noise (churn 1, conv_sample 1), x_prev = noise (p_noise 1), corrected = 0."""
    row = torch.zeros(1, len(COLUMNS), dtype=S)
    row[0, COLUMNS.index("churn")] = row[0, COLUMNS.index("conv_sample")] = row[0, COLUMNS.index("p_noise")] = 1
    return row


def draw(backend, shape, seed, seed_key=None, noise=None, x=None):
    """(x_prev, m_out) of a call that draws its noise, with x_prev = noise and m = x + noise."""
    x = torch.zeros(shape) if x is None else x
    m_out = torch.empty(shape)
    x_prev = op_of(backend)(x=x, model_output=torch.zeros(shape), model_cond=None, rows=noise_rows(),
                            row_index=torch.zeros(shape[0], dtype=torch.long), guidance_scale=1.0, cfg_factor=None,
                            thresh=None, h1=None, h2=None, h3=None, last_sample=None, noise=noise, draw_noise=True,
                            seed=seed, seed_key=seed_key, m_out=m_out)
    return x_prev, m_out


@pytest.mark.parametrize("backend", backends())
def test_drawn_noise_is_seeded_standard_normal_and_used_once(backend):
    shape = (4, 1, 125, 200)  # 10^5 draws
    z, m = draw(backend, shape, seed=11)
    assert torch.equal(z, draw(backend, shape, seed=11)[0])
    assert not torch.equal(z, draw(backend, shape, seed=12)[0])
    assert torch.equal(m, z)  # churn and p_noise read the same draw
    n = z.numel()
    assert abs(float(z.double().mean())) < 5 / n ** 0.5
    assert abs(float(z.double().std()) - 1) < 5 / (2 * n) ** 0.5
    key = torch.tensor([11])
    assert torch.equal(draw(backend, shape, seed=0, seed_key=key)[0], z)  # seed_key holds the seed
    given = torch.randn(shape)
    assert torch.equal(draw(backend, shape, seed=11, noise=given)[0], given)  # given noise wins over a draw


def test_drawn_noise_is_p_sample_steps_stream():
    """Philox(seed, b * N + i): the noise p_sample_step draws for the same seed (there sample = std * noise with
    a zero mean, so noise = sample / std)."""
    schedule = F.NoiseSchedule.named("linear", 1000)
    shape = (3, 2, 17, 19)
    seed = (5 << 32) + 77
    x_t, t = torch.zeros(shape), torch.tensor([1, 500, 999])
    kw = dict(mean_type="epsilon", var_type="fixed_small", clip_denoised=False)
    std = native.p_sample_step(x_t, x_t, t, schedule, noise=torch.ones(shape), **kw)["sample"]
    want = native.p_sample_step(x_t, x_t, t, schedule, seed=seed, **kw)["sample"].double() / std.double()
    got = draw("cpu", shape, seed=seed)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("cuda_emu" not in backends(), reason="backend cuda_emu is built only with DDPM_FAST_CUDA_EMU=1")
def test_cpu_and_cuda_emu_draw_the_same_noise():
    for shape in ((3, 2, 17, 19), (2, 3, 40, 41)):  # the second: several chunks a sample on both drivers
        cpu, emu = draw("cpu", shape, seed=21)[0], draw("cuda_emu", shape, seed=21)[0]
        torch.testing.assert_close(emu, cpu, rtol=1e-5, atol=1e-6)  # SIMD vs scalar elementary functions
    x = torch.randn(2, 3, 6, 5).contiguous(memory_format=torch.channels_last)  # offsets stay row-major
    cpu, emu = draw("cpu", x.shape, seed=21, x=x)[0], draw("cuda_emu", x.shape, seed=21, x=x)[0]
    torch.testing.assert_close(emu, cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu, draw("cpu", x.shape, seed=21)[0])


# ---- bad inputs -------------------------------------------------------------------------------------------
def _bad(a, **change):
    b = dict(a)
    b.update(change)
    return b


BAD = {
    "x": lambda a: (TypeError, _bad(a, x=a["x"].long())),
    "model_output shape": lambda a: (ValueError, _bad(a, model_output=a["model_output"][:, :1])),
    "model_output dtype": lambda a: (TypeError, _bad(a, model_output=a["model_output"].double())),
    "model_cond": lambda a: (TypeError, _bad(a, model_cond=a["x"].to(torch.bfloat16))),
    "rows width": lambda a: (ValueError, _bad(a, rows=a["rows"][:, :13].contiguous())),
    "rows dtype": lambda a: (TypeError, _bad(a, rows=a["rows"].double())),
    "rows layout": lambda a: (ValueError, _bad(a, rows=a["rows"].t().contiguous().t())),
    "row_index dtype": lambda a: (TypeError, _bad(a, row_index=a["row_index"].int())),
    "row_index shape": lambda a: (ValueError, _bad(a, row_index=torch.zeros(4, dtype=torch.long))),
    "row_index range": lambda a: (ValueError, _bad(a, row_index=torch.tensor([0, 5, 1]))),
    "row_index negative": lambda a: (ValueError, _bad(a, row_index=torch.tensor([0, -1, 1]))),
    "cfg_factor": lambda a: (ValueError, _bad(a, cfg_factor=torch.ones(3, 1))),
    "thresh": lambda a: (ValueError, _bad(a, thresh=torch.ones(4))),
    "thresh dtype": lambda a: (TypeError, _bad(a, thresh=torch.ones(3, dtype=torch.float64))),
    "h1": lambda a: (TypeError, _bad(a, h1=torch.zeros_like(a["x"], dtype=torch.float16))),
    "h2": lambda a: (ValueError, _bad(a, h2=torch.zeros(3, 2, 5))),
    "h3": lambda a: (TypeError, _bad(a, h3=torch.zeros_like(a["x"], dtype=torch.float64))),
    "last_sample": lambda a: (ValueError, _bad(a, last_sample=torch.zeros(1, 2, 5, 7))),
    "noise": lambda a: (ValueError, _bad(a, noise=torch.zeros(3, 2, 7, 5))),
    "m_out": lambda a: (TypeError, _bad(a, m_out=torch.zeros_like(a["x"], dtype=torch.float64))),
    "m_out shape": lambda a: (ValueError, _bad(a, m_out=torch.zeros(3, 2, 5, 6))),
    "seed_key": lambda a: (ValueError, _bad(a, draw_noise=True, seed_key=torch.tensor([1, 2]))),
}


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("backend", backends())
def test_bad_inputs_raise_naming_the_argument(backend, bad):
    if backend != "cpu" and bad in ("row_index range", "row_index negative"):
        pytest.skip("the CUDA host path reads no row_index on the host (the kernel's device assert checks it)")
    a = make_case(torch.float32, {"history"}, seed=1)
    a["rows"] = a["rows"][:5]
    error, args = BAD[bad](a)
    name = bad.split(" ")[0]
    with pytest.raises(error, match=rf"^{name}: "):
        op_of(backend)(**args)


@pytest.mark.parametrize("backend", backends())
def test_fp16_x_takes_fp32_history_and_the_outputs_dtypes(backend):
    """fp16 x: history, last_sample and m_out are float32 (the compute dtype); x_prev is fp16; a fp16 m_out is
    rejected naming it."""
    a = make_case(torch.float16, {"history", "last_sample"}, seed=2)
    assert op_of(backend)(**a).dtype == torch.float16
    with pytest.raises(TypeError, match=r"^m_out: expected dtype Float"):
        op_of(backend)(**_bad(a, m_out=torch.zeros_like(a["x"])))


@pytest.mark.skipif("cuda_emu" not in backends(), reason="backend cuda_emu is built only with DDPM_FAST_CUDA_EMU=1")
def test_row_index_out_of_range_trips_the_device_assert():
    """The CUDA host path reads no row_index on the host: the kernel's assert on the row fires (and later
    calls work)."""
    a = make_case(torch.float32, set(), seed=6)
    with pytest.raises(RuntimeError, match=r"device-side assert triggered.*tb < a\.nrows"):
        op_of("cuda_emu")(**_bad(a, row_index=torch.tensor([0, 5, 1])))
    run_and_check("cuda_emu", make_case(torch.float32, set(), seed=6), "after the assert")
