"""Property-based fuzzing: random shapes, strides, dtypes, schedules, options and timesteps; every
backend against a float64 reference by the flash-attention rule (see compare below).

Hypothesis runs derandomized (the same cases every CI run, no flaky reruns); the number of cases
run per backend is printed in pytest's terminal summary.
"""
import collections

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddpm_fast as F
from backend_cases import backends_here, device_for, flatten

COUNTS = collections.Counter()
# The reference defines the expected result, so it is the yardstick here, not a subject.
BACKENDS = [b for b in backends_here() if b != "reference"]
# Per backend: how many cases fit the time budget (the Triton interpreter runs programs one by one).
# cuda_emu (one block at a time, its 256 CUDA threads as fibers: 1-6 ms a block) is capped to keep CI short.
EXAMPLES = {"cpu": 2500, "cuda": 1500, "triton": 150 if not torch.cuda.is_available() else 1500, "cuda_emu": 300}
# Absolute floor of the tolerance, relative to the output's scale, per input dtype.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

MEAN_TYPES = ("epsilon", "x0", "x_prev", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
OPS = ("q_sample", "q_posterior", "vb_terms_bpd", "prior_bpd", "training_losses", "p_sample_step", "ddim_step")


@st.composite
def schedules(draw):
    kind = draw(st.sampled_from(["named", "random", "respaced"]))
    if kind == "named":
        name = draw(st.sampled_from(["linear", "cosine", "scaled_linear", "sigmoid"]))
        T = draw(st.integers(50 if name == "linear" else 2, 1000))
        return F.NoiseSchedule.named(name, T)
    if kind == "random":
        T = draw(st.integers(2, 60))
        betas = draw(st.lists(st.floats(1e-4, 0.2), min_size=T, max_size=T))
        return F.NoiseSchedule(betas)
    base = F.NoiseSchedule.named("cosine", 200)
    keep = draw(st.sets(st.integers(0, 199), min_size=2, max_size=40))
    return base.respace(keep)


@st.composite
def cases(draw, device, allow_bf16):
    dtypes = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if allow_bf16 else [])
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(2, 5))  # [B, C, ...]
    shape = [draw(st.integers(1, 4))] + [draw(st.integers(1, 5)) for _ in range(ndim - 1)]
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    schedule = draw(schedules())
    mean_type = draw(st.sampled_from(MEAN_TYPES))
    var_type = draw(st.sampled_from(VAR_TYPES))
    op = draw(st.sampled_from(OPS))
    opts = dict(
        loss_type=draw(st.sampled_from(["mse", "rescaled_mse", "kl", "rescaled_kl"])),
        weighting=draw(st.sampled_from(["simple", "elbo"] + (["min_snr"] if mean_type != "x_prev" else []))),
        clip=draw(st.booleans()),
        eta=draw(st.sampled_from([0.0, 0.5, 1.0])),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    t = [draw(st.integers(0, schedule.num_timesteps - 1)) for _ in range(shape[0])]
    return dict(dtype=dtype, shape=shape, layout=layout, schedule=schedule, mean_type=mean_type, var_type=var_type,
                op=op, opts=opts, seed=seed, t=t, device=device)


def _tensor(shape, layout, g, dtype, device, scale=1.0, x0=False):
    """A float64 master tensor with the requested memory layout, and its copy in ``dtype``."""
    if layout == "transposed" and len(shape) >= 3:
        base = torch.randn([shape[0], *shape[1:][::-1]], generator=g, dtype=torch.float64)
        master = base.transpose(1, len(shape) - 1) if len(shape) == 3 else base.permute(0, *range(len(shape) - 1, 0, -1))
    elif layout == "sliced":
        master = torch.randn([*shape[:-1], 2 * shape[-1]], generator=g, dtype=torch.float64)[..., ::2]
    else:
        master = torch.randn(shape, generator=g, dtype=torch.float64)
    master = master * scale
    if x0:
        master = (master.clamp(-1, 1) * 127.5).round() / 127.5
    low = master.to(dtype)
    master = low.to(torch.float64)  # what the low-precision input really holds
    return low.to(device), master.to(device)


def _run(c, backend, tensors, t):
    s, kw = c["schedule"], dict(mean_type=c["mean_type"], var_type=c["var_type"])
    x0, noise, x_t, mo = tensors
    o = c["opts"]
    if c["op"] == "q_sample":
        return F.q_sample(x0, t, noise, s, backend=backend)
    if c["op"] == "q_posterior":
        return F.q_posterior(x0, x_t, t, s, backend=backend)
    if c["op"] == "vb_terms_bpd":
        return F.vb_terms_bpd(mo, x0, x_t, t, s, clip_denoised=o["clip"], backend=backend, **kw)
    if c["op"] == "prior_bpd":
        return F.prior_bpd(x0, s, backend=backend)
    if c["op"] == "training_losses":
        return F.training_losses(mo, x0, t, noise, s, loss_type=o["loss_type"], weighting=o["weighting"],
                                 backend=backend, **kw)
    if c["op"] == "p_sample_step":
        return F.p_sample_step(mo, x_t, t, s, clip_denoised=o["clip"], noise=noise, backend=backend, **kw)
    return F.ddim_step(mo, x_t, t, s, eta=o["eta"], clip_denoised=o["clip"], noise=noise, backend=backend, **kw)


def compare(got, same_precision_ref, ref64, dtype, name):
    """|got - ref64| <= 2 |same-precision reference - ref64| + floor(dtype) * scale, in max norm.

    Non-finite positions must be those of the same-precision reference: a value beyond the output
    dtype's range (e.g. an x_prev model's x0 estimate over 65504 in float16) is inf in both, while
    the float64 reference still holds it. Values are compared where all three are finite.
    """
    got, same, ref = got.double().cpu(), same_precision_ref.double().cpu(), ref64.double().cpu()
    assert got.shape == ref.shape, name
    assert torch.equal(torch.isfinite(got), torch.isfinite(same)), f"{name}: non-finite values differ from the reference"
    finite = torch.isfinite(ref) & torch.isfinite(same)
    if not finite.any():
        return
    scale = ref[finite].abs().max().item() + 1.0
    err = (got - ref)[finite].abs().max().item()
    base = (same - ref)[finite].abs().max().item()
    assert err <= 2 * base + FLOOR[dtype] * scale, f"{name}: error {err:.3g} vs reference's {base:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_float64_reference(backend):
    device = device_for(backend)
    allow_bf16 = backend != "triton" or torch.cuda.is_available()

    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases(device, allow_bf16))
    def check(c):
        if c["schedule"].zero_terminal_snr and c["mean_type"] == "epsilon":
            return
        g = torch.Generator().manual_seed(c["seed"])
        learned = c["var_type"] in ("learned", "learned_range")
        shape, mo_shape = c["shape"], [c["shape"][0], 2 * c["shape"][1], *c["shape"][2:]]
        pairs = [
            _tensor(shape, c["layout"], g, c["dtype"], device, x0=True),
            _tensor(shape, c["layout"], g, c["dtype"], device),
            _tensor(shape, c["layout"], g, c["dtype"], device),
            _tensor(mo_shape if learned else shape, c["layout"], g, c["dtype"], device, scale=0.5),
        ]
        t = torch.tensor(c["t"], device=device)
        low = [p[0] for p in pairs]
        got = flatten(_run(c, backend, low, t))
        same = flatten(_run(c, "reference", low, t))
        ref64 = flatten(_run(c, "reference", [p[1] for p in pairs], t))
        for i, (g_, s_, r_) in enumerate(zip(got, same, ref64)):
            expected_dtype = s_.dtype
            assert g_.dtype == expected_dtype, f"{c['op']} output {i}: dtype {g_.dtype}, expected {expected_dtype}"
            compare(g_, s_, r_, c["dtype"], f"{c['op']} output {i} ({c['dtype']}, {c['mean_type']}, {c['var_type']})")
        COUNTS[backend] += 1

    check()
    assert COUNTS[backend] > 0
