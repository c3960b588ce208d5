"""Ahead-of-time compile of every Triton kernel for a GPU target, without a GPU.

``python -m ddpm_fast.triton.aot [--arch 80 90] [--json] [--only LABEL]`` compiles each kernel (fp32 pointers,
16-byte aligned contiguous inputs, BLOCK 1024, 4 warps (8 for vb_bwd with the vb term): what the launchers
pick on a GPU) with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) and reads registers per thread and
spill bytes from ptxas' own report. Must run with TRITON_INTERPRET unset: under the interpreter
@triton.jit yields interpreter objects that cannot be compiled (tests run this in a subprocess).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re

def _variants():
    """[(label, kernel, constexprs, streaming)] covering every kernel and its main variants."""
    from . import noising, posterior, sampler, solvers, vb

    f = dict(FLAT=True, BLOCK=1024, IDX64=False)
    fp = dict(f, CDT="fp32")
    big = dict(fp, IDX64=True)  # more than 2^31 elements per sample: int64 element indices
    solver = dict(fp, **{flag: False for flag in ("HAS_COND", "HAS_CFG", "HAS_THRESH", "HAS_H1", "HAS_H2", "HAS_H3",
                                                  "HAS_LAST")}, NOISE=0, NOISE_BLOCKS=False)
    g_loss_only = dict(G_LOSS=True, G_MSE=False, G_VB=False)  # vb_bwd from loss.mean().backward()
    vb_fwd = dict(WEIGHTING=1, MSE_OUT=True, FINISH=False)  # vb_fwd: elbo weighting, partial sums
    return [
        ("q_sample", noising._q_sample_kernel, fp, True),
        ("q_sample int64 index", noising._q_sample_kernel, big, True),
        ("q_sample int64 index strided", noising._q_sample_kernel, dict(big, FLAT=False), False),
        ("q_sample_bwd / q_posterior_bwd", noising.linear2_bwd_kernel, dict(fp, CA=4, CB=5), True),
        ("prior_bpd", noising._prior_kernel, fp, True),
        ("finish_mean", noising._finish_mean_kernel, dict(CBLOCK=64), False),
        ("q_posterior", posterior._q_posterior_kernel, fp, True),
        ("predict_xstart", posterior._predict_kernel, dict(fp, MEAN=0), True),
        ("predict_xstart_bwd", noising.linear2_bwd_kernel, dict(fp, CA=0, CB=0, MEAN=2), True),
        ("normal_kl", posterior._normal_kl_kernel, dict(fp, GRAD=False), True),
        ("normal_kl_bwd", posterior._normal_kl_kernel, dict(fp, GRAD=True), True),
        ("dgll", posterior._dgll_kernel, dict(fp, GRAD=False), True),
        ("dgll_bwd", posterior._dgll_kernel, dict(fp, GRAD=True), True),
        ("vb_fwd hybrid eps/learned_range", vb._vb_fwd_kernel,
         dict(fp, **vb_fwd, MEAN=0, VAR=3, CLIP=False, FROM_NOISE=True, DO_VB=True, DO_MSE=True), True),
        ("vb_fwd vb x_prev/learned clip", vb._vb_fwd_kernel,
         dict(fp, **vb_fwd, MEAN=2, VAR=2, CLIP=True, FROM_NOISE=False, DO_VB=True, DO_MSE=False), True),
        ("vb_fwd mse v/fixed_small", vb._vb_fwd_kernel,
         dict(fp, **vb_fwd, MEAN=3, VAR=0, CLIP=False, FROM_NOISE=True, DO_VB=False, DO_MSE=True), True),
        ("vb_fwd hybrid strided", vb._vb_fwd_kernel,
         dict(fp, **vb_fwd, MEAN=0, VAR=3, CLIP=False, FROM_NOISE=True, DO_VB=True, DO_MSE=True, FLAT=False), False),
        ("vb_fwd hybrid one chunk (finish)", vb._vb_fwd_kernel,
         dict(fp, **dict(vb_fwd, FINISH=True), MEAN=0, VAR=3, CLIP=False, FROM_NOISE=True, DO_VB=True, DO_MSE=True),
         True),
        ("vb_finish", vb._vb_finish_kernel,
         dict(MEAN=0, VAR=3, WEIGHTING=1, DO_VB=True, DO_MSE=True, MSE_OUT=True, CBLOCK=64), False),
        ("vb_bwd hybrid eps/learned_range", vb._vb_bwd_kernel,
         dict(fp, MEAN=0, VAR=3, CLIP=False, FROM_NOISE=True, DO_VB=True, DO_MSE=True, VB_MEAN_GRAD=False,
              WEIGHTING=2, **g_loss_only), True),
        ("vb_bwd kl eps/learned_range clip", vb._vb_bwd_kernel,
         dict(fp, MEAN=0, VAR=3, CLIP=True, FROM_NOISE=False, DO_VB=True, DO_MSE=False, VB_MEAN_GRAD=True,
              WEIGHTING=0, **g_loss_only), True),
        ("vb_bwd mse v/fixed_small", vb._vb_bwd_kernel,
         dict(fp, MEAN=3, VAR=0, CLIP=False, FROM_NOISE=True, DO_VB=False, DO_MSE=True, VB_MEAN_GRAD=False,
              WEIGHTING=1, **g_loss_only), True),
        ("abs_xstart (dyn. threshold)", sampler._abs_xstart_kernel, dict(fp, MEAN=0), True),
        ("p_mean_variance learned_range", sampler._sampler_kernel,
         dict(fp, MODE=0, MEAN=0, VAR=3, CLIP=True, DT=False, NOISE=0), True),
        ("p_sample_step philox", sampler._sampler_kernel,
         dict(fp, MODE=1, MEAN=0, VAR=3, CLIP=True, DT=False, NOISE=2, NOISE_BLOCKS=True), True),
        ("p_sample_step philox per element", sampler._sampler_kernel,
         dict(fp, MODE=1, MEAN=0, VAR=3, CLIP=True, DT=False, NOISE=2), True),
        ("p_sample_step philox int seed", sampler._sampler_kernel,
         dict(fp, MODE=1, MEAN=0, VAR=3, CLIP=True, DT=False, NOISE=2, SEED_FROM_PTR=False), True),
        ("p_sample_step philox strided", sampler._sampler_kernel,
         dict(fp, MODE=1, MEAN=0, VAR=3, CLIP=True, DT=False, NOISE=2, FLAT=False), False),
        ("p_sample_step philox int64 index", sampler._sampler_kernel,
         dict(big, MODE=1, MEAN=0, VAR=3, CLIP=True, DT=False, NOISE=2, NOISE_BLOCKS=True), True),
        ("vb_bwd hybrid int64 index", vb._vb_bwd_kernel,
         dict(big, MEAN=0, VAR=3, CLIP=False, FROM_NOISE=True, DO_VB=True, DO_MSE=True, VB_MEAN_GRAD=False,
              WEIGHTING=2, **g_loss_only), True),
        ("p_sample_step noise tensor", sampler._sampler_kernel,
         dict(fp, MODE=1, MEAN=0, VAR=0, CLIP=True, DT=False, NOISE=1), True),
        ("ddim_step noise + dyn. threshold", sampler._sampler_kernel,
         dict(fp, MODE=2, MEAN=0, VAR=0, CLIP=True, DT=True, NOISE=1), True),
        ("solver_update dpm++ 2 (h1)", solvers._solver_update_kernel, dict(solver, HAS_H1=True), True),
        ("solver_update dpm++ 3 sde cfg philox", solvers._solver_update_kernel,
         dict(solver, HAS_COND=True, HAS_H1=True, HAS_H2=True, NOISE=2, NOISE_BLOCKS=True), True),
        ("solver_update euler churn noise", solvers._solver_update_kernel, dict(solver, NOISE=1), True),
        ("solver_update unipc all inputs", solvers._solver_update_kernel,
         dict(solver, HAS_COND=True, HAS_CFG=True, HAS_THRESH=True, HAS_H1=True, HAS_H2=True, HAS_H3=True,
              HAS_LAST=True, NOISE=1), True),
        ("solver_update unipc all strided", solvers._solver_update_kernel,
         dict(solver, HAS_COND=True, HAS_CFG=True, HAS_THRESH=True, HAS_H1=True, HAS_H2=True, HAS_H3=True,
              HAS_LAST=True, NOISE=2, FLAT=False), False),
    ]


def _signature(kernel, constexprs):
    """Argument types as the JIT would see them for fp32 tensors: pointers *fp32 (t and seed *i64); an int seed
    i64; sizes and strides i32, except N, the batch strides and the variance-half offsets, i64 for the IDX64
    variants (>= 2^31 elements per sample)."""
    sig, attrs = {}, {}
    idx64 = bool(constexprs.get("IDX64", False))
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in ("t_ptr", "seed_ptr", "row_index_ptr") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("gamma", "vb_scale", "loss_scale", "scale", "sample_max", "eta", "sqrt_abar", "const",
                      "guidance_scale"):
            sig[name] = "fp32"
        elif name == "seed":  # an int Philox seed in [0, 2^63)
            sig[name] = "i64"
        else:
            sig[name] = "i64" if idx64 and (name.endswith(("_sb", "var_offset")) or name == "N") else "i32"
            if name.endswith("_sb") or name == "N":  # batch strides and sizes of 16-aligned samples
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_all(archs=(80, 90), num_warps=4, only=None):
    """[{kernel, arch, regs, spill_stores, spill_loads, v4_loads, streaming}] for every variant (only: those whose
    label starts with this string)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton import knobs

    from . import vb

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: kernels are interpreter objects; run with TRITON_INTERPRET unset")
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached binary would skip ptxas and its report
    rows = []
    for label, kernel, constexprs, streaming in _variants():
        if only is not None and not label.startswith(only):
            continue
        # constexpr parameters left out take their defaults (else _signature would make them runtime arguments)
        defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
        consts = {k: (tl.float32 if v == "fp32" else v) for k, v in {**defaults, **constexprs}.items()}
        sig, attrs = _signature(kernel, consts)
        warps = vb.bwd_warps(num_warps, constexprs["DO_VB"]) if kernel is vb._vb_bwd_kernel else num_warps
        for arch in archs:
            src = ASTSource(kernel, signature=sig, constexprs=consts, attrs=attrs)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            text = log.getvalue()
            regs = re.findall(r"Used (\d+) registers", text)
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            ptx = compiled.asm["ptx"]
            rows.append(dict(
                kernel=label, arch=arch, regs=int(regs[-1]) if regs else -1,
                spill_stores=int(spills[-1][0]) if spills else -1, spill_loads=int(spills[-1][1]) if spills else -1,
                v4_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)), streaming=streaming,
            ))
    return rows


def table_text(rows, arch=90) -> str:
    lines = [f"{'kernel':<36} {'regs':>5} {'spills (st/ld B)':>17} {'v4 loads':>9}   "
             f"(sm_{arch}, 4 warps (vb_bwd with the vb term: 8), BLOCK 1024)"]
    for r in rows:
        if r["arch"] == arch:
            lines.append(f"{r['kernel']:<36} {r['regs']:>5} {r['spill_stores']:>8}/{r['spill_loads']:<8} {r['v4_loads']:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.triton.aot", description=__doc__)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--only", metavar="LABEL", help="compile only the variants whose label starts with LABEL")
    args = p.parse_args(argv)
    rows = compile_all(tuple(args.arch), only=args.only)
    print(json.dumps(rows) if args.json else "\n\n".join(table_text(rows, a) for a in args.arch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
