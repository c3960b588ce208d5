"""No op of any available backend syncs the host with the device: every op (forward and backward) runs
under a TorchDispatchMode that fails on aten._local_scalar_dense (.item(), int(t), Python branches on
tensor values) and aten.nonzero. Parametrised over ddpm_fast.backends.availability(), so a backend
added later is covered as soon as it is available. validate=False (the CPU range check of t is a
deliberate, documented host read)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_fast
from ddpm_fast.backends import availability

FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.nonzero_static.default, torch.ops.aten.item.default}


class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in FORBIDDEN or func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


BACKENDS = [name for name, (ok, _) in availability().items() if ok]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_without_host_sync(backend):
    dev = _device()
    s = ddpm_fast.NoiseSchedule.named("linear", 50)
    g = torch.Generator(dev).manual_seed(0)
    x0 = torch.rand(2, 2, 3, 4, device=dev, generator=g) * 2 - 1
    nz = torch.randn(2, 2, 3, 4, device=dev, generator=g)
    mo = torch.randn(2, 4, 3, 4, device=dev, generator=g).tanh()
    t = torch.tensor([0, 30], device=dev)
    kw = dict(backend=backend, validate=False)
    with NoHostSync():
        x_t = ddpm_fast.q_sample(x0, t, nz, s, **kw)
        ddpm_fast.q_posterior(x0, x_t, t, s, **kw)
        ddpm_fast.predict_xstart(mo[:, :2], x_t, t, s, mean_type="v", **kw)
        ddpm_fast.normal_kl(x0, nz, x_t, torch.zeros((), device=dev), backend=backend)
        ddpm_fast.discretized_gaussian_log_likelihood(x0, x_t, nz[:, :1] * 0.1 - 2, backend=backend)
        ddpm_fast.p_mean_variance(mo, x_t, t, s, mean_type="epsilon", var_type="learned_range", **kw)
        ddpm_fast.prior_bpd(x0, s, backend=backend)
        ddpm_fast.vb_terms_bpd(mo, x0, x_t, t, s, mean_type="epsilon", var_type="learned_range", **kw)
        for noise_kw in (dict(noise=nz), dict(seed=3), dict(generator=g), {}):
            ddpm_fast.p_sample_step(mo, x_t, t, s, mean_type="epsilon", var_type="learned_range", **noise_kw, **kw)
            ddpm_fast.ddim_step(mo[:, :2], x_t, t, s, eta=1.0, **noise_kw, **kw)
        ddpm_fast.p_sample_step(mo, x_t, t, s, mean_type="epsilon", var_type="learned", dynamic_threshold=0.9,
                                sample_max_value=2.0, seed=1, **kw)
        ddpm_fast.ddim_step(mo[:, :2], x_t, t, s, dynamic_threshold=0.9, **kw)
        # forward and backward of everything a loss depends on
        m = mo.clone().requires_grad_()
        x0g = x0.clone().requires_grad_()
        terms = ddpm_fast.training_losses(m, x0, t, nz, s, mean_type="epsilon", var_type="learned_range",
                                          loss_type="rescaled_mse", weighting="min_snr", **kw)
        kl = ddpm_fast.training_losses(m, x0, t, nz, s, mean_type="x0", var_type="learned", loss_type="kl", **kw)
        vb = ddpm_fast.vb_terms_bpd(m, x0, x_t, t, s, mean_type="x_prev", var_type="learned_range",
                                    clip_denoised=True, **kw)
        post = ddpm_fast.q_posterior(x0g, x_t, t, s, **kw)[0]
        xs = ddpm_fast.q_sample(x0g, t, nz, s, **kw)
        (terms["loss"].sum() + kl["loss"].sum() + vb.sum() + post.sum() + xs.sum()).backward()
    assert m.grad is not None and x0g.grad is not None
