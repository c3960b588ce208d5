"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without a GPU: no register spills, and
128-bit global loads (ld.global.v4) in the streaming kernels for fp32 contiguous inputs.

The conftest switches the Triton interpreter on (TRITON_INTERPRET=1), under which @triton.jit yields
interpreter objects that triton.compile cannot take, so the compile runs in a subprocess without it.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ddpm_fast.triton.aot", "--arch", "80", "90", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_refuses_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from ddpm_fast.triton import aot

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_all((90,))


def test_every_kernel_compiles_for_both_targets(rows):
    from ddpm_fast.triton import aot

    labels = {label for label, *_ in aot._variants()}
    for arch in (80, 90):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == labels
    # every @triton.jit kernel of the package is in the list
    from ddpm_fast.triton import noising, posterior, sampler, solvers, vb

    kernels = {id(k) for _, k, *_ in aot._variants()}
    for mod in (noising, posterior, sampler, solvers, vb):
        for name, obj in vars(mod).items():
            if name.endswith("_kernel"):
                assert id(obj) in kernels, f"{mod.__name__}.{name} is not compiled ahead of time"


def test_no_spills_and_registers_reported(rows):
    for r in rows:
        assert r["regs"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    from ddpm_fast.triton.aot import table_text

    print("\n" + table_text(rows, 90))


def test_streaming_kernels_use_128_bit_loads(rows):
    for r in rows:
        if r["streaming"]:
            assert r["v4_loads"] > 0, f"{r['kernel']} (sm_{r['arch']}) issues no ld.global.v4"
