"""ddpm_fast/triton/_math.py mirrors csrc/ddpm_math.h function for function, and the Triton kernels write
no formula of their own.

The rule (see _math.py's docstring): every public @triton.jit helper of _math.py has the name of a
function of ddpm_math.h, in the header's order; every header function has one, except those listed in
_math.NOT_MIRRORED (each with its reason); Triton-only helpers start with an underscore. Parsed from the
source files (no Triton import needed for the header side).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "ddpm_math.h"
MATH = ROOT / "ddpm_fast" / "triton" / "_math.py"
KERNEL_FILES = [ROOT / "ddpm_fast" / "triton" / f"{name}.py"
                for name in ("noising", "posterior", "vb", "sampler", "solvers")]

# a namespace-level function definition: optional template line, then DDPM_HD / inline (not indented, so the
# static members of the Prim<> structs do not count), return type, name, "("
_CPP_FUNCTION = re.compile(
    r"^(?:template\s*<[^>]*>\s*)?(?:DDPM_HD|inline\s+constexpr|inline)\s+[\w:*&<> ]*?\b(\w+)\s*\(", re.M)


def header_functions(text: str) -> list:
    """Names of the namespace-level functions of a ddpm_math.h text, in order (comments stripped)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return _CPP_FUNCTION.findall(text)


def _is_jit(node: ast.FunctionDef) -> bool:
    return any(ast.unparse(d) in ("triton.jit", "jit") for d in node.decorator_list)


def jit_functions(text: str) -> list:
    """Names of the module-level @triton.jit functions of a Python source text, in order."""
    return [n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and _is_jit(n)]


def not_mirrored(text: str) -> dict:
    """The NOT_MIRRORED dict literal of a _math.py source text."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["NOT_MIRRORED"]:
            return ast.literal_eval(node.value)
    raise AssertionError("_math.py defines no NOT_MIRRORED")


def mirror_problems(header_text: str, math_text: str) -> list:
    """Every way math_text breaks the mirror of header_text (empty: it holds)."""
    cpp = header_functions(header_text)
    jit = jit_functions(math_text)
    public = [name for name in jit if not name.startswith("_")]
    skipped = not_mirrored(math_text)
    problems = []
    for name, why in skipped.items():
        if name not in cpp:
            problems.append(f"NOT_MIRRORED lists {name!r}, which ddpm_math.h does not define")
        if name in jit:
            problems.append(f"NOT_MIRRORED lists {name!r}, which _math.py defines")
        if not (isinstance(why, str) and why.strip()):
            problems.append(f"NOT_MIRRORED[{name!r}] gives no reason")
    if len(set(jit)) != len(jit):
        problems.append(f"_math.py defines a helper twice: {sorted(n for n in jit if jit.count(n) > 1)}")
    expected = [name for name in cpp if name not in skipped]
    if public != expected:
        extra = [n for n in public if n not in expected]
        missing = [n for n in expected if n not in public]
        problems.append(f"public helpers {public} != ddpm_math.h's functions {expected} "
                        f"(not in the header: {extra}; missing: {missing}; else the order differs)")
    return problems


def test_header_parser_sees_the_math():
    names = header_functions(HEADER.read_text())
    # a few anchors, so that a parser that finds nothing (or the Prim members) fails here, not vacuously below
    for name in ("q_sample", "predict_xstart", "normal_kl", "discretized_gaussian_loglik", "ddim_sample"):
        assert name in names
    assert "exp" not in names and "select" not in names  # Prim<> members are not formulas


def test_triton_math_mirrors_ddpm_math_h():
    assert mirror_problems(HEADER.read_text(), MATH.read_text()) == []


HEADER_SAMPLE = """
namespace ddpm {
template <class V> struct Prim;
template <> struct Prim<float> {
  static DDPM_HD float exp(float x) { return ::expf(x); }
};
inline constexpr bool is_learned(int64_t v) { return v >= 2; }
// a comment naming DDPM_HD V commented_out(
template <class V> DDPM_HD V alpha(V x) { return x; }
template <class V>
DDPM_HD V beta(V x, V y) { return x + y; }
DDPM_HD uint32_t gamma(uint32_t a) { return a; }
}
"""

MATH_SAMPLE = '''
import triton
NOT_MIRRORED = {"is_learned": "a constexpr test"}

@triton.jit
def _load(p):
    return p

@triton.jit
def alpha(x):
    return x

def not_jit(x):
    return x

@triton.jit
def beta(x, y):
    return x + y

@triton.jit
def gamma(a):
    return a
'''


def test_mirror_check_accepts_a_mirror():
    assert header_functions(HEADER_SAMPLE) == ["is_learned", "alpha", "beta", "gamma"]
    assert mirror_problems(HEADER_SAMPLE, MATH_SAMPLE) == []


@pytest.mark.parametrize("broken", [
    MATH_SAMPLE.replace("def beta(", "def beta_renamed("),  # a renamed helper
    MATH_SAMPLE.replace("def _load(", "def load("),  # a Triton-only helper without its underscore
    MATH_SAMPLE.replace("def gamma(", "def _gamma("),  # a missing mirror
    MATH_SAMPLE.replace('"is_learned": "a constexpr test"', '"is_learned": ""'),  # a skip without a reason
    MATH_SAMPLE.replace('"is_learned"', '"is_gone"'),  # a skip the header does not have
    MATH_SAMPLE.replace("@triton.jit\ndef alpha(x):\n    return x\n", "") + "\n@triton.jit\ndef alpha(x):\n"
    "    return x\n",  # the wrong order
])
def test_mirror_check_rejects(broken):
    assert mirror_problems(HEADER_SAMPLE, broken)


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.stem)
def test_kernels_define_no_math_helpers(path):
    """The kernel modules' @triton.jit functions are kernels (named *_kernel) only: every per-element helper
    lives in _math.py, so a formula cannot be written a second time beside a kernel."""
    helpers = [name for name in jit_functions(path.read_text()) if not name.endswith("_kernel")]
    assert helpers == []


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.stem)
def test_kernels_take_ddim_and_clip_math_from_math_module(path):
    """The inline copies this file once held (DDIM eps weight / re-derived eps, the [-1, 1] clip, the v
    target) are calls into _math.py: none of their expressions appears in a kernel module."""
    text = path.read_text()
    for pattern in (r"1\.0 - eta \* eta", r"tl\.maximum\(\w+, -1\.0\), 1\.0\)", r"/ \(s1m \* s1m\)",
                    r"SQRT_ABAR\) \* xn"):
        assert not re.search(pattern, text), pattern
