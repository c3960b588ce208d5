"""torch.compile traces into the Triton ops and inlines their kernels (torch.library.triton_op + wrap_triton).

Off the interpreter the ops are triton_ops; compiling needs no GPU, only running does. A subprocess (without
TRITON_INTERPRET, under which the ops are opaque custom ops) compiles one training + sampling step with a
capturing backend: AOTAutograd's joint forward + backward graph must hold every forward and backward
kernel as a triton_kernel_wrapper_functional node and no ddpm_fast_triton op call. The test stops at the
joint graph: without a GPU driver Triton cannot analyse which arguments a kernel mutates (torch then
assumes all, adding clones), so partitioning, Inductor's code and running the graph wait for a GPU.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import json, torch
import ddpm_fast as F
from ddpm_fast.triton import noising, posterior, sampler, vb
from ddpm_fast.triton._runtime import INTERPRET
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

assert not INTERPRET
S = F.NoiseSchedule.named("linear", 100)
tab = S.table("cpu", torch.float32)
found = {}

def capture(gm, example_inputs):
    def partition(joint, joint_inputs, **kw):
        for node in joint.graph.nodes:
            if node.op != "call_function":
                continue
            if "triton_kernel_wrapper" in str(node.target):
                found["kernels"].add(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
            elif "ddpm_fast_triton" in str(node.target):
                found["ops"].add(str(node.target))
        raise RuntimeError("joint graph captured")  # partitioning and running wait for a GPU

    return aot_module_simplified(gm, example_inputs, fw_compiler=None, partition_fn=partition)

def step(mo, x0, noise, t, ls, mo_big, x0_big):
    x_t = noising.q_sample_op(x0, t, noise, tab)
    loss = vb.vb_losses_op(mo, x0.detach(), noise.detach(), t, tab, 0, 3, "rescaled_mse", False, 0, 5.0)[0].sum()
    # a sample in two chunks (3 x 24 x 24 > BLOCK 1024): partial sums and the finishing kernel (one chunk: neither)
    loss = loss + vb.vb_losses_op(mo_big, x0_big.detach(), x0_big.detach(), t, tab, 0, 3, "mse", False, 0,
                                  5.0)[0].sum()
    loss = loss + posterior.q_posterior_op(x0, x_t, t, tab)[0].sum()
    loss = loss + posterior.predict_xstart_op(mo[:, :3], x_t, t, tab, 0).sum()
    loss = loss + posterior.normal_kl_op(x0, ls, x_t, ls).sum()
    loss = loss + posterior.dgll_op(x0.detach(), x_t, ls).sum()
    loss = loss + noising.prior_bpd_op(x0, 0.01, 1e-4).sum()
    mean = sampler.p_mean_variance_op(mo.detach(), x_t.detach(), t, tab, 0, 3, True, 0.9, 1.5)[0]
    sample = sampler.sampler_step_op(mo.detach(), x_t.detach(), t, tab, None, torch.tensor([3]), True, 0, 3, True,
                                     -1.0, 1.0, 0.5)[0]
    return loss + (mean.sum() + sample.sum()) * 0

g = lambda *shape: torch.randn(*shape, requires_grad=True)
result = {}
for dynamic in (False, True):  # dynamic: symbolic sizes through the host launchers (plans then not cached)
    found = {"kernels": set(), "ops": set()}
    torch._dynamo.reset()
    try:
        torch.compile(step, backend=capture, fullgraph=True, dynamic=dynamic)(
            g(2, 6, 4, 4), g(2, 3, 4, 4), g(2, 3, 4, 4), torch.tensor([3, 50]), g(2, 1, 1, 1), g(2, 6, 24, 24),
            g(2, 3, 24, 24))
    except Exception as exc:
        if "joint graph captured" not in str(exc):
            raise
    result[str(dynamic)] = {k: sorted(v) for k, v in found.items()}
print(json.dumps(result))
'''


def test_compile_inlines_every_kernel_forward_and_backward():
    """Static and dynamic (symbolic sizes) compiles, in one subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"False", "True"}
    want = {"_q_sample_kernel", "linear2_bwd_kernel", "_vb_fwd_kernel", "_vb_finish_kernel", "_vb_bwd_kernel",
            "_q_posterior_kernel", "_predict_kernel", "_normal_kl_kernel", "_dgll_kernel",
            "_prior_kernel", "_finish_mean_kernel",
            "_abs_xstart_kernel", "_sampler_kernel"}
    for dynamic, found in result.items():
        assert found["ops"] == [], f"dynamic={dynamic}: opaque ops left in the graph: {found['ops']}"
        missing = sorted(want - set(found["kernels"]))
        assert not missing, f"dynamic={dynamic}: kernels not in the graph: {missing}"
