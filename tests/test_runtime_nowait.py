"""Runtime features for protocol code: ``Worker.call_nowait``, one-way ``notify``,
``watch`` and inline handlers.

Tests using the ``cluster`` fixture run over both transports (in-process, TCP).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import slow_link, until

import actorgrad as ag
from actorgrad.runtime import current_worker, inline, transport
from actorgrad.runtime import worker as rworker

# ---- functions called remotely ---------------------------------------------------------


def add(a, b=0):
    return a + b


def boom(msg):
    raise ValueError(msg)


async def nap(seconds, value=None):
    await asyncio.sleep(seconds)
    return value


_gate: dict[str, asyncio.Event] = {}


async def hold():
    """Runs until the test sets _gate["release"] (in-process workers share its loop)."""
    _gate["started"].set()
    await _gate["release"].wait()
    return "released"


async def fetch(r):
    return await r.to_here()


@inline
def where_inline():
    """Runs on the worker's loop thread, in no task."""
    return [threading.current_thread() is threading.main_thread(), _in_task()]


def where_plain():
    return [threading.current_thread() is threading.main_thread(), _in_task()]


@inline
def inline_boom(msg):
    raise KeyError(msg)


@inline
async def inline_async(x):  # the marker has no effect on async functions
    await asyncio.sleep(0)
    return x + 1


@inline
def slow_inline():
    time.sleep(rworker.FAST_CALL * 2)
    return where_inline()


def _in_task() -> bool:
    try:
        return asyncio.current_task() is not None
    except RuntimeError:  # no running loop: a pool thread
        return False


@inline
def nowait_from_worker(dest: str, x: int) -> Any:
    """Protocol style: call_nowait from a handler, chained by a done callback."""
    w = current_worker()
    out = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(f.result() * 10)

    w.call_nowait(dest, add, (x, 1)).add_done_callback(done)
    return out


@pytest.fixture
async def loop_errors():
    """Contexts the loop's exception handler receives ("exception was never retrieved"...)."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield errors
    gc.collect()
    loop.set_exception_handler(old)
    # (here too: a test that asks for the fixture and forgets to look passed with them)
    assert errors == [], errors


# ---- inline handlers -------------------------------------------------------------------------


def test_inline_decorator_sets_the_marker():
    def f():
        pass

    assert inline(f) is f
    assert f.__actorgrad_inline__ is True


async def test_inline_functions_run_on_the_loop_at_once_and_never_in_the_pool(cluster):
    # the first calls of a plain function go to the thread pool; an inline one never does
    assert await ag.rpc("w1", where_plain) == [False, False]
    for _ in range(rworker.INLINE_AFTER + 2):
        assert await ag.rpc("w1", where_inline) == [True, False]


async def test_inline_function_errors_and_async_functions_with_the_marker(cluster):
    with pytest.raises(ag.RemoteError) as ei:
        await ag.rpc("w2", inline_boom, ("k",))
    assert ei.value.remote_type == "KeyError"
    assert await ag.rpc("w2", inline_async, (1,)) == 2


async def test_a_slow_inline_function_stays_inline(cluster):
    # slower than FAST_CALL: a plain function would be sent back to the pool
    for _ in range(3):
        assert await ag.rpc("w1", slow_inline) == [True, False]


# ---- call_nowait -----------------------------------------------------------------------------


async def test_call_nowait_returns_a_future_of_the_result(cluster):
    w = cluster.driver
    futs = [w.call_nowait("w1", add, (i,), {"b": 1}) for i in range(50)]
    assert all(isinstance(f, asyncio.Future) for f in futs)
    assert await asyncio.gather(*futs) == [i + 1 for i in range(50)]
    # a first call to a worker without a connection yet connects in a task
    assert await w.call_nowait("w3", f"{__name__}:add", (2, 3)) == 5
    assert await w.call_nowait("driver", add, (4,)) == 4


async def test_call_nowait_with_an_rref_of_a_third_worker_registers_the_fork_first(cluster):
    r = await ag.remote("w1", "builtins:list", ([1, 2, 3],))
    assert await cluster.driver.call_nowait("w2", fetch, (r,)) == [1, 2, 3]


async def test_call_nowait_failures_arrive_through_the_future(cluster, loop_errors):
    w = cluster.driver
    with pytest.raises(ag.RemoteError) as ei:
        await w.call_nowait("w1", boom, ("bad",))
    assert ei.value.remote_type == "ValueError" and "bad" in str(ei.value)
    with pytest.raises(ValueError, match="unknown worker"):
        await w.call_nowait("nobody", add, (1,))
    with pytest.raises(TypeError, match="set"):
        await w.call_nowait("w1", add, ({1, 2},))
    with pytest.raises(TypeError, match="args must be a tuple or list, not int"):
        w.call_nowait("w1", add, 5)
    with pytest.raises(TypeError, match="lambdas, closures and nested functions cannot be"):
        w.call_nowait("w1", lambda: 1)
    # (a malformed name, at the caller as for ag.rpc: it was sent, and came back as w1's)
    with pytest.raises(ValueError, match="must look like 'module:qualname'"):
        w.call_nowait("w1", "no_colon")


async def test_call_nowait_from_a_handler_with_done_callbacks(cluster):
    assert await ag.rpc("w1", nowait_from_worker, ("w2", 4)) == 50
    assert await ag.rpc("w2", nowait_from_worker, ("driver", 1)) == 20


async def test_call_nowait_fails_with_worker_lost_when_the_peer_goes(cluster, loop_errors):
    w = cluster.driver
    assert await w.call_nowait("w3", add, (1,)) == 1
    fut = w.call_nowait("w3", nap, (30,))
    seen: list[BaseException | None] = []
    fut.add_done_callback(lambda f: seen.append(f.exception()))
    await asyncio.sleep(0.05)
    await cluster.workers[2].shutdown(graceful=False)
    with pytest.raises(ag.WorkerLost, match=r"^worker 'w3' has left the cluster$"):
        await asyncio.wait_for(fut, 5)
    assert len(seen) == 1 and isinstance(seen[0], ag.WorkerLost)
    del fut
    gc.collect()
    assert loop_errors == []


async def test_call_nowait_futures_pending_at_shutdown_fail_without_warnings(loop_errors):
    async with ag.local_cluster(2, transport="tcp") as c:
        w = c.driver
        await w.call_nowait("w1", add, (1,))
        pending = [w.call_nowait("w1", nap, (0.3,)) for _ in range(3)]
        connecting = w.call_nowait("w2", nap, (0.3,))  # no connection yet: a task connects
        await asyncio.sleep(0)
        await w.shutdown()  # (before the workers: the calls are still pending)
    for f in [*pending, connecting]:  # (repr does not mark the exception as read)
        assert f.done() and "exception=WorkerLost" in repr(f)
    del pending, connecting, f
    gc.collect()
    assert loop_errors == []


async def test_call_nowait_after_shutdown_fails_at_once(loop_errors):
    async with ag.local_cluster(1) as c:
        w = c.driver
    fut = w.call_nowait("w1", add, (1,))
    assert fut.done() and isinstance(fut.exception(), ag.WorkerLost)


# ---- one-way calls (notify) and watching ------------------------------------------------

_received: list[Any] = []


@inline
def record(*args):
    """Handler of one-way calls: remembers what came; wakes the test waiting for it."""
    _received.append(list(args))
    ev = _arrived.get(len(_received))
    if ev is not None:
        ev.set()


_arrived: dict[int, asyncio.Event] = {}


async def _wait_received(n: int) -> None:
    if len(_received) < n:
        ev = _arrived[n] = asyncio.Event()
        await asyncio.wait_for(ev.wait(), 5)


async def test_notify_delivers_one_way_calls_in_order(cluster):
    _received.clear()
    for i in range(50):
        cluster.driver.notify("w1", record, (i, "x" * i))
    await _wait_received(50)
    assert _received == [[i, "x" * i] for i in range(50)]


@pytest.mark.parametrize("kind", ["tcp", "inproc"])
async def test_a_one_way_call_over_the_largest_frame_fails_alone(kind, monkeypatch):
    # Queued while the connection was being made, it failed every one-way call queued
    # after it with its own error, though the connection was good; and its traceback
    # (whose frames hold the message) was kept by the error handed on.
    monkeypatch.setattr(transport, "MAX_FRAME_SIZE", 1 << 20)
    _received.clear()
    errors: list[BaseException] = []
    async with ag.local_cluster(1, transport=kind) as c:
        c.driver.notify("w1", record, (np.ones(300_000, np.float32),), on_error=errors.append)
        for i in range(3):
            c.driver.notify("w1", record, (i,), on_error=errors.append)
        await _wait_received(3)
        assert _received == [[0], [1], [2]]
        assert len(errors) == 1 and isinstance(errors[0], ag.ProtocolError), errors
        assert "more than the largest frame" in str(errors[0])
        assert errors[0].__traceback__ is None


async def test_notify_failures_reach_on_error(cluster):
    w = cluster.driver
    errors: list[BaseException] = []
    all_in = asyncio.Event()

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        if len(errors) == 4:
            all_in.set()

    await w.call("w1", add, (1, 2))
    conn = w._out["w1"]
    w.notify("nobody", record, (1,), on_error=on_error)  # looked up by a task
    w.notify("w1", record, ({1, 2},), on_error=on_error)  # a set cannot travel
    w.notify("w1", lambda: None, (), on_error=on_error)  # nor can a lambda
    # (nor a malformed name: sent, it closed the connection on w1, and every call on it)
    w.notify("w1", "no_colon", (), on_error=on_error)
    await asyncio.wait_for(all_in.wait(), 5)
    kinds = sorted(type(e).__name__ for e in errors)
    assert kinds == ["TypeError", "TypeError", "ValueError", "ValueError"], errors
    assert any("unknown worker 'nobody'" in str(e) for e in errors)
    assert any("'no_colon' must look like" in str(e) for e in errors)
    assert not conn.closed


async def test_a_one_way_call_that_cannot_start_closes_the_connection(cluster, caplog):
    caplog.set_level(logging.WARNING, "actorgrad.runtime")
    w = cluster.driver
    await w.call("w1", add, (1, 2))
    conn = w._out["w1"]
    lost = asyncio.Event()
    w.add_peer_lost_callback(lambda name: name == "w1" and lost.set())
    w.notify("w1", "no_such_module_xyz:f", (1,))
    await asyncio.wait_for(lost.wait(), 5)  # the sender learns it as the peer's loss
    assert conn.closed
    # (the receiver says why: it closed the connection without a word)
    assert "worker w1: closing" in caplog.text
    assert "one-way call no_such_module_xyz:f cannot start" in caplog.text
    assert await ag.rpc("w1", add, (2, 3)) == 5  # the worker itself is fine


# ---- casts: one-way protocol messages ---------------------------------------------------


@rworker.on_cast("tests.record")
def _record_cast(worker: Any, n: int, payload: Any) -> None:
    record(worker.name, n, payload)


@rworker.on_cast("tests.boom")
def _boom_cast(worker: Any, msg: str) -> None:
    raise RuntimeError(msg)


async def test_a_peer_reconnected_after_a_loss_is_reported_lost_again(cluster):
    # a connection closed by a malformed message: both sides take the other for lost;
    # once a new connection says hello, it is not lost any more, and a second loss is
    # reported again (else whatever waits on that peer would never hear of it)
    w = cluster.driver
    losses: list[str] = []
    taken: list[bool] = []  # (is_lost at each report)
    lost = [asyncio.Event(), asyncio.Event()]

    def on_lost(name: str) -> None:
        if name == "w1":
            losses.append(name)
            taken.append(w.is_lost(name))
            if len(losses) <= len(lost):  # (the cluster's shutdown reports a third)
                lost[len(losses) - 1].set()

    w.add_peer_lost_callback(on_lost)
    for i in range(2):
        assert await ag.rpc("w1", add, (i, 1)) == i + 1  # (re)connects
        assert not w.is_lost("w1")
        w.cast("w1", "tests.no_such_topic", (1,))  # w1 closes the connection
        await asyncio.wait_for(lost[i].wait(), 5)
        # (then: w1, alive, answers the probe the driver sends on its membership, which
        # ends the loss a round trip later)
        assert taken[i]
    assert losses == ["w1", "w1"]
    assert await ag.rpc("w1", add, (2, 3)) == 5


async def test_casts_reach_their_handler_in_order_with_arrays(cluster):
    _received.clear()
    for i in range(50):
        cluster.driver.cast("w1", "tests.record", (i, np.arange(i, dtype=np.float64)))
    await _wait_received(50)
    assert [r[:2] for r in _received] == [["w1", i] for i in range(50)]
    for i, r in enumerate(_received):
        np.testing.assert_array_equal(r[2], np.arange(i, dtype=np.float64))


async def test_a_cast_waits_behind_the_requests_queued_before_it(cluster):
    _received.clear()
    w1 = cluster.workers[0]
    w1._max_in_flight = 1  # one call at a time: what comes meanwhile waits in the mailbox
    _gate.update(started=asyncio.Event(), release=asyncio.Event())
    busy = asyncio.ensure_future(ag.rpc("w1", hold))
    await asyncio.wait_for(_gate["started"].wait(), 5)
    cluster.driver.notify("w1", record, ("request",))
    cluster.driver.cast("w1", "tests.record", (1, "cast"))
    _gate["release"].set()
    await _wait_received(2)
    assert _received == [["request"], ["w1", 1, "cast"]]
    assert await busy == "released"


async def test_casts_queued_behind_requests_fill_the_mailbox_like_requests(cluster, monkeypatch):
    # a flood of casts behind a waiting request stops reading from its connection once
    # the mailbox is full, as a flood of requests does; all of it runs afterwards
    _received.clear()
    w1 = cluster.workers[0]
    w1._max_in_flight = 1
    w1._mailbox_size = 4
    paused = asyncio.Event()
    orig = transport.Connection.pause_reading

    def spy(self: Any) -> None:
        paused.set()
        orig(self)

    monkeypatch.setattr(transport.Connection, "pause_reading", spy)
    _gate.update(started=asyncio.Event(), release=asyncio.Event())
    busy = asyncio.ensure_future(ag.rpc("w1", hold))
    await asyncio.wait_for(_gate["started"].wait(), 5)
    cluster.driver.notify("w1", record, ("request",))
    for i in range(50):
        cluster.driver.cast("w1", "tests.record", (i, "cast"))
    await asyncio.wait_for(paused.wait(), 5)
    assert any(c.paused_reading for c in w1._conns)
    _gate["release"].set()
    await _wait_received(51)
    assert _received == [["request"]] + [["w1", i, "cast"] for i in range(50)]
    assert await busy == "released"
    assert not any(c.paused_reading for c in w1._conns) and not w1._mailbox


async def test_a_cast_does_not_wait_behind_the_requests_of_other_connections(cluster):
    # The calls holding the slots may be waiting for it (a gradient message of the
    # backward passes they run: 10,000 calls into w1, each running a backward through
    # w2, wedged w1 for good). The driver's request waits for a slot; w2's casts run.
    _received.clear()
    w1 = cluster.workers[0]
    w1._max_in_flight = 1
    _gate.update(started=asyncio.Event(), release=asyncio.Event())
    busy = asyncio.ensure_future(ag.rpc("w1", hold))
    await asyncio.wait_for(_gate["started"].wait(), 5)
    cluster.driver.notify("w1", record, ("request",))
    await until(lambda: w1._mailbox, 5)  # (it arrived and waits for the slot)
    w2 = cluster.workers[1]
    for i in range(5):
        w2.cast("w1", "tests.record", (i, "cast"))
    await _wait_received(5)  # (while `hold` holds the only slot)
    assert _received == [["w1", i, "cast"] for i in range(5)]
    assert not busy.done()
    _gate["release"].set()
    await _wait_received(6)
    assert _received[-1] == ["request"]
    assert await busy == "released"
    assert not w1._mailbox


async def test_a_cast_that_cannot_run_closes_the_connection_not_the_worker(cluster, caplog):
    w = cluster.driver
    for bad in [("tests.no_such_topic", (1,)), ("tests.record", (1,))]:  # unknown; 1 arg of 2
        await w.call("w1", add, (1, 2))
        conn = w._out["w1"]
        waiting = w.call_nowait("w1", nap, (30,))  # fails when its connection closes
        w.cast("w1", *bad)
        with pytest.raises(
            ag.WorkerLost,
            match=r"worker 'w1' closed the connection on a message from this worker: one-way",
        ):
            await asyncio.wait_for(waiting, 5)
        assert conn.closed
    assert "unknown topic 'tests.no_such_topic'" in caplog.text
    assert "'tests.record' needs a list of 2 arguments, got 1" in caplog.text
    # an exception in the handler is only logged: the connection stays
    _received.clear()
    await w.call("w1", add, (1, 2))
    conn = w._out["w1"]
    w.cast("w1", "tests.boom", ("kaput",))
    w.cast("w1", "tests.record", (7, None))
    await _wait_received(1)
    assert _received == [["w1", 7, None]] and not conn.closed
    assert "handler of one-way 'tests.boom' failed" in caplog.text and "kaput" in caplog.text


async def test_cast_failures_reach_on_error(cluster):
    errors: list[BaseException] = []
    done = asyncio.Event()

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        if len(errors) == 2:
            done.set()

    cluster.driver.cast("nobody", "tests.record", (1, 2), on_error=on_error)
    cluster.driver.cast("w1", "tests.record", (1, {1, 2}), on_error=on_error)
    await asyncio.wait_for(done.wait(), 5)
    assert sorted(type(e).__name__ for e in errors) == ["TypeError", "ValueError"], errors


def test_on_cast_refuses_a_second_handler_and_keyword_arguments():
    with pytest.raises(ValueError, match="'tests.record' already has a handler"):
        rworker.on_cast("tests.record")(lambda worker, n, payload: None)

    def kw(worker: Any, *, n: int) -> None:
        pass

    with pytest.raises(TypeError, match="must take plain positional arguments"):
        rworker.on_cast("tests.kw")(kw)


def _count_ticks(monkeypatch) -> Any:
    """Heartbeat rounds of 0.05 s (0.3 s timeout and ask window), counted for every
    worker of this loop (each calls trim_idle_buffers once a round); returns a function
    waiting for ``n`` more."""
    monkeypatch.setattr(rworker, "HEARTBEAT_INTERVAL", 0.05)
    monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 0.3)
    monkeypatch.setattr(rworker, "ASK_WINDOW", 0.3)
    ticks = [0]
    wake = asyncio.Event()
    trim = transport.trim_idle_buffers

    def counted(now: float) -> int:
        ticks[0] += 1
        wake.set()
        return trim(now)

    monkeypatch.setattr(transport, "trim_idle_buffers", counted)

    async def more(n: int) -> None:
        until = ticks[0] + n
        async with asyncio.timeout(10):
            while ticks[0] < until:
                wake.clear()
                await wake.wait()

    return more


def _frames_of(conn: Any, kind: int) -> list[float]:
    """When each frame of ``kind`` (a ping, an ask) arrives on ``conn`` from now on."""
    seen: list[float] = []
    on_frame = conn.on_frame
    frame = bytes(b"".join(rworker.wire.encode_frame([kind], None)))

    def spy(cn: Any, buf: Any) -> None:
        if bytes(buf) == frame:
            seen.append(time.monotonic())
        on_frame(cn, buf)

    conn.on_frame = spy
    return seen


async def test_an_idle_connection_is_pinged_seldom_and_fast_once_asked(monkeypatch):
    # Every connection was pinged each heartbeat interval, both ways: 32 idle worker
    # processes that had all called each other took a quarter of a core pinging. One
    # that nobody waits on is pinged every IDLE_TIMEOUT / 6 now, and every interval
    # while its peer asks (K_ASK), as a caller or watcher does.
    more = _count_ticks(monkeypatch)
    async with ag.local_cluster(1, transport="tcp") as c:
        w = c.driver
        assert await w.call("w1", add, (1, 2)) == 3
        await more(2 * 10)  # (w1 pings fast for ASK_WINDOW after an ask of the call's)
        pings = _frames_of(w._out["w1"], rworker.K_PING)
        (accepted,) = [
            cn for cn in c.workers[0]._conns if cn.peer_name == "driver" and not cn.outgoing
        ]
        asks = _frames_of(accepted, rworker.K_ASK)
        await more(2 * 20)  # (20 rounds of each: 1 s)
        assert pings == [] and asks == []
        assert not w.is_lost("w1")
        w.watch("w1")  # (as a pass does: w1 asked at once, and answers every round)
        await more(2 * 20)
        assert len(asks) >= 15 and len(pings) >= 15, (len(asks), len(pings))
        gaps = np.diff(pings)
        assert gaps.max() < rworker.HEARTBEAT_TIMEOUT, gaps.max()
        assert not w.is_lost("w1")
        w.unwatch("w1")
        await more(2 * 10)  # (the last asks fade: w1 pings for ASK_WINDOW after each)
        n, m = len(asks), len(pings)
        await more(2 * 20)
        assert (len(asks), len(pings)) == (n, m)


async def test_a_peer_idle_for_long_is_not_lost_when_a_watch_begins(monkeypatch):
    # Its silence counts from the first ask, not from its last seldom ping.
    more = _count_ticks(monkeypatch)
    async with ag.local_cluster(1, transport="tcp") as c:
        w = c.driver
        assert await w.call("w1", add, (1, 2)) == 3
        await more(2 * 20)  # (1 s idle: more than the heartbeat timeout)
        conn = w._out["w1"]
        assert time.monotonic() - conn.last_recv > rworker.HEARTBEAT_TIMEOUT
        w.watch("w1")
        await more(2 * 20)
        assert not w.is_lost("w1") and not conn.closed
        assert time.monotonic() - conn.last_recv < rworker.HEARTBEAT_TIMEOUT
        w.unwatch("w1")
        # (and a call after the idle time works, its caller asking as it waits)
        await more(2 * 20)
        assert await w.call("w1", asyncio.sleep, (0.5, 7)) == 7
        assert not w.is_lost("w1")


async def _through(w, peer: str, link: str, relayed: list) -> None:
    """Worker ``w`` reaches ``peer`` at ``link`` (a slow_link relay) from now on: its
    connection to it closed, a call made through the link."""
    wid = w.members[peer][0]
    w.members = {**w.members, peer: (wid, link, "")}
    old = w._out.pop(peer, None)
    if old is not None:
        old.close()
    assert await w.call(peer, add, (1, 2)) == 3
    assert relayed, "the call did not go through the link"


async def test_a_request_that_takes_longer_than_the_timeout_to_send_is_not_lost(monkeypatch):
    # The caller's asks for pings queue behind its request: sent over a slow link for
    # longer than the heartbeat timeout, to a peer that pinged seldom (idle before), the
    # live peer sent nothing meanwhile and was taken for lost (it pinged every interval
    # before asks). A peer pings as if asked while frames come.
    more = _count_ticks(monkeypatch)
    async with ag.local_cluster(1, transport="tcp") as c:
        w = c.driver
        async with slow_link(w.members["w1"][1], {"up": 2e6}) as (link, relayed):
            await _through(w, "w1", link, relayed)
            await more(2 * 20)  # (1 s idle: more than the heartbeat timeout)
            x = np.ones(250_000)  # (2 MB: 1 s through the link)
            t0 = time.monotonic()
            assert await w.call("w1", np.sum, (x,)) == x.size
            assert time.monotonic() - t0 > 3 * rworker.HEARTBEAT_TIMEOUT
            assert not w.is_lost("w1")


async def test_a_call_to_a_name_the_head_could_not_be_asked_about_says_so(monkeypatch):
    # A member calling a name it does not know asks the head for the member list first
    # (the news of a join may be on its way). With its link to the head stalled (or the
    # head's loop blocked) for the heartbeat timeout, that fetch failed, and the call
    # raised ValueError "unknown worker 'y'; known workers: [...]", as for a wrong name,
    # of a worker that had joined: its news came a moment later.
    more = _count_ticks(monkeypatch)
    async with ag.local_cluster(1, transport="tcp") as c:
        flowing = asyncio.Event()
        flowing.set()
        async with slow_link(c.address, {}, flowing) as (link, relayed):
            x = ag.runtime.Worker("x", token=c.driver.token)
            y = ag.runtime.Worker("y", token=c.driver.token)
            await x.start()
            await y.start()
            try:
                await x.join(link)
                assert relayed, "x did not join through the link"
                flowing.clear()  # (x's link to the head stalls)
                await y.join(c.address)
                with pytest.raises(
                    ag.WorkerLost,
                    match=r"^worker 'y' is not in this worker's view of the cluster, and the "
                    r"cluster's head did not give its member list: worker 'driver' sent "
                    r"nothing for 0\.3 s",
                ):
                    await asyncio.wait_for(x.call("y", add, (1, 2)), 10)
                flowing.set()
                await until(lambda: "y" in x.members)
                assert await x.call("y", add, (1, 2)) == 3
                await more(2)
                assert not x.registry_conn.closed  # (still a member)
                assert "x" in c.driver.members
            finally:
                await y.shutdown()
                await x.shutdown()


@pytest.mark.parametrize("kind", ["inproc", "tcp"])
async def test_a_call_to_a_name_unknown_after_the_head_was_lost_says_so(kind):
    # A member whose connection to the head closed (the head dropped it, or the link
    # broke) has no head left to ask about a name it does not know: a worker that had
    # joined, its news not read before the connection went, was called "unknown
    # worker 'y'", a ValueError that reads as a wrong name, where every other error of
    # such a member says it lost the head.
    async with ag.local_cluster(1, transport=kind) as c:
        x = ag.runtime.Worker("x", token=c.driver.token, transport_kind=kind)
        y = ag.runtime.Worker("y", token=c.driver.token, transport_kind=kind)
        await x.start()
        await y.start()
        try:
            await x.join(c.address)
            x.registry_conn.abort(ConnectionResetError("link cut"))
            await until(lambda: "x" not in c.driver.members)
            await y.join(c.address)
            with pytest.raises(
                ag.WorkerLost,
                match=r"^worker 'y' is not in this worker's view of the cluster, and the "
                r"cluster's head did not give its member list: this worker's connection to "
                r"the cluster's head broke \(.*link cut",
            ):
                await asyncio.wait_for(x.call("y", add, (1, 2)), 10)
            with pytest.raises(ag.WorkerLost, match=r"^worker 'no such' is not in"):
                await asyncio.wait_for(x.call("no such", add, (1, 2)), 10)
        finally:
            await y.shutdown()
            await x.shutdown()


async def test_calls_behind_a_big_frame_say_why_their_connection_was_lost(monkeypatch):
    # A request larger than the socket buffers takes a slow link seconds to pass: the
    # call waits for it to drain, and the calls made meanwhile wait to send theirs. When
    # the peer was taken for lost then, they all failed with the transport's bare
    # "connection to 'w1' closed while sending" (the call behind never was): the reason,
    # w1 silent for the heartbeat timeout, was only in the calls already sent.
    more = _count_ticks(monkeypatch)
    async with ag.local_cluster(1, transport="tcp") as c:
        w = c.driver
        async with slow_link(w.members["w1"][1], {"up": 1e6}) as (link, relayed):
            await _through(w, "w1", link, relayed)
            conn = w._out["w1"]
            for cn in c.workers[0]._conns:  # (w1 silent from now on: no pings)
                monkeypatch.setattr(cn, "send_heartbeat", lambda *_: None)
            big = asyncio.ensure_future(w.call("w1", np.sum, (np.ones(4_000_000),)))  # 32 MB
            await until(lambda: conn._write_paused or big.done())
            behind = asyncio.ensure_future(w.call("w1", add, (1, 2)))
            await more(2)
            assert not behind.done() and not big.done()  # (both wait for the big frame)
            for call in (big, behind):
                with pytest.raises(ag.WorkerLost, match="'w1' sent nothing for 0.3 s"):
                    await asyncio.wait_for(call, 10)
            assert w.is_lost("w1")


async def test_a_watched_silent_peer_is_reported_lost_within_the_heartbeat_timeout(monkeypatch):
    monkeypatch.setattr(rworker, "HEARTBEAT_INTERVAL", 0.05)
    monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 0.3)
    async with ag.local_cluster(1, transport="tcp") as c:
        w = c.driver
        await w.call("w1", add, (1, 2))
        lost = asyncio.Event()
        w.add_peer_lost_callback(lambda name: name == "w1" and lost.set())
        w1 = c.workers[0]
        for conn in w1._conns:  # silence w1: no more pings from it, asked or not
            monkeypatch.setattr(conn, "send_heartbeat", lambda *_: None)
        await asyncio.sleep(0.6)  # silent, but not watched: kept (IDLE_TIMEOUT)
        assert not lost.is_set() and not w.is_lost("w1")
        w.watch("w1")
        await asyncio.wait_for(lost.wait(), 3)
        assert w.is_lost("w1")
        w.unwatch("w1")
