"""`ddpm-fast bench --e2e`: what an existing training loop and sampler gain end to end.

Two networks: diffusers' UNet2DModel in a small configuration (3x32x32, 32/64 channels, attention at
16x16, 6 output channels: eps and a learned-range variance) and the demo's own U-Net
(ddpm_fast.demo_model, 1x8x8, width 32, 2 output channels).

Training: improved-diffusion's recipe (hybrid loss: MSE on eps + the vb term of a learned-range
variance, cosine schedule, T = 1000, AdamW at lr 1e-4, EMA of the weights at 0.9999), with the
uniform and the loss-aware (loss-second-moment) timestep sampler, run two ways from the same
initial weights, data, noise and sampler seed: "eager" (GaussianDiffusion with backend="reference":
improved-diffusion's algebra in plain PyTorch) and "fused" (backend="auto": the compiled kernels).
The two ways run in lockstep, one step of each in turn (alternating which goes first), so that a
busy machine slows both alike. The loss-aware sampler's history is pre-filled (improved-diffusion's
sampler is uniform until every t has 10 losses, which a short run never reaches): its
importance-sampled draw and its update are what is timed. Data: fixed synthetic 8-bit images
(smooth random fields), not a dataset. Default sizes (chosen to run in under 3 minutes on a 2-core
CPU): 10 training steps (2 warm-up) at batch 8 (diffusers U-Net) and 64 (demo U-Net); sampling at
batch 4 and 8, the diffusers U-Net's DDPM loop cut to its first 100 of 1000 steps (--full: all).

Per training step (medians over the timed steps; the first steps are warm-up): total time, the
network's forward and backward (backward: from the moment the gradient of the network's output
arrives, an autograd hook, to the end of loss.backward()), time outside the network, and in it the
diffusion math (q_sample + the loss forward + the loss backward up to the network's output), the
timestep sampler, and the optimiser (zero_grad, AdamW, EMA). Memory: the bytes of the tensors the
loss's autograd graph saves (distinct storages, torch.autograd.graph.saved_tensors_hooks; the
network's own are counted apart); on CUDA also the peak allocated during the step (both on the last
warm-up step). The loss curves of the two ways are compared step by step.

Sampling: a 1000-step DDPM loop (learned-range variance) and a 50-step DDIM loop (eta = 0), with
diffusers' DDPMScheduler / DDIMScheduler and with ddpm_fast's FastDDPMScheduler / FastDDIMScheduler,
same config, same start noise and generator, in lockstep; per step: total, network, outside.
Loops may be cut short (see --full / --quick): every row says how many of the steps ran.

Sweep: the demo U-Net (3 channels) at 8x8 and 32x32, batch 1, 8 and 64: the share of a training
step and of a DDPM sampling step outside the network, each way; plotted as a PNG.

Timings are wall clock (perf_counter) on the CPU and CUDA events on a GPU. Speedups are given as
measured and with the network's time pooled over both ways (the same network does the same work
either way; on a busy machine its timing noise is larger than what the ways change).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass

import torch

from .runner import _device_name, _loadavg, _versions  # the op bench's run metadata, shared

T = 1000
DDIM_STEPS = 50
SCHEMA = "ddpm_fast.bench.e2e/1"
WAYS_TRAIN = ("eager", "fused")
WAYS_SAMPLE = ("diffusers", "fast")
# Loss curves: the two ways are compared over this many first steps (see _agreement).
AGREE_STEPS = 5
# Relative tolerance on the per-step loss of the two ways over the first AGREE_STEPS steps: what
# float32 rounding allows. The loss is a mean over up to n = 64 * 3 * 32 * 32 ~ 2e5 elements, summed
# in another order by each way: a rounding error of order sqrt(n) * eps32 ~ 5e-5 relative (n * eps32
# in the worst case). Later steps add the rounding of the gradients carried through AdamW. A change
# in the math is far larger: the vb term alone is 0.8-2% of the loss of either network at step 0.
AGREE_RTOL = 1e-4


# -- networks ---------------------------------------------------------------------------------
class DiffusersNet(torch.nn.Module):
    """diffusers' UNet2DModel called as improved-diffusion calls a model: net(x, t) -> tensor."""

    def __init__(self, image_size: int = 32, channels: int = 3, widths=(32, 64)):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=2 * channels,
                                block_out_channels=tuple(widths), layers_per_block=1,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                attention_head_dim=widths[-1])

    def forward(self, x, t):
        return self.unet(x, t).sample


def _demo_net(channels: int):
    from ..demo_model import DigitsUNet

    return DigitsUNet(channels, 2 * channels, channels=32)


@dataclass(frozen=True)
class ModelSpec:
    """A network of the end-to-end run and its sizes: image (C, H, W), training and sampling batch,
    DDPM steps run by default (of T; the per-step cost does not depend on the step)."""

    name: str
    image: tuple
    train_batch: int
    sample_batch: int
    ddpm_steps: int

    def build(self) -> torch.nn.Module:
        if self.name == "diffusers-unet":
            return DiffusersNet(self.image[1], self.image[0])
        return _demo_net(self.image[0])


MODELS = (
    ModelSpec("diffusers-unet", (3, 32, 32), train_batch=8, sample_batch=4, ddpm_steps=100),
    ModelSpec("demo-unet", (1, 8, 8), train_batch=64, sample_batch=8, ddpm_steps=T),
)
SWEEP_SIZES = (8, 32)
SWEEP_BATCHES = (1, 8, 64)
SWEEP_CHANNELS = 3


@dataclass(frozen=True)
class Plan:
    """How many steps of everything to run."""

    train_steps: int  # training steps per (model, sampler, way), warm-up included
    warmup: int  # first steps not timed (lazy set-up, the memory-counting step)
    ddpm_steps: dict  # model name -> DDPM steps to run
    ddim_steps: int
    sample_warmup: int  # DDPM / DDIM steps run (and discarded) before the timed loop
    sweep_train_steps: dict  # image size -> timed training steps per sweep point (after one warm-up)
    sweep_sample_steps: dict  # image size -> timed DDPM steps per sweep point (after one warm-up)

    @staticmethod
    def make(quick: bool, full: bool) -> "Plan":
        if quick:
            return Plan(train_steps=2, warmup=1, ddpm_steps={m.name: 2 for m in MODELS}, ddim_steps=2,
                        sample_warmup=1, sweep_train_steps={n: 1 for n in SWEEP_SIZES},
                        sweep_sample_steps={n: 1 for n in SWEEP_SIZES})
        ddpm = {m.name: (T if full else m.ddpm_steps) for m in MODELS}
        return Plan(train_steps=10, warmup=2, ddpm_steps=ddpm, ddim_steps=DDIM_STEPS, sample_warmup=2,
                    sweep_train_steps={8: 8, 32: 3}, sweep_sample_steps={8: 20, 32: 10})


# -- clocks and timed network ------------------------------------------------------------------
class Clock:
    """mark() -> a time stamp; ms(a, b) -> milliseconds between two stamps. CPU: perf_counter;
    CUDA: events (read after resolve(), which synchronises once)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def resolve(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


class TimedNet:
    """Calls the network and stamps the start and end of each forward, and (training) the moment
    the gradient of its output arrives in backward, where the network's backward begins."""

    def __init__(self, net, clock: Clock):
        self.net, self.clock = net, clock
        self.in_net = False
        self.reset()

    def reset(self):
        self.forwards, self.grad_arrived = [], []

    def __call__(self, x, t, **kwargs):
        self.in_net = True
        start = self.clock.mark()
        out = self.net(x, t, **kwargs)
        end = self.clock.mark()
        self.in_net = False
        self.forwards.append((start, end))
        if out.requires_grad:
            out.register_hook(self._grad_hook)
        return out

    def _grad_hook(self, grad):
        self.grad_arrived.append(self.clock.mark())


class SavedBytes:
    """saved_tensors_hooks that add up the distinct storages saved for backward, split into those
    saved while the network runs and the rest (the loss's graph)."""

    def __init__(self, timed: TimedNet):
        self.timed = timed
        self.loss, self.net = {}, {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        (self.net if self.timed.in_net else self.loss)[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    @property
    def loss_bytes(self) -> int:
        return sum(v for k, v in self.loss.items() if k not in self.net)

    @property
    def net_bytes(self) -> int:
        return sum(self.net.values())


# -- training ----------------------------------------------------------------------------------
def synthetic_images(n: int, image: tuple, seed: int) -> torch.Tensor:
    """n fixed 8-bit images [n, C, H, W] in [-1, 1]: smooth random fields (bilinear upsampling of
    a quarter-size normal field, tanh), quantised to 256 levels as improved-diffusion's data."""
    c, h, w = image
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, max(1, h // 4), max(1, w // 4), generator=gen)
    x = torch.tanh(1.5 * torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False))
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def _fused_backend(device: torch.device) -> str:
    """The backend backend="auto" runs for this device's tensors."""
    from .. import backends

    found = backends.availability()
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return next((name for name in order if found[name][0]), "reference")


class _Trainer:
    """One way of training: a diffusion with its backend, a copy of the network, AdamW, EMA and a
    timestep sampler with its own seeded generator."""

    def __init__(self, way, net, sampler_name, device, clock, seed, lr=1e-4, ema_rate=0.9999):
        from ..diffusion import create_gaussian_diffusion
        from ..resample import create_named_schedule_sampler

        self.way = way
        # improved-diffusion's defaults (script_util): rescaled learned sigmas and timesteps
        self.diffusion = create_gaussian_diffusion(steps=T, learn_sigma=True, noise_schedule="cosine",
                                                   rescale_learned_sigmas=True, rescale_timesteps=True,
                                                   backend="reference" if way == "eager" else "auto")
        self.net = copy.deepcopy(net).to(device).train()
        self.ema = [p.detach().clone() for p in self.net.parameters()]
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0)
        self.ema_rate = ema_rate
        self.sampler = create_named_schedule_sampler(sampler_name, self.diffusion)
        self.loss_aware = sampler_name != "uniform"
        if self.loss_aware:
            _prefill(self.sampler)
        self.gen = torch.Generator(device).manual_seed(seed)
        self.device, self.clock = device, clock
        self.timed = TimedNet(self.net, clock)
        self.losses, self.ts, self.segments = [], [], []
        self.saved, self.peak_bytes = None, None

    def step(self, x0, noise, count_memory=False):
        """One training step, in improved-diffusion's order (losses, the loss-aware sampler's update,
        backward, optimiser, EMA); appends its loss, timesteps and time stamps. count_memory: also
        count the saved tensors (and on CUDA the step's peak allocation)."""
        clock, timed = self.clock, self.timed
        timed.reset()
        if count_memory and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        m0 = clock.mark()
        t, weights = self.sampler.sample(x0.shape[0], self.device, generator=self.gen)
        m1 = clock.mark()
        if count_memory:
            self.saved = SavedBytes(timed)
            with self.saved.hooks():
                terms = self.diffusion.training_losses(timed, x0, t, noise=noise)
                loss = (terms["loss"] * weights).mean()
        else:
            terms = self.diffusion.training_losses(timed, x0, t, noise=noise)
            loss = (terms["loss"] * weights).mean()
        m2 = clock.mark()
        if self.loss_aware:
            self.sampler.update_with_local_losses(t, terms["loss"].detach())
        m3 = clock.mark()
        self.opt.zero_grad(set_to_none=True)
        m4 = clock.mark()
        loss.backward()
        m5 = clock.mark()
        self.opt.step()
        with torch.no_grad():
            for avg, p in zip(self.ema, self.net.parameters()):
                avg.lerp_(p.detach(), 1.0 - self.ema_rate)
        m6 = clock.mark()
        if count_memory and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - base
        self.losses.append(loss.detach())
        self.ts.append(t)
        self.segments.append(((m0, m1, m2, m3, m4, m5, m6), list(timed.forwards), list(timed.grad_arrived)))

    def times(self, skip: int) -> list:
        """Per timed step: dict of ms segments (resolves the stamps)."""
        self.clock.resolve()
        ms = self.clock.ms
        out = []
        for (m0, m1, m2, m3, m4, m5, m6), forwards, grads in self.segments[skip:]:
            net_fwd = sum(ms(a, b) for a, b in forwards)
            grad_at = grads[0] if grads else m5
            loss_bwd, net_bwd = ms(m4, grad_at), ms(grad_at, m5)
            total = ms(m0, m6)
            math_ms = ms(m1, m2) - net_fwd + loss_bwd
            out.append({"total_ms": total, "net_fwd_ms": net_fwd, "net_bwd_ms": net_bwd, "net_ms": net_fwd + net_bwd,
                        "outside_ms": total - net_fwd - net_bwd, "math_ms": math_ms,
                        "sampler_ms": ms(m0, m1) + ms(m2, m3), "optim_ms": ms(m3, m4) + ms(m5, m6)})
        return out


def _prefill(sampler):
    """Fill a loss-aware sampler's history (a loss falling with t, some spread) so that it samples by
    importance from the first step, as after improved-diffusion's warm-up."""
    import numpy as np

    T_ = sampler.diffusion.num_timesteps
    rng = np.random.RandomState(0)
    ts = np.repeat(np.arange(T_), sampler.history_per_term)
    losses = 0.05 + 1.0 / (1.0 + ts / 20.0) + 0.01 * rng.rand(ts.size)
    sampler.update_with_all_losses(ts, losses)


def _median_row(per_step: list) -> dict:
    keys = per_step[0].keys()
    row = {k: statistics.median(s[k] for s in per_step) for k in keys}
    shares = [(s["outside_ms"] / s["total_ms"], s["math_ms"] / s["total_ms"]) for s in per_step if s["total_ms"] > 0]
    row["outside_share"] = statistics.median(a for a, _ in shares)
    row["math_share"] = statistics.median(b for _, b in shares)
    row["other_ms"] = row["outside_ms"] - row["math_ms"] - row["sampler_ms"] - row["optim_ms"]
    return row


def train_two_ways(spec_name, net, image, batch, sampler_name, device, plan_steps, warmup, seed, progress=None):
    """Train ``net`` two ways in lockstep: (rows per way, agreement dict, the fused way's trained network)."""
    size = "x".join(map(str, (batch, *image)))
    if progress:
        progress(f"train {spec_name} {size}, {sampler_name} sampler: {plan_steps} steps each way")
    clock = Clock(device)
    trainers = {w: _Trainer(w, net, sampler_name, device, clock, seed + 17) for w in WAYS_TRAIN}
    data = synthetic_images(max(256, batch), image, seed).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(plan_steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        x0 = data[idx.to(device)]
        noise = torch.randn((batch, *image), generator=gen).to(device)
        order = WAYS_TRAIN if i % 2 == 0 else WAYS_TRAIN[::-1]
        for w in order:  # memory: counted on the last warm-up step (not the first: lazy set-up)
            trainers[w].step(x0, noise, count_memory=(i == max(0, warmup - 1)))
    rows, nets = [], []
    for w, tr in trainers.items():
        per_step = tr.times(warmup)
        nets += [p["net_ms"] for p in per_step]
        row = {"model": spec_name, "sampler": sampler_name, "way": w,
               "backend": "reference" if w == "eager" else _fused_backend(device), "size": size, "steps": plan_steps,
               "timed_steps": len(per_step), **_median_row(per_step),
               "loss_saved_bytes": tr.saved.loss_bytes, "net_saved_bytes": tr.saved.net_bytes,
               "peak_step_bytes": tr.peak_bytes, "losses": [float(v) for v in torch.stack(tr.losses).cpu()]}
        rows.append(row)
    agree = _agreement(spec_name, sampler_name, rows[0]["losses"], rows[1]["losses"],
                       trainers["eager"].ts, trainers["fused"].ts)
    _speedups(rows, statistics.median(nets))
    return rows, agree, trainers["fused"].net


def _speedups(rows, pooled_net_ms):
    """Speedups of each row against the first (the eager / diffusers way): of the step as measured
    (speedup_total); of the step with the network's time taken as the median over both ways' steps
    (speedup_same_net: the network does the same work either way, so this keeps only what the ways
    do differently, without the network's timing noise, which on a busy machine swamps it); of the
    time outside the network and of the diffusion math."""
    ref = rows[0]
    for r in rows:
        r["pooled_net_ms"] = pooled_net_ms
        r["speedup_total"] = ref["total_ms"] / r["total_ms"]
        r["speedup_same_net"] = (pooled_net_ms + ref["outside_ms"]) / (pooled_net_ms + r["outside_ms"])
        r["speedup_outside"] = ref["outside_ms"] / r["outside_ms"] if r["outside_ms"] > 0 else None
        r["speedup_math"] = ref["math_ms"] / r["math_ms"] if r["math_ms"] > 0 else None


def _agreement(model, sampler, eager_losses, fused_losses, eager_ts, fused_ts) -> dict:
    """The two loss curves, step by step: relative difference over the first AGREE_STEPS steps."""
    n = min(AGREE_STEPS, len(eager_losses))
    rel = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(eager_losses, fused_losses)]
    same_t = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(eager_ts, fused_ts))
    return {"model": model, "sampler": sampler, "steps_compared": n, "step0_rel_diff": rel[0],
            "max_rel_diff_first": max(rel[:n]), "max_rel_diff_all": max(rel), "same_timesteps": same_t,
            "rtol": AGREE_RTOL, "agree": bool(same_t and max(rel[:n]) <= AGREE_RTOL)}


# -- sampling ----------------------------------------------------------------------------------
def _schedulers(loop: str, way: str):
    """A diffusers scheduler (way "diffusers") or its ddpm_fast drop-in ("fast") for ``loop``."""
    common = {"num_train_timesteps": T, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
              "prediction_type": "epsilon"}
    if way == "diffusers":
        from diffusers import DDIMScheduler as DDIM, DDPMScheduler as DDPM
    else:
        from ..compat.diffusers import FastDDIMScheduler as DDIM, FastDDPMScheduler as DDPM
    if loop == "ddpm":
        s = DDPM(variance_type="learned_range", **common)
        s.set_timesteps(T)
    else:
        s = DDIM(set_alpha_to_one=True, **common)
        s.set_timesteps(DDIM_STEPS)
    return s


def sample_two_ways(spec_name, net, image, batch, loop, run_steps, warmup, device, seed, progress=None):
    """Run ``loop`` ("ddpm" / "ddim") both ways in lockstep for its first ``run_steps`` steps after
    ``warmup`` discarded ones (the loop is restarted). (rows per way, max |difference| of the samples)."""
    net = net.to(device).eval()
    clock = Clock(device)
    channels = image[0]
    full = T if loop == "ddpm" else DDIM_STEPS

    def start():
        scheds = {w: _schedulers(loop, w) for w in WAYS_SAMPLE}
        x = torch.randn((batch, *image), generator=torch.Generator().manual_seed(seed)).to(device)
        gens = {w: torch.Generator(device).manual_seed(seed + 1) for w in WAYS_SAMPLE}
        return scheds, {w: x.clone() for w in WAYS_SAMPLE}, gens

    def one(sched, x, ts, gen, timed):
        t_batch = ts.to(device).expand(batch)
        m0 = clock.mark()
        out = timed(x, t_batch)
        m1 = clock.mark()
        if loop == "ddpm":
            x = sched.step(out, ts, x, generator=gen).prev_sample
        else:
            x = sched.step(out[:, :channels], ts, x, eta=0.0, use_clipped_model_output=True).prev_sample
        m2 = clock.mark()
        return x, (m0, m1, m2)

    if progress:
        progress(f"sample {spec_name} {'x'.join(map(str, (batch, *image)))}, {loop}: {run_steps} of {full} steps "
                 f"each way")
    stamps = {w: [] for w in WAYS_SAMPLE}
    with torch.no_grad():
        for phase, n in (("warmup", warmup), ("timed", run_steps)):
            scheds, xs, gens = start()
            timed = TimedNet(net, clock)
            for i, ts in enumerate(scheds["diffusers"].timesteps[:n]):
                order = WAYS_SAMPLE if i % 2 == 0 else WAYS_SAMPLE[::-1]
                for w in order:
                    xs[w], st = one(scheds[w], xs[w], ts, gens[w], timed)
                    if phase == "timed":
                        stamps[w].append(st)
    clock.resolve()
    rows, nets = [], []
    for w in WAYS_SAMPLE:
        per = [{"total_ms": clock.ms(a, c), "net_ms": clock.ms(a, b), "step_ms": clock.ms(b, c)}
               for a, b, c in stamps[w]]
        nets += [p["net_ms"] for p in per]
        med = {k: statistics.median(p[k] for p in per) for k in per[0]}
        loop_ms = sum(p["total_ms"] for p in per)
        loop_net = sum(p["net_ms"] for p in per)
        rows.append({"model": spec_name, "loop": loop, "way": w, "size": "x".join(map(str, (batch, *image))),
                     "steps_run": run_steps, "steps_full": full, "total_ms": med["total_ms"], "net_ms": med["net_ms"],
                     "outside_ms": statistics.median(p["total_ms"] - p["net_ms"] for p in per),
                     "math_ms": med["step_ms"],
                     "outside_share": statistics.median((p["total_ms"] - p["net_ms"]) / p["total_ms"] for p in per),
                     "math_share": statistics.median(p["step_ms"] / p["total_ms"] for p in per),
                     "loop_ms": loop_ms, "loop_outside_ms": loop_ms - loop_net,
                     "note": "" if run_steps == full else f"first {run_steps} of {full} steps"})
    _speedups(rows, statistics.median(nets))
    diff = float((xs["diffusers"].float() - xs["fast"].float()).abs().max())
    for r in rows:
        r["max_abs_diff"] = diff
    return rows


# -- the whole run -----------------------------------------------------------------------------
def run_e2e(device, quick: bool, out_dir, *, full: bool = False, seed: int = 0, progress=None) -> dict:
    """Run the end-to-end benchmark on ``device`` and write e2e.json, e2e.csv, e2e.txt and
    e2e_<device>.png to ``out_dir``. quick: a smoke run of a few steps of everything; full: every
    sampling loop to its last step. Returns the results dict (also the JSON)."""
    device = torch.device(device)
    started = time.perf_counter()
    plan = Plan.make(quick, full)
    say = progress or (lambda text: None)
    fused = _fused_backend(device)
    meta = {"schema": SCHEMA, "device": str(device), "device_name": _device_name(device),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick, "full": full, "seed": seed, "fused_backend": fused, "diffusion_steps": T,
            "ddim_steps": DDIM_STEPS, "plan": vars(plan), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": _loadavg(),
            "agree_steps": AGREE_STEPS, "agree_rtol": AGREE_RTOL}
    meta.update(_versions())
    train, agreement, sample, sweep = [], [], [], []
    for i, spec in enumerate(MODELS):
        torch.manual_seed(seed + 100 * i)
        net = spec.build()
        meta.setdefault("params", {})[spec.name] = sum(p.numel() for p in net.parameters())
        for sampler in ("uniform", "loss-second-moment"):
            rows, agree, trained = train_two_ways(spec.name, net, spec.image, spec.train_batch, sampler, device,
                                                  plan.train_steps, plan.warmup, seed + 1000 * i, say)
            train += rows
            agreement.append(agree)
        for loop, steps in (("ddpm", plan.ddpm_steps[spec.name]), ("ddim", plan.ddim_steps)):
            sample += sample_two_ways(spec.name, trained, spec.image, spec.sample_batch, loop, steps,
                                      plan.sample_warmup, device, seed + 7, say)
    for size in SWEEP_SIZES:
        image = (SWEEP_CHANNELS, size, size)
        torch.manual_seed(seed + 5)
        net = _demo_net(SWEEP_CHANNELS)
        for batch in SWEEP_BATCHES:
            rows, _, trained = train_two_ways("demo-unet", net, image, batch, "uniform", device,
                                              plan.sweep_train_steps[size] + 1, 1, seed + 3, say)
            sweep += [_sweep_row("train", r) for r in rows]
            rows = sample_two_ways("demo-unet", trained, image, batch, "ddpm", plan.sweep_sample_steps[size], 1,
                                   device, seed + 9, say)
            sweep += [_sweep_row("ddpm", r) for r in rows]
    meta["elapsed_s"] = time.perf_counter() - started
    meta["loadavg_end"] = _loadavg()
    results = {"meta": meta, "train": train, "agreement": agreement, "sample": sample, "sweep": sweep}
    results["paths"] = write_all(results, out_dir)
    return results


def _sweep_row(kind, r) -> dict:
    keys = ("way", "size", "total_ms", "net_ms", "outside_ms", "math_ms", "outside_share", "math_share",
            "pooled_net_ms", "speedup_total", "speedup_same_net", "speedup_outside", "speedup_math")
    return {"kind": kind, **{k: r[k] for k in keys}}


# -- output ------------------------------------------------------------------------------------
CSV_COLUMNS = (
    "section", "model", "sampler", "loop", "kind", "way", "backend", "size", "steps", "timed_steps", "steps_run",
    "steps_full", "total_ms", "net_fwd_ms", "net_bwd_ms", "net_ms", "outside_ms", "math_ms", "sampler_ms",
    "optim_ms", "other_ms", "outside_share", "math_share", "pooled_net_ms", "speedup_total", "speedup_same_net",
    "speedup_outside", "speedup_math",
    "loss_saved_bytes", "net_saved_bytes", "peak_step_bytes", "max_abs_diff", "steps_compared", "step0_rel_diff",
    "max_rel_diff_first", "max_rel_diff_all", "same_timesteps", "rtol", "agree", "note", "device", "device_name",
    "torch_version", "ddpm_fast_version", "timestamp",
)
SAMPLER_LABEL = {"uniform": "uniform", "loss-second-moment": "loss-aware"}


def _f(x, fmt, none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ms(v) -> str:
    """Milliseconds in at most 5 characters below 10 s: 3 significant digits or more."""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _section(caption: str, head: str, *notes: str) -> list:
    """The lines above a table's rows: a blank line, the caption wrapped to 100 characters, the notes (a line
    each), the column header and its rule."""
    return ["", *textwrap.wrap(caption, 100), *notes, head, "-" * len(head)]


def table(results: dict) -> str:
    """The console table (lines of at most 100 characters)."""
    meta = results["meta"]
    head = (f"ddpm-fast bench --e2e: {meta['device_name']} ({meta['device']}); torch {meta['torch_version']}, "
            f"diffusers {meta['diffusers_version']}, fused backend: "
            f"{meta['fused_backend']}; {meta.get('elapsed_s', 0):.0f} s in all, {meta['timestamp']}")
    lines = textwrap.wrap(head, 100)
    loads = [x for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x is not None]
    if loads and meta["device"].startswith("cpu") and max(loads) > (meta.get("cpu_count") or 1):
        lines += textwrap.wrap(f"WARNING: load average {max(loads):.1f} on {meta['cpu_count']} cores: other "
                               f"processes shared the CPU; times are inflated and noisy", 100)
    if meta["quick"]:
        lines.append("QUICK MODE: a smoke run of a few steps of everything; not a measurement")
    if meta["fused_backend"] == "reference":
        lines.append("WARNING: no fused backend available here: the 'fused' way ran the reference")
    lines += textwrap.wrap(
        "ms per step, medians. net: the network (training: forward + backward); outside: the rest of the step; "
        "math: the diffusion math (training: q_sample + loss forward + loss backward; sampling: the scheduler's "
        "step). x tot: speedup of the step as measured; x =net: of the step with the network's time pooled "
        "over both ways (same network: its timing noise left out); x out, x math: of the time outside the "
        "network, of the math.", 100)
    plan = meta["plan"]
    lines += _section(
        f"Training: improved-diffusion's recipe (hybrid loss, cosine T={T}, AdamW + EMA), eager reference vs "
        f"fused ops, same seed; {plan['train_steps'] - plan['warmup']} steps timed after {plan['warmup']} warm-up",
        f"{'model':<15}{'sampler':<11}{'way':<6}{'total':>7}{'fwd':>6}{'bwd':>6}{'out':>6}{'math':>6}"
        f"{'out%':>5}{'math%':>6}{'x tot':>6}{'x =net':>7}{'x out':>6}{'x math':>7}",
        "fwd, bwd: the network's forward and backward; out: outside the network")
    for r in results["train"]:
        lines.append(f"{r['model']:<15}{SAMPLER_LABEL.get(r['sampler'], r['sampler']):<11}{r['way']:<6}"
                     f"{_ms(r['total_ms']):>7}{_ms(r['net_fwd_ms']):>6}{_ms(r['net_bwd_ms']):>6}"
                     f"{_ms(r['outside_ms']):>6}{_ms(r['math_ms']):>6}"
                     f"{100 * r['outside_share']:>5.1f}{100 * r['math_share']:>6.1f}{r['speedup_total']:>6.2f}"
                     f"{r['speedup_same_net']:>7.2f}{_f(r['speedup_outside'], '.2f'):>6}"
                     f"{_f(r['speedup_math'], '.2f'):>7}")
    lines += _section(
        f"Loss curves, eager vs fused: relative difference of the loss per step (agree: the same timesteps and "
        f"<= {AGREE_RTOL:g} over the first {AGREE_STEPS} steps); MB: tensors saved by the loss's autograd graph",
        f"{'model':<15}{'sampler':<11}{'step 0':>9}{'first':>9}{'all':>9}{'same t':>8}{'agree':>7}"
        f"{'MB eager':>10}{'MB fused':>10}")
    saved = {(r["model"], r["sampler"], r["way"]): r["loss_saved_bytes"] / 2**20 for r in results["train"]}
    for a in results["agreement"]:
        key = (a["model"], a["sampler"])
        lines.append(f"{a['model']:<15}{SAMPLER_LABEL.get(a['sampler'], a['sampler']):<11}{a['step0_rel_diff']:>9.1e}"
                     f"{a['max_rel_diff_first']:>9.1e}{a['max_rel_diff_all']:>9.1e}"
                     f"{'yes' if a['same_timesteps'] else 'NO':>8}{'yes' if a['agree'] else 'NO':>7}"
                     f"{saved[key + ('eager',)]:>10.2f}{saved[key + ('fused',)]:>10.2f}")
    sizes = ", ".join(dict.fromkeys(f"{r['model']} {r['size']}" for r in results["sample"]))
    lines += _section(
        f"Sampling: diffusers' schedulers vs ddpm_fast's Fast ones, same model, noise and generator ({sizes}). "
        f"steps: run / in the loop; diff: max |difference| of the two ways' samples at the end",
        f"{'model':<15}{'loop':<5}{'way':<10}{'steps':>10}{'total':>8}{'net':>8}{'outside':>8}"
        f"{'out%':>6}{'x tot':>6}{'x =net':>7}{'x out':>6}{'diff':>8}")
    for r in results["sample"]:
        lines.append(f"{r['model']:<15}{r['loop']:<5}{r['way']:<10}"
                     f"{str(r['steps_run']) + '/' + str(r['steps_full']):>10}{r['total_ms']:>8.2f}{r['net_ms']:>8.2f}"
                     f"{r['outside_ms']:>8.3f}{100 * r['outside_share']:>6.1f}{r['speedup_total']:>6.2f}"
                     f"{r['speedup_same_net']:>7.2f}{_f(r['speedup_outside'], '.2f'):>6}{r['max_abs_diff']:>8.1e}")
    lines += _section(
        f"Sweep: the demo U-Net ({SWEEP_CHANNELS} channels), a training step (uniform sampler) and a DDPM sampling "
        f"step: share of the step outside the network and in the diffusion math",
        f"{'step':<6}{'size':<12}{'way':<10}{'total':>9}{'net':>9}{'outside':>9}{'out%':>6}{'math%':>6}"
        f"{'x tot':>6}{'x =net':>7}{'x out':>6}")
    for r in results["sweep"]:
        lines.append(f"{r['kind']:<6}{r['size']:<12}{r['way']:<10}{r['total_ms']:>9.2f}{r['net_ms']:>9.2f}"
                     f"{r['outside_ms']:>9.3f}{100 * r['outside_share']:>6.1f}{100 * r['math_share']:>6.1f}"
                     f"{r['speedup_total']:>6.2f}{r['speedup_same_net']:>7.2f}{_f(r['speedup_outside'], '.2f'):>6}")
    return "\n".join(lines)


def csv_rows(results: dict) -> list:
    meta = results["meta"]
    common = {k: meta.get(k) for k in ("device", "device_name", "torch_version", "ddpm_fast_version", "timestamp")}
    out = []
    for section in ("train", "agreement", "sample", "sweep"):
        for r in results[section]:
            out.append({"section": section, **{k: v for k, v in r.items() if k != "losses"}, **common})
    return out


def plot(results: dict, path) -> bool:
    """The sweep as a PNG: per step kind and image size, each batch and way's step split into the
    network (its median over both ways' steps: the same network), the diffusion math and the rest
    outside the network, in ms, stacked, as % of their sum; the sum in ms above each bar. False
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep, meta = results["sweep"], results["meta"]
    kinds = [k for k in ("train", "ddpm") if any(r["kind"] == k for r in sweep)]
    sizes = list(dict.fromkeys(r["size"].split("x", 1)[1] for r in sweep))
    fig, axes = plt.subplots(len(kinds), len(sizes), figsize=(4.2 * len(sizes), 3.3 * len(kinds) + 0.5),
                             squeeze=False)
    colors = {"network (same for both ways)": "#9aa5b1", "diffusion math": "#d9534f",
              "other outside the network (AdamW, EMA, t sampler)": "#f0ad4e"}
    for i, kind in enumerate(kinds):
        for j, size in enumerate(sizes):
            ax = axes[i][j]
            rows = [r for r in sweep if r["kind"] == kind and r["size"].split("x", 1)[1] == size]
            labels = []
            for x, r in enumerate(rows):
                parts = (r["pooled_net_ms"], r["math_ms"], max(0.0, r["outside_ms"] - r["math_ms"]))
                total, bottom = sum(parts), 0.0
                for name, v in zip(colors, parts):
                    share = 100 * v / total if total > 0 else 0
                    ax.bar(x, share, bottom=bottom, color=colors[name], width=0.8,
                           label=name if (i, j, x) == (0, 0, 0) else None)
                    bottom += share
                ax.text(x, 101, f"{total:.0f}" if total >= 100 else f"{total:.3g}", ha="center", va="bottom",
                        fontsize=6.5)
                labels.append(f"B{r['size'].split('x')[0]}\n{r['way']}")
            ax.set_xticks(range(len(labels)), labels, fontsize=6.5)
            ax.set_ylim(0, 112)
            ax.set_ylabel("% of step time", fontsize=8)
            step = "training step" if kind == "train" else "DDPM sampling step"
            ax.set_title(f"{step}, {size} (ms per step above bars)", fontsize=8.5)
            ax.tick_params(axis="y", labelsize=7)
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    loads = [x for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x is not None]
    busy = (f", load avg up to {max(loads):.0f} (busy)" if loads and meta["device"].startswith("cpu")
            and max(loads) > (meta.get("cpu_count") or 1) else "")
    fig.suptitle(f"ddpm-fast bench --e2e: demo U-Net ({SWEEP_CHANNELS} channels), where a step's time goes\n"
                 f"{meta['device_name'][:80]}{busy}" + (" (QUICK: not a measurement)" if meta["quick"] else ""),
                 fontsize=8.5)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(results: dict, out_dir) -> dict:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(results["meta"]["device"]).type
    paths = {"json": out / "e2e.json", "csv": out / "e2e.csv", "table": out / "e2e.txt", "png": out / f"e2e_{dev}.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(csv_rows(results))
    paths["table"].write_text(table(results) + "\n")
    if not plot(results, paths["png"]):
        paths["png"] = None
    paths = {k: (str(v) if v is not None else None) for k, v in paths.items()}
    with open(paths["json"], "w") as f:
        json.dump({**results, "paths": paths}, f, indent=1)
    return paths


def _parser():
    p = argparse.ArgumentParser(prog="ddpm-fast bench --e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu or cuda[:N] (default: a GPU if there is one, else the CPU)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps of everything (not a measurement)")
    p.add_argument("--full", action="store_true", help="run every sampling loop to its last step (default: the "
                   "diffusers U-Net's DDPM loop runs its first 100 of 1000 steps; --full adds minutes on a CPU)")
    p.add_argument("--out", default="bench-results", help="output folder (default: bench-results/)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: CUDA was asked for but no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {device}")
    if args.quick and args.full:
        raise SystemExit("--quick and --full exclude each other")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive count, got {args.threads}")
        torch.set_num_threads(args.threads)
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit("ddpm-fast bench --e2e needs diffusers (its UNet2DModel and schedulers): "
                         "pip install 'ddpm-fast[diffusers]'")
    print("ddpm-fast bench --e2e: starting (a first use may build the C++ extension)...", file=sys.stderr)

    def progress(text):
        print(f"  {text}", file=sys.stderr, flush=True)

    results = run_e2e(device, args.quick, args.out, full=args.full, seed=args.seed, progress=progress)
    print(table(results))
    paths = results["paths"]
    print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['table']}; chart: {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
