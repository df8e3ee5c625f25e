"""A worker whose process is out of open files: a new connection is refused at once,
and when not even that can be done (no spare file left) the worker waits, instead of
failing to accept every loop turn, and serves the connection once files are free.

Run on asyncio's loop and on uvloop's: the listener is our own on both
(transport.Listener). The process's limit of open files is lowered for a moment to
the lowest free file number, so that the next file this process opens fails."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time

import pytest
from conftest import until, valid_client_works

import actorgrad as ag
from actorgrad.runtime import transport

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is installed where it runs
    uvloop = None

LOOPS = {"asyncio": asyncio.new_event_loop}
if uvloop is not None:
    LOOPS["uvloop"] = uvloop.new_event_loop


def add(a, b=0):
    return a + b


def _lowest_free_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def _client_for(w1, kind: str) -> tuple[socket.socket, object]:
    """An unconnected socket to w1's listener of ``kind`` (made before files run out)
    and the address to connect it to."""
    if kind == "unix":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "\0" + w1.local_address
    host, _, port = w1.address.rpartition(":")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM), (host.strip("[]"), int(port))


async def _scenario(kind: str, spare_taken: bool) -> None:
    loop = asyncio.get_running_loop()
    async with ag.local_cluster(1, transport=kind) as c:
        w1 = c.workers[0]
        listener = w1._local_server if kind == "unix" else w1._server
        assert isinstance(listener, transport.Listener)
        client, address = _client_for(w1, kind)
        with client:
            client.setblocking(False)
            accepted = listener.accepted
            if spare_taken:  # (another thread took the file the listener kept spare)
                os.close(listener._spare)
                listener._spare = None
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
            t0, cpu0 = time.monotonic(), time.process_time()
            try:
                await loop.sock_connect(client, address)  # (queued by the kernel)
                if not spare_taken:
                    # closed at once: the peer hears the end before any handshake
                    async with asyncio.timeout(5):
                        try:
                            assert await loop.sock_recv(client, 64) == b""
                        except ConnectionResetError:
                            pass
                    assert listener.refused == 1
                else:
                    # the listener pauses, 50 ms then doubling, instead of spinning
                    await until(lambda: listener.pauses >= 4)  # (no event for it)
                    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
                    assert wall >= 0.05 + 0.1 + 0.2  # (the first three pauses ended)
                    assert cpu < wall / 2, (cpu, wall)
                    assert listener.refused == 0 and listener.accepted == accepted
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            if spare_taken:
                # files are free again: the waiting connection is taken at the next try
                await until(lambda: listener.accepted != accepted, 5)  # (no event for it)
                assert "paused" not in repr(listener), repr(listener)
                assert listener._spare is not None
        # the worker serves on: a call on a new connection, and on its driver's
        c.listener = kind
        await valid_client_works(c)


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("spare_taken", [False, True], ids=["spare", "spare-taken"])
def test_a_worker_out_of_open_files(loop, kind, spare_taken, caplog):
    caplog.set_level(logging.WARNING, "actorgrad.runtime")
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(_scenario(kind, spare_taken))
    said = [r.getMessage() for r in caplog.records if "out of open files" in r.getMessage()]
    assert len(said) == 1, said  # (once a minute)
    assert said[0].startswith("worker w1 is out of open files or memory (too many open files;")
    if spare_taken:
        assert said[0].endswith("new connections wait (accepting again in 0.05 s)")
    else:
        assert said[0].endswith("closed 1 new connection(s) at once")


async def test_a_listeners_repr_shows_its_state():
    async with ag.local_cluster(1, transport="tcp") as c:
        listener = c.workers[0]._server
        assert await ag.rpc("w1", add, (1, 2)) == 3
        text = repr(listener)
        assert text.startswith("<Listener worker w1 open at ('127.0.0.1', ")
        assert "accepted, 0 refused for want of files, 0 pauses>" in text
    assert repr(listener).startswith("<Listener worker w1 closed at -:")


class _Failing:
    """A listening socket whose accepts fail with ``errnos``, then find nothing."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = list(errnos)

    def accept(self):
        if self.errnos:
            n = self.errnos.pop(0)
            raise OSError(n, os.strerror(n))
        raise BlockingIOError


async def test_a_listener_skips_a_failed_connection_and_pauses_on_a_failed_socket(caplog):
    caplog.set_level(logging.WARNING, "actorgrad.runtime")
    sock = socket.create_server(("127.0.0.1", 0))
    listener = transport.Listener(asyncio.get_running_loop(), [sock], asyncio.Protocol, "test")
    try:
        # (a connection that died queued: the next one is taken, no pause)
        listener._readable(_Failing(errno.ECONNABORTED, errno.EHOSTUNREACH))
        assert listener.pauses == 0 and "open" in repr(listener)
        # (any other error would fail again at once: the listener pauses)
        listener._readable(_Failing(errno.EINVAL))
        assert listener.pauses == 1 and "paused 0.05 s" in repr(listener)
    finally:
        listener.close()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test ")]
    assert said == [
        "test cannot accept connections (invalid argument): new connections wait "
        "(accepting again in 0.05 s)"
    ]


class _EndlessQueue:
    """A listening socket whose peers never stop coming: each accept gives a fresh
    connection (a flood while the process is out of files)."""

    def __init__(self, limit: int = 5000) -> None:
        self.accepts = 0
        self.limit = limit

    def accept(self):
        self.accepts += 1
        if self.accepts > self.limit:
            raise BlockingIOError
        a, b = socket.socketpair()
        b.close()
        return a, None


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_refusing_a_flood_out_of_files_gives_the_loop_back_between_batches(loop):
    # (the spare file closed, what waited was accepted and closed until none was left:
    # connections arriving as fast as they were refused held the loop for seconds,
    # heartbeats and calls of the worker's peers with it)
    lp = LOOPS[loop]()
    try:
        listener = transport.Listener(lp, [], asyncio.Protocol, "test")
        flood = _EndlessQueue()
        listener._cannot_accept(flood, OSError(errno.EMFILE, "Too many open files"))
        assert flood.accepts <= transport.ACCEPT_BATCH + 1, flood.accepts
        assert listener.refused == transport.ACCEPT_BATCH
        assert listener._spare is not None and listener._resume is None  # (no pause)
        listener.close()
    finally:
        lp.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_listener_dropped_unclosed_keeps_no_spare_file(loop):
    # (a worker whose loop ended without its shutdown, dropped: its sockets close when
    # collected, as they did with the loop's own servers; the spare file stayed open
    # for good, a raw file number nothing would ever close)
    import gc

    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    lp = LOOPS[loop]()
    try:
        before = count()
        listener = transport.Listener(lp, [], lambda: asyncio.Protocol(), "test")
        assert listener._spare is not None and count() == before + 1
        del listener
        gc.collect()
        assert count() == before
    finally:
        lp.close()
