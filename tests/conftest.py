"""Shared fixtures.

``cluster``: a local cluster (driver + w1, w2, w3) whose workers are actors on the
test's loop, parametrized over the in-process transport, TCP and local Unix sockets,
so the same runtime tests run over all three.
"""

from __future__ import annotations

import pytest

import actorgrad as ag


@pytest.fixture(params=["inproc", "tcp", "unix"])
async def cluster(request):
    async with ag.local_cluster(3, transport=request.param) as c:
        yield c
