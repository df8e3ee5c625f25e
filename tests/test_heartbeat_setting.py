"""``ACTORGRAD_HEARTBEAT_TIMEOUT``: how long a peer that is waited on may be silent.

The 3 s heartbeat timeout was fixed: a worker whose loop was blocked for 4 s (a long
plain computation marked inline, a big decode, a GC pause, a VM stall), or whose link
stalled that long, was taken for lost, and its callers got WorkerLost. The variable
trades detection time for tolerance; each process reads its own, and those a cluster
starts inherit it. (The command's usage error and --help: test_cli.py.)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

import actorgrad as ag
from actorgrad.runtime import inline
from actorgrad.runtime import worker as rworker

ENV = "ACTORGRAD_HEARTBEAT_TIMEOUT"
BLOCK = 4.0  # (past the default 3 s, well inside the 8 s set below)


def add(a: int, b: int) -> int:
    return a + b


@inline
def block_inline(seconds: float, started: str) -> str:
    """A long plain computation marked inline: it runs on the worker's loop where its
    request is read, and blocks it (no ping goes out meanwhile). Says so through the
    FIFO ``started`` right before."""
    with open(started, "w") as f:
        f.write("blocking")
    time.sleep(seconds)
    return "unblocked"


async def call_peer(peer: str, fn: str, args: list[Any]) -> Any:
    """Call ``peer`` from this worker (judged by this process's own timeout)."""
    return await ag.rpc(peer, fn, tuple(args))


async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "rested"


def timeouts() -> tuple[float, float]:
    return rworker.HEARTBEAT_TIMEOUT, rworker.PEER_CONNECT_TIMEOUT


def _read_here(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """This process reads the variable (``value``; None: unset) again at its next worker
    (it reads it once per process); the module's values come back after the test."""
    for name in ("HEARTBEAT_TIMEOUT", "PEER_CONNECT_TIMEOUT"):
        monkeypatch.setattr(rworker, name, getattr(rworker, name))
    monkeypatch.setattr(rworker, "_settings_read", False)
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)


async def _blocked(name: str, seconds: float, tmp_path: Path) -> asyncio.Future[Any]:
    """Block worker ``name``'s loop for ``seconds`` with block_inline; return (the call
    doing it) once the worker said, through a FIFO, that it blocks."""
    fifo = tmp_path / f"{name}-blocking"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # (open: the writer does not wait)
    loop = asyncio.get_running_loop()
    said = loop.create_future()
    loop.add_reader(fd, lambda: said.done() or said.set_result(os.read(fd, 64)))
    try:
        busy = asyncio.ensure_future(ag.rpc(name, block_inline, (seconds, str(fifo))))
        async with asyncio.timeout(10):
            await asyncio.wait([said, busy], return_when=asyncio.FIRST_COMPLETED)
        if not said.done():
            await busy  # (failed: its error)
            raise AssertionError(f"block_inline on {name!r} returned without saying it blocks")
        assert said.result() == b"blocking"
        return busy
    finally:
        loop.remove_reader(fd)
        os.close(fd)
        if not said.done():
            said.cancel()


def _lost(result: Any) -> bool:
    """Whether a call's outcome is a WorkerLost (raised here, or by the worker that
    relayed it)."""
    if isinstance(result, ag.WorkerLost):
        return True
    return isinstance(result, ag.RemoteError) and result.remote_type.endswith(".WorkerLost")


@pytest.mark.timeout(40)
@pytest.mark.parametrize("setting", ["8", None])
async def test_a_worker_blocked_past_the_default_timeout_is_not_lost_with_a_longer_one(
    monkeypatch, tmp_path, setting
):
    # w1's loop is blocked 4 s by an inline function. Meanwhile the driver calls w1 on
    # the connection it has, and w2 (a process of its own, inheriting the variable)
    # calls w1 on a new connection (its connect waits on w1's loop too). With 8 s,
    # every call completes once w1 runs again; with the default 3 s, each caller takes
    # w1 for lost (as before: a silent call, then "did not answer within 3 s").
    _read_here(monkeypatch, setting)
    async with ag.local_cluster(2, processes=True):
        want = (8.0, 8.0) if setting else (3.0, 3.0)
        assert rworker.HEARTBEAT_TIMEOUT == rworker.PEER_CONNECT_TIMEOUT == want[0]
        assert await ag.rpc("w2", timeouts) == want  # (read by the worker processes too)
        assert await ag.rpc("w1", add, (0, 1)) == 1  # (the driver's connection to w1)
        busy = await _blocked("w1", BLOCK, tmp_path)
        t0 = time.monotonic()
        direct = ag.rpc("w1", add, (1, 2))
        relayed = ag.rpc("w2", call_peer, ("w1", "operator:add", [2, 3]))
        results = await asyncio.wait_for(
            asyncio.gather(busy, direct, relayed, return_exceptions=True), BLOCK + 10
        )
        took = time.monotonic() - t0
        if setting:
            assert results == ["unblocked", 3, 5], results
            assert took > BLOCK - 1.0, took  # (they waited out the block)
        else:
            assert all(_lost(r) for r in results), results
            assert took < BLOCK, took  # (lost before w1 ran again)
            # (w1 lives on: the next call reaches it once its loop is free)
            assert await asyncio.wait_for(ag.rpc("w1", add, (3, 4)), 10) == 7


@pytest.mark.timeout(40)
async def test_processes_set_otherwise_each_judge_by_their_own_timeout(monkeypatch, tmp_path):
    # The driver keeps the default 3 s; the worker processes it starts are set to 30 s.
    # w1's loop is blocked 4 s: the driver takes it for lost, w2 does not (its call to
    # w1 completes). And none takes a live peer for lost because it is set otherwise:
    # the driver (3 s) waits 4.5 s on a call of w3 (30 s) that awaits, and w3 pings it
    # all along, at the same interval as every process (had the interval grown with the
    # timeout, a sixth of it, w3 would ping every 5 s: too seldom for the driver).
    monkeypatch.setattr(rworker, "_settings_read", True)  # (the driver: read, unset)
    monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 3.0)
    monkeypatch.setattr(rworker, "PEER_CONNECT_TIMEOUT", 3.0)
    monkeypatch.setenv(ENV, "30")  # (for the worker processes)
    async with ag.local_cluster(3, processes=True):
        assert timeouts() == (3.0, 3.0)
        assert await ag.rpc("w2", timeouts) == (30.0, 30.0)
        assert await ag.rpc("w2", call_peer, ("w1", "operator:add", [0, 1])) == 1
        busy = await _blocked("w1", BLOCK, tmp_path)
        t0 = time.monotonic()
        direct = ag.rpc("w1", add, (1, 2))
        relayed = ag.rpc("w2", call_peer, ("w1", "operator:add", [2, 3]))
        resting = ag.rpc("w3", nap, (BLOCK + 0.5,))  # (nothing else on that connection)
        busy_r, direct_r, relayed_r, resting_r = await asyncio.wait_for(
            asyncio.gather(busy, direct, relayed, resting, return_exceptions=True), BLOCK + 10
        )
        assert _lost(busy_r) and _lost(direct_r), (busy_r, direct_r)
        assert "sent nothing for 3 s" in str(direct_r), direct_r
        assert (relayed_r, resting_r) == (5, "rested")
        assert time.monotonic() - t0 > BLOCK - 1.0
        # (and the driver reaches w1 again, now that it runs)
        assert await asyncio.wait_for(ag.rpc("w1", add, (3, 4)), 10) == 7


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("abc", "not a number of seconds"),
        ("8s", "not a number of seconds"),
        ("nan", "not a finite number of seconds"),
        ("inf", "not a finite number of seconds"),
        ("-5", "must be a positive number of seconds"),
        ("0", "must be a positive number of seconds"),
        ("1.5", r"must be at least 2 s \(4 heartbeat intervals of 0.5 s\)"),
        ("31", r"must be at most 30 s \(half the 60 s a cluster's head waits on a silent"),
    ],
)
async def test_a_bad_value_is_refused_naming_the_variable(monkeypatch, value, why):
    _read_here(monkeypatch, value)
    said = rf"^{ENV}='{value}': {why}"
    with pytest.raises(ValueError, match=said):
        async with ag.local_cluster(1, processes=True):
            pass
    with pytest.raises(ValueError, match=said):
        await ag.init("driver")
    assert rworker.HEARTBEAT_TIMEOUT == 3.0  # (nothing set, nothing started)
    with pytest.raises(ValueError, match=said):  # (a worker of its own too)
        rworker.Worker("w", token="t")


def test_values_that_are_taken(monkeypatch):
    for raw, value in (("", None), ("  ", None), (" 8\n", 8.0), ("2", 2.0), ("30", 30.0)):
        monkeypatch.setenv(ENV, raw)
        assert rworker.heartbeat_timeout_setting() == value
    monkeypatch.delenv(ENV)
    assert rworker.heartbeat_timeout_setting() is None
