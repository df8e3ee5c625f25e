"""What someone without the cluster token can do to a worker: connect, over TCP or a
local Unix socket, and hold connections in their handshake. A worker holds at most
``MAX_HANDSHAKING`` such connections (``MAX_HANDSHAKING_PER_HOST`` from one remote
host), fewer near its limit of open files, and makes room for a new one by closing the
oldest: a token holder's handshake is done in a round trip, a stranger's stays pending,
so strangers cannot lock token holders out."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import slow_link, until

import actorgrad as ag
from actorgrad.runtime import transport, worker
from actorgrad.runtime.worker import Worker


def add(a, b=0):
    return a + b


async def _stranger(address: str, source: str = "") -> socket.socket | None:
    """A connection to ``address`` that sends nothing, once the worker took it (its
    hello came); None when the worker closed it at once (out of open files)."""
    loop = asyncio.get_running_loop()
    if address.startswith("\0"):  # (a worker's abstract Unix socket)
        s, to = socket.socket(socket.AF_UNIX), address
    else:
        host, port = transport.split_address(address)
        s, to = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    s.setblocking(False)
    if source:
        s.bind((source, 0))
    try:
        await loop.sock_connect(s, to)
        hello = await asyncio.wait_for(loop.sock_recv(s, 64), 5)
    except ConnectionError:
        hello = b""
    if not hello:
        s.close()
        return None
    assert hello.startswith(transport.MAGIC)
    return s


async def _closed_by_worker(s: socket.socket) -> bool:
    """Whether the worker closed ``s`` (its end of data or a reset within 3 s: the
    handshake deadline, 5 s, would close it later anyway)."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 64), 3) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def _still_open(s: socket.socket) -> bool:
    """Whether ``s`` is open, nothing to read (the worker did not close it)."""
    try:
        s.recv(1)
    except BlockingIOError:
        return True
    except ConnectionError:
        pass
    return False


def _handshaking(w: Worker) -> int:
    return sum(1 for c in w._conns if c._handshaking and not c.closed)


async def _token_holder_call(address: str, token: str) -> int:
    client = Worker(f"probe-{secrets.token_hex(3)}", token=token, local_sockets=False)
    try:
        conn = await asyncio.wait_for(client.open_connection(address), 5)
        return await asyncio.wait_for(client.call_on(conn, len, ("x" * 42,)), 5)
    finally:
        await client.shutdown()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_the_oldest_connection_in_its_handshake_makes_room_for_a_new_one(
    monkeypatch, caplog, kind
):
    # Each connection of a stranger held a file until its handshake deadline, 5 s, and
    # nothing bounded how many a worker held: anyone who could connect filled its
    # files. Beyond MAX_HANDSHAKING the oldest one goes.
    caplog.set_level(logging.WARNING, "actorgrad.runtime")
    cap = 16
    monkeypatch.setattr(worker, "MAX_HANDSHAKING", cap, raising=False)
    async with ag.local_cluster(1, transport=kind) as c:
        w1 = c.workers[0]
        where = w1.address if kind == "tcp" else "\0" + w1.local_address
        held = [await _stranger(where) for _ in range(3 * cap)]
        assert None not in held
        assert _handshaking(w1) <= cap
        try:
            # a token holder gets through (its handshake, the newest, stays)
            assert await _token_holder_call(w1.address, c.driver.token) == 42
            # the oldest were closed; the newest stay open, waiting for their deadline
            for s in held[: 2 * cap]:
                assert await _closed_by_worker(s)
            assert _still_open(held[-1])
        finally:
            for s in held:
                s.close()
        assert await asyncio.wait_for(ag.rpc("w1", add, (1, 2)), 5) == 3
    said = [r.getMessage() for r in caplog.records if "connection(s) still in" in r.getMessage()]
    # (at once, then once a minute: the rest when the worker shut down)
    assert len(said) == 2, said
    assert said[0].startswith("worker w1 closed 1 connection(s) still in their handshake")
    assert "too many in their handshake" in said[0]
    # (32 strangers', and one for the token holder's)
    assert said[1].startswith("worker w1 closed 32 connection(s) still in their handshake")


REPO = str(Path(ag.__file__).resolve().parent.parent)
WORKER_OF_FEW_FILES = r"""
import asyncio, logging, os, resource, sys
import actorgrad as ag

def lowest_free_fd():
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd

async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd() + 100, hard))
    async with ag.local_cluster(1, transport="tcp", token=sys.argv[1]) as c:
        # (files the process's own code took since the worker started: it runs out
        # before its connections near its share)
        taken = [os.open(os.devnull, os.O_RDONLY) for _ in range(int(sys.argv[2]))]
        print(c.workers[0].address, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

logging.basicConfig(level=logging.WARNING, format="%(message)s")
asyncio.run(main())
"""


@pytest.mark.parametrize("taken", [0, 70], ids=["near", "out-of-files"])
async def test_strangers_filling_the_open_files_limit_do_not_lock_a_token_holder_out(
    tmp_path, taken
):
    # A worker process that may open 100 more files, and strangers that keep twice as
    # many connections open. Each held a file until its handshake deadline; once the
    # files were gone, a token holder's connection was closed at once: "closed the
    # connection before its handshake (the process died, is shutting down, or is out
    # of open files)". Near the limit the oldest connection in its handshake goes; out
    # of files (other files of the process took them), the oldest go for those waiting.
    script = tmp_path / "few_files.py"
    script.write_text(WORKER_OF_FEW_FILES)
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORGRAD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        token,
        str(taken),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "PYTHONPATH": REPO},
    )
    assert proc.stdin is not None and proc.stdout is not None
    held: list[socket.socket | None] = []
    try:
        address = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        held = [await _stranger(address) for _ in range(200)]
        assert await _token_holder_call(address, token) == 42
        assert None not in held  # (none closed at once: the worker kept files for them)
        assert await _closed_by_worker(held[0])  # (the oldest went for the newer)
        assert _still_open(held[-1])
    finally:
        for s in held:
            if s is not None:
                s.close()
        proc.stdin.close()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    said = [line for line in err.decode().splitlines() if "connection(s) still in their" in line]
    assert len(said) == 2, err.decode()[-2000:]  # (at once, the rest at the shutdown)
    assert ("near the open-files limit" if not taken else "out of open files") in said[0]
    if taken:
        assert "worker w1 is out of open files or memory (too many open files; " in err.decode()
        assert " connection(s) in their handshake for new ones" in err.decode()
    assert proc.returncode == 0, err.decode()[-2000:]


async def test_one_remote_hosts_connections_in_their_handshake_close_only_its_own(monkeypatch):
    # One host takes at most MAX_HANDSHAKING_PER_HOST of them, and beyond, its own
    # oldest goes: older connections of other hosts stay (loopback is every local
    # process's address: counted against the whole only).
    ip = worker._advertised_ip(socket.AF_INET)
    if transport.is_loopback(ip):
        pytest.skip("no address but loopback here")
    cap = 8
    monkeypatch.setattr(worker, "MAX_HANDSHAKING_PER_HOST", cap, raising=False)
    w = Worker("w", token=secrets.token_hex(16), host="0.0.0.0", local_sockets=False)
    await w.start()
    port = transport.split_address(w.address)[1]
    held: list[socket.socket | None] = []
    try:
        local = [await _stranger(f"127.0.0.1:{port}") for _ in range(2 * cap)]
        held += local
        remote = [await _stranger(f"{ip}:{port}", source=ip) for _ in range(3 * cap)]
        held += remote
        assert None not in held
        assert _handshaking(w) <= 3 * cap  # (2 * cap of loopback's, cap of the host's)
        for s in remote[: 2 * cap]:
            assert await _closed_by_worker(s)
        assert all(_still_open(s) for s in local + remote[2 * cap :])
        assert await _token_holder_call(f"{ip}:{port}", w.token) == 42
        assert await _token_holder_call(f"127.0.0.1:{port}", w.token) == 42
        assert list(w._handshaking_from) == [ip]
        for s in held:
            s.close()
        # (the worker keeps nothing of them once they closed: no entry per host seen)
        await until(lambda: not w._handshaking and not w._handshaking_from, 5)
    finally:
        for s in held:
            if s is not None:
                s.close()
        await w.shutdown()


async def test_a_token_holder_whose_handshake_stalls_under_a_flood_hears_why_it_closed(
    monkeypatch,
):
    # The oldest connection in its handshake goes, a token holder's too when more than
    # the cap came during its handshake (here: its link stalled). It hears that its
    # peer made room, not only that it shut down or died.
    cap = 8
    monkeypatch.setattr(worker, "MAX_HANDSHAKING", cap, raising=False)
    async with ag.local_cluster(1, transport="tcp") as c:
        w1 = c.workers[0]
        flowing = asyncio.Event()
        async with slow_link(w1.address, {}, flowing) as (relay, _):
            client = Worker(f"probe-{secrets.token_hex(3)}", token=c.driver.token)
            opening = asyncio.ensure_future(client.open_connection(relay))
            held: list[socket.socket | None] = []
            try:
                await until(lambda: _handshaking(w1) == 1)  # (the relay's: no event)
                held = [await _stranger(w1.address) for _ in range(cap)]
                flowing.set()
                with pytest.raises(ag.WorkerLost) as err:
                    await asyncio.wait_for(opening, 5)
            finally:
                opening.cancel()
                for s in held:
                    if s is not None:
                        s.close()
                await client.shutdown()
        assert "closed the connection during its handshake" in str(err.value)
        assert "it made room for newer connections: too many were in their handshake" in str(
            err.value
        )
        assert await _token_holder_call(w1.address, c.driver.token) == 42


@pytest.mark.parametrize("end", ["the minute", "the worker"])
async def test_connections_closed_to_make_room_are_counted_when_their_minute_ends(
    monkeypatch, caplog, end
):
    # Said at once, then once a minute: the rest of a flood that stopped is said when
    # its minute ends (or the worker shuts down), not with the next one, if ever.
    caplog.set_level(logging.WARNING, "actorgrad.runtime")
    cap = 4
    monkeypatch.setattr(worker, "MAX_HANDSHAKING", cap, raising=False)
    monkeypatch.setattr(worker, "REJECTED_LOG_WINDOW", 1.0 if end == "the minute" else 3600.0)

    def said() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "connection(s) still in" in r.getMessage()
        ]

    held: list[socket.socket | None] = []
    try:
        async with ag.local_cluster(1, transport="tcp") as c:
            w1 = c.workers[0]
            held = [await _stranger(w1.address) for _ in range(cap + 4)]
            assert len(said()) == 1 and said()[0].startswith("worker w1 closed 1 connection(s)")
            if end == "the minute":
                await until(lambda: len(said()) == 2, 5)  # (its timer's: no event)
    finally:
        for s in held:
            if s is not None:
                s.close()
    assert len(said()) == 2, said()
    assert said()[1].startswith("worker w1 closed 3 connection(s) still in their handshake")


async def test_a_burst_of_token_holders_near_the_open_files_limit_is_let_through():
    # Near the limit the oldest connection in its handshake makes room for a new one
    # only beyond half the files left: token holders connecting at once there closed
    # each other's handshakes, all but the last.
    async with ag.local_cluster(1, transport="tcp") as c:
        w1 = c.workers[0]
        w1._near_file_limit = len(w1._conns)  # (there already)
        w1._near_limit_handshakes = 8
        calls = [_token_holder_call(w1.address, c.driver.token) for _ in range(6)]
        assert await asyncio.gather(*calls) == [42] * 6
        # strangers past the 8 do not lock them out
        held = [await _stranger(w1.address) for _ in range(16)]
        try:
            assert await _token_holder_call(w1.address, c.driver.token) == 42
            assert await _closed_by_worker(held[0])
            assert _handshaking(w1) <= 8
        finally:
            for s in held:
                if s is not None:
                    s.close()
