"""The examples (``>>>``) in the package's docstrings run and show what they say."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import actorgrad as ag


def _has_examples(name: str) -> bool:
    return any(t.examples for t in doctest.DocTestFinder().find(importlib.import_module(name)))


# (only the modules with examples: one without could only fail to import)
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(ag.__path__, "actorgrad.")
    if m.name != "actorgrad.__main__" and _has_examples(m.name)
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs={"ag": ag}, optionflags=doctest.ELLIPSIS, report=False
    )
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def _public_objects() -> list[tuple[str, object]]:
    """The public API's non-module names: ``ag.__all__``, then the ``__all__`` of
    ``ag.dist``, ``ag.nn``, ``ag.nn.functional`` and ``ag.optim``, as dotted names."""
    objs = [(f"ag.{n}", getattr(ag, n)) for n in ag.__all__ if not inspect.ismodule(getattr(ag, n))]
    for mod, label in (
        (ag.dist, "ag.dist"),
        (ag.nn, "ag.nn"),
        (ag.nn.functional, "ag.nn.functional"),
        (ag.optim, "ag.optim"),
    ):
        objs += [
            (f"{label}.{n}", getattr(mod, n))
            for n in getattr(mod, "__all__", [])
            if not inspect.ismodule(getattr(mod, n))
        ]
    return objs


PUBLIC_OBJECTS = _public_objects()


@pytest.mark.parametrize(("label", "obj"), PUBLIC_OBJECTS, ids=[n for n, _ in PUBLIC_OBJECTS])
def test_public_docstring_examples_run_with_only_ag_and_np(label: str, obj: object) -> None:
    """Each public object's examples (its methods' included) run as a user would type
    them after ``import actorgrad as ag; import numpy as np``: no name of the defining
    module, no variable of another docstring."""
    failed = attempted = 0
    report: list[str] = []
    for test in doctest.DocTestFinder().find(obj, label, globs={}):
        test.globs = {"ag": ag, "np": np}
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        result = runner.run(test, out=report.append)
        failed += result.failed
        attempted += result.attempted
    assert failed == 0, (
        f"{failed} of {attempted} examples failed in {label} with only ag and np as "
        "globals:\n" + "".join(report)
    )
    if attempted == 0:  # (the async API's examples are shown in an Example:: block, not run)
        assert "Example" in (inspect.getdoc(obj) or ""), f"{label} has no example"
