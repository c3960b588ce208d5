"""Check an implementation against the reference before timing it (the flash-attention rule).

On fresh random inputs (t = 0 included), every output -- and, for fwd+bwd cases, the gradient
w.r.t. model_output -- must satisfy

    max |out - ref64| <= 2 * max |ref_same_dtype - ref64| + floor,
    floor = 2 * eps(output dtype) * max(1, max |ref64|) * L,

where ref64 is the reference run on the same input values upcast to float64 and ref_same_dtype
the reference run in the inputs' dtype: an implementation may be at most twice as far from the
exact answer as plain PyTorch is in that precision, plus two ulps at the output's scale. L is 1
for elementwise outputs; for per-sample [B] results, means of n terms, L = ceil(log2 n): the
error bound of a blocked / pairwise float32 sum (Higham, gamma_{log2 n}), since a fused kernel
may legitimately add in another order than PyTorch's (the terms are non-negative: KL, NLL,
squared errors, so their mean is their scale). Shapes
and dtypes must match the reference's. Sampler steps are checked with explicit noise; their
seeded path (the one timed) must be deterministic and, in float32 / float64, its noise must have
mean 0 and standard deviation 1 to within 0.05 over all elements with t > 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import reference
from .cases import Case


@dataclass
class CheckResult:
    ok: bool
    max_rel_err: float   # max over outputs of max |out - ref64| / max(1, max |ref64|)
    detail: str          # "" when ok, else the first failure


def _as64(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(torch.float64).requires_grad_(a.requires_grad)
        out.append(a)
    return tuple(out)


def _fresh(args):
    """Detached copies (leaves keep requires_grad) so each run has its own autograd graph."""
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def reference_outputs(case: Case, args):
    """(float64 reference outputs, same-dtype reference outputs) for ``args``."""
    ref64 = case.run(getattr(reference, case.op), _as64(args), explicit_noise=True)
    refd = case.run(getattr(reference, case.op), _fresh(args), explicit_noise=True)
    return [r.detach() for r in ref64], [r.detach() for r in refd]


def _err(a, b64) -> float:
    return float((a.detach().to(torch.float64) - b64).abs().max()) if a.numel() else 0.0


def _scale(r64) -> float:
    return max(1.0, float(r64.abs().max())) if r64.numel() else 1.0


def compare(case: Case, outs, ref64, refd, reduced: int = 1) -> CheckResult:
    """``reduced``: n, the number of terms each per-sample [B] output is the mean of."""
    worst, names = 0.0, case.output_names()
    levels = max(1, math.ceil(math.log2(max(2, reduced))))
    for name, out, r64, rd in zip(names, outs, ref64, refd):
        if tuple(out.shape) != tuple(rd.shape) or out.dtype != rd.dtype:
            return CheckResult(False, float("nan"), f"{name}: got {tuple(out.shape)} {out.dtype}, "
                                                    f"reference gives {tuple(rd.shape)} {rd.dtype}")
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(rd).all()):
            return CheckResult(False, float("nan"), f"{name}: non-finite values where the reference is finite")
        err, err_ref, scale = _err(out, r64), _err(rd, r64), _scale(r64)
        per_sample = out.ndim == 1 and reduced > 1
        bound = 2 * err_ref + 2 * torch.finfo(out.dtype).eps * scale * (levels if per_sample else 1)
        worst = max(worst, err / scale)
        if not err <= bound:
            return CheckResult(False, err / scale, f"{name}: max error {err:.3g} > bound {bound:.3g} "
                                                   f"(reference's own error {err_ref:.3g})")
    return CheckResult(True, worst, "")


@dataclass
class Fresh:
    """Fresh check inputs (t = 0 included) and the reference's outputs on them."""

    args: tuple
    ref64: list
    refd: list


def fresh(case: Case, shape, dtype, device, seed: int) -> Fresh:
    """Draw fresh inputs of ``shape`` / ``dtype`` from ``seed`` and run the reference on them."""
    gen = torch.Generator().manual_seed(seed)
    args = case.inputs(shape, dtype, device, gen, per_sample_t=True).args
    return Fresh(args, *reference_outputs(case, args))


def check(case: Case, fn, data: Fresh) -> CheckResult:
    """Check ``fn`` (signature of reference.<op>) on the inputs of ``data`` (see fresh)."""
    try:
        outs = case.run(fn, _fresh(data.args), explicit_noise=True)
    except Exception as exc:  # a backend that cannot run these inputs fails its check
        return CheckResult(False, float("nan"), f"raised {type(exc).__name__}: {exc}")
    x = data.args[1] if case.kind in ("vb", "loss") else data.args[0]
    result = compare(case, outs, data.ref64, data.refd, reduced=math.prod(x.shape[1:]))
    if result.ok and case.kind == "ddpm":
        detail = _check_seeded(case, fn, data.args)
        if detail:
            return CheckResult(False, result.max_rel_err, detail)
    return result


def _check_seeded(case: Case, fn, args) -> str:
    """'' if the seeded step is deterministic and its noise looks N(0, 1), else why not."""
    a = case.forward(fn, _fresh(args))[0]
    b = case.forward(fn, _fresh(args))[0]
    if not torch.equal(a, b):
        return "sample: two calls with the same seed differ"
    mo, x_t, t, _ = args
    if x_t.dtype not in (torch.float32, torch.float64):
        return ""  # rounding to 16 bits is a sizeable fraction of sigma at small t
    pm = reference.p_mean_variance(mo.double(), x_t.double(), t, case.schedule, mean_type=case.mean_type,
                                   var_type=case.var_type, clip_denoised=True)
    z = (a.double() - pm["mean"]) / pm["variance"].sqrt()
    z = z[t != 0]
    if z.numel() < 1000:
        return ""
    mean, std = float(z.mean()), float(z.std())
    if abs(mean) > 0.05 or abs(std - 1) > 0.05:
        return f"seeded noise: mean {mean:.3f}, std {std:.3f} (expected 0 and 1 within 0.05)"
    return ""


def peer_error(peer, case: Case, inputs) -> float:
    """Max relative error of a peer's comparable outputs on ``inputs`` (an Inputs) against the
    float64 reference."""
    ref64 = case.run(getattr(reference, case.op), _as64(inputs.args), explicit_noise=True)
    with torch.no_grad():
        outs = peer.call(*inputs.args, peer.timestep(inputs.t0))
    return max(_err(outs[i], ref64[j].detach()) / _scale(ref64[j]) for i, j in peer.compare)
