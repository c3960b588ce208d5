"""Backend "cuda_emu": csrc/cuda/kernels.cu and the op families' CUDA host path (csrc/ops/host.h) run on the
CPU through the CUDA emulation (csrc/cuda/emu/cuda_emu.h). Runs when DDPM_FAST_CUDA_EMU=1 (CI sets it); a failed build then
fails the run. The cross-backend suites (hardening, fuzz, no-host-sync, opcheck) cover it too; this file
holds what is specific to it: equality with the cpu backend, the two bugs it found, device asserts.

Equality with the cpu backend "to float32 rounding": both compute the same ddpm_math.h formulas in
float32, but the CPU driver uses SIMD elementary functions (at::vec) and sums each sample's elements in
another order than the CUDA block reduction, so float32 results differ by a few units in the last place
(rtol 1e-5: < 100 ulp; atol 1e-6 for values near 0); fp16 / bf16 outputs may round to neighbouring
values (one unit of the output dtype).
"""
from __future__ import annotations

import pytest
import torch

import ddpm_fast as F
from ddpm_fast import _build
from ddpm_fast import reference as R
from backend_cases import OPS, SCHEDULE, flatten, inputs

if not _build.emu_requested():
    pytest.skip("backend cuda_emu is built only with DDPM_FAST_CUDA_EMU=1 (CI sets it)", allow_module_level=True)
_ok, _why = F.availability()["cuda_emu"]
if not _ok:  # requested but unavailable: a build failure must fail CI, not skip it
    pytest.fail(f"backend cuda_emu is unavailable: {_why}", pytrace=False)

# (rtol, atol) between cuda_emu and cpu outputs per output dtype (module docstring)
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2 ** -10, 2 ** -14), torch.bfloat16: (2 ** -7, 2 ** -14)}


def assert_same_as_cpu(emu, cpu, what):
    for k, (a, b) in enumerate(zip(flatten(emu), flatten(cpu))):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{k}]: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        rtol, atol = TOL[a.dtype]
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{k}]: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_equals_the_cpu_backend(op, dtype):
    a = inputs(B=3, C=3, spatial=(5, 7), dtype=dtype)
    assert_same_as_cpu(OPS[op](a, backend="cuda_emu"), OPS[op](a, backend="cpu"), f"{op} {dtype}")


def test_several_chunks_channels_last_and_gradients():
    """Samples of 3 x 60 x 61 elements span two 8192-element chunks (grid.x = 2, two-stage reduction);
    channels_last inputs take the host path's copy into the plan's layout; gradients run the backward ops
    (scale_halves, linear_backward) on the emulated kernels."""
    a = inputs(B=2, C=3, spatial=(60, 61))
    a = {k: (v.to(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v)
         for k, v in a.items()}
    grads = {}
    for backend in ("cuda_emu", "cpu"):
        mo = a["model_output"].clone().requires_grad_()
        x0 = a["x0"].clone().requires_grad_()
        terms = F.training_losses(mo, a["x0"], a["t"], a["noise"], SCHEDULE, mean_type="epsilon",
                                  var_type="learned_range", loss_type="mse", backend=backend)
        xs = F.q_sample(x0, a["t"], a["noise"], SCHEDULE, backend=backend)
        (terms["loss"].sum() + xs.square().sum()).backward()
        grads[backend] = (*flatten(terms), xs.detach(), mo.grad, x0.grad)
    assert_same_as_cpu(grads["cuda_emu"], grads["cpu"], "losses, q_sample, gradients")


@pytest.mark.parametrize("op", ["normal_kl", "dgll"])
def test_table_less_ops_and_their_gradients_run(op):
    """Bug 1 (found by the emulator): kernels.cu asserted `tb < a.nrows` in bodies without a table
    (nrows = 0), so normal_kl, the decoder likelihood, their backwards and scale_halves (the losses'
    backward) hit the device-side assert on every call."""
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 3, 5, generator=g) * 2 - 1).requires_grad_()
    m = torch.randn(4, 3, 5, generator=g).requires_grad_()
    s = (torch.randn(4, 1, 5, generator=g) * 0.2 - 2).requires_grad_()
    got = {}
    for backend in ("cuda_emu", "reference"):
        if op == "normal_kl":
            out = F.normal_kl(x, s, m, s.detach() * 0.5, backend=backend)
        else:
            out = F.discretized_gaussian_log_likelihood(x.detach(), m, s, backend=backend)
        got[backend] = (out, *torch.autograd.grad(out.sum(), (m, s)))
    torch.testing.assert_close(got["cuda_emu"], got["reference"], rtol=1e-5, atol=1e-5)
    a = inputs(B=2)
    mo = a["model_output"].clone().requires_grad_()
    vb = F.vb_terms_bpd(mo, a["x0"], a["x_t"], a["t"], SCHEDULE, mean_type="epsilon", var_type="learned_range",
                        backend="cuda_emu")
    (grad,) = torch.autograd.grad(vb.sum(), mo)  # scale_halves: table-less
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_broadcast_inputs_are_kept_alive(dtype):
    """Bug 2 (found by the emulator): the CUDA host path (then ops.cpp, now csrc/ops/host.h) cast fp16 / bf16 broadcast inputs to float32
    in a temporary that was freed before the kernel read it (garbage such as inf; a heap-use-after-free
    under ASan)."""
    g = torch.Generator().manual_seed(0)
    m1, lv1 = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
    m2, lv2 = torch.randn(1, 3, generator=g), torch.randn(64, 3, generator=g)
    low = [v.to(dtype) for v in (m1, lv1, m2, lv2)]
    got = F.normal_kl(*low, backend="cuda_emu")
    # the float64 reference of the same low-precision inputs, rounded once to the output dtype
    want = R.normal_kl(*[v.double() for v in low]).to(dtype)
    rtol = 2 ** -10 if dtype == torch.float16 else 2 ** -7
    torch.testing.assert_close(got, want, rtol=2 * rtol, atol=1e-3)
    x = torch.linspace(-1, 1, 64 * 3).reshape(64, 3).to(dtype)
    ll = F.discretized_gaussian_log_likelihood(x, low[0].clamp(-1, 1), (low[1] * 0.1 - 3), backend="cuda_emu")
    ll_ref = R.discretized_gaussian_log_likelihood(x.double(), low[0].clamp(-1, 1).double(),
                                                   (low[1] * 0.1 - 3).double()).to(dtype)
    torch.testing.assert_close(ll, ll_ref, rtol=4 * rtol, atol=1e-2)


def test_device_side_assert_raises_and_the_backend_recovers():
    """t out of the table with validate=False: the CUDA host path reads no t on the host, the kernel's
    CUDA_KERNEL_ASSERT fires and the launch check raises, naming the condition; later calls work."""
    a = inputs(B=2)
    bad_t = torch.tensor([0, SCHEDULE.num_timesteps])
    with pytest.raises(RuntimeError, match=r"device-side assert triggered.*tb >= 0 && tb < a\.nrows"):
        F.q_sample(a["x0"], bad_t, a["noise"], SCHEDULE, backend="cuda_emu", validate=False)
    with pytest.raises(ValueError, match="t: expected timesteps"):  # validate (the default on CPU tensors)
        F.q_sample(a["x0"], bad_t, a["noise"], SCHEDULE, backend="cuda_emu")
    out = F.q_sample(a["x0"], a["t"], a["noise"], SCHEDULE, backend="cuda_emu")
    torch.testing.assert_close(out, R.q_sample(a["x0"], a["t"], a["noise"], SCHEDULE))


def test_float64_runs_the_reference_as_on_cuda():
    a = inputs(B=2, dtype=torch.float64)
    for op in ("q_sample", "training_losses"):
        for got, want in zip(flatten(OPS[op](a, backend="cuda_emu")), flatten(OPS[op](a, backend="reference"))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_selected_only_for_cpu_tensors_and_never_by_auto():
    from ddpm_fast import backends, cuda_emu, native

    assert backends.select("auto", "cpu") is native
    assert backends.select("cuda_emu", "cpu") is cuda_emu
    with pytest.raises(F.BackendUnavailableError, match="runs cpu tensors"):
        backends.select("cuda_emu", "cuda")


def test_samples_over_many_chunks_reduce_deterministically():
    """kernels.cu sizes chunks from N, B and the SM count (132 emulated): 4 samples of 3 x 40 x 41 elements
    are cut into five 1024-element chunks each (the last one short). The per-sample losses come out
    bit-identical run to run (partials added in chunk order, in double) and equal the cpu backend's."""
    a = inputs(B=4, C=3, spatial=(40, 41))
    kw = dict(mean_type="epsilon", var_type="learned_range", loss_type="mse")
    runs = [F.training_losses(a["model_output"], a["x0"], a["t"], a["noise"], SCHEDULE, backend="cuda_emu", **kw)
            for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    cpu = F.training_losses(a["model_output"], a["x0"], a["t"], a["noise"], SCHEDULE, backend="cpu", **kw)
    assert_same_as_cpu(runs[0], cpu, "training_losses over five chunks a sample")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vector_and_scalar_accesses_give_the_same_elements(dtype):
    """16-byte-aligned runs of 8 elements take the 128-bit loads and stores (8 halves or 2 x 4 floats per
    access), others the element-by-element path: the same q_sample on storage shifted by one element
    (every access unaligned) gives bit-identical results."""
    g = torch.Generator().manual_seed(5)
    B, C, H, W = 3, 2, 8, 16
    t = torch.tensor([0, SCHEDULE.num_timesteps // 2, SCHEDULE.num_timesteps - 1])
    aligned, shifted = {}, {}
    for k in ("x0", "noise"):  # the same values at a 16-byte-aligned address and one element past it
        buf = torch.randn(B * C * H * W + 1, generator=g).to(dtype)
        aligned[k] = buf[:-1].clone().view(B, C, H, W)
        buf[1:] = aligned[k].reshape(-1)
        shifted[k] = buf[1:].view(B, C, H, W)
    assert all(v.data_ptr() % 16 == 0 for v in aligned.values())
    assert all(v.data_ptr() % 16 != 0 for v in shifted.values())
    got_aligned = F.q_sample(aligned["x0"], t, aligned["noise"], SCHEDULE, backend="cuda_emu")
    got_shifted = F.q_sample(shifted["x0"], t, shifted["noise"], SCHEDULE, backend="cuda_emu")
    assert torch.equal(got_aligned, got_shifted)
    assert_same_as_cpu(got_aligned, F.q_sample(aligned["x0"], t, aligned["noise"], SCHEDULE, backend="cpu"),
                       f"q_sample {dtype}")
