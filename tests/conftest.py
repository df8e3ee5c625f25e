"""Shared fixtures.

``cluster``: a local cluster (driver + w1, w2, w3) whose workers are actors on the
test's loop, parametrized over the in-process transport, TCP and local Unix sockets,
so the same runtime tests run over all three. ``worker_path``: worker processes can
import this directory's helper modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import inspect
import os
import pathlib
import secrets
import signal
import socket
import sys
import types
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import actorgrad as ag

TESTS = str(pathlib.Path(__file__).parent)

# A suite started with SIGINT ignored (in the background of a shell without job
# control, under nohup: as a CI runner may start it) passed that on to every process
# its tests start, and actorgrad leaves a signal ignored at start ignored: each test of
# Ctrl-C failed, its processes deaf to it (18 tests). Python's own handler here makes
# the processes started from the suite get the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _ignore(signum: int, frame: object) -> None:
    pass


# The same for SIGHUP and SIGTERM (`nohup` ignores SIGHUP: the cluster of the test of
# two signals at once, deaf to its SIGHUP, stopped gracefully on the SIGTERM alone).
# A handler that does nothing keeps this process as deaf to them as it was started,
# while the processes it starts get the default (an exec resets a handled signal, not
# an ignored one).
for _sig in (signal.SIGHUP, signal.SIGTERM):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, _ignore)

# The tests assume the default heartbeat timeout (3 s) in this process and in every one
# it starts: a shell's ACTORGRAD_HEARTBEAT_TIMEOUT would change what they measure (the
# tests of the setting set it themselves).
os.environ.pop("ACTORGRAD_HEARTBEAT_TIMEOUT", None)


def helpers_importable(mp: pytest.MonkeyPatch) -> None:
    """Through ``mp``: process workers started now import this directory's helper
    modules (dist_fns), this directory first on their PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    mp.setenv("PYTHONPATH", TESTS + (os.pathsep + path if path else ""))


@pytest.fixture
def worker_path(monkeypatch):
    """Process workers import this directory's helper modules (dist_fns)."""
    helpers_importable(monkeypatch)


#: The heartbeat timeout of the tests that wait out a loss (a stopped process, a blocked
#: loop) to check what follows it, not the default: the shortest
#: ACTORGRAD_HEARTBEAT_TIMEOUT allows (4 ping intervals), 1 s less per wait. The default
#: stays with the tests that measure it (test_heartbeat_setting.py, the bounds in
#: test_runtime_procs.py).
SHORT_HEARTBEAT = 2.0


@pytest.fixture
def short_heartbeat(monkeypatch) -> float:
    """A heartbeat timeout of SHORT_HEARTBEAT s here and in the worker processes the test
    starts: they read ACTORGRAD_HEARTBEAT_TIMEOUT; this process read it already, so its
    module values are set (as _read_here in test_heartbeat_setting.py leaves them)."""
    from actorgrad.runtime import worker as rworker

    monkeypatch.setenv(rworker.ENV_HEARTBEAT_TIMEOUT, f"{SHORT_HEARTBEAT:g}")
    for name in ("HEARTBEAT_TIMEOUT", "PEER_CONNECT_TIMEOUT"):
        monkeypatch.setattr(rworker, name, SHORT_HEARTBEAT)
    return SHORT_HEARTBEAT


@pytest.fixture(params=["inproc", "tcp", "unix"])
async def cluster(request):
    async with ag.local_cluster(3, transport=request.param) as c:
        yield c


#: set on a test whose call failed (see pytest_runtest_makereport)
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        item.stash[CALL_FAILED] = True
    return report


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """The tests marked shared_processes (test_dist.py's ``mode`` "processes") share a
    cluster of worker processes whose driver lives on an event loop: the module's, so
    they run on it, and one after another after the module's other tests, so that no
    test on a loop of its own runs while that loop stands still (the worker processes
    would take its driver for lost after the heartbeat timeout). (With
    ACTORGRAD_TEST_LOOP=uvloop pytest-asyncio makes the module's loop anew for each test,
    as it parametrizes each test's loop factory: each gets a cluster of its own then,
    checked as a shared one.)"""
    if not any(item.get_closest_marker("shared_processes") for item in items):
        return
    runs: list[tuple[object, list[pytest.Item], list[pytest.Item]]] = []
    for item in items:  # (each run of items of one module: its own tests, then shared)
        if not runs or runs[-1][0] != item.path:
            runs.append((item.path, [], []))
        if item.get_closest_marker("shared_processes"):
            # (before the asyncio marker auto mode gave it: the closest one counts)
            item.add_marker(pytest.mark.asyncio(loop_scope="module"), append=False)
            runs[-1][2].append(item)
        else:
            runs[-1][1].append(item)
    items[:] = [item for _path, own, shared in runs for item in own + shared]


# A hard stop for a test that hangs where pytest-timeout cannot end it. Its signal
# fails the test's call, but a hang in an asyncio fixture's teardown can outlive it:
# the exception lands in a task (as that task's result) and the teardown waits on.
# Past this bound faulthandler prints every thread's stack to the real stderr and ends
# the run with status 1, so CI fails loudly instead of stalling.
HARD_STOP_MARGIN = 60  # seconds beyond the test's own timeout (set-up and teardown)
_real_stderr: list[int] = []


def pytest_configure(config):
    # (capture is suspended while plugins are configured: fd 2 is the terminal's here)
    _real_stderr.append(os.dup(2))


def _timeout_of(item: pytest.Item) -> float:
    """The test's timeout as pytest-timeout takes it: its marker, then --timeout, then
    PYTEST_TIMEOUT, then the ini file (0: none)."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        return float(marker.args[0] if marker.args else marker.kwargs["timeout"])
    option = item.config.getoption("timeout", None)
    if option is not None:
        return float(option)
    if os.environ.get("PYTEST_TIMEOUT"):
        return float(os.environ["PYTEST_TIMEOUT"])
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timeout = _timeout_of(item)
    debugging = item.config.getoption("usepdb", False) or item.config.getoption("trace", False)
    if timeout > 0 and _real_stderr and not debugging:
        faulthandler.dump_traceback_later(
            timeout + HARD_STOP_MARGIN, exit=True, file=_real_stderr[0]
        )
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
    _freeze_what_was_imported()


# Each full garbage collection (the many gc.collect() of the tests of freeing, and
# Python's own) walks every object this process tracks, and most are the modules' own:
# ~100,000 after collection (numpy, actorgrad, pytest, the tests), ~380,000 once the
# optimizer tests imported torch. A collection took 0.2 s from there on, and the
# in-process tests that poll a count with gc.collect() took 0.5 s instead of 0.07.
# Objects that exist when new modules came in (after collection, and after a test that
# imported some) go to the collector's permanent generation: collected first, so only
# what was alive then is frozen. A test's own objects, cycles and all, are collected
# and counted as before (gc.get_objects() lists the unfrozen ones, those of its time).
_modules_frozen: list[int] = [0]


def _freeze_what_was_imported() -> None:
    if len(sys.modules) != _modules_frozen[0]:
        gc.collect()
        gc.freeze()
        _modules_frozen[0] = len(sys.modules)


def pytest_collection_finish(session):
    _freeze_what_was_imported()


def has_ipv6_loopback() -> bool:
    """Whether this host can bind ::1 (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def on_uvloop() -> bool:
    """Whether the running event loop is uvloop's (``ACTORGRAD_TEST_LOOP=uvloop``)."""
    return type(asyncio.get_running_loop()).__module__.startswith("uvloop")


if os.environ.get("ACTORGRAD_TEST_LOOP") == "uvloop":
    # (the in-process tests on uvloop, as a driver of `uvloop.run(main())` runs: they
    # run on asyncio's own loop otherwise; worker processes run uvloop either way)
    def pytest_asyncio_loop_factories(config, item):
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


async def open_abstract(name: str):
    """Streams to the abstract Unix socket ``name`` (as the runtime connects: a socket of
    our own, so it works on uvloop too, whose create_unix_connection(path) refuses
    abstract names with EINVAL)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, "\0" + name)
        return await asyncio.open_unix_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def assert_no_cycles(
    step: Callable[[], Any], times: int = 1, *, warmup: int = 1, frames_only: bool = False
) -> None:
    """Run ``step`` (a coroutine function) ``warmup`` times, collect until nothing is left
    (the clusters of earlier tests can take more than one collection to go), then
    ``times`` times with the cyclic GC off: nothing it made may be left in reference
    cycles (``frames_only``: no frame, where a cycle of another kind is expected, e.g. a
    closed in-process connection's with its transport, collected when its teardown
    ends). A cycle keeps what it holds (a failed call's arguments, a frame's buffer)
    until a collection comes."""
    for _ in range(warmup):
        await step()
    while gc.collect():
        pass
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(times):
            await step()
        found = gc.collect()
        kinds = sorted({type(o).__name__ for o in gc.garbage})
        if frames_only:
            frames = [o.f_code.co_name for o in gc.garbage if isinstance(o, types.FrameType)]
            assert frames == [], kinds
        else:
            assert found == 0, kinds
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def until(pred: Callable[[], object], deadline: float = 10.0) -> None:
    """Wait until ``pred()`` is true (awaited first when it gives an awaitable), checking
    every 5 ms, for at most ``deadline`` s (TimeoutError after that): for worker state
    that no event tells of (a thread's end, a count going down, a connection closing)."""
    async with asyncio.timeout(deadline):
        while True:
            ok = pred()
            if inspect.isawaitable(ok):
                ok = await ok
            if ok:
                return
            await asyncio.sleep(0.005)


class Traced:
    """Bytes allocated in a ``traced_memory()`` block, counted from its start."""

    grown = 0  # still allocated at the block's end
    peak = 0  # the most allocated at any moment inside it

    def __repr__(self) -> str:
        return f"<Traced grown={self.grown:,} peak={self.peak:,}>"


@contextlib.contextmanager
def traced_memory() -> Iterator[Traced]:
    """Count what the block allocates (numpy's arrays included, as tracemalloc sees
    them); the counts are set when the block ends without an exception."""
    import tracemalloc

    t = Traced()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        yield t
        now, peak = tracemalloc.get_traced_memory()
        t.grown, t.peak = now - base, peak - base
    finally:
        tracemalloc.stop()


def add(a, b=0):
    return a + b


async def valid_client_works(c) -> None:
    """A fresh connection to w1 of local cluster ``c`` over ``c.listener`` ("tcp" or
    "unix") handshakes and gets an answer; the driver's connection still works."""
    w1 = c.workers[0]
    client = ag.runtime.Worker(f"probe-{secrets.token_hex(3)}", token=c.driver.token)
    try:
        local = w1.local_address if c.listener == "unix" else ""
        conn = await asyncio.wait_for(client.open_connection(w1.address, local), 5)
        assert conn.kind == c.listener
        assert await asyncio.wait_for(client.call_on(conn, add, (20, 22)), 5) == 42
    finally:
        await client.shutdown()
    assert await asyncio.wait_for(ag.rpc("w1", add, (1, 2)), 5) == 3


@contextlib.asynccontextmanager
async def slow_link(
    target: str, rate: dict[str, float], flowing: asyncio.Event | None = None
) -> AsyncIterator[tuple[str, list]]:
    """A TCP relay on this loop to ``target`` ("host:port") whose client-to-server
    direction passes at most ``rate["up"]`` bytes a second (a slow link; read at each
    chunk, so a test can change it; 0 or missing: as fast as it comes, as the other
    way). While ``flowing`` (if given) is clear, nothing passes either way: a stalled
    link, what was sent meanwhile passing once it is set again. Yields its address and the client side of each connection it relayed (a
    test checks that its call went through). Leaving closes them all: from Python 3.12
    on, a server's wait_closed waits for its connections, and a cluster's connection
    through the link lives as long as the cluster (a test hung there, its checks
    passed)."""
    host, port = target.rsplit(":", 1)
    relayed: list[asyncio.StreamWriter] = []

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, way: str) -> None:
        try:
            while data := await r.read(16384):
                if rate.get(way):
                    await asyncio.sleep(len(data) / rate[way])
                if flowing is not None:
                    await flowing.wait()
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        relayed.append(cw)
        sr, sw = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(cr, sw, "up"), pipe(sr, cw, "down"))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", relayed
    finally:
        server.close()
        if flowing is not None:  # (a pipe held by a stall ends with the others)
            flowing.set()
        for cw in relayed:  # (its pipes then close the other side)
            cw.transport.abort()
        await asyncio.wait_for(server.wait_closed(), 10)


def hold_end(end: object, reads: bool = True) -> None:
    """Hold what the in-process transport end ``end`` delivers to its connection: the
    data it reads (unless not ``reads``) and its close, until :func:`release_end`."""
    if reads:
        end._schedule = lambda: None

        # (a delivery already scheduled delivers nothing either: under the order fuzzer
        # one can be turns away when the hold starts, and it delivered what came after,
        # a worker's leave among it: ACTORGRAD_TEST_FUZZ_SEED=153 with STREAMS=1)
        def held_pump() -> None:
            end._scheduled = False

        end._pump = held_pump
    end._close_after_pump = lambda: None


def release_end(end: object) -> None:
    """Deliver what :func:`hold_end` held at ``end``: its data, then its close."""
    vars(end).pop("_schedule", None)
    vars(end).pop("_pump", None)
    del end._close_after_pump
    end._close_after_pump()


# ACTORGRAD_TEST_FUZZ_SEED=N: in-process connections deliver in a random order (fuzz_order.py);
# with ACTORGRAD_TEST_FUZZ_STREAMS=1 too, socket connections read in one.
_FUZZ_SEED = os.environ.get("ACTORGRAD_TEST_FUZZ_SEED", "")

#: Marks a test that sets up one delivery order on purpose (a race made to go one way:
#: a reply read in the loop turn that cancels its call, ...): skipped when the order is
#: fuzzed, which makes the race go the other way, where the test's outcome differs.
exact_order = pytest.mark.skipif(
    bool(_FUZZ_SEED), reason="sets up one delivery order on purpose; the fuzzer changes it"
)

if _FUZZ_SEED:
    import fuzz_order

    fuzz_order.install()
    _FUZZ_STREAMS = os.environ.get("ACTORGRAD_TEST_FUZZ_STREAMS", "") == "1"
    if _FUZZ_STREAMS:
        fuzz_order.install_streams()

    def pytest_runtest_setup(item):
        fuzz_order.reseed(int(_FUZZ_SEED), item.nodeid)
        if _FUZZ_STREAMS:
            fuzz_order.reseed_streams(int(_FUZZ_SEED), item.nodeid)


@contextlib.asynccontextmanager
async def replaced_unheard(
    head: Any, w: Any, monkeypatch: pytest.MonkeyPatch, name: str = "t"
) -> AsyncIterator[tuple[Any, Any, Callable[[], None]]]:
    """A worker ``name`` joins the cluster of ``head`` (an in-process driver over TCP)
    and leaves, and a new process joins under its name, while worker ``w`` holds back
    the head's news of ``name`` (its link to the head slower than to the new process):
    yields (the old worker, the new one, ``deliver``), which hands ``w`` the news held
    (and what came after it) and lets the rest through; the new one is shut down at the
    end. (For the races of a same-name replacement: soaks with workers replaced.)"""
    from actorgrad.runtime.worker import Worker

    old = Worker(name, token=head.token, transport_kind="tcp")
    await old.start()
    await old.join(head.address)
    await ag.wait_for_workers([name])
    await until(lambda: name in w.members)
    held: list[tuple[Any, ...]] = []
    apply = w._apply_member

    def late(version: int, who: str, entry: Any) -> None:
        if who == name or held:  # (what comes after the held news waits behind it)
            held.append((version, who, entry))
        else:
            apply(version, who, entry)

    def deliver() -> None:
        monkeypatch.setattr(w, "_apply_member", apply)
        for change in held:
            apply(*change)
        held.clear()

    monkeypatch.setattr(w, "_apply_member", late)
    await old.shutdown()
    new = Worker(name, token=head.token, transport_kind="tcp")
    await new.start()
    try:
        await new.join(head.address)
        yield old, new, deliver
    finally:
        await new.shutdown()
