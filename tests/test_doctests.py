"""The examples (``>>>``) in the package's docstrings run and show what they say."""

from __future__ import annotations

import collections
import doctest
import importlib
import inspect
import io
import operator
import os
import pkgutil
import re
import sys
import textwrap
import types

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


# The async API's examples (an ``Example::`` block of awaited code): those that need
# nothing but a cluster run as written, inside ``local_cluster(2)`` on the test's loop
# (those that open a cluster themselves, without one), with the modules they use
# imported, and each ``print(...)  # shown`` line prints what its comment shows (up to
# a comment's explanation in brackets; PORT is any port). The others are fragments
# with names of the reader's program (``forward``, ``w1_ref``, ``ctx``, a script's env).
ASYNC_EXAMPLES = {
    "ag.RRef": ag.RRef,
    "ag.RRef.is_owner": ag.RRef.is_owner,
    "ag.RRef.local_value": ag.RRef.local_value,
    "ag.RRef.remote": ag.RRef.remote,
    "ag.RRef.rpc": ag.RRef.rpc,
    "ag.RRef.to_here": ag.RRef.to_here,
    "ag.RemoteError": ag.RemoteError,
    "ag.remote": ag.remote,
    "ag.rpc": ag.rpc,
    "ag.worker_name": ag.worker_name,
    "ag.workers": ag.workers,
    "ag.wait_for_workers": ag.wait_for_workers,
    "ag.dist.debug_info": ag.dist.debug_info,
    "ag.dist.context": ag.dist.context,
    "ag.dist.backward": ag.dist.backward,
    "ag.local_cluster": ag.local_cluster,
}


# (examples that print nothing they show: they run, and their asserts hold)
UNCHECKED = {
    "ag.RRef.is_owner",
    "ag.RRef.local_value",
    "ag.RemoteError",
    "ag.worker_name",
    "ag.workers",
    "ag.dist.debug_info",
}


def _example_code(obj: object) -> str:
    """The indented block after the first ``Example::`` of ``obj``'s docstring."""
    doc = inspect.getdoc(obj) or ""
    assert "Example::" in doc, "no Example:: block"
    lines = doc.split("Example::", 1)[1].splitlines()[1:]
    block: list[str] = []
    for line in lines:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip("\n")


def _shown(expected: str, printed: str) -> bool:
    expected = re.sub(r"\s+\(.*\)$", "", expected)  # (an explanation)
    pattern = re.escape(expected).replace("PORT", r"\d+")
    return re.fullmatch(pattern, printed) is not None


def _as_test(code: str) -> tuple[str, str, int]:
    """(module-level definitions, ``async def example(out, shows)`` with the rest, the
    number of checks): each ``print(...)  # shown`` prints into ``out`` and checks
    with ``shows``."""
    defs: list[str] = []
    body: list[str] = []
    in_def = False
    checks = 0
    for line in code.splitlines():
        if line.startswith("def "):
            in_def = True
        elif line.strip() and not line.startswith(" "):
            in_def = False
        if in_def:
            defs.append(line)
            continue
        call, sep, comment = line.rpartition("  # ")
        if sep and call.strip().startswith("print(") and call.rstrip().endswith(")"):
            line = f"{call.rstrip()[:-1]}, file=out); shows({comment.strip()!r})"
            checks += 1
        body.append(line)
    example = "\n".join(["async def example(out, shows):", *("    " + b for b in body)])
    return "\n".join(defs), example, checks


@pytest.mark.parametrize("label", ASYNC_EXAMPLES)
async def test_async_examples_run_and_print_what_they_show(label: str) -> None:
    code = _example_code(ASYNC_EXAMPLES[label])
    defs, body, checks = _as_test(code)
    # (the functions it defines are module-level, found by name as the workers need)
    module = types.ModuleType(f"_example_{label.replace('.', '_')}")
    module.__dict__.update(ag=ag, np=np, os=os, operator=operator, collections=collections)
    sys.modules[module.__name__] = module
    try:
        exec(compile(defs + "\n" + body, label, "exec"), module.__dict__)
        out = io.StringIO()
        checked: list[str] = []

        def shows(expected: str) -> None:
            printed = out.getvalue().splitlines()[-1]
            assert _shown(expected, printed), (
                f"{label} printed {printed!r}, its comment shows {expected!r}"
            )
            checked.append(expected)

        if code.startswith("async with ag.local_cluster"):
            await module.example(out, shows)
        else:
            async with ag.local_cluster(2):
                await module.example(out, shows)
        assert len(checked) == checks, out.getvalue()
        assert checks > 0 or label in UNCHECKED, f"{label} shows no output to check"
    finally:
        del sys.modules[module.__name__]
