"""The typing surface users see: the package ships its annotations (PEP 561), and
typed user programs check clean under ``mypy --strict`` against it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import actorgrad

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(actorgrad.__file__).resolve().parent


def _setuptools_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("setuptools") is None:
        return None
    version = importlib.metadata.version("setuptools")
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def test_py_typed_marker_is_in_the_package_and_declared():
    # (without it, mypy on a user's program says "module is installed, but missing
    # library stubs or py.typed marker" and uses none of the annotations)
    assert (PACKAGE / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["actorgrad"]


@pytest.mark.skipif(
    (_setuptools_version() or (0,)) < (77,),
    reason="building the wheel offline needs setuptools>=77 installed (the build backend)",
)
def test_the_wheel_ships_py_typed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "actorgrad", src / "actorgrad", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "dist"
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = out.glob("actorgrad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "actorgrad/py.typed" in names
    assert "actorgrad/__init__.py" in names


TYPED_USER = ROOT / "tests" / "typed_user"


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (it is a dev dependency: pip install -e '.[lint]')",
)
def test_typed_user_programs_pass_mypy_strict(tmp_path):
    # The programs see the package as a user's do: installed (here the directory that
    # holds it, on the path mypy asks the interpreter for), so mypy reads its py.typed
    # marker and its annotations, and reports nothing about its insides. The run is
    # from tmp_path: from the checkout, mypy would take actorgrad for a program's own
    # source (the current directory comes first). No configuration of the user's or
    # the project's applies: an empty [mypy] section is the configuration.
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYPY")}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PACKAGE.parent) + (os.pathsep + path if path else "")
    p = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(config)]
        + ["--cache-dir", str(tmp_path / "cache"), "--no-error-summary", "--hide-error-context"]
        + sorted(str(f) for f in TYPED_USER.glob("*.py")),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env,
    )
    assert (p.returncode, p.stdout + p.stderr) == (0, "")


@pytest.mark.parametrize(
    "program, last",
    [("local_training.py", "(2, 2) (2, 2) "), ("distributed_training.py", "['a', 'b']")],
)
def test_typed_user_programs_run(tmp_path, program, last):
    # mypy checks what the programs say, not what they do: a local variable that
    # shadowed the module's function of the same name gave ag.rpc an int for fn, and
    # the program failed at that call ("cannot call 5 remotely"), unseen. Run as a
    # user runs them, from another directory (process workers find the script's
    # functions through it).
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORGRAD_")}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PACKAGE.parent) + (os.pathsep + path if path else "")
    p = subprocess.run(
        [sys.executable, str(TYPED_USER / program)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1].startswith(last)  # (ran to its end)
