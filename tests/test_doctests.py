"""The examples (``>>>``) in the package's docstrings run and show what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import actorgrad as ag

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(ag.__path__, "actorgrad.")
    if m.name != "actorgrad.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs={"ag": ag}, optionflags=doctest.ELLIPSIS, report=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
