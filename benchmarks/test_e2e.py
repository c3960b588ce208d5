"""pytest-benchmark cases of the end-to-end benchmark (ddpm_fast.bench.e2e): one training step of
improved-diffusion's recipe with each network, eager vs fused, and one sampling step with diffusers'
schedulers vs the Fast ones; and the whole `ddpm-fast bench --e2e` run once, its shares attached
as extra_info. Measurements, not assertions.

    pytest benchmarks/test_e2e.py --benchmark-only [--bench-device cuda] [--benchmark-json out.json]
"""
import importlib.util

import pytest
import torch

from ddpm_fast.bench import e2e
from ddpm_fast.bench.measure import sync

pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                reason="the e2e benchmark needs diffusers")
MODELS = {m.name: m for m in e2e.MODELS}


@pytest.fixture(params=list(MODELS))
def spec(request):
    """Each network of the e2e benchmark in turn (its e2e.MODELS entry), torch's seed reset for its weights."""
    torch.manual_seed(0)
    return MODELS[request.param]


@pytest.mark.parametrize("way", e2e.WAYS_TRAIN)
@pytest.mark.parametrize("sampler", ["uniform", "loss-second-moment"])
def test_train_step(benchmark, spec, sampler, way, device):
    trainer = e2e._Trainer(way, spec.build(), sampler, device, e2e.Clock(device), seed=1)
    x0 = e2e.synthetic_images(spec.train_batch, spec.image, seed=2).to(device)
    noise = torch.randn_like(x0)

    def step():
        trainer.step(x0, noise)
        trainer.losses.clear(), trainer.ts.clear(), trainer.segments.clear()  # keep nothing between rounds
        sync(device)

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("way", e2e.WAYS_SAMPLE)
@pytest.mark.parametrize("loop", ["ddpm", "ddim"])
def test_sample_step(benchmark, spec, loop, way, device):
    net = spec.build().to(device).eval()
    sched = e2e._schedulers(loop, way)
    ts = sched.timesteps[1]  # a step with t > 0 (the DDPM step adds noise)
    x = torch.randn((spec.sample_batch, *spec.image), device=device)
    t_batch = ts.to(device).expand(spec.sample_batch)
    gen = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def step():
        out = net(x, t_batch)
        if loop == "ddpm":
            y = sched.step(out, ts, x, generator=gen).prev_sample
        else:
            y = sched.step(out[:, :spec.image[0]], ts, x, eta=0.0, use_clipped_model_output=True).prev_sample
        sync(device)
        return y

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)


def test_e2e_run(benchmark, device, tmp_path):
    """The whole default e2e run once (about 1-3 minutes on a CPU); the shares go to extra_info."""
    results = benchmark.pedantic(e2e.run_e2e, args=(device, False, tmp_path), rounds=1, iterations=1)
    info = benchmark.extra_info
    for r in results["train"]:
        key = f"train {r['model']} {r['sampler']} {r['way']}"
        info[key] = {k: r[k] for k in ("total_ms", "net_ms", "outside_ms", "math_ms", "outside_share", "math_share",
                                       "speedup_total", "loss_saved_bytes")}
    for r in results["sample"]:
        info[f"sample {r['model']} {r['loop']} {r['way']}"] = {
            k: r[k] for k in ("total_ms", "net_ms", "outside_ms", "outside_share", "speedup_total", "steps_run")}
    for r in results["sweep"]:
        info[f"sweep {r['kind']} {r['size']} {r['way']}"] = {
            k: r[k] for k in ("total_ms", "outside_share", "math_share", "speedup_total")}
    info["loss_curves_agree"] = all(a["agree"] for a in results["agreement"])
