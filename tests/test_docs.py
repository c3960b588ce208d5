"""Every public op's docstring documents each of its arguments, its return value and has an example
(the examples themselves run as doctests: pyproject.toml's testpaths include ddpm_fast/ops/ and ddpm_fast/solvers/)."""
import inspect
import re

import pytest

import ddpm_fast
from ddpm_fast import ops


@pytest.mark.parametrize("name", ops.__all__)
def test_public_op_docstring_is_complete(name):
    fn = getattr(ops, name)
    assert getattr(ddpm_fast, name) is fn
    doc = inspect.getdoc(fn)
    assert doc and "Args:" in doc and "Returns:" in doc and "Example:" in doc, name
    args = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
    documented = set(re.findall(r"^ {4}(\w+(?:, \w+)*):", args, re.M))
    documented = {n for entry in documented for n in entry.split(", ")}
    params = set(inspect.signature(fn).parameters)
    assert params <= documented, f"{name}: undocumented {sorted(params - documented)}"
    assert ">>> " in doc.split("Example:", 1)[1]


def test_simple_loss_needs_no_options():
    """training_losses defaults to the simple DDPM loss, as the class API does."""
    sig = inspect.signature(ops.training_losses).parameters
    assert (sig["mean_type"].default, sig["var_type"].default, sig["loss_type"].default) == (
        "epsilon", "fixed_small", "mse")
