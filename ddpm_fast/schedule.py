"""Noise schedules: float64 tables from the betas, a packed float32 device table, respacing.

Timesteps are 0-based as in improved-diffusion: t = 0 is the first noising step.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from .options import COLUMN, COLUMNS  # noqa: F401  (the packed table's columns, re-exported)

NAMED_SCHEDULES = ("linear", "cosine", "scaled_linear", "sigmoid")


def _named_betas(name: str, num_timesteps: int) -> np.ndarray:
    T = num_timesteps
    if name == "linear":
        # improved-diffusion: the DDPM range 1e-4..0.02 for T = 1000, scaled by 1000 / T.
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name == "cosine":
        # Nichol & Dhariwal 2021: s = 0.008, betas capped at 0.999.
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
            dtype=np.float64,
        )
    if name == "scaled_linear":
        # Stable Diffusion: linspace of sqrt(beta) from 0.00085 to 0.012, squared.
        return np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    if name == "sigmoid":
        # diffusers' "sigmoid": sigmoid(linspace(-6, 6)) mapped onto 1e-4..0.02.
        x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-x)) * (0.02 - 1e-4) + 1e-4
    raise ValueError(f"name: unknown schedule {name!r}; expected one of {NAMED_SCHEDULES}")


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023: shift and scale sqrt(abar) so that abar_{T-1} = 0, abar_0 unchanged."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _check_betas(betas) -> np.ndarray:
    if isinstance(betas, torch.Tensor):
        betas = betas.detach().cpu().double().numpy()
    try:
        arr = np.asarray(betas, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"betas: expected a 1-D array of floats, got {type(betas).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"betas: expected a 1-D array, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError("betas: expected at least one timestep, got an empty array")
    problem = betas_problem(arr)
    if problem is not None:
        raise ValueError(problem)
    return arr


def betas_problem(betas) -> str | None:
    """Why ``betas`` cannot make a NoiseSchedule (each must be finite and in (0, 1]), or None if it can.

    Never raises on a 1-D array of numbers: the diffusers compat schedulers ask it before building
    a schedule, and run the parent's own code for betas it rejects (diffusers accepts any betas).
    """
    arr = np.asarray(betas, dtype=np.float64)
    ok = np.isfinite(arr) & (arr > 0.0) & (arr <= 1.0)
    if ok.all():
        return None
    return f"betas: every beta must be in (0, 1], found {arr[~ok][:3].tolist()}"


class NoiseSchedule:
    """A diffusion noise schedule: float64 tables by name and a packed float32 device table.

    Args:
        betas: 1-D array-like of T betas in (0, 1].
        rescale_zero_terminal_snr: rescale so that alphas_cumprod[T-1] = 0 (zero terminal SNR).
        timestep_map: for a respaced schedule, the original timestep of each kept step (int64 [T]).

    Every table is a float64 CPU tensor of shape [T], e.g. ``schedule.alphas_cumprod``.
    ``schedule.table(device)`` is the [T, len(COLUMNS)] float32 table the kernels read.
    """

    def __init__(self, betas, *, rescale_zero_terminal_snr: bool = False, timestep_map=None):
        b = _check_betas(betas)
        if rescale_zero_terminal_snr:
            b = _rescale_zero_terminal_snr(b)
        self.rescale_zero_terminal_snr = bool(rescale_zero_terminal_snr)
        self._tables = self._compute_tables(b)
        T = b.shape[0]
        self._num_timesteps = int(T)  # read by every op's t check: an int, not the table's shape
        # abar_{T-1} = 0: x_0 cannot be recovered from an epsilon prediction at the last step.
        self.zero_terminal_snr = bool(self._tables["alphas_cumprod"][-1] == 0.0)
        if timestep_map is None:
            timestep_map = np.arange(T)
        self.timestep_map = torch.as_tensor(np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map: expected shape ({T},), got {tuple(self.timestep_map.shape)}")
        self._device_tables: dict = {}
        self._cpu_tables: dict = {}  # input dtype -> the CPU table (cpu_table)

    def __getstate__(self):
        # Device tables are rebuilt on demand (e.g. after pickling to a DDP worker).
        state = dict(self.__dict__)
        state["_device_tables"] = {}
        state["_cpu_tables"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._num_timesteps = int(self._tables["betas"].shape[0])
        self._cpu_tables = {}

    @classmethod
    def named(cls, name: str, num_timesteps: int = 1000, *, rescale_zero_terminal_snr: bool = False):
        """One of ``linear``, ``cosine``, ``scaled_linear``, ``sigmoid`` with num_timesteps steps."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected a string, got {type(name).__name__}")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
        return cls(_named_betas(name, num_timesteps), rescale_zero_terminal_snr=rescale_zero_terminal_snr)

    @staticmethod
    def _compute_tables(betas: np.ndarray) -> dict:
        T = betas.shape[0]
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        abar_next = np.concatenate([abar[1:], [0.0]])
        with np.errstate(divide="ignore", invalid="ignore"):
            post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
            # post_var[0] = 0: the clipped log variance uses post_var[1] there (betas[0] if T = 1).
            first = post_var[1] if T > 1 else betas[0]
            fixed_large = np.concatenate([[first], betas[1:]])
            t = {
                "betas": betas,
                "log_betas": np.log(betas),
                "alphas": alphas,
                "alphas_cumprod": abar,
                "alphas_cumprod_prev": abar_prev,
                "alphas_cumprod_next": abar_next,
                "sqrt_alphas_cumprod": np.sqrt(abar),
                "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
                "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
                "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
                "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
                "posterior_variance": post_var,
                "posterior_log_variance_clipped": np.log(np.concatenate([[first], post_var[1:]])),
                "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
                "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
                "fixed_large_variance": fixed_large,
                "fixed_large_log_variance": np.log(fixed_large),
                "sqrt_alphas_cumprod_prev": np.sqrt(abar_prev),
                "sqrt_one_minus_alphas_cumprod_prev": np.sqrt(1.0 - abar_prev),
                "snr": abar / (1.0 - abar),
            }
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in t.items()}

    # -- tables ---------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def __len__(self) -> int:
        return self.num_timesteps

    def __getattr__(self, name: str):
        tables = self.__dict__.get("_tables")
        if tables is not None and name in tables:
            return tables[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute or table {name!r}")

    @property
    def table_names(self) -> tuple:
        return tuple(self._tables)

    def table(self, device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed table [T, len(COLUMNS)] on ``device`` (float32 by default), cached per device.

        Built from the float64 tables; never cast to a low-precision input dtype.
        """
        cached = self._device_tables.get((device, dtype))  # keys are normalised torch.devices, as x.device is
        if cached is not None:
            return cached
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        cached = self._device_tables.get(key)
        if cached is None:
            # no lock (torch.compile cannot trace one): two threads may both build it, and setdefault keeps one
            packed = torch.stack([self._tables[c] for c in COLUMNS], dim=1)
            cached = self._device_tables.setdefault(key, packed.to(dtype=dtype).contiguous().to(device))
        return cached

    def cpu_table(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The CPU table for inputs of ``dtype``: table("cpu", float64) for float64, else table("cpu", float32)
        (the compute dtype), from a dict keyed by the input dtype alone: the compiled CPU ops' per-call lookup
        (no torch.device to build and hash, no compute dtype to work out)."""
        table = self._cpu_tables.get(dtype)
        if table is None:
            compute = torch.float64 if dtype == torch.float64 else torch.float32
            table = self._cpu_tables[dtype] = self.table(torch.device("cpu"), compute)
        return table

    # -- respacing ------------------------------------------------------------------------
    def respace(self, use_timesteps: Iterable[int]) -> "NoiseSchedule":
        """The schedule that keeps only ``use_timesteps`` (original 0-based indices).

        Betas are re-derived as 1 - abar_i / abar_prev_kept, so alphas_cumprod at the kept
        steps is unchanged; ``timestep_map`` maps each new step to its original timestep.
        """
        keep = sorted(set(int(i) for i in use_timesteps))
        T = self.num_timesteps
        if not keep:
            raise ValueError("use_timesteps: expected at least one timestep to keep")
        if keep[0] < 0 or keep[-1] >= T:
            raise ValueError(f"use_timesteps: every timestep must be in [0, {T}), got {keep[0]}..{keep[-1]}")
        abar = self.alphas_cumprod.numpy()
        new_betas, last = [], 1.0
        for i in keep:
            new_betas.append(1.0 - abar[i] / last)
            last = abar[i]
        original = self.timestep_map.numpy()[keep]
        return NoiseSchedule(np.array(new_betas), timestep_map=original)

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, respaced={self.is_respaced})"

    @property
    def is_respaced(self) -> bool:
        return not torch.equal(self.timestep_map, torch.arange(self.num_timesteps))


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """Timesteps to keep from an original process of ``num_timesteps`` (improved-diffusion semantics).

    section_counts: "ddimN" (an even stride giving exactly N steps), a comma-separated string
    such as "10,15,20", or a list of per-section counts; the process is cut into equal
    sections and each section is strided to its count. Returns a set of 0-based timesteps.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"section_counts: cannot parse {section_counts!r}; expected 'ddimN'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(
                f"section_counts: cannot create exactly {desired} steps with an integer stride "
                f"from {num_timesteps} timesteps"
            )
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"section_counts: cannot parse {section_counts!r}") from None
    counts = list(section_counts)
    if not counts or any((not isinstance(c, (int, np.integer))) or c < 1 for c in counts):
        raise ValueError(f"section_counts: expected positive integer counts, got {counts!r}")
    if len(counts) > num_timesteps:
        raise ValueError(f"section_counts: {len(counts)} sections for only {num_timesteps} timesteps")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"section_counts: cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)
