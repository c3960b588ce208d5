"""Hardening on every backend that runs here: bad inputs, edge sizes, numerics, determinism.

Backends come from ddpm_fast.availability(), so a backend that is built is covered automatically.
"""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import ddpm_fast as F
from backend_cases import OPS, READS, SCHEDULE, backends_here, device_for, flatten, inputs

BACKENDS = backends_here()


def _bad_cases():
    """(name, input overrides or a callable mutating the inputs, exception, text the message must contain)."""
    return [
        ("int_tensor", lambda a, k: a.__setitem__(k, a[k].long()), TypeError, "{k}"),
        ("complex_tensor", lambda a, k: a.__setitem__(k, a[k].to(torch.complex64)), TypeError, "{k}"),
        ("wrong_dtype_mix", lambda a, k: a.__setitem__(k, a[k].double()), TypeError, "{k}"),
        ("shape_mismatch", lambda a, k: a.__setitem__(k, a[k][:, :, :2]), ValueError, "{k}"),
        ("zero_dim", lambda a, k: a.__setitem__(k, a[k].flatten()[0]), ValueError, "{k}"),
        ("other_device", lambda a, k: a.__setitem__(k, a[k].to("meta")), ValueError, "{k}"),
    ]


T_CASES = [
    ("float_t", lambda a: a.__setitem__("t", a["t"].float()), TypeError),
    ("bool_t", lambda a: a.__setitem__("t", a["t"] > 0), TypeError),
    ("complex_t", lambda a: a.__setitem__("t", a["t"].to(torch.complex64)), TypeError),
    ("t_too_long", lambda a: a.__setitem__("t", torch.cat([a["t"], a["t"]])), ValueError),
    ("t_rank_2", lambda a: a.__setitem__("t", a["t"][:, None]), ValueError),
    ("t_negative", lambda a: a.__setitem__("t", a["t"] - 1000), ValueError),
    ("t_equals_T", lambda a: a.__setitem__("t", torch.full_like(a["t"], SCHEDULE.num_timesteps)), ValueError),
    ("t_python_int_out_of_range", lambda a: a.__setitem__("t", 100), ValueError),
    ("t_other_device", lambda a: a.__setitem__("t", a["t"].to("meta")), ValueError),
]


def _matrix():
    cases = []
    for op, reads in READS.items():
        for name, mutate, exc, match in _bad_cases():
            for k in reads:
                if k == "t":
                    continue
                if op == "prior_bpd" and name in ("shape_mismatch", "wrong_dtype_mix", "other_device"):
                    continue  # one tensor: nothing to mismatch
                arg = "model_output" if k == "eps" else k  # the public argument's name
                cases.append((op, f"{name}:{k}", (lambda a, m=mutate, k=k: m(a, k)), exc, match.format(k=arg)))
        if "t" in reads:
            for name, mutate, exc in T_CASES:
                cases.append((op, name, mutate, exc, "t"))
    return cases


MATRIX = _matrix()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,case,mutate,exc,match", MATRIX, ids=[f"{c[0]}-{c[1]}" for c in MATRIX])
def test_bad_input_matrix(backend, op, case, mutate, exc, match):
    a = inputs(device=device_for(backend))
    mutate(a)
    with pytest.raises(exc, match=match):
        OPS[op](a, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_option_strings(backend):
    a = inputs(device=device_for(backend))
    x0, t, mo, x_t = a["x0"], a["t"], a["model_output"], a["x_t"]
    for kw, name in [(dict(mean_type="noise"), "mean_type"), (dict(var_type="fixed"), "var_type")]:
        opts = dict(mean_type="epsilon", var_type="learned_range") | kw
        with pytest.raises(ValueError, match=name):
            F.vb_terms_bpd(mo, x0, x_t, t, SCHEDULE, backend=backend, **opts)
        with pytest.raises(ValueError, match=name):
            F.p_sample_step(mo, x_t, t, SCHEDULE, backend=backend, **opts)
    base = dict(mean_type="epsilon", var_type="learned_range", loss_type="mse", backend=backend)
    with pytest.raises(ValueError, match="loss_type"):
        F.training_losses(mo, x0, t, x0, SCHEDULE, **(base | dict(loss_type="huber")))
    with pytest.raises(ValueError, match="weighting"):
        F.training_losses(mo, x0, t, x0, SCHEDULE, **(base | dict(weighting="p2")))
    with pytest.raises(ValueError, match="model_output"):
        F.training_losses(mo[:, :3], x0, t, x0, SCHEDULE, **base)


def test_broadcastable_agrees_with_torch():
    """The checks' broadcast_shape / broadcastable (normal_kl's and the decoder likelihood's shape check) answer
    as torch.broadcast_shapes does, zero-size and 0-dim shapes included, and so does the Triton launchers'
    broadcast shape wherever the shapes broadcast."""
    pytest.importorskip("triton")
    from ddpm_fast.ops._checks import broadcast_shape, broadcastable
    from ddpm_fast.triton.posterior import _broadcast_shape

    shapes = [(), (1,), (3,), (2, 3), (2, 1), (1, 3), (4, 2, 3), (4, 1, 1), (0,), (2, 0), (1, 0), (0, 3), (5,)]
    for a in shapes:
        for b in shapes:
            for c in shapes:
                sizes = torch.Size(a), torch.Size(b), torch.Size(c)
                try:
                    want = torch.broadcast_shapes(a, b, c)
                except RuntimeError:
                    want = None
                assert broadcastable(*sizes) == (want is not None), (a, b, c)
                if want is not None:
                    assert broadcast_shape(*sizes) == tuple(want), (a, b, c)
                    assert _broadcast_shape(*sizes) == want, (a, b, c)


def test_x_args_agrees_with_like_then_timesteps():
    """x_args (the checks of q_sample, velocity and q_posterior: one pass over plain tensors when they pass)
    returns what like() then timesteps() return, and raises their exception with their message otherwise."""
    from ddpm_fast.ops import _checks as check

    def separate(x, t, sched, validate, **others):
        device = check.like("x0", x, **others)
        return check.timesteps(t, x.shape[0], check.schedule(sched), device, validate), device

    def combined(x, t, sched, validate, **others):
        return check.x_args("x0", x, t, sched, validate, **others)

    def outcome(fn, x, t, sched, validate, others):
        try:
            t_out, device = fn(x, t, sched, validate, **others)
        except Exception as exc:  # noqa: BLE001 - the exception itself is compared
            return type(exc), str(exc)
        return t_out.dtype, t_out.tolist(), t_out.is_contiguous(), device

    x = torch.randn(3, 2, 4)
    t = torch.tensor([0, 5, SCHEDULE.num_timesteps - 1])
    good = dict(x=x, t=t, sched=SCHEDULE, validate=None, others={"noise": torch.randn(3, 2, 4)})
    cases = [
        {}, {"others": {}}, {"others": {"noise": None}}, {"x": torch.nn.Parameter(x)}, {"t": 7},
        {"t": torch.tensor(4)}, {"t": t.int()}, {"validate": True},
        {"t": torch.tensor([0, 9, 3, 1, 2, 8])[::2]}, {"t": t + 1, "validate": False}, {"t": t + 1},
        {"t": t - 1}, {"t": t.float()}, {"t": t > 0}, {"t": t[:2]}, {"t": t.to("meta")}, {"t": [0, 1, 2]},
        {"x": x.long()}, {"x": x[0, 0, 0]}, {"x": x.to("meta")}, {"others": {"noise": x[:2]}},
        {"others": {"noise": x.double()}}, {"others": {"noise": x.to("meta")}}, {"others": {"noise": 1.0}},
        {"sched": "linear"}, {"sched": "linear", "x": x.long()}, {"sched": "linear", "t": t + 1},
        {"x": x.as_subclass(_Subclass)}, {"others": {"noise": x.as_subclass(_Subclass)}},
    ]
    for case in cases:
        args = {**good, **case}
        want = outcome(separate, **args)
        assert outcome(combined, **args) == want, case


class _Subclass(torch.Tensor):
    pass


def test_int_range_is_the_min_and_max():
    from ddpm_fast.ops._checks import int_range

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 64, 65, 300):
        values = torch.randint(-50, 50, (n,), generator=g)
        assert int_range(values) == (int(values.min()), int(values.max())), n
    assert int_range(torch.zeros(0, dtype=torch.int64)) == (None, None)


def test_bad_backend_schedule_and_respacing():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend"):
        F.q_sample(x, 1, x, SCHEDULE, backend="gpu")
    with pytest.raises(ValueError, match="betas"):
        F.NoiseSchedule([0.1, 1.2])
    with pytest.raises(ValueError, match="section_counts"):
        F.space_timesteps(100, [200])
    with pytest.raises(ValueError, match="section_counts"):
        F.space_timesteps(100, "ddim101")
    with pytest.raises(ValueError, match="use_timesteps"):
        SCHEDULE.respace(range(101))


# -- edge sizes: run in a subprocess so a crash in a kernel fails the test instead of the run ------
_EDGE_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import ddpm_fast as F
    from backend_cases import OPS, inputs, flatten, device_for
    backend = {backend!r}
    dev = device_for(backend)
    # the Triton interpreter runs one program at a time (about 1 ms each), cuda_emu one block at a time
    # (256 fibers, 1-6 ms): batch 1000 there on two ops only
    slow = (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1") or backend == "cuda_emu"
    for B, C, spatial in [(0, 3, (4,)), (1, 1, ()), (1, 3, (1, 1)), (3, 3, (5, 7)), (1000, 2, (3,))]:
        a = inputs(B=B, C=C, spatial=spatial, device=dev)
        ref = inputs(B=B, C=C, spatial=spatial, device=dev)
        for op, call in OPS.items():
            if slow and B == 1000 and op not in ("q_sample", "training_losses"):
                continue
            got = flatten(call(a, backend=backend))
            want = flatten(call(ref, backend="reference"))
            for g, w in zip(got, want):
                assert g.shape == w.shape, (op, B, g.shape, w.shape)
                assert torch.allclose(g.float().cpu(), w.float().cpu(), rtol=1e-4, atol=1e-5), (op, B)
    print("edge sizes ok")
    """
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_sizes_in_a_subprocess(backend):
    """Batch 0 (empty results), batch 1 without channels' spatial dims, 1-element samples, odd sizes, batch 1000."""
    import os

    script = _EDGE_SCRIPT.format(tests=os.path.dirname(__file__), backend=backend)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "edge sizes ok" in proc.stdout


# -- numerics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_stay_in_their_sample(backend, op, bad):
    a = inputs(B=3, device=device_for(backend))
    clean = flatten(OPS[op](a, backend=backend))
    for k in READS[op]:
        if k != "t":
            a[k] = a[k].clone()
            a[k][1].view(-1)[0] = bad
    dirty = flatten(OPS[op](a, backend=backend))
    for c, d in zip(clean, dirty):
        if c.ndim == 0 or c.shape[0] != 3:
            continue
        keep = torch.tensor([True, False, True])
        assert torch.equal(c[keep], d[keep]), f"{op}: a non-finite input in sample 1 changed another sample"
    assert any(not torch.isfinite(d[1]).all() for d in dirty if d.ndim and d.shape[0] == 3), op


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_nll_stays_finite_at_the_edges(backend):
    dev = device_for(backend)
    x = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0], device=dev)
    means = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.9], device=dev)
    log_scales = torch.tensor([-30.0, -30.0, -30.0, -30.0, -30.0], device=dev)
    ll = F.discretized_gaussian_log_likelihood(x, means, log_scales, backend=backend)
    assert torch.all(torch.isfinite(ll))
    assert torch.all(ll >= math.log(1e-12) - 1e-4)
    assert ll[2].item() == pytest.approx(0.0, abs=1e-6) and ll[3].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_variance_kl_finite_for_network_range(backend):
    dev = device_for(backend)
    lv = torch.linspace(-30, 30, 61, device=dev)
    kl = F.normal_kl(torch.zeros_like(lv), torch.zeros_like(lv), torch.full_like(lv, 0.5), lv, backend=backend)
    assert torch.all(torch.isfinite(kl))
    a = inputs(B=4, device=dev)
    a["model_output"][:, 3:] = 30.0  # far outside learned_range's [-1, 1]: still finite
    vb = F.vb_terms_bpd(a["model_output"], a["x0"], a["x_t"], a["t"], SCHEDULE, mean_type="epsilon",
                        var_type="learned", backend=backend)
    assert torch.all(torch.isfinite(vb))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_inputs_do_not_overflow_intermediates(backend):
    """x_t / sqrt(abar) at t = T-1 is ~ 160 x_t: fp16 holds it, but squares of it (6e4+) would not."""
    dev = device_for(backend)
    a = inputs(B=2, dtype=torch.float16, device=dev)
    a["t"] = torch.full_like(a["t"], SCHEDULE.num_timesteps - 1)
    a["x_t"] = (a["x_t"].float() * 60).half()
    vb = F.vb_terms_bpd(a["model_output"], a["x0"], a["x_t"], a["t"], SCHEDULE, mean_type="epsilon",
                        var_type="learned_range", backend=backend)
    assert torch.all(torch.isfinite(vb))
    ref = F.vb_terms_bpd(*(a[k].double() for k in ("model_output", "x0", "x_t")), a["t"], SCHEDULE,
                         mean_type="epsilon", var_type="learned_range", backend="reference")
    torch.testing.assert_close(vb.double().cpu(), ref.cpu(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_terminal_snr(backend):
    dev = device_for(backend)
    s = F.NoiseSchedule.named("linear", 1000, rescale_zero_terminal_snr=True)
    a = inputs(B=2, device=dev)
    t = torch.tensor([999, 500], device=dev)
    out = F.p_sample_step(a["model_output"], a["x_t"], t, s, mean_type="v", var_type="learned_range",
                          noise=a["noise"], backend=backend)
    assert all(torch.isfinite(v).all() for v in out.values())
    out = F.ddim_step(a["model_output"], a["x_t"], t, s, mean_type="v", var_type="learned_range", eta=1.0,
                      noise=a["noise"], backend=backend)
    assert all(torch.isfinite(v).all() for v in out.values())
    loss = F.training_losses(a["model_output"], a["x0"], t, a["noise"], s, mean_type="v", var_type="learned_range",
                             loss_type="mse", weighting="min_snr", backend=backend)
    assert all(torch.isfinite(v).all() for v in loss.values())
    with pytest.raises(ValueError, match="mean_type"):
        F.ddim_step(a["model_output"], a["x_t"], t, s, var_type="learned_range", backend=backend)


# -- determinism and batch invariance --------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_deterministic_and_batch_invariant(backend, op):
    a = inputs(B=5, C=3, spatial=(6, 7), device=device_for(backend))
    first = flatten(OPS[op](a, backend=backend))
    again = flatten(OPS[op](a, backend=backend))
    assert all(torch.equal(x, y) for x, y in zip(first, again)), f"{op}: not bit-identical on a rerun"
    for i in (0, 3):
        alone = flatten(OPS[op]({k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in a.items()}, backend=backend))
        for full, one in zip(first, alone):
            if full.ndim and full.shape[0] == 5:
                assert torch.equal(full[i : i + 1], one), f"{op}: sample {i} differs alone and in the batch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_kernel_noise_is_deterministic_per_seed(backend):
    a = inputs(B=2, device=device_for(backend))
    kw = dict(mean_type="epsilon", var_type="learned_range", backend=backend)
    one = F.p_sample_step(a["model_output"], a["x_t"], a["t"], SCHEDULE, seed=123, **kw)["sample"]
    two = F.p_sample_step(a["model_output"], a["x_t"], a["t"], SCHEDULE, seed=123, **kw)["sample"]
    other = F.p_sample_step(a["model_output"], a["x_t"], a["t"], SCHEDULE, seed=124, **kw)["sample"]
    assert torch.equal(one, two) and not torch.equal(one, other)


# -- more than 2^31 elements -----------------------------------------------------------------------
def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled CPU extension is not available")
@pytest.mark.skipif(_available_bytes() < 8 << 30, reason="needs 8 GiB of free memory (a 4.3 GB output)")
def test_more_than_2_31_elements_on_the_cpu_path():
    """int64 element counts and offsets: a reduction over one sample of more than 2^31 elements, and a
    q_sample output of more than 2^31 elements (float16, 4.3 GB), read from stride-0 expanded inputs."""
    s = F.NoiseSchedule.named("linear", 1000)
    W = 4099
    row = torch.linspace(-1, 1, W)
    # prior_bpd of a sample of H copies of a row is the row's own (the mean over the sample is the row's mean)
    H = 2**31 // W + 1
    got = F.prior_bpd(row.reshape(1, 1, W).expand(1, H, W), s, backend="cpu")
    want = F.prior_bpd(row.reshape(1, W).double(), s, backend="reference")
    assert H * W > 2**31
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)  # float32 terms, double chunk sums
    # q_sample over 2 samples of 2^30 + W elements: the second sample's outputs lie past element 2^31
    H2 = 2**30 // W + 1
    x0 = row.half().reshape(1, 1, W).expand(2, H2, W)
    noise = row.flip(0).half().reshape(1, 1, W).expand(2, H2, W)
    t = torch.tensor([10, 900])
    out = F.q_sample(x0, t, noise, s, backend="cpu")
    assert out.numel() > 2**31 and out.is_contiguous()
    want = F.q_sample(row.half().reshape(1, 1, W).expand(2, 1, W), t, row.flip(0).half().reshape(1, 1, W).expand(2, 1, W),
                      s, backend="reference")
    for h in (0, 1, H2 // 2, H2 - 1):  # rows of both samples, the last element of the tensor included
        assert torch.equal(out[:, h], want[:, 0]), h
    del out
