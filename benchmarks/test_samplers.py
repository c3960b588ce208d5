"""pytest-benchmark: one step of each drop-in solver scheduler and of its diffusers parent (the rows of
`ddpm-fast bench --samplers`, see ddpm_fast/bench/samplers.py) at Stable Diffusion latent sizes, float32,
without and with classifier-free guidance. Each benchmarked call is a whole 25-step loop (set_timesteps
included); divide by 25 for the time per step. Measurements, not assertions; compare a sampler's "ours"
row with its "parent" row of the same run.

    pytest benchmarks/test_samplers.py --benchmark-only [--benchmark-json samplers.json]
"""
import pytest
import torch

pytest.importorskip("diffusers", reason="the samplers benchmark compares with diffusers")

from ddpm_fast.bench import samplers  # noqa: E402

STEPS = 25
SAMPLERS = samplers.samplers()


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("shape", samplers.SD_SIZES, ids=["x".join(map(str, s)) for s in samplers.SD_SIZES])
@pytest.mark.parametrize("side", ["parent", "ours"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s[0].replace(" ", "_") for s in SAMPLERS])
def test_sampler_loop(benchmark, sampler, side, shape, cfg, device):
    name, parent_cls, fast_cls, config = sampler
    guidance = samplers.GUIDANCE_SCALE if cfg else None
    x, model_output = samplers._inputs(shape, guidance, device, seed=0)
    runner = samplers.Side(fast_cls if side == "ours" else parent_cls, config, side == "ours", guidance, seed=0)
    benchmark.extra_info.update(sampler=name, side=side, size="x".join(map(str, shape)), cfg=cfg, steps=STEPS,
                                threads=torch.get_num_threads())

    def loop():
        runner.loop(x, model_output, STEPS)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark(loop)
