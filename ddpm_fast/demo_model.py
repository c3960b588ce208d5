"""A compact UNet for 8x8 single-channel images (sklearn's digits), CPU-friendly.

forward(x [B, 1, 8, 8] float32, t [B] timesteps) -> [B, out_channels, 8, 8]: two levels (8x8 and
4x4), residual blocks with GroupNorm and a sinusoidal timestep embedding, zero-initialised output.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """UNet for [B, in_channels, 8, 8]; ``out_channels`` = 2 * in_channels for a learned variance."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: int = 64):
        super().__init__()
        c, emb = channels, 4 * channels
        self.emb_dim = c
        self.time = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb)
        self.pool = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * c, 2 * c, emb)
        self.mid2 = ResBlock(2 * c, 2 * c, emb)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.up1 = ResBlock(2 * c, c, emb)
        self.out_norm = nn.GroupNorm(8, c)
        self.out = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t):
        emb = self.time(timestep_embedding(t, self.emb_dim))
        h0 = self.down1(self.inp(x), emb)
        h = self.mid2(self.mid1(self.pool(h0), emb), emb)
        h = self.up1(torch.cat([self.up(h), h0], dim=1), emb)
        return self.out(torch.nn.functional.silu(self.out_norm(h)))
