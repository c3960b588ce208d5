"""ddpm_fast.options is the one source of option ids: the C++ enums must say the same.

Each enum of options.CPP_ENUMS (`enum Name : int { kA = 0, kB, ... };`) is looked up in whichever csrc/*.h
header defines it; its enumerators (implicit values counted as C++ does) must be the option values in id
order, named k + the value in CamelCase; the table columns (Col) are compared by position and count.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ddpm_fast import options, reference, schedule
from ddpm_fast.triton import _runtime

CSRC = Path(__file__).resolve().parents[1] / "csrc"
ENUM = re.compile(r"\benum\s+(\w+)\s*:\s*int\s*\{(.*?)\}\s*;", re.S)


def parse_enums(text: str) -> dict:
    """{enum name: [(enumerator, value), ...]} of every `enum Name : int { ... };` in C++ ``text``."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    enums = {}
    for name, body in ENUM.findall(text):
        items, value = [], -1
        for entry in filter(None, (e.strip() for e in body.split(","))):
            ident, _, explicit = (part.strip() for part in entry.partition("="))
            value = int(explicit, 0) if explicit else value + 1
            items.append((ident, value))
        enums[name] = items
    return enums


def csrc_enums() -> dict:
    found = {}
    for header in sorted(CSRC.rglob("*.h")):
        for name, items in parse_enums(header.read_text()).items():
            found.setdefault(name, (header, items))
    return found


def test_parser_counts_implicit_values_and_skips_comments():
    parsed = parse_enums("enum A : int { kX = 0, kY, // a comment\n kZ = 5, kW };\nenum class B { kQ };")
    assert parsed == {"A": [("kX", 0), ("kY", 1), ("kZ", 5), ("kW", 6)]}


@pytest.mark.parametrize("enum", sorted(options.CPP_ENUMS))
def test_cpp_enum_matches_options(enum):
    found = csrc_enums()
    assert enum in found, f"no csrc/*.h defines `enum {enum} : int {{ ... }};` (options.CPP_ENUMS expects it)"
    header, items = found[enum]
    values = options.CPP_ENUMS[enum]
    if enum == "Col":  # abbreviated names: by position, plus the kNumCols count at the end
        assert [v for _, v in items] == list(range(len(values) + 1)), f"{header}: Col ids are not 0..n"
        assert items[-1] == ("kNumCols", len(values)), f"{header}: kNumCols != len(options.COLUMNS)"
        return
    want = [(options.cpp_enumerator(v), i) for i, v in enumerate(values)]
    assert items == want, f"{header}: enum {enum} {items} != options {want}"


def test_the_other_modules_take_their_options_from_options():
    assert reference.MEAN_TYPES is options.MEAN_TYPES and reference.VAR_TYPES is options.VAR_TYPES
    assert reference.LOSS_TYPES is options.LOSS_TYPES and reference.WEIGHTINGS is options.WEIGHTINGS
    assert schedule.COLUMNS is options.COLUMNS and schedule.COLUMN is options.COLUMN
    assert _runtime.MEAN_IDS is options.MEAN_IDS and _runtime.VAR_IDS is options.VAR_IDS
    assert _runtime.LEARNED == tuple(options.VAR_IDS[v] for v in options.LEARNED_VAR_TYPES)


def test_describe_and_check():
    assert options.describe("weighting").startswith('"simple" (default, 1), "elbo" (')
    assert options.check("var_type", "learned") == "learned"
    with pytest.raises(ValueError, match="loss_type: unknown 'l1'"):
        options.check("loss_type", "l1")
