"""Drivers without a script file: ``python -c``, a script read from stdin, code typed
at a prompt (``python -i``). Their functions cannot be imported by a worker process,
but in-process workers run them; a process worker's call is refused at once, saying
what to do. And drivers whose script file Python hides: ``python -i script.py`` once
the script ran, a zip archive (``python app.pyz``). Each driver is a real interpreter
in a subprocess (what it runs as ``__main__`` is the point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import actorgrad as ag

REPO = str(Path(__file__).resolve().parent.parent)

# The driver: functions and a class of its own (its __main__), used on in-process
# workers (rpc, remote and an RRef's method, a distributed backward; a function
# defined anew runs as defined anew) and on a worker process (refused at the caller).
DRIVER = textwrap.dedent(
    """
    import asyncio, json, time
    import actorgrad as ag

    def scale(x, w):
        return (x * w).tanh()

    class Acc:
        def __init__(self):
            self.n = 0
        def add(self, k):
            self.n += k
            return self.n

    def version():
        return 1

    async def in_process():
        global version
        async with ag.local_cluster(1):
            x = ag.tensor([1.0, 2.0], requires_grad=True)
            w = ag.tensor([0.5, -0.5], requires_grad=True)
            async with ag.dist.context() as ctx:
                y = await ag.rpc("w1", scale, (x, w))
                await ag.dist.backward(ctx, [y.sum()])
                grad = [round(float(g), 4) for g in ag.dist.get_gradients(ctx)[w]]
            acc = await ag.remote("w1", Acc)
            await acc.rpc().add(3)
            first = await ag.rpc("w1", version)
            def version():
                return 2
            return [grad, await acc.rpc().add(4), first, await ag.rpc("w1", version)]

    async def in_a_process():
        async with ag.local_cluster(1, processes=True):
            out = []
            for fn in (scale, Acc):
                t0 = time.monotonic()
                try:
                    await ag.remote("w1", fn, (1, 2) if fn is scale else ())
                except TypeError as exc:
                    out.append([str(exc), time.monotonic() - t0])
            return out

    print(json.dumps([asyncio.run(in_process()), asyncio.run(in_a_process())]))
    """
)


def _check(stdout: str) -> None:
    local, procs = json.loads(stdout.strip().splitlines()[-1])
    grad, total, first, second = local
    assert grad == [0.7864, 0.8399]
    assert total == 7
    assert (first, second) == (1, 2)  # the function defined anew, not the first one
    assert [m.split(":")[0] for m, _ in procs] == [
        "cannot call 'scale' on worker 'w1'",
        "cannot call 'Acc' on worker 'w1'",
    ]
    for message, took in procs:
        assert "defined interactively" in message
        assert "Put it in a module" in message
        assert took < 1.0  # (refused by the caller, not after a worker's import)


def _run(args: list[str], stdin: str | None = None) -> str:
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_functions_of_python_c_run_on_in_process_workers_and_are_refused_for_processes(
    tmp_path,
):
    _check(_run(["-c", DRIVER]))


def test_functions_of_a_script_read_from_stdin_are_named_as_interactive(tmp_path):
    # (its __file__ is "<stdin>": a worker process was told to copy "<stdin>" to its disk)
    _check(_run(["-"], stdin=DRIVER))


def test_functions_typed_at_the_prompt_of_python_i_are_named_as_interactive(tmp_path):
    # (`python -i script.py`: Python drops __main__.__file__ once the script ran)
    script = tmp_path / "script.py"
    script.write_text("X = 1\n")
    stdout = _run(["-i", str(script)], stdin=_for_prompt(DRIVER))
    _check(stdout.replace(">>> ", "").replace("... ", ""))


def _for_prompt(code: str) -> str:
    """``code`` as typed at Python's prompt: a blank line after each top-level compound
    statement, none inside one."""
    lines: list[str] = []
    for line in code.splitlines():
        if not line.strip():
            continue
        if lines and not line[0].isspace() and lines[-1][:1].isspace():
            lines.append("")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _one_line_each(code: str) -> str:
    """``code`` with each top-level compound statement made one line that runs it in
    the namespace it is typed in, compiled from ``"<stdin>"``."""
    out: list[str] = []
    block: list[str] = []

    def close() -> None:
        if len(block) > 1:
            out.append(f"exec(compile({chr(10).join(block)!r}, '<stdin>', 'exec'))")
        else:
            out.extend(block)
        block.clear()

    for line in code.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            close()
        block.append(line)
    close()
    return "\n".join(out) + "\n"


def test_functions_typed_at_the_asyncio_repl_are_named_as_interactive():
    # (`python -m asyncio`: its __main__ is asyncio's, with a file, and what is typed
    # lives in a namespace of its own: "'__main__' has no attribute 'scale'", from the
    # worker, in-process too)
    typed = DRIVER.replace("asyncio.run(in_process())", "await in_process()")
    typed = typed.replace("asyncio.run(in_a_process())", "await in_a_process()")
    if sys.version_info >= (3, 13):
        # (its basic REPL, which a piped stdin gets, takes each line for a whole
        # statement from 3.13 on: CPython gh-140013. Each compound statement is typed
        # as one line then, compiled as typed code is, from "<stdin>")
        typed = _one_line_each(typed)
    stdout = _run(["-m", "asyncio"], stdin=_for_prompt(typed))
    _check(stdout.replace(">>> ", "").replace("... ", ""))


async def test_a_module_reloaded_runs_as_reloaded_on_in_process_workers(tmp_path, monkeypatch):
    # (importlib.reload in a notebook, an edited function: the in-process worker ran
    # the first version it had resolved, silently)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "reloaded_mod.py"
    source.write_text("def version():\n    return 1\n")
    import importlib

    import reloaded_mod  # type: ignore[import-not-found]

    try:
        async with ag.local_cluster(1):
            assert await ag.rpc("w1", reloaded_mod.version) == 1
            source.write_text("def version():\n    return 22\n")  # (another size)
            importlib.reload(reloaded_mod)
            assert await ag.rpc("w1", reloaded_mod.version) == 22
            assert await ag.rpc("w1", "reloaded_mod:version") == 22
    finally:
        sys.modules.pop("reloaded_mod", None)


# `python -i script.py`: the script's own functions, named by the file their code came
# from, run on a worker process after the script ran (Python drops __main__.__file__
# then: every call was refused as "defined interactively"); those typed at the prompt
# (new, or one of the script's defined anew) are refused at the caller, by a function
# or by its "__main__:name", while in-process workers run them as typed.
SCRIPT_FOR_PROMPT = textwrap.dedent(
    """
    import asyncio, json
    import actorgrad as ag
    from beside import twice

    print("top level of", __name__, flush=True)

    def scale(x, k):
        return x * k

    class Acc:
        def __init__(self):
            self.n = 0
        def add(self, k):
            self.n += k
            return self.n

    def version():
        return 1

    async def run(calls, processes=True):
        out = []
        async with ag.local_cluster(1, processes=processes):
            for fn, args in calls:
                try:
                    out.append(await ag.rpc("w1", fn, args))
                except Exception as exc:
                    out.append(f"{type(exc).__name__} {str(exc).split(':')[0]}")
            if processes:
                acc = await ag.remote("w1", Acc)
                await acc.rpc().add(3)
                out.append(await acc.rpc().add(4))
        return out
    """
)

TYPED_AT_THE_PROMPT = textwrap.dedent(
    """
    def typed():
        return 3

    def version():
        return 2

    calls = [(scale, (3, 4)), ("__main__:scale", (2, 5)), (twice, (6,)), (typed, ())]
    calls += [(version, ()), ("__main__:version", ()), ("__main__:typed", ())]
    print("RESULT", json.dumps([asyncio.run(run(calls)), asyncio.run(run(calls, False))]))
    """
)


def test_the_functions_of_the_script_of_python_i_run_on_process_workers(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT_FOR_PROMPT)
    (tmp_path / "beside.py").write_text("def twice(x):\n    return 2 * x\n")
    stdout = _run(["-i", str(tmp_path / "script.py")], stdin=_for_prompt(TYPED_AT_THE_PROMPT))
    lines = stdout.replace(">>> ", "").replace("... ", "").splitlines()
    procs, local = json.loads(next(x for x in lines if x.startswith("RESULT "))[7:])
    typed, version = (f"TypeError cannot call {q!r} on worker 'w1'" for q in ("typed", "version"))
    assert procs == [12, 10, 12, typed, version, version, typed, 7]
    assert local == [12, 10, 12, 3, 2, 2, 3]  # (as typed)
    # (the worker imported the script once, without its main block)
    assert lines.count("[w1] top level of __mp_main__") == 1


# Classes of the script with no function of their own compiled from it (a dataclass's
# come from "<string>", an Enum or a class of attributes has none): the script's if it
# defines a class of that name with the same names in its body. They were all taken
# for the prompt's and refused.
SCRIPT_OF_CLASSES = textwrap.dedent(
    """
    import asyncio, dataclasses, enum, json
    import actorgrad as ag

    @dataclasses.dataclass
    class Point:
        x: int
        y: int = 5

    class Mode(int, enum.Enum):
        SLOW = 1
        FAST = 2

    class Limits:
        top = 7

    class Shape:
        @property
        def area(self):
            return 12

    if __name__ == "__main__":  # (a worker importing the script would not find it)
        class Guarded:
            top = 3

    def attr(ref, name):
        return getattr(ref.local_value(), name)

    async def run(typed):
        out = []
        async with ag.local_cluster(1, processes=True):
            p = await ag.remote("w1", Point, (1,))
            out.append([await ag.rpc("w1", attr, (p, "x")), await ag.rpc("w1", attr, (p, "y"))])
            out.append(await ag.rpc("w1", Mode, (2,)))
            out.append(await ag.rpc("w1", attr, (await ag.remote("w1", Shape), "area")))
            for cls in [Limits, *typed]:
                try:
                    out.append(await ag.rpc("w1", attr, (await ag.remote("w1", cls), "top")))
                except TypeError as exc:
                    out.append(str(exc).split(". Put it")[0])
        return out
    """
)

CLASSES_TYPED_AT_THE_PROMPT = textwrap.dedent(
    """
    class Typed:
        top = 1

    print("RESULT", json.dumps(asyncio.run(run([Typed, Guarded]))))

    class Limits:
        top = 8
        low = 0

    print("RESULT", json.dumps(asyncio.run(run([]))))
    """
)


def test_classes_of_the_script_of_python_i_without_functions_of_their_own_run_on_workers(
    tmp_path,
):
    (tmp_path / "script.py").write_text(SCRIPT_OF_CLASSES)
    stdin = _for_prompt(CLASSES_TYPED_AT_THE_PROMPT)
    stdout = _run(["-i", str(tmp_path / "script.py")], stdin=stdin)
    lines = stdout.replace(">>> ", "").replace("... ", "").splitlines()
    first, second = (json.loads(x[7:]) for x in lines if x.startswith("RESULT "))
    script = [[1, 5], 2, 12]
    refused = (
        "cannot call {!r} on worker 'w1': it was defined interactively in the driver (at "
        "the prompt of python -i; a class with no function of its own written in the "
        "script is the script's only where the script's top level defines a class of "
        "that name with the same public names in its body), where no file holds it, so "
        "a worker process cannot import it"
    ).format
    # (Guarded: the script's, but not at its top level; its message says why it is not)
    assert first == [*script, 7, refused("Typed"), refused("Guarded")]
    # (Limits defined anew at the prompt, with other names in its body: the prompt's)
    assert second == [*script, refused("Limits")]


def test_a_script_that_does_not_parse_is_parsed_once_per_version(tmp_path, monkeypatch):
    # What the script says of its classes is read from its file, once per version of
    # it: one that does not parse too (it was parsed again at each call naming one of
    # its classes), and one nested too deeply for the parser (its MemoryError went up
    # to the call) defines no class.
    from actorgrad.runtime import calls

    parsed: list[str] = []
    parse = calls.ast.parse

    def counted(source, *args, **kwargs):
        parsed.append(args[0])
        return parse(source, *args, **kwargs)

    monkeypatch.setattr(calls.ast, "parse", counted)
    script = tmp_path / "script.py"
    script.write_text("class Limits:\n    top = 7\n\nclass Broken(:\n")
    path = str(script)
    assert [calls._script_class(path, "Limits") for _ in range(3)] == [None] * 3
    assert parsed == [path]
    script.write_text("class Limits:\n    top = 7\n    low = 0\n")  # (a new size)
    assert calls._script_class(path, "Limits") == frozenset({"top", "low"})
    assert calls._script_class(path, "Limits") == frozenset({"top", "low"})
    assert parsed == [path, path]
    script.write_text("class Limits:\n    top = 7\n\nx = " + "-" * 200_000 + "1\n")
    assert [calls._script_class(path, "Limits") for _ in range(2)] == [None] * 2
    assert parsed == [path] * 3


# A driver run from a zip archive (`python app.pyz`, made with zipapp): a worker
# process loads its __main__.py from the archive, with the archive first on its path,
# so the modules in it import too. (The worker was sent to look for app.pyz/__main__.py
# on its disk: every function of the driver was refused as "defined interactively".)
# A folder holding __main__.py (`python app`) runs as a script of that folder.
ZIPPED_MAIN = textwrap.dedent(
    """
    import asyncio, json
    import actorgrad as ag
    from helper import twice, Counter

    print("top level of", __name__, flush=True)

    def scale(x, k):
        return twice(x) * k

    async def main():
        async with ag.local_cluster(1, processes=True):
            out = [await ag.rpc("w1", scale, (3, 4)), await ag.rpc("w1", "__main__:scale", (1, 5))]
            out.append(await ag.rpc("w1", twice, (7,)))
            counter = await ag.remote("w1", Counter)
            await counter.rpc().add(2)
            out.append(await counter.rpc().add(5))
            out.append(await ag.rpc("w1", where))
        print("RESULT", json.dumps(out), flush=True)

    def where():
        import helper, sys
        return [__name__, sys.path[0] == ARCHIVE, helper.__file__.startswith(ARCHIVE)]

    ARCHIVE = __file__.rpartition("/")[0]

    if __name__ == "__main__":
        asyncio.run(main())
    """
)
HELPER = "def twice(x):\n    return 2 * x\n\nclass Counter:\n    n = 0\n    def add(self, k):\n        self.n += k\n        return self.n\n"


@pytest.mark.parametrize("packed", ["pyz", "zip", "folder"])
def test_a_driver_run_from_a_zip_archive_or_a_folder_runs_on_process_workers(tmp_path, packed):
    import zipapp

    src = tmp_path / "app"
    src.mkdir()
    (src / "__main__.py").write_text(ZIPPED_MAIN)
    (src / "helper.py").write_text(HELPER)
    target = src
    if packed == "pyz":  # (with a shebang line before the archive)
        target = tmp_path / "app.pyz"
        zipapp.create_archive(src, target, interpreter=sys.executable)
    elif packed == "zip":
        target = tmp_path / "app.zip"
        with zipfile.ZipFile(target, "w") as z:
            for f in src.iterdir():
                z.write(f, f.name)
    lines = _run([str(target)]).splitlines()
    result = json.loads(next(x for x in lines if x.startswith("RESULT "))[7:])
    assert result == [24, 10, 14, 7, ["__mp_main__", True, True]]
    assert lines.count("[w1] top level of __mp_main__") == 1


async def test_a_zipped_driver_rebuilt_between_runs_is_loaded_anew_and_keeps_its_modules(
    tmp_path, monkeypatch
):
    # (a cluster outliving its runs: the archive's size or time says the script and the
    # modules in it changed, as a script's file does; and a module of another archive
    # is refused, as one of another script's folder is)
    import zipapp

    monkeypatch.setenv("PYTHONPATH", REPO)
    src, archive = tmp_path / "app", tmp_path / "app.pyz"
    src.mkdir()
    main = str(archive / "__main__.py")

    def build(version: int) -> None:
        (src / "__main__.py").write_text(f"import helper\n\ndef f():\n    return {version}\n")
        (src / "helper.py").write_text(f"def g():\n    return {'x' * version!r}\n")
        zipapp.create_archive(src, archive)
        os.utime(archive, ns=(version * 10**9, version * 10**9))

    build(1)
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["helper:g", main, "s1"]) == "x"
        build(22)
        assert await ag.rpc("w1", ["helper:g", main, "s2"]) == "x" * 22
        assert await ag.rpc("w1", ["__main__:f", main, "s2"]) == 22
        build(3)
        assert await ag.rpc("w1", ["__main__:f", main, "s3"]) == 3
        assert await ag.rpc("w1", ["helper:g", main, "s3"]) == "xxx"
        assert await ag.rpc("w1", ["__main__:f", main, "s2"]) == 22  # (a run keeps its code)
        # (another archive's module of that name: the worker would run this one's)
        zipapp.create_archive(src, tmp_path / "other.pyz")
        other = str(tmp_path / "other.pyz" / "__main__.py")
        with pytest.raises(ag.RemoteError, match="holds 'helper.py', but this worker already"):
            await ag.rpc("w1", ["__main__:f", other, "s4"])
