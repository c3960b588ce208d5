"""The compiled CPU kernels (ddpm_fast._C via ddpm_fast.native) against the reference.

Comparison rule (docs/design.md, flash-attention style): the kernel's error against a float64 reference
computed from the same inputs is at most twice the error of the same-precision PyTorch reference,
plus a small floor for the output dtype. The first test run builds the extension (about a minute).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_fast as F
from ddpm_fast import backends, native, noise_stream
from ddpm_fast import reference as R

ok, why = native.availability("cpu")
if not ok:  # a build failure must fail CI, not skip it
    pytest.fail(f"the compiled extension is unavailable: {why}", pytrace=False)

OPS = torch.ops.ddpm_fast
SCHEDULE = F.NoiseSchedule.named("cosine", 1000)
T = SCHEDULE.num_timesteps
FLOOR = {  # (atol, rtol) of the output dtype: a few units in the last place
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 2e-6),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 8e-3),
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def assert_close(out, ref_lp, ref64, what=""):
    """Per sample (dim 0): max |out - ref64| <= 2 max |ref_lp - ref64| + atol + rtol max |ref64|.

    The flash-attention rule, applied to each sample's slice so that samples of very different
    magnitude (t = 0 next to t = T-1) each get their own bound. NaN / inf positions must agree.
    """
    assert out.dtype == ref_lp.dtype, f"{what}: dtype {out.dtype} != {ref_lp.dtype}"
    assert out.shape == ref_lp.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_lp.shape)}"
    o, r, e = out.double(), ref_lp.double(), ref64.double()
    assert torch.equal(torch.isfinite(o), torch.isfinite(r)), f"{what}: non-finite values differ"
    fin = torch.isfinite(r)
    o, r, e = [torch.where(fin, x, torch.zeros_like(x)).reshape(x.shape[0] if x.ndim else 1, -1) for x in (o, r, e)]
    atol, rtol = FLOOR[out.dtype]
    err = (o - e).abs().amax(dim=1)
    bound = 2 * (r - e).abs().amax(dim=1) + atol + rtol * e.abs().amax(dim=1)
    bad = err > bound
    assert not bad.any(), (f"{what}: samples {bad.nonzero().flatten().tolist()} off; errors "
                           f"{err[bad].tolist()} > bounds {bound[bad].tolist()}")


def inputs(B=5, shape=(3, 5, 7), learned=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand((B, *shape), generator=g) * 2 - 1).to(dtype)
    noise = torch.randn((B, *shape), generator=g).to(dtype)
    c = shape[0] * (2 if learned else 1)
    mo = torch.randn((B, c, *shape[1:]), generator=g).to(dtype)
    t = torch.tensor([0, 1, 10, 500, T - 1] * ((B + 4) // 5))[:B]
    return mo, x0, noise, t


def up(x):
    return None if x is None else x.double()


def compare_dicts(a, b_lp, b64, what):
    assert a.keys() == b_lp.keys(), (what, a.keys(), b_lp.keys())
    for k in a:
        assert_close(a[k], b_lp[k], b64[k], f"{what}[{k}]")


# -- training losses: every mean / variance / loss type and weighting, values and gradients ---------
LOSS_CASES = [(m, v, lt, "simple") for m in R.MEAN_TYPES for v in R.VAR_TYPES for lt in R.LOSS_TYPES] + [
    (m, v, "mse", w) for m in R.MEAN_TYPES for v in R.VAR_TYPES for w in ("elbo", "min_snr")
    if not (w == "min_snr" and m == "x_prev")
]


@pytest.mark.parametrize("mean_type,var_type,loss_type,weighting", LOSS_CASES)
def test_training_losses(mean_type, var_type, loss_type, weighting):
    mo, x0, noise, t = inputs(learned=var_type in R.LEARNED_VAR_TYPES)
    kw = dict(mean_type=mean_type, var_type=var_type, loss_type=loss_type, weighting=weighting, min_snr_gamma=5.0)
    w = torch.randn(mo.shape[0], generator=torch.Generator().manual_seed(1))
    results = []
    for fn, m in ((native.training_losses, mo), (R.training_losses, mo), (R.training_losses, up(mo))):
        m = m.clone().requires_grad_()
        cast = up if m.dtype == torch.float64 else (lambda x: x)
        out = fn(m, cast(x0), t, cast(noise), SCHEDULE, **kw)
        sum((v * w.to(v.dtype)).sum() for v in out.values()).backward()
        results.append(({k: v.detach() for k, v in out.items()}, m.grad))
    (a, ga), (b, gb), (c, gc) = results
    compare_dicts(a, b, c, f"{kw}")
    assert_close(ga, gb, gc, f"{kw} grad")


@pytest.mark.parametrize("loss_type,used", [(lt, u) for lt in R.LOSS_TYPES for u in ("loss", "mse", "vb")
                                             if not (u == "mse" and lt in ("kl", "rescaled_kl"))])  # KL: no mse
def test_training_losses_grad_of_one_output(loss_type, used):
    """The backward with gradients on one output only (the others None, not zero-filled)."""
    mo, x0, noise, t = inputs(learned=True)
    kw = dict(mean_type="epsilon", var_type="learned_range", loss_type=loss_type)
    grads = []
    for fn, m in ((native.training_losses, mo), (R.training_losses, mo), (R.training_losses, up(mo))):
        m = m.clone().requires_grad_()
        cast = up if m.dtype == torch.float64 else (lambda x: x)
        fn(m, cast(x0), t, cast(noise), SCHEDULE, **kw)[used].sum().backward()
        grads.append(m.grad)
    assert_close(*grads, f"{kw} d{used}")


@pytest.mark.parametrize("var_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("need_grad", [False, True])
def test_training_losses_makes_only_the_results_its_options_define(var_type, need_grad):
    """The op makes no result its options leave undefined (None; its fake agrees: test_opcheck): mse for KL losses
    and where it is the loss (a fixed variance, "simple" weighting: the public "mse" is then the loss tensor
    itself, as in improved-diffusion's training_losses), vb without a vb term, the weight w for "simple" weighting
    and KL losses, d_out without need_grad, d_v without need_grad and a learned variance. The public terms and
    the gradient through each are still the reference's."""
    learned = var_type in R.LEARNED_VAR_TYPES
    mo, x0, noise, t = inputs(learned=learned)  # the inputs of test_training_losses
    table = SCHEDULE.cpu_table(torch.float32)
    ids = F.options.LOSS_IDS, F.options.WEIGHTING_IDS
    for loss_type in R.LOSS_TYPES:
        for weighting in R.WEIGHTINGS if loss_type not in R.KL_LOSS_TYPES else ("simple",):
            kl, weighted = loss_type in R.KL_LOSS_TYPES, weighting != "simple"
            results = torch.ops.ddpm_fast.training_losses.default(
                mo, x0, t, noise, table, 0, F.options.VAR_IDS[var_type], ids[0][loss_type], ids[1][weighting], 5.0,
                need_grad)
            made = [r is not None for r in results]
            assert made == [True, not kl and (learned or weighted), learned or kl, weighted, need_grad,
                            need_grad and learned], (loss_type, weighting, made)
            kw = dict(mean_type="epsilon", var_type=var_type, loss_type=loss_type, weighting=weighting)
            for term in ("loss", "mse", "vb"):
                m, m_ref, m64 = mo.clone().requires_grad_(), mo.clone().requires_grad_(), up(mo).requires_grad_()
                ours = native.training_losses(m, x0, t, noise, SCHEDULE, **kw)
                refs = R.training_losses(m_ref, x0, t, noise, SCHEDULE, **kw)
                ref64 = R.training_losses(m64, up(x0), t, up(noise), SCHEDULE, **kw)
                assert ours.keys() == refs.keys()
                if term not in ours:
                    continue
                if term == "mse" and not made[1]:
                    assert ours["mse"] is ours["loss"]
                compare_dicts(ours, refs, ref64, f"{kw}")
                grads = [torch.autograd.grad(d[term].sum(), x)[0] for d, x in ((ours, m), (refs, m_ref), (ref64, m64))]
                assert_close(*grads, f"{kw} d{term}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_losses_dtypes(dtype):
    mo, x0, noise, t = inputs(learned=True, dtype=dtype)
    kw = dict(mean_type="epsilon", var_type="learned_range", loss_type="mse")
    compare_dicts(native.training_losses(mo, x0, t, noise, SCHEDULE, **kw),
                  R.training_losses(mo, x0, t, noise, SCHEDULE, **kw),
                  R.training_losses(up(mo), up(x0), t, up(noise), SCHEDULE, **kw), str(dtype))


def test_training_losses_grad_wrt_x0_falls_back_to_reference():
    mo, x0, noise, t = inputs(learned=True)
    kw = dict(mean_type="epsilon", var_type="learned_range", loss_type="kl")
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    native.training_losses(mo, xa, t, noise, SCHEDULE, **kw)["loss"].sum().backward()
    R.training_losses(mo, xb, t, noise, SCHEDULE, **kw)["loss"].sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


# -- the variational bound ------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_type", R.MEAN_TYPES)
@pytest.mark.parametrize("var_type", R.VAR_TYPES)
@pytest.mark.parametrize("clip", [False, True])
def test_vb_terms_bpd(mean_type, var_type, clip):
    mo, x0, noise, t = inputs(learned=var_type in R.LEARNED_VAR_TYPES)
    x_t = R.q_sample(x0, t, noise, SCHEDULE)
    kw = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip)
    outs = []
    for fn, m, a, b in ((native.vb_terms_bpd, mo, x0, x_t), (R.vb_terms_bpd, mo, x0, x_t),
                        (R.vb_terms_bpd, up(mo), up(x0), up(x_t))):
        m = m.clone().requires_grad_()
        v = fn(m, a, b, t, SCHEDULE, **kw)
        (v * torch.arange(1.0, 6.0, dtype=v.dtype)).sum().backward()
        outs.append((v.detach(), m.grad))
    assert_close(outs[0][0], outs[1][0], outs[2][0], f"vb {kw}")
    assert_close(outs[0][1], outs[1][1], outs[2][1], f"vb grad {kw}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_prior_bpd(dtype):
    _, x0, _, _ = inputs(dtype=dtype)
    assert_close(native.prior_bpd(x0, SCHEDULE), R.prior_bpd(x0, SCHEDULE), R.prior_bpd(up(x0), SCHEDULE), "prior")


@pytest.mark.parametrize("dtype", DTYPES)
def test_normal_kl_and_decoder_likelihood_broadcast(dtype):
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(4, 3, 5, generator=g).to(dtype), torch.randn(4, 3, 5, generator=g).to(dtype)
    lv1, lv2 = torch.randn(4, 1, 1, generator=g).to(dtype), torch.randn(1, 3, 5, generator=g).to(dtype)
    assert_close(native.normal_kl(m1, lv1, m2, lv2), R.normal_kl(m1, lv1, m2, lv2),
                 R.normal_kl(up(m1), up(lv1), up(m2), up(lv2)), "normal_kl")
    x = (torch.randint(0, 256, (4, 3, 5), generator=g).double() / 127.5 - 1).to(dtype)
    ls = (torch.randn(4, 1, 5, generator=g) - 3).to(dtype)
    assert_close(native.discretized_gaussian_log_likelihood(x, m1, ls), R.discretized_gaussian_log_likelihood(x, m1, ls),
                 R.discretized_gaussian_log_likelihood(up(x), up(m1), up(ls)), "dgll")


# -- forward process, posterior, prediction -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (1, 3, 5, 7), (2, 3, 40, 41), (4, 7)])
def test_q_sample_and_posterior(dtype, shape):
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    t = torch.randint(0, T, (shape[0],), generator=g)
    assert_close(native.q_sample(x0, t, noise, SCHEDULE), R.q_sample(x0, t, noise, SCHEDULE),
                 R.q_sample(up(x0), t, up(noise), SCHEDULE), "q_sample")
    for a, b, c in zip(native.q_posterior(x0, noise, t, SCHEDULE), R.q_posterior(x0, noise, t, SCHEDULE),
                       R.q_posterior(up(x0), up(noise), t, SCHEDULE)):
        assert_close(a, b, c, "q_posterior")
    for mean_type in R.MEAN_TYPES:
        assert_close(native.predict_xstart(noise, x0, t, SCHEDULE, mean_type=mean_type),
                     R.predict_xstart(noise, x0, t, SCHEDULE, mean_type=mean_type),
                     R.predict_xstart(up(noise), up(x0), t, SCHEDULE, mean_type=mean_type), mean_type)


@pytest.mark.parametrize("mean_type", R.MEAN_TYPES)
@pytest.mark.parametrize("var_type", R.VAR_TYPES)
@pytest.mark.parametrize("clip,threshold", [(False, None), (True, None), (True, 0.9)])
def test_p_mean_variance_and_steps(mean_type, var_type, clip, threshold):
    mo, x0, noise, t = inputs(learned=var_type in R.LEARNED_VAR_TYPES)
    x_t = R.q_sample(x0, t, noise, SCHEDULE)
    kw = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip, dynamic_threshold=threshold,
              sample_max_value=1.5)
    compare_dicts(native.p_mean_variance(mo, x_t, t, SCHEDULE, **kw), R.p_mean_variance(mo, x_t, t, SCHEDULE, **kw),
                  R.p_mean_variance(up(mo), up(x_t), t, SCHEDULE, **kw), f"pmv {kw}")
    compare_dicts(native.p_sample_step(mo, x_t, t, SCHEDULE, noise=noise, **kw),
                  R.p_sample_step(mo, x_t, t, SCHEDULE, noise=noise, **kw),
                  R.p_sample_step(up(mo), up(x_t), t, SCHEDULE, noise=up(noise), **kw), f"p_sample {kw}")
    for eta in (0.0, 0.7):
        compare_dicts(native.ddim_step(mo, x_t, t, SCHEDULE, eta=eta, noise=noise, **kw),
                      R.ddim_step(mo, x_t, t, SCHEDULE, eta=eta, noise=noise, **kw),
                      R.ddim_step(up(mo), up(x_t), t, SCHEDULE, eta=eta, noise=up(noise), **kw), f"ddim {eta} {kw}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_steps_dtypes(dtype):
    mo, x0, noise, t = inputs(learned=True, dtype=dtype)
    x_t = R.q_sample(x0, t, noise, SCHEDULE)
    kw = dict(mean_type="epsilon", var_type="learned_range", noise=noise)
    compare_dicts(native.p_sample_step(mo, x_t, t, SCHEDULE, **kw), R.p_sample_step(mo, x_t, t, SCHEDULE, **kw),
                  R.p_sample_step(up(mo), up(x_t), t, SCHEDULE, mean_type="epsilon", var_type="learned_range",
                                  noise=up(noise)), str(dtype))


# -- layouts --------------------------------------------------------------------------------------------
def test_channels_last_and_strided_inputs():
    mo, x0, noise, t = inputs(B=3, shape=(3, 6, 8), learned=True)
    cl = [x.contiguous(memory_format=torch.channels_last) for x in (mo, x0, noise)]
    sl = [torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])[..., ::2] for x in (mo, x0, noise)]
    kw = dict(mean_type="epsilon", var_type="learned_range", loss_type="mse")
    for m, a, n in (cl, sl, (cl[0], x0, sl[2])):
        compare_dicts(native.training_losses(m, a, t, n, SCHEDULE, **kw), R.training_losses(m, a, t, n, SCHEDULE, **kw),
                      R.training_losses(up(m), up(a), t, up(n), SCHEDULE, **kw), "layout")
        grads = []
        for fn, mm, aa, nn in ((native.training_losses, m, a, n), (R.training_losses, m, a, n),
                               (R.training_losses, up(m), up(a), up(n))):
            mm = mm.clone().requires_grad_()
            fn(mm, aa, t, nn, SCHEDULE, **kw)["loss"].sum().backward()
            grads.append(mm.grad)
        assert_close(*grads, "layout grad")
        out = native.q_sample(a, t, n, SCHEDULE)
        assert_close(out, R.q_sample(a, t, n, SCHEDULE), R.q_sample(up(a), t, up(n), SCHEDULE), "q_sample layout")
        step = native.p_sample_step(m, a, t, SCHEDULE, mean_type="v", var_type="learned", noise=n)
        compare_dicts(step, R.p_sample_step(m, a, t, SCHEDULE, mean_type="v", var_type="learned", noise=n),
                      R.p_sample_step(up(m), up(a), t, SCHEDULE, mean_type="v", var_type="learned", noise=up(n)), "ps")
    out = native.q_sample(cl[1], t, cl[2], SCHEDULE)
    assert out.is_contiguous(memory_format=torch.channels_last)  # outputs keep a dense input's layout


# -- determinism ----------------------------------------------------------------------------------------
def test_reductions_deterministic_and_batch_independent():
    mo, x0, noise, t = inputs(B=5, shape=(3, 40, 41), learned=True)  # several chunks per sample
    kw = dict(mean_type="epsilon", var_type="learned_range", loss_type="mse")
    full = native.training_losses(mo, x0, t, noise, SCHEDULE, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = native.training_losses(mo, x0, t, noise, SCHEDULE, **kw)
    finally:
        torch.set_num_threads(threads)
    for k in full:
        assert torch.equal(full[k], single[k]), k
    for i in (0, 3):
        one = native.training_losses(mo[i:i + 1], x0[i:i + 1], t[i:i + 1], noise[i:i + 1], SCHEDULE, **kw)
        for k in full:
            assert torch.equal(one[k][0], full[k][i]), (k, i)


# -- in-kernel noise ------------------------------------------------------------------------------------
def _drawn_noise(x_t, t, **kw):
    """The N(0, 1) draw of a p_sample step, recovered as (sample - mean) / std (fixed_small variance)."""
    mo = torch.zeros_like(x_t)
    step = native.p_sample_step(mo, x_t, t, SCHEDULE, mean_type="epsilon", var_type="fixed_small",
                                clip_denoised=False, **kw)
    pmv = R.p_mean_variance(mo, x_t, t, SCHEDULE, mean_type="epsilon", var_type="fixed_small")
    return ((step["sample"].double() - pmv["mean"].double()) / pmv["variance"].double().sqrt()).float()


def test_philox_noise_seeded_and_normal():
    x_t = torch.randn(4, 3, 32, 32)
    t = torch.full((4,), 500)
    a, b, c = _drawn_noise(x_t, t, seed=7), _drawn_noise(x_t, t, seed=7), _drawn_noise(x_t, t, seed=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05
    # the same draw whatever the layout (offset = row-major index)
    cl = _drawn_noise(x_t.contiguous(memory_format=torch.channels_last), t, seed=7)
    torch.testing.assert_close(cl, a, rtol=1e-4, atol=1e-4)
    # generator: deterministic for a seeded generator, and it advances
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d1, d2 = _drawn_noise(x_t, t, generator=g1), _drawn_noise(x_t, t, generator=g2)
    assert torch.equal(d1, d2) and not torch.equal(_drawn_noise(x_t, t, generator=g1), d1)
    # no noise at t = 0
    t0 = torch.zeros(4, dtype=torch.int64)
    s = native.p_sample_step(torch.zeros_like(x_t), x_t, t0, SCHEDULE, mean_type="epsilon", var_type="fixed_small", seed=1)
    r = R.p_sample_step(torch.zeros_like(x_t), x_t, t0, SCHEDULE, mean_type="epsilon", var_type="fixed_small",
                        noise=torch.zeros_like(x_t))
    torch.testing.assert_close(s["sample"], r["sample"])


def test_philox_noise_matches_triton_randn4x():
    """The seeded draw of counter g is lane g % 4 of tl.randn4x(seed, g // 4): the CPU kernels' draws, and
    the Triton kernels' helpers (_math.philox_normal per counter, _math._philox_normal_rows by whole blocks; bit
    for bit: the same float32 operations)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    from triton_draw_kernels import philox_normal_kernel, philox_normal_rows_kernel, randn4x_kernel

    x_t = torch.randn(2, 3, 8, 8)
    ref = torch.empty(x_t.numel())
    randn4x_kernel[(triton.cdiv(ref.numel() // 4, 128),)](ref, 1234, ref.numel() // 4, BLOCK=128)
    helper = torch.empty_like(ref)
    philox_normal_kernel[(triton.cdiv(ref.numel(), 128),)](helper, 1234, ref.numel(), BLOCK=128)
    assert torch.equal(helper, ref)
    rows = torch.empty_like(ref)
    philox_normal_rows_kernel[(triton.cdiv(ref.numel(), 64),)](rows, 1234, ref.numel(), BLOCK=64)
    assert torch.equal(rows, ref)
    got = _drawn_noise(x_t, torch.full((2,), 300), seed=1234).reshape(-1)
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_philox_noise_matches_float64_philox_box_muller(layout):
    """Every drawn value against the stream's float64 definition (ddpm_fast.noise_stream: an independent numpy
    Philox + Box-Muller), over 2^17 + odd-sized draws
    (SIMD, unaligned-head and scalar-tail paths: 43,885 per sample is 1 mod 4, so samples 1 and 2 start
    inside a Philox block; channels_last takes the strided path, offsets stay row-major).

    Bound per element, from the float32 steps of the kernel: cos and sin(2 pi u) within 2e-7 absolute (their
    polynomial's float32 error, after an exact reduction); the radius r within 2 ulp relative (log 1 ulp, sqrt and products half an
    ulp each); the step's std * z and our division by the step's own std another ulp of |z| <= r. So
    |z - z64| <= r (2e-7 + 3 * 2^-24) < 4e-7 r."""
    seed = (7 << 32) + 12345  # both key words nonzero
    x_t = torch.zeros(3, 5, 67, 131)  # 43,885 per sample: not a multiple of any vector width
    if layout == "channels_last":
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([1, 500, 999])
    kw = dict(mean_type="epsilon", var_type="fixed_small", clip_denoised=False)
    mo = torch.zeros_like(x_t)
    std = native.p_sample_step(mo, x_t, t, SCHEDULE, noise=torch.ones_like(x_t), **kw)["sample"]  # mean is 0
    got = (native.p_sample_step(mo, x_t, t, SCHEDULE, seed=seed, **kw)["sample"].double() / std.double())
    counters = np.arange(x_t.numel(), dtype=np.uint64)  # b * N + row-major index
    want, r = noise_stream.normals(seed, counters)
    err = np.abs(got.contiguous().reshape(-1).numpy() - want)
    assert np.isfinite(err).all()
    assert (err <= 4e-7 * r).all(), f"max error {err.max():.3g} at r = {r[err.argmax()]:.3g}"
    assert abs(want.mean()) < 0.01 and abs(want.std() - 1) < 0.01  # the reference itself draws N(0, 1)


# -- gradcheck (float64) --------------------------------------------------------------------------------
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    B, shape = 3, (2, 3, 4)

    def rnd(*s, lo=-1.0, hi=1.0):
        return (torch.rand(s, generator=g, dtype=torch.float64) * (hi - lo) + lo).requires_grad_()

    t = torch.tensor([0, 7, 999])
    x0, noise = rnd(B, *shape), rnd(B, *shape)
    assert torch.autograd.gradcheck(lambda a, b: native.q_sample(a, t, b, SCHEDULE), (x0, noise))
    assert torch.autograd.gradcheck(lambda a, b: native.q_posterior(a, b, t, SCHEDULE)[0], (x0, noise))
    for mt in R.MEAN_TYPES:
        assert torch.autograd.gradcheck(lambda a, b: native.predict_xstart(a, b, t, SCHEDULE, mean_type=mt), (x0, noise))
    m1, lv1, m2, lv2 = rnd(B, 3), rnd(B, 1), rnd(1, 3), rnd(B, 3)
    assert torch.autograd.gradcheck(native.normal_kl, (m1, lv1, m2, lv2))
    x = torch.tensor([[-1.0, -0.5, 0.2, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, s: native.discretized_gaussian_log_likelihood(x, m, s),
                                    (rnd(2, 4, lo=-0.9, hi=0.9), rnd(2, 1, lo=-4.0, hi=-2.0)))
    assert torch.autograd.gradcheck(lambda a: native.prior_bpd(a, SCHEDULE), (x0,))
    x_t = R.q_sample(x0.detach(), t, noise.detach(), SCHEDULE)
    # (the hybrid loss's stop-gradient is checked against the reference in test_training_losses;
    # finite differences cannot see it, so gradcheck takes losses without one)
    for mt, vt, lt in (("epsilon", "learned_range", "kl"), ("epsilon", "fixed_small", "kl"),
                       ("x_prev", "learned", "rescaled_kl"), ("v", "fixed_small", "rescaled_mse"),
                       ("x0", "fixed_large", "mse")):
        c = shape[0] * (2 if vt in R.LEARNED_VAR_TYPES else 1)
        mo = rnd(B, c, *shape[1:])
        assert torch.autograd.gradcheck(
            lambda m: tuple(native.training_losses(m, x0.detach(), t, noise.detach(), SCHEDULE, mean_type=mt,
                                                   var_type=vt, loss_type=lt, weighting="elbo").values()), (mo,))
        assert torch.autograd.gradcheck(
            lambda m: native.vb_terms_bpd(m, x0.detach(), x_t, t, SCHEDULE, mean_type=mt, var_type=vt), (mo,))


# -- torch.library.opcheck for every op -----------------------------------------------------------------
def _opcheck_cases():
    mo, x0, noise, t = inputs(B=3, shape=(2, 3, 4), learned=True)
    mo1 = mo[:, :2].contiguous()
    tab = SCHEDULE.table("cpu")
    th = torch.tensor([1.0, 1.2, 1.5])
    g = torch.randn(3)
    m = mo.clone().requires_grad_()
    return [
        ("q_sample", (x0.clone().requires_grad_(), t, noise, tab)),
        ("linear_backward", (x0, t, tab, 2, 1)),
        ("q_posterior", (x0.clone().requires_grad_(), noise, t, tab)),
        ("predict_xstart", (mo1.clone().requires_grad_(), x0, t, tab, 0)),
        ("p_mean_variance", (mo, x0, t, tab, 0, 3, True, th)),
        ("p_mean_variance", (mo1, x0, t, tab, 2, 0, False, None)),
        ("p_sample_step", (mo, x0, t, tab, 3, 3, True, None, noise, 0)),
        ("p_sample_step", (mo1, x0, t, tab, 0, 1, True, th, None, 5)),
        ("ddim_step", (mo1, x0, t, tab, 0, 0, True, None, 0.5, None, 3)),
        ("vb_terms_bpd", (m, x0, noise, t, tab, 0, 3, False, True)),
        ("training_losses", (m, x0, t, noise, tab, 0, 3, 1, 1, 5.0, True)),
        ("training_losses", (mo1.clone().requires_grad_(), x0, t, noise, tab, 1, 0, 2, 0, 5.0, True)),
        ("scale_halves", (torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4), mo, g, g, g, g, 1.0, 1.0, 0.0, 0.5, 0.5)),
        ("scale_halves", (torch.randn(3, 2, 3, 4), None, mo1, g.expand(3), None, g[:1].expand(3), None, 2.0, 0.0,
                          1.0, 2.0, 1.0)),
        ("prior_bpd", (x0.clone().requires_grad_(), tab)),
        ("prior_bpd_backward", (g, x0, tab)),
        ("normal_kl", (x0.clone().requires_grad_(), noise[:, :1], x0[:1], noise.clone().requires_grad_())),
        ("normal_kl_backward", (x0, x0, noise[:, :1], x0[:1], noise)),
        ("discretized_gaussian_log_likelihood", (x0, noise.clone().requires_grad_(), noise[:, :1] - 3)),
        ("dgll_backward", (x0, x0, noise, noise[:, :1] - 3)),
    ]


# the compiled ops, and those of the emulated CUDA library (backend cuda_emu) when it is built
NAMESPACES = ["ddpm_fast"] + (["ddpm_fast_emu"] if F.availability()["cuda_emu"][0] else [])


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, args, namespace):
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), name).default, args)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_raw_ops_check_the_table(namespace):
    """A raw torch.ops call with a schedule table of another dtype than the inputs' compute dtype raises naming the
    table, instead of reading it as the compute dtype (garbage, or past its end). (The device check beside it needs
    two devices: a meta table sends the call to the fake, and this machine has no GPU.)"""
    ops = getattr(torch.ops, namespace)
    x64 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([999, 998])
    table32, table64 = SCHEDULE.cpu_table(torch.float32), SCHEDULE.cpu_table(torch.float64)
    if namespace == "ddpm_fast":  # (the CUDA kernels take no float64 inputs: they raise before the table)
        with pytest.raises(TypeError, match="table: expected dtype Double"):
            ops.q_sample.default(x64, t, x64, table32)
        torch.testing.assert_close(ops.q_sample.default(x64, t, x64, table64), R.q_sample(x64, t, x64, SCHEDULE))
    for x in (x64.float(), x64.half()):
        with pytest.raises(TypeError, match="table: expected dtype Float"):
            ops.q_sample.default(x, t, x, table64)
        with pytest.raises(TypeError, match="table: expected dtype Float"):
            ops.training_losses.default(x, x, t, x, table64, 0, 0, 0, 0, 5.0, False)


DIFFERENTIABLE = ("q_sample", "q_posterior", "predict_xstart", "vb_terms_bpd", "training_losses", "prior_bpd",
                  "normal_kl", "discretized_gaussian_log_likelihood")


@pytest.mark.parametrize("name,args", [c for c in _opcheck_cases() if c[0] in DIFFERENTIABLE],
                         ids=[c[0] for c in _opcheck_cases() if c[0] in DIFFERENTIABLE])
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_opcheck_aot_dispatch(name, args, namespace):
    """The AOT-dispatch check (torch.compile's path, symbolic shapes) through each C++ autograd kernel,
    forward and backward."""
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), name).default, args,
                          test_utils=("test_aot_dispatch_dynamic",))


def test_autograd_kernels_are_cpp():
    """Every differentiable op's autograd kernel is the C++ one, registered from its family's file
    csrc/ops/<family>.cpp (the file that defines its schema), not a Python wrapper (tens of microseconds a
    call); the sampler ops have none (native.py runs the reference under grad)."""

    def registered_at(line: str) -> str:  # the source file of a _dispatch_dump line, "" if it names none
        found = re.search(r"registered at (\S+?):\d+", line)
        return found.group(1) if found else ""

    for name in DIFFERENTIABLE:
        lines = torch._C._dispatch_dump(f"ddpm_fast::{name}").splitlines()
        autograd = registered_at(next(x for x in lines if x.startswith("Autograd")))
        schema = registered_at(next(x for x in lines if x.startswith("debug:")))
        assert re.search(r"[/\\]csrc[/\\]ops[/\\]\w+\.cpp$", autograd), (name, autograd)
        assert autograd == schema, (name, autograd, schema)
    for name in ("p_mean_variance", "p_sample_step", "ddim_step"):
        assert not any(x.startswith("Autograd") for x in torch._C._dispatch_dump(f"ddpm_fast::{name}").splitlines())


def test_autograd_single_inputs_and_outputs():
    """Gradients reach exactly the inputs that require them; q_posterior's variance outputs (functions of t
    alone) are non-differentiable; a backward through only some outputs works."""
    mo, x0, noise, t = inputs(B=3, shape=(2, 3, 4))
    n = noise.clone().requires_grad_()
    (gn,) = torch.autograd.grad(native.q_sample(x0, t, n, SCHEDULE).sum(), n)
    torch.testing.assert_close(gn, R.q_sample(0 * x0, t, torch.ones_like(x0), SCHEDULE))  # sqrt(1 - abar_t)
    a = x0.clone().requires_grad_()
    mean, var, logvar = native.q_posterior(a, noise, t, SCHEDULE)
    assert mean.requires_grad and not var.requires_grad and not logvar.requires_grad
    (ga,) = torch.autograd.grad(mean.sum(), a)
    torch.testing.assert_close(ga, R.q_posterior(torch.ones_like(x0), 0 * x0, t, SCHEDULE)[0])  # post_c1_t
    m1, lv2 = x0.clone().requires_grad_(), noise[:, :1].clone().requires_grad_()
    g1, g2 = torch.autograd.grad(native.normal_kl(m1, noise[:, :1], x0[:1], lv2).sum(), (m1, lv2))
    r1, r2 = m1.detach().clone().requires_grad_(), lv2.detach().clone().requires_grad_()
    w1, w2 = torch.autograd.grad(R.normal_kl(r1, noise[:, :1], x0[:1], r2).sum(), (r1, r2))
    assert g2.shape == lv2.shape
    torch.testing.assert_close((g1, g2), (w1, w2), rtol=1e-5, atol=1e-5)


# -- dispatch and failure reporting ---------------------------------------------------------------------
def test_auto_backend_uses_the_extension_on_cpu():
    assert backends.select("auto", "cpu") is native
    mo, x0, noise, t = inputs()
    out = F.training_losses(mo, x0, t, noise, SCHEDULE, mean_type="epsilon", var_type="fixed_small",
                            loss_type="mse", backend="cpu")
    torch.testing.assert_close(out["loss"], R.training_losses(mo, x0, t, noise, SCHEDULE, mean_type="epsilon",
                                                              var_type="fixed_small", loss_type="mse")["loss"])
    assert native.availability("cuda")[0] is False or torch.cuda.is_available()


def test_unavailable_extension_says_why(tmp_path):
    env = dict(os.environ, DDPM_FAST_BUILD_DIR=str(tmp_path), CXX="no-such-compiler-xyz")
    code = "from ddpm_fast import native; print(native.availability('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "(False, " in out.stdout and "no C++ compiler" in out.stdout, out.stdout + out.stderr


def test_cuda_toolkit_is_a_folder_that_holds_one(tmp_path):
    """A guessed CUDA_HOME without a toolkit (the parent of a wrapper-script nvcc) is passed over."""
    from ddpm_fast import _build

    wrapper_parent, toolkit = tmp_path / "local", tmp_path / "cuda"
    (wrapper_parent / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    assert _build.first_toolkit([None, str(wrapper_parent), str(toolkit)]) == str(toolkit)
    assert _build.first_toolkit([None, str(wrapper_parent)]) is None


@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda_emu") if F.availability()[b][0]])
def test_a_call_without_gradients_skips_the_autograd_node_with_the_same_results(backend):
    """With grad mode off, or no input requiring grad, the C++ ops run below autograd (no node is built):
    the same outputs bit for bit as the call that builds the node, and outputs that do not require grad."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    out = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 7, 999])
    plain = F.training_losses(out, x0, t, noise, SCHEDULE, var_type="learned_range", backend=backend)["loss"]
    with torch.no_grad():
        no_grad = F.training_losses(out.requires_grad_(), x0, t, noise, SCHEDULE, var_type="learned_range",
                                    backend=backend)["loss"]
    with_node = F.training_losses(out, x0, t, noise, SCHEDULE, var_type="learned_range", backend=backend)["loss"]
    assert with_node.requires_grad and not plain.requires_grad and not no_grad.requires_grad
    assert torch.equal(plain, with_node.detach()) and torch.equal(no_grad, plain)
    x_t = F.q_sample(x0, t, noise, SCHEDULE, backend=backend)
    assert not x_t.requires_grad
    assert torch.equal(x_t, F.q_sample(x0.requires_grad_(), t, noise, SCHEDULE, backend=backend).detach())


TERMS = ("loss", "mse", "vb")  # training_losses' differentiable outputs

# the node's cases: a learned variance (vb term, d_v saved), a fixed one (no vb output), min-SNR weights (w saved),
# ELBO weights with a rescaled MSE, a rescaled KL
NODE_CASES = [dict(var_type="learned_range"), dict(var_type="fixed_small"),
              dict(var_type="fixed_large", weighting="min_snr", mean_type="v"),
              dict(var_type="learned", loss_type="rescaled_mse", weighting="elbo"),
              dict(var_type="learned_range", loss_type="rescaled_kl")]


@pytest.mark.parametrize("case", NODE_CASES, ids=lambda c: "-".join(c.values()))
@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda_emu") if F.availability()[b][0]])
def test_training_losses_node_behaves_as_an_autograd_function(backend, case):
    """training_losses' hand-built node (csrc/ops/losses.cpp, not a torch::autograd::Function) keeps what the
    Function did: a retained graph gives the same gradient twice, a second backward through a freed graph raises
    torch's error, compiled autograd gives the same gradient, and a functorch transform or a forward-mode gradient
    raises instead of running unsupported. The gradient is the reference's, from the loss and from the mse term."""
    import torch.autograd.forward_ad as fwAD

    mo, x0, noise, t = inputs(learned=case["var_type"] in R.LEARNED_VAR_TYPES)
    kw = dict(dict(mean_type="epsilon", loss_type="mse"), **case, backend=backend)
    m = mo.clone().requires_grad_()
    terms = F.training_losses(m, x0, t, noise, SCHEDULE, **kw)
    loss = terms["loss"].sum()
    assert loss.grad_fn.next_functions[0][0].name() == "ddpm_fast::TrainingLossesBackward"
    (g1,) = torch.autograd.grad(loss, m, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, m, retain_graph=True)
    assert torch.equal(g1, g2) and g1.abs().sum() > 0
    options = {k: v for k, v in kw.items() if k != "backend"}
    refs = {}  # the reference's terms, in float32 and float64, with their model outputs
    for dtype in (torch.float32, torch.float64):
        m_ref = mo.to(dtype, copy=True).requires_grad_()
        refs[dtype] = m_ref, R.training_losses(m_ref, x0.to(dtype), t, noise.to(dtype), SCHEDULE, **options)
    for term in (k for k in TERMS if k in refs[torch.float64][1]):  # by the flash-attention rule (assert_close)
        (ours,) = torch.autograd.grad(terms[term].sum(), m, retain_graph=True, allow_unused=True)
        ours = torch.zeros_like(m) if ours is None else ours
        refs_of_term = [torch.autograd.grad(r[term].sum(), m_ref, retain_graph=True, allow_unused=True)[0]
                        for m_ref, r in refs.values()]
        refs_of_term = [torch.zeros_like(m) if g is None else g for g in refs_of_term]
        assert_close(ours, *refs_of_term, what=f"{case} d {term}")
    (g2,) = torch.autograd.grad(loss, m)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, m)
    # compiled autograd traces the node (compiled_args / apply_with_saved) with placeholder gradients: from the loss
    # alone, and from all of its terms at once (the per-sample weights and term sums are scale_halves' own work)
    for terms_of in (lambda r: r["loss"].sum(), lambda r: sum(v.sum() for k, v in r.items() if k in TERMS)):
        (want,) = torch.autograd.grad(terms_of(F.training_losses(m, x0, t, noise, SCHEDULE, **kw)), m)
        m2 = mo.clone().requires_grad_()
        total = terms_of(F.training_losses(m2, x0, t, noise, SCHEDULE, **kw))
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
            total.backward()
        assert torch.equal(m2.grad, want)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda a: F.training_losses(a, x0, t, noise, SCHEDULE, **kw)["loss"].sum())(mo)
    with fwAD.dual_level():
        dual = fwAD.make_dual(mo, torch.ones_like(mo))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            F.training_losses(dual, x0, t, noise, SCHEDULE, **kw)


def _differentiable_calls(backend):
    """(name, fn of one differentiable input, that input) for every op with a fused backward but
    training_losses (its node has a test of its own)."""
    mo, x0, noise, t = inputs(learned=True)
    x_t = R.q_sample(x0, t, noise, SCHEDULE)
    lv = torch.linspace(-2.0, 0.5, 5).reshape(5, 1, 1, 1)
    kw = dict(backend=backend)
    return [
        ("q_sample", lambda a: F.q_sample(a, t, noise, SCHEDULE, **kw), x0),
        ("q_posterior", lambda a: F.q_posterior(a, x_t, t, SCHEDULE, **kw)[0], x0),
        ("predict_xstart", lambda a: F.predict_xstart(a, x_t, t, SCHEDULE, **kw), x0),
        ("vb_terms_bpd", lambda a: F.vb_terms_bpd(a, x0, x_t, t, SCHEDULE, mean_type="epsilon",
                                                  var_type="learned_range", **kw), mo),
        ("prior_bpd", lambda a: F.prior_bpd(a, SCHEDULE, **kw), x0),
        ("normal_kl", lambda a: F.normal_kl(a, lv, x_t, lv, **kw), x0),
        ("discretized_gaussian_log_likelihood",
         lambda a: F.discretized_gaussian_log_likelihood(x0.clamp(-1, 1), a, lv, **kw), x0),
    ]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda_emu", "triton") if F.availability()[b][0]])
def test_compiled_autograd_traces_every_fused_backward(backend):
    """Under compiled autograd (torch._dynamo's) each op's backward gives eager's gradient bit for bit. Its C++
    autograd Functions mark no output non-differentiable (compiled autograd asserts none is); q_posterior's
    variances and vb_terms_bpd's saved unit gradients still need no gradient."""
    for name, fn, x in _differentiable_calls(backend):
        out = fn(x)
        weights = torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape)  # a gradient that is not all ones
        a = x.clone().requires_grad_()
        (want,) = torch.autograd.grad((fn(a) * weights).sum(), a)
        a2 = x.clone().requires_grad_()
        total = (fn(a2) * weights).sum()
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
            total.backward()
        assert torch.equal(a2.grad, want), name
    a = x.clone().requires_grad_()
    mean, var, logvar = F.q_posterior(a, a.detach() + 1, torch.tensor([1, 2, 3, 4, 5]), SCHEDULE, backend=backend)
    assert mean.requires_grad and not var.requires_grad and not logvar.requires_grad
    if backend == "triton":
        return
    mo = torch.randn(5, 6, 5, 7, requires_grad=True)
    x0 = torch.randn(5, 3, 5, 7)
    vb, d_out, d_v = getattr(torch.ops, "ddpm_fast_emu" if backend == "cuda_emu" else "ddpm_fast").vb_terms_bpd(
        mo, x0, x0, torch.tensor([0, 1, 2, 3, 4]), SCHEDULE.table("cpu"), 0, 3, False, True)
    assert vb.requires_grad and not d_out.requires_grad and not d_v.requires_grad


@pytest.mark.skipif(not backends.available("cpu"), reason="the compiled CPU backend is unavailable")
def test_plain_eager_calls_skip_the_overload_frame_and_compile_still_traces(monkeypatch):
    """cpu_native hands plain-eager calls the adapters bound to native.EagerKernel (the op's direct binding,
    csrc/ops/direct.h) and torch.compile the traceable ones; the routed adapters (the checked path: CUDA tensors)
    call the direct binding in eager and the OpOverload under compile. The same results either way, and a
    fullgraph compile of a public op, and of a routed one, traces (the direct binding would break the graph)."""
    from ddpm_fast import _build
    from ddpm_fast.ops import _checks

    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 900])
    eager_fn = _checks.cpu_native("q_sample", "auto", x0, noise)
    assert eager_fn is native.eager_kernels.q_sample
    assert eager_fn.args[0].op is _build.direct_bindings(False).q_sample
    routed_kernel = native.kernels.q_sample.args[0]
    assert routed_kernel.op is _build.direct_bindings(False).q_sample
    monkeypatch.setattr(_checks, "is_compiling", lambda: True)
    monkeypatch.setattr(native, "_is_compiling", lambda: True)
    assert _checks.cpu_native("q_sample", "auto", x0, noise) is native.kernels.q_sample
    assert routed_kernel.op is torch.ops.ddpm_fast.q_sample.default
    monkeypatch.undo()
    want = F.q_sample(x0, t, noise, SCHEDULE)
    torch.testing.assert_close(want, R.q_sample(x0, t, noise, SCHEDULE), rtol=1e-6, atol=1e-6)
    assert torch.equal(native.q_sample(x0, t, noise, SCHEDULE), want)
    for fn in (F.q_sample, native.q_sample):
        compiled = torch.compile(lambda a, b: fn(a, t, b, SCHEDULE), fullgraph=True, backend="eager")
        assert torch.equal(compiled(x0, noise), want)


_COLD_COMPILE = """
import sys, torch, ddpm_fast as F
F.availability()  # loads the backends: no op has run, no route plan or schedule table exists yet
S = F.NoiseSchedule.named("cosine", 100)
g = torch.Generator().manual_seed(0)
x0, noise, out = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
t = torch.tensor([0, 50, 99])
for backend in ("auto", "reference"):
    def step(a, b, m):
        x_t = F.q_sample(a, t, b, S, backend=backend, validate=False)
        return x_t, F.training_losses(m, a, t, b, S, backend=backend, validate=False)["loss"]
    got = torch.compile(step, fullgraph=True, backend="eager")(x0, noise, out)
    want = step(x0, noise, out)
    assert all(torch.equal(x, y) for x, y in zip(got, want)), backend
print("ok")
"""


@pytest.mark.skipif(not backends.available("cpu"), reason="the compiled CPU backend is unavailable")
def test_fullgraph_compile_as_the_first_call_of_the_ops():
    """A fullgraph torch.compile may be the first call of an op once the backends are loaded
    (ddpm_fast.availability()): the route plans and the schedule's tables are made while tracing (a fresh
    process, so no cache is warm)."""
    proc = subprocess.run([sys.executable, "-c", _COLD_COMPILE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_direct_bindings_dispatch_as_the_overloads(namespace):
    """Each op's direct binding (csrc/ops/direct.h, what native.EagerKernel calls) gives the OpOverload's
    results bit for bit, builds the same autograd graph, is seen by dispatch modes, raises the op's own
    errors, and sends what it does not take (a __torch_function__ subclass, a torch function mode, an argument
    of another type, a wrong count) to the OpOverload, which handles or rejects it as before."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from ddpm_fast import _build

    direct = _build.direct_bindings(namespace == "ddpm_fast_emu")
    ops = getattr(torch.ops, namespace)
    declared = {m for p in _build.op_sources() for m in re.findall(r"^DDPM_DEVICE_OP\((\w+),", p.read_text(), re.M)}
    assert {name for name in dir(direct) if not name.startswith("_")} == declared and len(declared) >= 17
    assert all(hasattr(ops, name) for name in declared)
    table = SCHEDULE.cpu_table(torch.float32)
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 900])
    assert torch.equal(direct.q_sample(x0, t, noise, table), ops.q_sample.default(x0, t, noise, table))
    mo = torch.randn(2, 3, 4, 4, requires_grad=True)
    args = (mo, x0, t, noise, table, 0, 0, 0, 0, 5.0, True)
    ours, theirs = direct.training_losses(*args), ops.training_losses.default(*args)
    # DDPM_DIRECT_RESULTS: the binding gives Python (loss, mse, vb), not the node's saved w, d_out, d_v; the
    # simple MSE loss with a fixed variance makes neither mse (it is the loss) nor vb nor w
    assert len(ours) == 3 and len(theirs) == 6 and type(ours[0]) is torch.Tensor
    assert ours[1:] == (None, None) and theirs[1:4] == (None, None, None) and theirs[4].shape == x0.shape
    assert torch.equal(ours[0], theirs[0])
    vb_args = (mo, x0, x0, t, table, 0, 0, False, True)
    assert len(direct.vb_terms_bpd(*vb_args)) == 1 and len(ops.vb_terms_bpd.default(*vb_args)) == 3
    assert torch.equal(direct.vb_terms_bpd(*vb_args)[0], ops.vb_terms_bpd.default(*vb_args)[0])
    assert type(ours[0].grad_fn) is type(theirs[0].grad_fn)
    assert torch.equal(torch.autograd.grad(ours[0].sum(), mo)[0], torch.autograd.grad(theirs[0].sum(), mo)[0])

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        direct.q_sample(x0, t, noise, table)
    assert seen.ops == [ops.q_sample.default]
    # the op's own errors (emulated CUDA: t out of range is the kernel's device-side assert, as on a GPU)
    for bad, error in (((x0, torch.tensor([3, 5000]), noise, table), r"t: expected timesteps in \[0, 1000\)|assert"),
                       ((x0.int(), t, noise, table), "x0: expected a float16")):
        with pytest.raises(Exception, match=error) as ours:
            direct.q_sample(*bad)
        with pytest.raises(Exception, match=error) as theirs:
            ops.q_sample.default(*bad)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)

    calls = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    out = direct.q_sample(x0.as_subclass(Logged), t, noise, table)
    assert calls == [ops.q_sample.default] and type(out) is Logged
    assert torch.equal(out.as_subclass(torch.Tensor), ops.q_sample.default(x0, t, noise, table))
    with Mode():
        direct.q_sample(x0, t, noise, table)
    assert calls == [ops.q_sample.default] * 2
    with pytest.raises(RuntimeError, match="expected at most 4 argument"):  # the OpOverload's own error
        direct.q_sample(x0, t, noise, table, table)
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor'"):
        direct.q_sample(x0, [3, 900], noise, table)
