"""Timestep samplers for training (improved-diffusion's resample.py semantics).

- ``UniformSampler``: t ~ U{0..T-1}, weights 1.
- ``LossSecondMomentResampler``: importance sampling with p_t proportional to sqrt(E[loss_t^2]) over
  the last ``history_per_term`` losses of each t (mixed with ``uniform_prob`` of uniform), uniform
  until every t has a full history; weights 1 / (T p_t) keep the loss estimate unbiased.

``sample(batch_size, device)`` draws on ``device`` with torch (no host-to-device copy); the
distribution is improved-diffusion's, the random stream is torch's rather than numpy's.
``update_with_local_losses`` gathers every rank's (t, loss) under torch.distributed with one
all_gather per tensor and one device-to-host copy in all (no per-element .item()).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["create_named_schedule_sampler", "ScheduleSampler", "UniformSampler", "LossAwareSampler",
           "LossSecondMomentResampler"]


def create_named_schedule_sampler(name, diffusion):
    """"uniform" or "loss-second-moment" for ``diffusion`` (anything with num_timesteps)."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"name: unknown schedule sampler {name!r}; expected 'uniform' or 'loss-second-moment'")


class ScheduleSampler(ABC):
    """A distribution over timesteps, with importance weights for an unbiased loss."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalized, positive weights per timestep: float64 numpy [T]."""

    def sample(self, batch_size, device, generator=None):
        """(timesteps int64 [batch_size], weights float32 [batch_size]), both on ``device``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        w = np.asarray(self.weights(), dtype=np.float64)
        return self._draw(w, batch_size, torch.device(device), generator)

    def _draw(self, w, batch_size, device, generator):
        p = torch.as_tensor(w / w.sum(), dtype=torch.float32).to(device)
        idx = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (p.numel() * p[idx])
        return idx, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self):
        return self._weights

    def sample(self, batch_size, device, generator=None):
        # Uniform: draw on the device directly, weights are all 1.
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        device = torch.device(device)
        t = torch.randint(0, self.diffusion.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, dtype=torch.float32, device=device)


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """Record this rank's (t [B], loss [B]) and, under torch.distributed, every other rank's.

        Every rank must call this (it is a collective when distributed); all end with the same state.
        """
        local_ts = local_ts.detach().reshape(-1).to(torch.int64)
        local_losses = local_losses.detach().reshape(-1).to(torch.float64)
        if local_ts.shape != local_losses.shape:
            raise ValueError(
                f"local_losses: expected shape {tuple(local_ts.shape)} (that of local_ts), got {tuple(local_losses.shape)}"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ts, losses = _gather_ragged(local_ts, local_losses)
        else:
            ts, losses = local_ts.cpu().numpy(), local_losses.cpu().numpy()
        self.update_with_all_losses(ts, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Record the losses of all ranks: ts int [N], losses float [N] (sequences or numpy arrays)."""


def _gather_ragged(ts: torch.Tensor, losses: torch.Tensor):
    """All ranks' (ts, losses) concatenated in rank order, as numpy, with per-rank batch sizes allowed."""
    world = dist.get_world_size()
    device = ts.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    n = torch.tensor([ts.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = torch.cat(sizes).cpu().tolist()  # one small copy
    m = max(sizes)
    packed = torch.zeros(2, m, dtype=torch.float64, device=device)
    packed[0, : ts.numel()] = ts.to(device=device, dtype=torch.float64)  # t < 2**53: exact
    packed[1, : ts.numel()] = losses.to(device)
    gathered = [torch.zeros_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    everything = torch.stack(gathered).cpu().numpy()  # one copy for all ranks
    all_ts = np.concatenate([everything[r, 0, : sizes[r]] for r in range(world)]).astype(np.int64)
    all_losses = np.concatenate([everything[r, 1, : sizes[r]] for r in range(world)])
    return all_ts, all_losses


class LossSecondMomentResampler(LossAwareSampler):
    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        if not (isinstance(history_per_term, int) and history_per_term >= 1):
            raise ValueError(f"history_per_term: expected a positive int, got {history_per_term!r}")
        if not 0.0 <= float(uniform_prob) <= 1.0:
            raise ValueError(f"uniform_prob: expected a value in [0, 1], got {uniform_prob!r}")
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = float(uniform_prob)
        T = diffusion.num_timesteps
        self._loss_history = np.zeros([T, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([T], dtype=np.int64)  # np.int (removed in NumPy 1.24) in the original

    def weights(self):
        T = self.diffusion.num_timesteps
        if not self._warmed_up():
            return np.ones([T], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        w = w / np.sum(w)
        w = w * (1.0 - self.uniform_prob)
        return w + self.uniform_prob / T

    def update_with_all_losses(self, ts, losses):
        ts = np.asarray(ts, dtype=np.int64).reshape(-1)
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        T = self.diffusion.num_timesteps
        if ts.size and (ts.min() < 0 or ts.max() >= T):
            raise ValueError(f"ts: expected timesteps in [0, {T}), got values in [{ts.min()}, {ts.max()}]")
        # In order, as improved-diffusion: a full history shifts out its oldest loss.
        for t, loss in zip(ts.tolist(), losses.tolist()):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())
