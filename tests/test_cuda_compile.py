"""csrc/cuda compiles with nvcc for sm_80 and sm_90 without register spills, and its sm_90 SASS is shaped
for memory bandwidth (no GPU needed).

Runs where nvcc exists (CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda). One nvcc call builds both
architectures for all the checks (a module-scoped fixture; about 1.5 minutes on 2 cores); the SASS checks
read cuobjdump's disassembly of the sm_90 code (cuobjdump beside nvcc, on PATH or from the triton wheel).
`pytest -s` prints registers, stack, spills, blocks per SM, theoretical occupancy and the 128-bit
accesses per kernel.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddpm_fast._ptxas import compile_kernels, find_cuobjdump, find_nvcc, parse_sass, short

ARCHS = ("80", "90")
SASS_ARCH = "90"
needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def kernels():
    """ptxas' rows of both architectures, the sm_90 rows with their SASS memory instructions."""
    nvcc = find_nvcc()
    sass_arch = SASS_ARCH if find_cuobjdump(nvcc) else None
    rows = compile_kernels(nvcc, ARCHS, sass_arch=sass_arch)  # raises RuntimeError with nvcc's last lines
    print(f"\n{'kernel':<36} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8} "
          f"{'blocks/SM':>9} {'occupancy':>9} {'LDG.128':>7} {'STG.128':>7}")
    for r in sorted(rows, key=lambda r: (r["name"], r["arch"])):
        sass = r.get("sass", {})
        print(f"{r['name']:<36} {r['arch']:<6} {r.get('registers', -1):>4} {r.get('stack', -1):>5} "
              f"{r.get('spill_stores', -1):>8} {r.get('spill_loads', -1):>8} {r['blocks_per_sm']:>9} "
              f"{r['occupancy']:>9.3f} {sass.get('LDG.E.128', '-'):>7} {sass.get('STG.E.128', '-'):>7}")
    return rows


def _sm90(rows, kind="body"):
    return [r for r in rows if r["arch"] == f"sm_{SASS_ARCH}" and r["name"].startswith(kind)]


@needs_nvcc
def test_cuda_kernels_compile_without_spills(kernels):
    for arch in ARCHS:
        assert any(r["arch"] == f"sm_{arch}" for r in kernels), f"no kernel compiled for sm_{arch}"
    spilled = [r for r in kernels if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
    assert not spilled, f"register spills: {[(r['name'], r['arch'], r['spill_stores']) for r in spilled]}"


@needs_nvcc
def test_body_kernels_keep_three_or_more_blocks_resident_per_sm(kernels):
    """__launch_bounds__ asks ptxas for 4 blocks of 256 threads an SM (3 for TrainElem, VbElem,
    PMeanVarElem): at least 3 resident blocks (37.5% occupancy) on sm_80 and sm_90, 4 for most. The one
    exception, SolverUpdateElem (8 input streams: 64 registers of loads in flight alone), asks for 2 and must
    get them without spilling (test above)."""
    body = [r for r in kernels if r["name"].startswith("body")]
    assert body
    solver = [r for r in body if "SolverUpdateElem" in r["name"]]
    assert solver and all(r["blocks_per_sm"] >= 2 for r in solver), [(r["name"], r["registers"]) for r in solver]
    low = [(r["name"], r["arch"], r["registers"], r["blocks_per_sm"]) for r in body
           if r["blocks_per_sm"] < 3 and r not in solver]
    assert not low, f"fewer than 3 resident blocks per SM: {low}"
    others = [r for r in _sm90(kernels) if "SolverUpdateElem" not in r["name"]]
    four = [r for r in others if r["blocks_per_sm"] >= 4]
    assert len(four) >= len(others) - 3, [(r["name"], r["registers"]) for r in others]


@needs_nvcc
def test_noise_is_compiled_only_into_the_kernels_that_draw_it(kernels):
    """Philox + Box-Muller only in the `noise` instances of the bodies that can draw noise (p_sample_step,
    ddim_step, solver_update); no kernel has a stack frame (local memory), those included: their sine and
    cosine are sinpif / cospif, which need no argument reduction (cosf's gave them 32 bytes)."""
    noise = {r["name"] for r in _sm90(kernels) if r["name"].endswith(" noise")}
    assert noise == {"body PSampleElem<float> noise", "body DdimElem<float> noise",
                     "body SolverUpdateElem<float> noise"}, noise
    framed = {(r["name"], r["arch"]): r["stack"] for r in kernels if r["stack"] > 0}
    assert not framed, f"stack frames (bytes): {framed}"


@needs_nvcc
@pytest.mark.skipif(find_nvcc() is None or find_cuobjdump(find_nvcc()) is None, reason="cuobjdump not found")
def test_sm90_body_kernels_load_and_store_128_bits(kernels):
    """Every body kernel loads (LDG.E.128) and, if it writes per-element outputs, stores (STG.E.128) in
    128-bit accesses: two for 8 float32, one for 8 fp16 / bf16, next to the scalar tail / unaligned path
    (8 x STG.E.U16 for each 16-bit type, so at least one 128-bit store per 4 of those)."""
    rows = _sm90(kernels)
    assert rows and all("sass" in r for r in rows)
    for r in rows:
        sass = r["sass"]
        assert sass["LDG.E.128"] > 0 and 4 * sass["LDG.E.128"] >= sass["LDG.E.U16"], (r["name"], dict(sass))
        if sass["STG.E.U16"]:  # PriorElem writes no element outputs
            assert sass["STG.E.128"] > 0 and 4 * sass["STG.E.128"] >= sass["STG.E.U16"], (r["name"], dict(sass))
    assert sum(r["sass"]["STG.E.128"] for r in rows) > 0


def test_parse_sass_counts_memory_instructions_by_width():
    text = ("\t\tFunction : _Z1kPf\n"
            "        /*0040*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;   /* 0x0 */\n"
            "        /*0050*/               @P0 STG.E desc[UR4][R8.64+0x4], R5 ;           /* 0x0 */\n"
            "        /*0060*/                   STG.E.128 desc[UR4][R8.64], R4 ;            /* 0x0 */\n"
            "        /*0070*/                   STG.E.128.STRONG.SM desc[UR4][R8.64], R4 ;  /* 0x0 */\n"
            "        /*0080*/                   STL [R1+0x18], R6 ;                         /* 0x0 */\n"
            "\t\tFunction : _Z1gPf\n"
            "        /*0000*/                   LDG.E.U16 R3, desc[UR4][R4.64] ;            /* 0x0 */\n")
    assert parse_sass(text) == {"_Z1kPf": {"LDG.E.128": 1, "STG.E": 1, "STG.E.128": 2, "STL": 1},
                                "_Z1gPf": {"LDG.E.U16": 1}}


def test_short_kernel_names():
    ns = "void ddpm::(anonymous namespace)::"
    assert short(ns + "body_kernel<float, ddpm::TrainElem<float>, false>(ddpm::(anonymous namespace)::KArgs<float>)"
                 ) == "body TrainElem<float>"
    assert short(ns + "body_kernel<float, ddpm::PSampleElem<float>, true>(ddpm::KArgs<float>)"
                 ) == "body PSampleElem<float> noise"
    assert short(ns + "finish_kernel<float, ddpm::VbElem<float> >(ddpm::KArgs<float>, long)") == "finish VbElem<float>"


@pytest.mark.skipif(find_nvcc() is None or torch.version.cuda is None, reason="needs nvcc and a CUDA build of torch")
def test_cuda_extension_builds_links_and_loads(tmp_path):
    """The whole CPU + CUDA extension (ops, autograd, CPU and CUDA kernels) builds as on a GPU machine,
    links against the toolkit ddpm_fast._build.cuda_home() finds, and imports as the extension module; its CPU
    ops run, through torch.ops and through the module's direct bindings (a few minutes: the CUDA kernels for
    both architectures)."""
    from ddpm_fast import _build

    env = dict(os.environ)
    env.pop("CUDA_HOME", None)  # as a GPU machine may be: the toolkit found from nvcc on PATH
    code = (
        "import torch; from pathlib import Path; import ddpm_fast as F; from ddpm_fast import _build, reference\n"
        f"d = Path({str(tmp_path)!r}); module = _build._build(True, ['80', '90'], d)\n"
        "s = F.NoiseSchedule.named('linear', 1000); x0, n, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 999])\n"
        "torch.testing.assert_close(torch.ops.ddpm_fast.q_sample(x0, t, n, s.table()), reference.q_sample(x0, t, n, s))\n"
        "assert torch.equal(module.q_sample(x0, t, n, s.table()), torch.ops.ddpm_fast.q_sample(x0, t, n, s.table()))\n"
        "print('ran')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0 and "ran" in out.stdout, _build._excerpt(out.stdout + out.stderr)
