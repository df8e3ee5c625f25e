"""Shared fixtures.

``cluster``: a local cluster (driver + w1, w2, w3) whose workers are actors on the
test's loop, parametrized over the in-process transport, TCP and local Unix sockets,
so the same runtime tests run over all three. ``worker_path``: worker processes can
import this directory's helper modules.
"""

from __future__ import annotations

import os
import pathlib

import pytest

import actorgrad as ag

TESTS = str(pathlib.Path(__file__).parent)


@pytest.fixture
def worker_path(monkeypatch):
    """Process workers import this directory's helper modules (dist_fns)."""
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", TESTS + (os.pathsep + path if path else ""))


@pytest.fixture(params=["inproc", "tcp", "unix"])
async def cluster(request):
    async with ag.local_cluster(3, transport=request.param) as c:
        yield c
