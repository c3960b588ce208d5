"""Data-parallel training with the fused loss: DistributedDataParallel on 2 CPU processes (gloo,
127.0.0.1 only) against one process over the same data; and the loss-aware timestep sampler's
distributed update (ragged per-rank batches) against a single-process update.

Each rank takes half of every batch and averages its loss; DDP averages the gradients over ranks,
which is the full-batch mean gradient. Float32 sums in a different order: tolerance 1e-6 relative.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm_fast.demo_model import DigitsUNet
from ddpm_fast.diffusion import create_gaussian_diffusion
from ddpm_fast.resample import LossSecondMomentResampler

WORLD = 2
BATCH = 8
STEPS = 3


def _setup():
    torch.manual_seed(0)
    diffusion = create_gaussian_diffusion(steps=50, learn_sigma=True, noise_schedule="cosine",
                                          rescale_learned_sigmas=True)
    model = DigitsUNet(1, 2, channels=8)
    for p in model.parameters():  # non-zero everywhere, so every parameter gets a gradient
        torch.nn.init.normal_(p, std=0.1)
    return diffusion, model


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x0 = torch.rand(BATCH, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 50, (BATCH,), generator=g)
    noise = torch.randn(BATCH, 1, 8, 8, generator=g)
    return x0, t, noise


def _train(model, diffusion, rank, world):
    """STEPS of SGD on this rank's share of each batch; returns (grads per step, final params)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    share = BATCH // world
    for step in range(STEPS):
        x0, t, noise = _batch(step)
        sl = slice(rank * share, (rank + 1) * share)
        loss = diffusion.training_losses(model, x0[sl], t[sl], noise=noise[sl])["loss"].mean()
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        diffusion, model = _setup()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        grads, params = _train(ddp, diffusion, rank, WORLD)
        # The sampler's distributed update, with a different batch size on each rank.
        sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
        n = 3 if rank == 0 else 5
        ts = torch.arange(n) * 7 % diffusion.num_timesteps + rank
        losses = torch.arange(n, dtype=torch.float32) + 10 * rank
        sampler.update_with_local_losses(ts, losses)
        torch.save({"grads": grads, "params": params, "history": sampler._loss_history,
                    "counts": sampler._loss_counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo unavailable")
def test_ddp_matches_single_process(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    try:
        for _ in range(240):  # at most 120 s
            if ctx.join(timeout=0.5):
                break
        else:
            pytest.fail("DDP workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    diffusion, model = _setup()
    grads, params = _train(model, diffusion, 0, 1)
    for r, res in enumerate(results):
        for step in range(STEPS):
            for g_ddp, g_ref in zip(res["grads"][step], grads[step]):
                torch.testing.assert_close(g_ddp, g_ref, rtol=1e-5, atol=1e-6, msg=f"rank {r} step {step}")
        for p_ddp, p_ref in zip(res["params"], params):
            torch.testing.assert_close(p_ddp, p_ref, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads[0])

    sampler = LossSecondMomentResampler(diffusion, history_per_term=2)
    all_ts = torch.cat([torch.arange(3) * 7 % 50, torch.arange(5) * 7 % 50 + 1])
    all_losses = torch.cat([torch.arange(3.0), torch.arange(5.0) + 10])
    sampler.update_with_all_losses(all_ts.numpy(), all_losses.numpy())
    for res in results:
        assert (res["counts"] == sampler._loss_counts).all()
        assert (res["history"] == sampler._loss_history).all()
    assert sampler._loss_counts.sum() == 8
