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
