"""CPU timing of the compiled kernels (ddpm_fast.native) against the eager and torch.compile'd reference.

fp32, batch 64 of 3x64x64; every case runs interleaved with the others (median of `reps` rounds after
warm-up); GB/s counts the bytes an op must read and write, against x.copy_ of a 12.6 MB float32 tensor (the size of the inputs).
    python benchmarks/bench_cpu.py [reps] 
"""
import statistics, time, sys
import torch, ddpm_fast as F
from ddpm_fast import native, reference as R
torch.manual_seed(0)
s = F.NoiseSchedule.named("linear", 1000)
B = 64
x0 = torch.rand(B, 3, 64, 64) * 2 - 1
n = torch.randn_like(x0)
t = torch.randint(0, 1000, (B,))
mo = torch.randn(B, 6, 64, 64)
def hybrid(fn):
    def run():
        m = mo.detach().requires_grad_()
        out = fn(m, x0, t, n, s, mean_type="epsilon", var_type="learned_range", loss_type="mse")
        out["loss"].mean().backward()
        return m.grad
    return run
native.availability("cpu")
compiled = torch.compile(R.training_losses)
fns = {"native": hybrid(native.training_losses), "eager": hybrid(R.training_losses), "compiled": hybrid(compiled)}
big = torch.randn(64 * 3 * 64 * 64 * 4); dst = torch.empty_like(big)
xs = torch.randn(B, 3, 64, 64)
fns["copy"] = lambda: dst.copy_(big)
fns["q_sample"] = lambda: native.q_sample(x0, t, n, s)
mo3 = torch.randn(B, 3, 64, 64)
fns["p_sample(noise)"] = lambda: native.p_sample_step(mo3, xs, t, s, mean_type="epsilon", var_type="fixed_small", noise=n)
fns["p_sample(philox)"] = lambda: native.p_sample_step(mo3, xs, t, s, mean_type="epsilon", var_type="fixed_small", seed=1)
fns["ddim(eta=0)"] = lambda: native.ddim_step(mo3, xs, t, s)
fns["p_sample_lr(noise)"] = lambda: native.p_sample_step(mo, xs, t, s, mean_type="epsilon", var_type="learned_range", noise=n)
for f in fns.values():
    for _ in range(3): f()
times = {k: [] for k in fns}
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 25):
    for k, f in fns.items():
        t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
N = B * 3 * 64 * 64
copy_gbs = 2 * big.numel() * 4 / med["copy"] / 1e6
print(f"copy bandwidth: {copy_gbs:.1f} GB/s (copy_ of {big.numel()*4/1e6:.0f} MB, read+write)")
bytes_ = {"q_sample": 3 * N * 4, "p_sample(noise)": 5 * N * 4, "p_sample(philox)": 4 * N * 4, "ddim(eta=0)": 4 * N * 4,
          "p_sample_lr(noise)": 6 * N * 4}
for k, v in med.items():
    extra = ""
    if k in bytes_:
        gbs = bytes_[k] / v / 1e6
        extra = f"  {gbs:.1f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy"
    print(f"{k:20s} {v:8.3f} ms{extra}")
if "native" in med and "eager" in med:
    print(f"hybrid fwd+bwd: {med['eager']/med['native']:.1f}x vs eager, {med['compiled']/med['native']:.1f}x vs torch.compile")
