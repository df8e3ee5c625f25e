"""Transport-level tests: framing, coalescing, big frames, limits, handshake, backpressure."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_no_cycles

import actorgrad as ag
from actorgrad import wire
from actorgrad.errors import AuthError
from actorgrad.runtime import transport
from actorgrad.runtime.transport import Connection, StreamConnection, handshake

PREFIX = transport._PREFIX  # (a frame's length and tag: none between these fakes)


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data):
        self.writes.append(bytes(data))

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_write_buffer_size(self):
        return 0

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_extra_info(self, name, default=None):
        return ("fake", 0) if name == "peername" else default


def _conn(frames):
    c = Connection(kind="fake", on_frame=lambda conn, f: frames.append(f))
    t = FakeTransport()
    c.connection_made(t)
    c.start_frames()
    return c, t


def _framed(header, body=None):
    chunks = wire.encode_frame(header, body)
    data = bytes(wire.join_chunks(chunks))
    return PREFIX.pack(len(data), bytes(16)) + data


async def test_frames_split_and_merged_arbitrarily_are_reassembled():
    frames = []
    c, _ = _conn(frames)
    stream = b"".join(_framed([i], {"x": list(range(i))}) for i in range(20))
    for i in range(0, len(stream), 7):
        c.data_received(stream[i : i + 7])
    assert [wire.decode_frame(f).header for f in frames] == [[i] for i in range(20)]
    frames.clear()
    c.data_received(stream)
    assert len(frames) == 20


async def test_a_stream_connection_lets_its_read_buffer_go_once_its_transport_is_gone():
    # (a connection can outlive its transport in a reference cycle until a garbage
    # collection: with its 256 KiB read buffer, a driver that joined and left 150
    # times in one process held 21 MB more)
    c = StreamConnection(kind="fake", on_frame=lambda conn, f: None)
    c.connection_made(FakeTransport())
    assert len(c.get_buffer(-1)) > 0
    c.connection_lost(None)
    assert c._scratch_mv is None and c.closed


async def test_big_frame_is_assembled_in_place_and_arrays_are_writable():
    frames = []
    c, _ = _conn(frames)
    a = np.arange(1_000_000, dtype=np.float64)
    data = _framed([1], a)
    for i in range(0, len(data), 65536):
        c.data_received(data[i : i + 65536])
    assert len(frames) == 1 and not memoryview(frames[0]).readonly
    b = wire.decode_frame(frames[0]).body()
    np.testing.assert_array_equal(a, b)
    b[0] = 42.0  # writable, zero copy


async def test_oversized_length_prefix_is_a_protocol_error_and_closes():
    frames = []
    c, t = _conn(frames)
    c.max_frame_size = 1000
    c.data_received(PREFIX.pack(1001, bytes(16)) + b"x" * 10)
    assert c.closed and t.closed and isinstance(c.close_reason, ag.ProtocolError)
    assert frames == []


async def test_small_messages_of_one_tick_are_coalesced():
    c, t = _conn([])
    c.peer_name = "p"
    for i in range(10):
        c.send_nowait(wire.encode_frame([i], None))
    assert len(t.writes) == 1  # the first frame of the tick goes out at once
    await asyncio.sleep(0)
    assert len(t.writes) == 2  # the other nine in one write
    got = []
    r, _ = _conn(got)
    r.data_received(b"".join(t.writes))
    assert [wire.decode_frame(f).header for f in got] == [[i] for i in range(10)]


async def test_a_read_on_one_connection_lets_another_write_its_next_frame_at_once():
    # (a worker reads a request on the connection its peer opened and answers on one
    # of its own: that answer waited a loop turn, queued behind a call_soon, every
    # other time, because its connection never reads and so kept counting it as
    # "already wrote at once")
    out, t = _conn([])
    out.peer_name = "p"
    inbox, _ = _conn([])
    for i in range(3):
        inbox.data_received(_framed([i]))
        out.send_nowait(wire.encode_frame([i], None))
        assert len(t.writes) == i + 1, f"frame {i} waited for the loop"
    out.send_nowait(wire.encode_frame([3], None))  # (no read since: coalesced)
    assert len(t.writes) == 3
    await asyncio.sleep(0)
    assert len(t.writes) == 4


async def test_coalesced_writes_are_bounded_so_the_peer_can_start_early():
    c, t = _conn([])
    c.peer_name = "p"
    frames = [wire.encode_frame([i], "x" * 20) for i in range(200)]
    for f in frames:
        c.send_nowait(f)
    await asyncio.sleep(0)
    frame_size = 8 + len(frames[0][0])
    assert len(t.writes) > 5
    assert all(len(w) < transport.COALESCE_MAX + frame_size for w in t.writes)
    got = []
    r, _ = _conn(got)
    r.data_received(b"".join(t.writes))
    assert [wire.decode_frame(f).header for f in got] == [[i] for i in range(200)]


async def test_big_messages_are_written_without_joining():
    c, t = _conn([])
    a = np.zeros(1_000_000, dtype=np.uint8)
    c.send_nowait(wire.encode_frame([0], a))
    assert len(t.writes) >= 2  # prefix and chunks, no concatenated copy
    assert sum(len(w) for w in t.writes) > 1_000_000


class WritevTransport(FakeTransport):
    """A transport whose writelines does not join (like uvloop's)."""

    def writelines(self, list_of_data):
        self.writes.append([memoryview(d) for d in list_of_data])


async def test_medium_frames_with_arrays_go_out_in_one_writelines_without_copies():
    c = Connection(kind="fake")
    t = WritevTransport()
    c.connection_made(t)
    c.start_frames()
    c.send_nowait(wire.encode_frame([0], None))  # small: written at once
    c.send_nowait(wire.encode_frame([1], None))  # coalesced...
    a = np.ones(wire.OOB_THRESHOLD, dtype=np.uint8)  # out of band, < the old 256 KiB limit
    c.send_nowait(wire.encode_frame([2], a))  # ...and written along with the big one
    assert len(t.writes) == 2 and isinstance(t.writes[1], list)
    assert any(np.shares_memory(np.asarray(m), a) for m in t.writes[1])  # a itself, no copy
    got = []
    r, _ = _conn(got)
    r.data_received(t.writes[0] + b"".join(bytes(m) for m in t.writes[1]))
    assert [wire.decode_frame(f).header for f in got] == [[0], [1], [2]]


async def test_big_frame_buffers_are_recycled_once_nothing_refers_to_them():
    frames = []
    c, _ = _conn(frames)
    data = _framed([1], np.arange(100_000, dtype=np.float64))  # > _BufferPool.MIN_SIZE

    def receive():
        for i in range(0, len(data), 65536):
            c.data_received(data[i : i + 65536])
        return wire.decode_frame(frames.pop()).body()

    kept = receive()
    again = receive()
    assert not np.shares_memory(kept, again)  # the first one is still referenced
    addr = again.__array_interface__["data"][0]
    del again
    third = receive()
    assert third.__array_interface__["data"][0] == addr  # recycled
    np.testing.assert_array_equal(third, np.arange(100_000, dtype=np.float64))
    np.testing.assert_array_equal(kept, np.arange(100_000, dtype=np.float64))


@pytest.mark.parametrize("n", [transport.BIG_FRAME, transport._BufferPool.MIN_SIZE + 5])
def test_big_frame_buffers_are_64_byte_aligned_and_never_just_past_their_source(n):
    # a copy to 1-63 bytes past its source modulo 4 KiB runs into 4K aliasing (10x
    # slower on the 2-core VM); the pool moves the frame's start out of that window
    pool = transport._BufferPool()
    natural = np.frombuffer(pool.get(n), np.uint8).ctypes.data
    for back in (0, 1, 8, 16, 63, 64, 100):
        near = natural - back
        got = np.frombuffer(pool.get(n, near), np.uint8)
        addr = got.ctypes.data
        assert got.size == n and got.flags.writeable
        assert addr % 64 == 0
        assert not 0 < (addr - near) % 4096 < 64, (back, (addr - near) % 4096)


def test_a_pool_idle_for_a_while_drops_its_free_buffers(monkeypatch):
    # Each connection kept its buffers for good: a driver that got a 60 MiB message
    # from each of its 16 workers kept 1 GB while idle.
    P = transport._BufferPool
    monkeypatch.setattr(P, "_pools", weakref.WeakSet(), raising=False)
    idle, busy, recent = P(), P(), P()
    for pool in (idle, busy, recent):
        pool.get(300_000)  # (freed at once: kept for the next frame of its size)
    held = busy.get(400_000)  # (its frame lives on)
    assert all(len(p._bufs) >= 1 for p in (idle, busy, recent))
    now = time.monotonic()
    idle._used = busy._used = now - P.IDLE_SECONDS - 1
    dropped = P.trim_idle(now)
    assert idle._bufs == [] and recent._bufs != []
    assert [len(b) for b in busy._bufs] == [len(held.obj)]  # (in use: kept)
    assert dropped >= 2 * 300_000


async def test_big_frames_assembled_across_reads_at_every_offset_decode_aligned():
    arr = np.arange(20_000, dtype=np.float32)  # an 80 KiB frame, in two reads: placed
    data = _framed([7], arr)
    for lead in (0, 1, 8, 13, 64):
        frames = []
        c, _ = _conn(frames)
        first = _framed([0], np.zeros(lead, np.uint8)) + data[:30_000]
        c.data_received(memoryview(bytearray(first)))
        c.data_received(memoryview(bytearray(data[30_000:])))
        out = wire.decode_frame(frames[-1])
        assert out.header == [7]
        body = out.body()
        np.testing.assert_array_equal(body, arr)
        assert body.ctypes.data % 64 == 0


async def _inproc_pair(server_token, client_token, server_results=None):
    """(client, the server side's handshake outcomes), the latter also put in
    ``server_results`` (seen when the client's handshake raised)."""
    server_side = []

    def factory():
        s = Connection(kind="inproc")
        server_side.append(asyncio.ensure_future(handshake(s, server_token, server=True)))
        return s

    address = transport.inproc_listen(factory)
    try:
        client = Connection(kind="inproc")
        transport.open_inproc(address, client)
        try:
            await handshake(client, client_token, server=False)
        finally:
            results = await asyncio.gather(*server_side, return_exceptions=True)
            if server_results is not None:
                server_results.extend(results)
    finally:
        transport.inproc_unlisten(address)
    return client, results


async def test_inproc_handshake_succeeds_with_the_same_token():
    client, results = await _inproc_pair("tok", "tok")
    assert results == [None] and not client.closed
    client.close()
    await asyncio.sleep(0)


async def test_inproc_handshake_with_a_wrong_token_is_an_auth_error_on_both_sides():
    server: list = []
    with pytest.raises(AuthError, match="token"):
        await _inproc_pair("tok", "other", server)
    # (the server's side was not looked at: it could have taken the client)
    assert len(server) == 1 and isinstance(server[0], AuthError), server
    assert "wrong cluster token" in str(server[0])


@pytest.mark.parametrize("how", ["wrong token", "client closed", "a worker's, over tcp"])
async def test_a_failed_handshake_leaves_no_reference_cycle(how):
    # The connection was aborted with the error being raised on as its close_reason;
    # that error's traceback holds the handshake's frame (and _read_exact's), and those
    # the connection: a cycle (error, traceback, frame, connection, transport, buffers)
    # kept until a gc run, for each connection a stranger or a stale peer failed.
    async def wrong_token() -> None:
        server: list = []
        try:
            await _inproc_pair("tok", "other", server)
        except AuthError as exc:
            assert "wrong cluster token" in str(exc)
        else:
            raise AssertionError("the handshake passed")
        assert isinstance(server[0], AuthError), server

    async def client_closed() -> None:
        server_side = []

        def factory():
            s = Connection(kind="inproc")
            server_side.append(asyncio.ensure_future(handshake(s, "tok", server=True)))
            return s

        address = transport.inproc_listen(factory)
        try:
            client = Connection(kind="inproc")
            transport.open_inproc(address, client)
            await client.made
            client.close()
            [result] = await asyncio.gather(*server_side, return_exceptions=True)
            assert isinstance(result, AuthError) and "client closed" in str(result), result
        finally:
            transport.inproc_unlisten(address)

    if how != "a worker's, over tcp":
        # (frames only: an in-process connection and its transport refer to each other)
        step = wrong_token if how == "wrong token" else client_closed
        await assert_no_cycles(step, 2, frames_only=True)
        return
    from actorgrad.runtime import Worker

    async with ag.local_cluster(1, transport="tcp") as c:
        w = Worker("x", token="bad")

        async def refused() -> None:
            with pytest.raises(AuthError, match="wrong cluster token"):
                await w.open_connection(c.address)

        try:
            # (frames only: asyncio's socket transport and its bound methods remain)
            await assert_no_cycles(refused, 2, frames_only=True)
        finally:
            await w.shutdown()


async def test_tcp_worker_refuses_wrong_token_via_open_connection():
    async with ag.local_cluster(1, transport="tcp") as c:
        from actorgrad.runtime import Worker

        w = Worker("x", token="bad")
        try:
            with pytest.raises(
                AuthError, match=r"refused: wrong cluster token \(the peer does not take ours\)$"
            ):
                await w.open_connection(c.address)
        finally:
            await w.shutdown()
        assert await ag.rpc("w1", "operator:add", (1, 2)) == 3


async def test_an_echo_server_is_named_not_an_actorgrad_peer():
    # It sent our handshake back: the magic matched, and the MAC check said "wrong
    # cluster token".
    from actorgrad.runtime import Worker

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = Worker("x", token="t")
    try:
        with pytest.raises(AuthError, match="not an actorgrad peer .*an echo server"):
            await w.open_connection(f"127.0.0.1:{port}")
    finally:
        await w.shutdown()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("reply", "then", "said"),
    [
        (
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
            "close",
            r"bad handshake magic: it sent b'HTTP/1\.1'",
        ),
        (b"NO\n", "close", r"it sent b'NO\\n'\.\.\. and closed the connection"),
        (b"NO", "stay", r"it sent b'NO'\.\.\., then nothing for 0\.5 s"),
    ],
)
async def test_a_server_answering_foreign_bytes_is_named_not_an_actorgrad_peer(
    monkeypatch, reply, then, said
):
    # An HTTP server's short error reply, then its close, was "closed the connection
    # before its handshake (the process died ...)": a WorkerLost, not an AuthError.
    from actorgrad.runtime import Worker

    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT", 0.5)
    done = asyncio.Event()

    async def foreign(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)
        if then == "stay":
            await done.wait()
        writer.close()

    server = await asyncio.start_server(foreign, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = Worker("x", token="t")
    try:
        with pytest.raises(AuthError, match=f"^127.0.0.1:{port}: not an actorgrad peer \\({said}"):
            await w.open_connection(f"127.0.0.1:{port}")
    finally:
        done.set()
        await w.shutdown()
        server.close()
        await server.wait_closed()


async def test_a_peer_that_closes_before_its_hello_is_lost_not_a_wrong_token():
    # A process killed just after its kernel accepted the connection closes it before
    # the handshake: that was an AuthError ("a wrong cluster token, ..."), and a call
    # needing that dead peer failed with it instead of WorkerLost.
    from actorgrad.runtime import Worker

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = Worker("x", token="t")
    try:
        with pytest.raises(ag.WorkerLost, match="closed the connection before its handshake"):
            await w.open_connection(f"127.0.0.1:{port}")
    finally:
        await w.shutdown()
        server.close()
        await server.wait_closed()


async def test_a_peer_that_closes_after_its_hello_without_refusing_is_lost_not_a_wrong_token():
    # A worker shutting down (a whole cluster stopping) closes the connections still in
    # their handshake, also after its hello: that was an AuthError ("a wrong cluster
    # token, the peer is shutting down, or ..."), in 1-3 of 100 calls to a stopping TCP
    # cluster. A peer that refuses our token now says so (test_badinput's raw client).
    from actorgrad.runtime import Worker

    async def hello_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(transport._HELLO.pack(transport.MAGIC, transport.PROTOCOL_VERSION, b"n" * 32))
        await reader.readexactly(transport._HELLO.size + transport._MAC_LEN)  # (hello, MAC)
        writer.close()

    server = await asyncio.start_server(hello_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = Worker("x", token="t")
    try:
        with pytest.raises(
            ag.WorkerLost, match=r"closed the connection during its handshake, without refusing"
        ):
            await w.open_connection(f"127.0.0.1:{port}")
    finally:
        await w.shutdown()
        server.close()
        await server.wait_closed()


async def test_a_handshake_cut_by_its_own_workers_shutdown_is_that_shutdown_not_a_refusal():
    # The worker's shutdown closes its connections still in their handshake: that was
    # "handshake with ... refused: connection closed by the peer (a wrong cluster
    # token, ...)", an AuthError, to a call whose own worker had shut down.
    from actorgrad.runtime import Worker

    mac_came = asyncio.Event()
    done = asyncio.Event()

    async def hello_then_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        writer.write(transport._HELLO.pack(transport.MAGIC, transport.PROTOCOL_VERSION, b"n" * 32))
        # (the client's hello, then its MAC: it sent that once it had ours)
        await reader.readexactly(transport._HELLO.size + transport._MAC_LEN)
        mac_came.set()
        await done.wait()
        writer.close()

    server = await asyncio.start_server(hello_then_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    w = Worker("x", token="t")
    try:
        opening = asyncio.ensure_future(w.open_connection(f"127.0.0.1:{port}"))
        await asyncio.wait_for(mac_came.wait(), 5)
        await w.shutdown()
        with pytest.raises(ag.WorkerLost, match="^worker 'x' shut down$"):
            await asyncio.wait_for(opening, 5)
    finally:
        done.set()
        await w.shutdown()
        server.close()
        await server.wait_closed()


async def test_a_worker_shutting_down_with_a_connection_in_its_handshake_logs_no_error(caplog):
    # The accepting side of the above: its handshake, cut by its worker's shutdown, is a
    # connection that went (the accept ignores it), not "task ... failed" in the log.
    from actorgrad.runtime import Worker

    w = Worker("x", token="t")
    await w.start()
    host, port = transport.split_address(w.address)
    _, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(5):
            while not any(c._handshaking and c.transport for c in w._conns):  # noqa: ASYNC110 (accepted from the next turns on)
                await asyncio.sleep(0)
        await w.shutdown()
    finally:
        writer.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_nobody_listening_is_worker_lost():
    from actorgrad.runtime import Worker

    w = Worker("x", token="t")
    try:
        with pytest.raises(ag.WorkerLost, match=r"cannot connect to 127\.0\.0\.1:1: "):
            await w.open_connection("127.0.0.1:1")
        with pytest.raises(ag.WorkerLost, match="no in-process worker listens at"):
            await w.open_connection("inproc://999999")
    finally:
        await w.shutdown()


async def _nap_add(a, b):
    await asyncio.sleep(0.005)
    return a + b


async def test_full_mailbox_pauses_reading_and_every_call_completes(cluster):
    w1 = cluster.workers[0]
    w1._mailbox_size = 4
    w1._max_in_flight = 8
    paused = []
    most = 0
    orig = transport.Connection.pause_reading

    def spy(self):
        nonlocal most
        paused.append(self)
        most = max(most, w1._inflight)
        orig(self)

    transport.Connection.pause_reading = spy  # type: ignore[method-assign]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(ag.rpc("w1", _nap_add, (i, 1)) for i in range(500))), 20
        )
    finally:
        transport.Connection.pause_reading = orig  # type: ignore[method-assign]
    assert results == [i + 1 for i in range(500)]
    assert paused, "the mailbox never filled up"
    assert most <= 8
    assert not any(c.paused_reading for c in w1._conns)
    assert not w1._mailbox and w1._inflight == 0


async def test_max_frame_size_is_configurable_per_worker():
    from actorgrad.runtime import Worker

    async with ag.local_cluster(0, transport="tcp") as c:
        small = Worker("small", token=c.driver.token, transport_kind="tcp", max_frame_size=4096)
        await small.start()
        try:
            await small.join(c.address)
            assert await ag.rpc("small", "operator:add", (1, 2)) == 3
            (conn,) = [k for k in c.driver._conns if k.peer_name == "small" and k.outgoing]
            # (its hello says how large a frame it takes: sent, the frame made it close
            # the connection, and the caller got "connection to worker 'small' lost")
            with pytest.raises(
                ag.ProtocolError,
                match=r"cannot send a message of \d+ bytes to 'small': more than the "
                r"largest frame it takes \(4096 bytes\)",
            ):
                await asyncio.wait_for(ag.rpc("small", "operator:add", (b"x" * 10_000, b"")), 5)
            assert await ag.rpc("small", "operator:add", (2, 2)) == 4
            assert not conn.closed
            # (a reply too large for it fails as the callee's error, the call answered)
            with pytest.raises(ag.RemoteError, match="more than the largest frame it takes"):
                await small.call("driver", "operator:mul", (b"x", 10_000))
        finally:
            await small.shutdown()


async def _uvloop_workload():
    async with ag.local_cluster(2, transport="tcp"):
        a = np.arange(1_000_000, dtype=np.float32)
        b = await ag.rpc("w1", "numpy:negative", (a,))
        np.testing.assert_array_equal(b, -a)
        results = await asyncio.gather(*(ag.rpc("w2", "operator:add", (i, 1)) for i in range(200)))
        assert results == [i + 1 for i in range(200)]
        r = await ag.remote("w1", "builtins:list", ([1],))
        assert await ag.rpc("w2", "operator:getitem", ([r], 0)) is not None
        return True


def test_everything_also_works_on_uvloop():
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(_uvloop_workload())


async def test_a_connection_closed_before_it_was_made_logs_no_unretrieved_error():
    # (seen in a chaos run: "Future exception was never retrieved ... connection
    # closed" for a connection that closed while nobody awaited its `made`)
    import gc

    loop = asyncio.get_running_loop()
    seen: list[dict] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda lp, ctx: seen.append(ctx))
    try:
        conn = transport.Connection(kind="tcp")
        conn.abort(ConnectionResetError("gone"))
        assert conn.closed and conn.made.done()
        del conn
        gc.collect()  # (an unretrieved error is reported as the future is freed)
    finally:
        loop.set_exception_handler(old)
    assert not [c for c in seen if "never retrieved" in c.get("message", "")], seen
    # whoever awaits it still gets the error
    conn = transport.Connection(kind="tcp")
    conn.abort()
    with pytest.raises(ConnectionResetError, match="connection closed"):
        await conn.made


class _UnpausingWritev(asyncio.WriteTransport):
    """A transport whose own writelines buffers what the socket does not take without
    pausing its protocol, as asyncio's selector transport of CPython 3.12.0-3.12.8 and
    3.13.0-3.13.1 does (gh-127655); setting the limits checks the buffer, as theirs."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol, self.buffered, self.high = protocol, 0, 65536

    def writelines(self, list_of_data) -> None:  # type: ignore[override]
        self.buffered += sum(len(memoryview(d).cast("B")) for d in list_of_data)

    def write(self, data) -> None:  # type: ignore[override]
        self.writelines([data])

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high=None, low=None) -> None:  # type: ignore[override]
        self.high = 65536 if high is None else high
        if self.buffered > self.high:
            self.protocol.pause_writing()

    def get_extra_info(self, name, default=None):  # type: ignore[override]
        return default

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


async def test_a_big_frame_left_buffered_by_a_writelines_that_does_not_pause_pauses():
    # asyncio's own writelines (3.12+) never paused the protocol: send() did not wait,
    # and replies to a peer that reads nothing piled up (25 MB where the cap is 1 MiB)
    conn = transport.Connection(kind="tcp")
    conn.connection_made(_UnpausingWritev(conn))
    assert conn._writev
    conn.send_nowait([bytes(transport.BIG_FRAME)])
    assert conn._write_paused


#: the driver of the test below: a fresh process, so that its address space (VmSize)
#: and what it allocates meanwhile are its own, not those of a test process that ran
#: other tests first (there the copy could fit, and the limit hit asyncio's own
#: bookkeeping of the write instead: in the whole suite, 1 run in 1)
HALF_WRITTEN_FRAME = """
import asyncio, logging, resource
import numpy as np
import actorgrad as ag

def address_space():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

async def main():
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", len, ([1, 2],)) == 2
        big = np.ones(256 << 20, np.uint8)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = address_space() + (128 << 20)  # (less than the copy: the worker has none)
        if hard != resource.RLIM_INFINITY and hard < limit:
            print("SKIP", flush=True)
            return
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        try:
            await asyncio.wait_for(ag.rpc("w1", len, (big,)), 30)
            print("sent", flush=True)
        except MemoryError:
            print("MemoryError", flush=True)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        del big
        # (over a new connection: nothing can follow half a frame on the old one)
        print("later", await asyncio.wait_for(ag.rpc("w1", len, ([1, 2, 3],)), 10), flush=True)

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_a_big_frame_that_fails_part_way_out_breaks_its_connection_not_later_calls(tmp_path):
    # On asyncio's own loop the part of a big frame the socket does not take at once is
    # copied into the transport's buffer. Where that copy failed (MemoryError), the
    # frame was left half written on a connection kept open: the peer waited for the
    # rest of it, every later call to that worker waited for good, and asyncio's
    # transport (its writer registered, its buffer empty) logged "AssertionError: Data
    # should not be empty" at every loop turn; closing it alone left that registration
    # behind, and the next connection, given the same file number, could not be read.
    # (the script runs on asyncio's own loop, whatever loop this test process has)
    script = tmp_path / "half_written.py"
    script.write_text(HALF_WRITTEN_FRAME)
    repo = str(Path(ag.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORGRAD_")}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**env, "PYTHONPATH": repo},
        cwd=tmp_path,
    )
    if out.stdout.startswith("SKIP"):
        pytest.skip("the address space is limited already")
    if out.stdout.startswith("sent") and sys.version_info >= (3, 12):
        # (asyncio's selector transport has writelines since 3.12, which keeps what the
        # socket did not take as views of the frame's own memory, as uvloop does: no
        # copy to fail; 3.13 sent it whole under the limit)
        pytest.skip("this Python's asyncio makes no copy of a big frame")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["MemoryError", "later 3"], out.stderr
    # (the driver's own log: no asyncio error at every loop turn, no traceback)
    driver_log = [line for line in out.stderr.splitlines() if not line.startswith("[w1] ")]
    assert driver_log == [], out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_big_frame_buffer_is_not_shared_with_a_forked_child():
    # Buffers of LAZY_SIZE bytes or more are memory maps: shared ones let a worker
    # function's forked child write into the arrays its parent received.
    pool = transport._BufferPool()
    mv = pool.get(transport._BufferPool.LAZY_SIZE)
    mv[0] = 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        mv[0] = 2
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert mv[0] == 1


async def test_a_connection_closed_before_its_transport_came_closes_the_transport():
    # A worker shutting down between an accept and the transport's connection_made
    # closed the connection while it had no transport: the socket stayed open until
    # the garbage collector found it (a ResourceWarning in a later test).
    c = Connection(kind="fake")
    c.close(None)
    t = FakeTransport()
    c.connection_made(t)
    assert t.closed and c.closed


def test_a_frames_tag_covers_its_number_length_header_and_body_not_its_big_arrays():
    out_key, in_key = transport.frame_keys("tok", b"c" * 32, b"s" * 32, server=False)
    s_out, s_in = transport.frame_keys("tok", b"c" * 32, b"s" * 32, server=True)
    assert (out_key, in_key) == (s_in, s_out) and out_key != in_key
    chunks = wire.encode_frame([0, "mod:fn"], (np.ones(1 << 14, np.float64), [1, 2]))
    frame = bytes(wire.join_chunks(chunks))
    front = wire.front_nbytes(frame, len(frame))
    assert 20 < front < len(frame) - (1 << 17) + 64

    def checked(data, tag, seq=0):
        mac = transport.FrameMac(out_key, wire.front_nbytes)
        mac.seq = seq
        return mac.check(data, tag)

    tag = transport.FrameMac(out_key, wire.front_nbytes).tag(chunks, len(frame))
    assert checked(frame, tag)
    assert not checked(frame, tag, seq=1)  # (replayed, or one dropped before it)
    assert not checked(frame[:-8] + bytes(8), bytes(16))
    assert not transport.FrameMac(in_key, wire.front_nbytes).check(frame, tag)  # sent back
    for at in (0, 5, 30, front - 1):  # prefix, lengths, header, body: all covered
        bad = bytearray(frame)
        bad[at] ^= 1
        assert not checked(bad, tag), at
    bad = bytearray(frame)
    bad[-1] ^= 1  # an out-of-band array's raw bytes: not covered (see FrameMac)
    assert checked(bad, tag)
    assert not checked(frame + b"x", tag)  # (the length is covered)


async def test_a_frame_of_the_largest_size_is_taken_and_one_byte_more_refused():
    frames = []
    c, t = _conn(frames)
    c.max_frame_size = 1000
    c.data_received(PREFIX.pack(1000, bytes(16)) + b"x" * 1000)
    assert [bytes(f) for f in frames] == [b"x" * 1000] and not c.closed
    c.data_received(PREFIX.pack(1001, bytes(16)))
    assert c.closed and t.closed and isinstance(c.close_reason, ag.ProtocolError)
    assert str(c.close_reason) == "declared frame length 1001 exceeds the maximum of 1000 bytes"
    assert len(frames) == 1


async def test_a_frame_of_the_send_limit_goes_and_one_byte_more_is_refused_unsent():
    c, t = _conn([])
    c.peer_name = "p"
    c.send_limit = 1000
    assert c.send_nowait([b"x" * 1000]) == 1000
    assert c.send_nowait([b"x" * 600, memoryview(b"y" * 400)]) == 1000
    for chunks in ([b"x" * 1001], [b"x" * 600, b"y" * 401]):
        with pytest.raises(ag.ProtocolError, match="^cannot send a message of 1001 bytes to 'p'"):
            c.send_nowait(chunks)
    await asyncio.sleep(0)
    head = PREFIX.pack(1000, bytes(16))
    assert b"".join(t.writes) == head + b"x" * 1000 + head + b"x" * 600 + b"y" * 400
    assert not c.closed


class BufferingTransport(FakeTransport):
    """A transport that keeps what it is given unsent (its peer reads nothing)."""

    def __init__(self):
        super().__init__()
        self.unsent = 0

    def get_write_buffer_size(self):
        return self.unsent


def _answering(handled):
    def on_frame(conn, frame):
        handled.append(wire.decode_frame(frame).header)
        conn.send_nowait(wire.encode_frame(["reply", *handled[-1]], "x" * 100))

    c = Connection(kind="fake", on_frame=on_frame)
    t = BufferingTransport()
    c.connection_made(t)
    c.start_frames()
    c.peer_name = "p"
    c.max_unsent = 1000
    return c, t


async def test_frames_read_past_the_unsent_limit_wait_until_the_replies_are_sent():
    handled = []
    c, t = _answering(handled)
    t.unsent = 5000
    c.pause_writing()  # (its transport's buffer is over the high-water mark)
    c.data_received(_framed([0]) + _framed([1]) + _framed([2]))
    assert handled == [[0]] and t.paused  # the rest waits, and the socket is not read
    t.unsent = 0
    c.resume_writing()
    assert not t.paused and handled == [[0]]
    await asyncio.sleep(0)  # (the frames read before are handled in a callback)
    assert handled == [[0], [1], [2]]


async def test_a_connection_paused_for_its_mailbox_and_its_unsent_bytes_reads_when_both_let_it():
    handled = []
    c, t = _answering(handled)
    t.unsent = 5000
    c.pause_writing()
    c.data_received(_framed([0]))
    assert t.paused
    c.pause_reading()  # (its mailbox is full too)
    t.unsent = 0
    c.resume_writing()
    assert t.paused  # (still: for the mailbox)
    c.resume_reading()
    assert not t.paused
    c.pause_reading()
    assert t.paused
    c.resume_reading()
    assert not t.paused and handled == [[0]]


async def test_the_first_frame_after_a_coalesced_write_goes_out_at_once():
    c, t = _conn([])
    c.peer_name = "p"
    c.send_nowait(wire.encode_frame([0], None))
    c.send_nowait(wire.encode_frame([1], None))
    await asyncio.sleep(0)
    assert len(t.writes) == 2
    c.send_nowait(wire.encode_frame([2], None))  # (no read since: but nothing is queued)
    assert len(t.writes) == 3


async def test_frames_coalesced_before_a_connection_was_aborted_are_not_written():
    c, t = _conn([])
    c.peer_name = "p"
    c.send_nowait(wire.encode_frame([0], None))
    c.send_nowait(wire.encode_frame([1], None))
    c.abort()
    await asyncio.sleep(0)
    assert len(t.writes) == 1


async def test_replies_made_while_handling_a_read_are_written_once_it_was_handled():
    def on_frame(conn, frame):
        for i in range(3):
            conn.send_nowait(wire.encode_frame([i], None))

    c = Connection(kind="fake", on_frame=on_frame)
    t = FakeTransport()
    c.connection_made(t)
    c.start_frames()
    c.peer_name = "p"
    c.data_received(_framed(["request"]))
    # the first reply at once, the other two in one write as the read was handled
    assert len(t.writes) == 2
    got = []
    r, _ = _conn(got)
    r.data_received(b"".join(t.writes))
    assert [wire.decode_frame(f).header for f in got] == [[0], [1], [2]]


async def test_frames_after_a_big_frame_in_the_same_read_are_delivered():
    frames = []
    c, _ = _conn(frames)
    big = _framed([1], np.arange(100_000, dtype=np.float64))
    small = _framed([2])
    c.data_received(big[:1000])
    c.data_received(big[1000:] + small + small[:5])
    c.data_received(small[5:])
    assert [wire.decode_frame(f).header for f in frames] == [[1], [2], [2]]


async def test_a_frame_is_data_to_the_heartbeat_unless_it_is_a_heartbeat():
    from actorgrad.runtime.worker import K_PING  # (the runtime's heartbeats)

    frames = []
    c, _ = _conn(frames)
    ping = b"".join(wire.encode_frame([K_PING], None))
    c.data_received(PREFIX.pack(len(ping), bytes(16)) + ping)
    assert [bytes(f) for f in frames] == [ping] and c.last_data == 0.0
    other = bytearray(ping)
    other[-1] ^= 1  # (as long as a heartbeat, but another frame)
    c.data_received(PREFIX.pack(len(other), bytes(16)) + other)
    assert len(frames) == 2 and c.last_data == c.last_recv > 0


class HalfClosingTransport(FakeTransport):
    """A transport that can end its data and leave the socket open (a TCP one)."""

    def __init__(self, can=True):
        super().__init__()
        self.can = can
        self.eof = False
        self.aborted = asyncio.Event()

    def can_write_eof(self):
        return self.can

    def write_eof(self):
        self.eof = True

    def abort(self):
        super().abort()
        self.aborted.set()


async def test_a_parting_connection_writes_its_goodbye_half_closes_then_aborts_after_its_linger():
    c = Connection(kind="fake")
    t = HalfClosingTransport()
    c.connection_made(t)
    c.start_frames()
    c.peer_name = "p"
    lost = []
    c.on_lost = lambda conn, exc: lost.append(exc)
    c.send_nowait(wire.encode_frame([0], None))  # (at once)
    c.send_nowait(wire.encode_frame(["bye"], None))  # (coalesced: part writes it)
    err = ag.ProtocolError("refused")
    timer = c.part(err, 0.0)
    assert c.closed and c.close_reason is err and lost == [err]
    assert t.eof and not t.closed and len(t.writes) == 2
    assert timer is not None  # (the linger's timer: uvloop's is no asyncio.TimerHandle)
    assert not timer.cancelled()
    await asyncio.wait_for(t.aborted.wait(), 5)  # (the linger's end)
    assert t.closed


async def test_a_parting_connection_without_a_half_close_is_aborted_at_once():
    c = Connection(kind="fake")
    t = HalfClosingTransport(can=False)
    c.connection_made(t)
    c.start_frames()
    err = ag.ProtocolError("refused")
    assert c.part(err, 60.0) is None
    assert c.closed and t.closed and not t.eof and c.close_reason is err
