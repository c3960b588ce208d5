"""What every op family shares: the argument checks (each error names the argument), the compiled CPU
fast path and the Args paragraphs common to the ops' docstrings."""
from __future__ import annotations

import textwrap
from itertools import zip_longest

import torch

from .. import backends, options
from ..options import LEARNED_VAR_TYPES
from ..schedule import NoiseSchedule

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = frozenset(_FLOAT_DTYPES)
# tensor types whose shape, dtype and device are read directly by the one-pass checks (subclasses take the
# separate checks: their attributes may be overridden)
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
# up to this many timesteps are range-checked in Python (t.tolist(): ~0.3 us for a few on the CPU, against ~2.5 us
# for torch.aminmax and two scalar reads; one device-to-host copy for CUDA tensors, not two); more through aminmax
_LIST_RANGE_MAX = 64
_Tensor, _INT64 = torch.Tensor, torch.int64
_MEAN_TYPES, _VAR_TYPES = options.OPTIONS["mean_type"], options.OPTIONS["var_type"]


# -- checks -----------------------------------------------------------------------------------
def tensor(name, x, *, batched=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if batched and x.ndim < 1:
        raise ValueError(f"{name}: expected a batched tensor [B, ...], got a 0-dim tensor")
    return x


def same_device(**tensors):
    devices = {name: x.device for name, x in tensors.items() if x is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: expected a tensor on {first} (like {first_name}), got one on {dev}")
    return first


def same_shape(ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(x.shape)}")


def same_dtype(ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x is not None and x.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {x.dtype}")


def _all_like(tensors: dict, dtype, shape, device) -> bool:
    """Whether every tensor of ``tensors`` (None: absent) is a plain tensor of this dtype, shape and device."""
    for x in tensors.values():
        if x is not None and not (type(x) in PLAIN_TYPES and x.dtype == dtype and x.shape == shape
                                  and x.device == device):
            return False
    return True


def like(ref_name, ref, **others):
    """tensor(ref_name, ref) and each of ``others`` (None: absent), then same_shape, same_dtype and
    same_device of ``others`` against ``ref``, in that order; returns the device. One pass over plain tensors
    when every check passes; otherwise the separate checks, which raise their errors."""
    if type(ref) in PLAIN_TYPES:
        dtype, shape, device = ref.dtype, ref.shape, ref.device
        if dtype in _FLOAT_SET and shape and _all_like(others, dtype, shape, device):
            return device
    tensor(ref_name, ref)
    for name, x in others.items():
        if x is not None:
            tensor(name, x)
    same_shape(ref_name, ref, **others), same_dtype(ref_name, ref, **others)
    return same_device(**{ref_name: ref}, **others)


def x_args(x_name, x, t, sched, validate, **others):
    """Shared checks of (x, t, ...) ops: like(x_name, x, **others), then t by timesteps (sched checked first).
    Returns (t, device)."""
    device = like(x_name, x, **others)
    return timesteps(t, x.shape[0], schedule(sched), device, validate), device


def schedule(value):
    if not isinstance(value, NoiseSchedule):
        raise TypeError(f"schedule: expected a ddpm_fast.NoiseSchedule, got {type(value).__name__}")
    return value


def timesteps(t, batch: int, sched: NoiseSchedule, device: torch.device, validate):
    """t as an int64 tensor [B] on ``device``; range-checked when validate (default: not on CUDA)."""
    if type(t) is _Tensor and t.dtype is _INT64 and t.shape == (batch,) and t.device == device:
        # the common case in one test; then only the range (values read on the host) and the layout
        if validate or (validate is None and not t.is_cuda):
            if batch > _LIST_RANGE_MAX:
                _check_range(t, sched.num_timesteps)
            elif batch:  # int_range's list read, inline
                items = t.tolist()
                items.sort()
                if items[0] < 0 or items[-1] >= sched.num_timesteps:
                    _check_range(t, sched.num_timesteps)  # raises
        return t if t.is_contiguous() else t.contiguous()
    T = sched.num_timesteps
    if isinstance(t, bool) or (isinstance(t, torch.Tensor) and t.dtype == torch.bool):
        raise TypeError("t: expected integer timesteps, got a bool")
    if isinstance(t, int):
        if not 0 <= t < T:
            raise ValueError(f"t: expected timesteps in [0, {T}), got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected an int or an integer tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"t: expected an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"t: expected a tensor on {device} (like the inputs), got one on {t.device}")
    if t.ndim == 0:
        t = t.reshape(1).expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"t: expected shape ({batch},) or a 0-dim tensor, got {tuple(t.shape)}")
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    if validate is None:
        validate = device.type != "cuda"
    if validate:
        _check_range(t, T)
    return t if t.is_contiguous() else t.contiguous()


def _check_range(t, T):
    """Raise ValueError unless every value of the integer tensor t [B] is in [0, T) (reads t on the host)."""
    lo, hi = int_range(t)
    if lo is not None and (lo < 0 or hi >= T):
        raise ValueError(f"t: expected timesteps in [0, {T}), got values in [{lo}, {hi}]")


def int_range(values):
    """(min, max) of the integer tensor values [N] as ints, read on the host ((None, None) when empty): a list
    for short ones (one copy, no reduction ops; sorted in place, one call cheaper than min and max up to
    _LIST_RANGE_MAX values), aminmax otherwise."""
    n = values.shape[0]
    if n <= _LIST_RANGE_MAX:
        if not n:
            return None, None
        items = values.tolist()
        items.sort()
        return items[0], items[-1]
    lo, hi = torch.aminmax(values)
    return int(lo), int(hi)


def model_output_shape(model_output, x_t, var_type, x_name):
    """model_output is x_t's shape, or doubled in channels (dim 1) for a learned variance."""
    shape, out_shape = x_t.shape, model_output.shape  # each read once (a torch.Size made per read)
    if var_type in LEARNED_VAR_TYPES:
        if len(shape) < 2:
            raise ValueError(f"{x_name}: a learned variance needs a channel dim 1, got shape {tuple(shape)}")
        want = (shape[0], 2 * shape[1], *shape[2:])
        if out_shape != want:
            raise ValueError(
                f"model_output: var_type={var_type!r} needs {x_name}'s shape {tuple(shape)} with doubled "
                f"channels, {want} (mean and variance halves), got {tuple(out_shape)}"
            )
    elif out_shape != shape:
        raise ValueError(
            f"model_output: expected shape {tuple(shape)} (that of {x_name}) for var_type={var_type!r}, "
            f"got {tuple(out_shape)}"
        )


def number(name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if value != value or (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and value > hi
    ):
        raise ValueError(f"{name}: expected a value in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return value


def thresholding(dynamic_threshold, sample_max_value):
    if dynamic_threshold is None and type(sample_max_value) in (float, int) and sample_max_value >= 1.0:
        return  # the default case, valid (NaN and bools take the checks below)
    if dynamic_threshold is not None:
        number("dynamic_threshold", dynamic_threshold, 0.0, 1.0, lo_open=True)
    number("sample_max_value", sample_max_value, 1.0, float("inf"))


def broadcast_shape(*shapes):
    """The shape ``shapes`` broadcast to (a tuple), or None if they do not broadcast (torch.broadcast_shapes,
    ~25 us a call, without its exception; plain int sizes)."""
    first = shapes[0]
    for shape in shapes:
        if shape != first:
            break
    else:
        return tuple(first)  # all equal
    out = []
    for sizes in zip_longest(*[reversed(s) for s in shapes], fillvalue=1):
        size = 1  # the dim's size other than 1, once one is seen
        for s in sizes:
            if s != 1:
                if size == 1:
                    size = s
                elif s != size:
                    return None
        out.append(size)
    return tuple(reversed(out))


def broadcastable(*shapes) -> bool:
    """Whether the shapes broadcast together."""
    return broadcast_shape(*shapes) is not None


def seed(value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63):
        raise ValueError(f"seed: expected None or an int in [0, 2**63), got {value!r}")
    return value


def generator(value, device):
    if value is not None:
        if not isinstance(value, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(value).__name__}")
        if value.device.type != device.type:
            raise ValueError(f"generator: expected a generator on {device.type}, got one on {value.device}")


def xstart_defined(mean_type, sched):
    """An epsilon model cannot give x_0 where abar_t = 0 (zero terminal SNR): x_0 = (x_t - 0 eps) / 0."""
    if mean_type == "epsilon" and sched.zero_terminal_snr:
        raise ValueError(
            "mean_type: 'epsilon' cannot predict x_0 at the zero-terminal-SNR step of this schedule "
            "(alphas_cumprod[T-1] = 0); use mean_type 'v' (or 'x0') with rescale_zero_terminal_snr"
        )


def model_args(model_output, x_t, t, sched, mean_type, var_type, validate, x_name="x_t", **others):
    """Shared checks of (model_output, x_t, t, ...) ops; x_name names x_t. Returns (t, device)."""
    if mean_type not in _MEAN_TYPES or var_type not in _VAR_TYPES:  # options.check's test; it raises
        options.check("mean_type", mean_type), options.check("var_type", var_type)
    if type(model_output) in PLAIN_TYPES and type(x_t) in PLAIN_TYPES:  # one pass when the checks below pass
        dtype, shape, device = x_t.dtype, x_t.shape, x_t.device
        if (dtype in _FLOAT_SET and shape and model_output.dtype == dtype and model_output.device == device
                and (not others or _all_like(others, dtype, shape, device))):
            if var_type in LEARNED_VAR_TYPES or model_output.shape != shape:  # (equal shapes: batched too)
                if not model_output.ndim:
                    tensor("model_output", model_output)  # raises
                model_output_shape(model_output, x_t, var_type, x_name)
            return timesteps(t, shape[0], schedule(sched), device, validate), device
    tensor("model_output", model_output), tensor(x_name, x_t)
    for name, x in others.items():
        if x is not None:
            tensor(name, x)
    same_shape(x_name, x_t, **others), same_dtype(x_name, x_t, model_output=model_output, **others)
    model_output_shape(model_output, x_t, var_type, x_name)
    device = same_device(model_output=model_output, **{x_name: x_t}, **others)
    return timesteps(t, x_t.shape[0], schedule(sched), device, validate), device


# -- the compiled CPU path: its C++ checks dtypes, shapes and t (range included) once ---------------
def cpu_native(op, backend, *tensors):
    """The compiled CPU extension's ``op`` when ``backend`` runs these tensors (ops.REGISTRY[op].tensors, in
    order, the batched one first; None: absent) on it, else None (the checked path, which also takes every
    fallback to the reference). The op families' C++ host functions (csrc/ops/host.h) then check dtypes,
    shapes and t once, raising the TypeError / ValueError the checks above raise, named the same: no check
    runs twice. The decision is backends.route's, its plan for
    (cpu, op, dtype) kept here: one lookup, and a requires_grad test where the kernels lack a gradient."""
    if backend != "auto" and backend != "cpu":
        return None
    for x in tensors:
        if x is not None and not (isinstance(x, _Tensor) and x.is_cpu):
            return None
    first = tensors[0]
    if first.ndim == 0:
        return None
    plan = _cpu_plans.get((op, first.dtype))
    if plan is None:
        plan = _cpu_plan(op, backend, first.dtype)
    fn, eager_fn, positions = plan
    if positions and _grad_enabled():  # backends.grad_blocked, inline
        for i in positions:
            x = tensors[i]
            if x is not None and x.requires_grad:
                return None
    return fn if is_compiling() else eager_fn


# whether torch.compile's dynamo traces this call, where the direct binding would break the graph: a plain
# `return False` in eager (torch.compiler.is_compiling calls torch.jit.is_scripting first, one more frame)
is_compiling = torch.compiler.is_dynamo_compiling
_grad_enabled = torch.is_grad_enabled
# (op, dtype) -> (the compiled op or None, the same for plain-eager calls (native.eager_kernels: the op's
# direct binding, csrc/ops/direct.h), the inputs whose requires_grad needs the reference)
_cpu_plans: dict = {}


def _cpu_plan(op, backend, dtype):
    if not backends.available("cpu"):  # no compiled extension: the checked path (which says why for "cpu")
        if backend == "cpu":
            backends.select(backend, "cpu")  # raises BackendUnavailableError with the reason
        return None, None, ()
    from .. import native

    (fn, reason), positions, _ = backends.plan("cpu", "cpu", op, dtype)
    if reason:
        fn = None
    eager_fn = getattr(native.eager_kernels, op) if fn is getattr(native.kernels, op, None) else fn
    _cpu_plans[(op, dtype)] = plan = fn, eager_fn, positions
    return plan


def cpu_timesteps(t, x, sched):
    """t for the compiled CPU op, once ``sched`` is checked to be a NoiseSchedule (schedule's TypeError): an
    int64 [B] CPU tensor as is (the C++ checks its shape and range, reading it on the host anyway); an int
    range-checked here and broadcast; anything else via timesteps."""
    if not isinstance(sched, NoiseSchedule):
        schedule(sched)  # raises
    if isinstance(t, _Tensor) and t.dtype is _INT64 and t.ndim == 1 and t.is_cpu and t.is_contiguous():
        return t
    if type(t) is int:
        if not 0 <= t < sched.num_timesteps:
            raise ValueError(f"t: expected timesteps in [0, {sched.num_timesteps}), got {t}")
        return torch.full((x.shape[0],), t, dtype=torch.int64)
    return timesteps(t, x.shape[0], sched, x.device, False)


def cpu_model_args(t, x, sched, mean_type, var_type):
    """model_args on the compiled CPU path: the options and t here, the tensors in C++."""
    options.check("mean_type", mean_type), options.check("var_type", var_type)
    t = cpu_timesteps(t, x, sched)
    xstart_defined(mean_type, sched)
    return t


# -- the Args paragraphs several ops share ----------------------------------------------------------------
_PARAGRAPHS = {
    "t": "t: 0-based timesteps in [0, T): an integer tensor [B] on the inputs' device (one per sample), or a "
         "Python int / 0-dim tensor used for every sample.",
    "schedule": "schedule: a ddpm_fast.NoiseSchedule (e.g. ``NoiseSchedule.named(\"linear\", 1000)``, or a "
                "respaced one); its float64 tables are cached on the device in float32 on first use.",
    "backend": "backend: \"auto\" (default: the compiled CUDA kernels for CUDA tensors, else Triton; the compiled "
               "CPU extension for CPU tensors, else the reference), \"reference\" (plain PyTorch, always "
               "available), \"triton\", \"cpu\", \"cuda\" or \"cuda_emu\" (the CUDA kernels emulated on CPU "
               "tensors, for checking). An unavailable backend raises BackendUnavailableError saying why "
               "(``ddpm-fast info`` lists them); inputs a backend cannot take (its capability table in "
               "ddpm_fast.backends) run on the reference.",
    "backend_short": "backend: \"auto\" (default), \"reference\", \"triton\", \"cpu\", \"cuda\" or \"cuda_emu\" "
                     "(see q_sample).",
    "validate": "validate: check that every t is in [0, T) (ValueError otherwise). None (default): on for CPU "
                "tensors, off for CUDA tensors, where it would cost a host sync (an out-of-range t there is "
                "still never read out of bounds; see the module docstring).",
    "model_output": "model_output: the network's output [B, C, ...] (x_t's shape), or [B, 2C, ...] (mean half "
                    "first, then the variance half) for var_type \"learned\" / \"learned_range\".",
    "mean_type": "mean_type: what the model's (mean) output predicts: " + options.describe("mean_type") + ".",
    "var_type": "var_type: the model's variance: " + options.describe("var_type") + ". With a learned type "
                "model_output has 2C channels.",
    "loss_type": "loss_type: " + options.describe("loss_type") + ".",
    "weighting": "weighting: how the mse is weighted per sample: " + options.describe("weighting") + ".",
    "clip_denoised": "clip_denoised: clamp the predicted x_0 to [-1, 1] before it is used. Default True.",
    "dynamic_threshold": "dynamic_threshold: None (default) or a quantile p in (0, 1]: Imagen's dynamic "
                         "thresholding of the predicted x_0: per sample, s = the p-quantile of |x_0| clamped to "
                         "[1, sample_max_value], then x_0 = clamp(x_0, -s, s) / s. Used instead of clipping.",
    "sample_max_value": "sample_max_value: the largest threshold dynamic thresholding may use (>= 1; default 1).",
}


def document(function):
    """Replace each line ``<name>`` of the function's docstring by the shared Args paragraph ``name``."""
    lines = []
    for line in function.__doc__.split("\n"):
        key = line.strip()
        if key.startswith("<") and key.endswith(">") and key[1:-1] in _PARAGRAPHS:
            indent = line[: len(line) - len(line.lstrip())]
            line = textwrap.fill(_PARAGRAPHS[key[1:-1]], width=104, initial_indent=indent,
                                 subsequent_indent=indent + "    ", break_on_hyphens=False)
        lines.append(line)
    function.__doc__ = "\n".join(lines)
    return function
