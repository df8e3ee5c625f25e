"""Mutated real protocol messages against a real worker: the frames a distributed step
sends into w1 (requests, replies, the backward's casts, RRef bookkeeping), sent again
with one field at a time replaced by a value of another type. Every outcome is a clear
error (an error reply, a refused message whose connection closes saying why, a logged
one-way failure) that names what was wrong, never a bare Python error from inside the
runtime ("unhashable type: 'list'"), and w1 serves on.

A message is walked as a tree: the payloads of the codec's ext types are decoded too,
so a tensor's dtype, shape and link, and an RRef's id and fork tag, are fields.
(test_wire_fuzz.py covers the codec alone; test_badinput.py the transport and single
malformed messages.)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys
from typing import Any

import dist_fns as F
import msgpack
import numpy as np
import pytest
from conftest import until

import actorgrad as ag
from actorgrad import wire
from actorgrad.dist.backward import T_DELIVER
from actorgrad.dist.context import PASS_ID_BITS, state_of
from actorgrad.runtime import rref, transport
from actorgrad.runtime.worker import K_CAST, K_REQ

# What Python says from inside code that took a malformed value as it came: the
# runtime's own errors say what was wrong instead. (A method an RRef's value lacks, "'Net'
# object has no attribute 'fit'", is the caller's clear error: a value of a builtin type
# lacking one is the runtime's.)
UNCLEAR = re.compile(
    r"unhashable type|object is not iterable|values to unpack|is (shorter|longer) than arg"
    r"|'(int|float|bool|str|bytes|list|tuple|dict|NoneType)' object has no attribute"
    r"|object is not subscriptable|truth value of an array|unsupported operand"
    r"|not supported between instances|indices must be integers|has no len\(\)"
    r"|object is not callable|argument after \*\* must be"
)


class Ext:
    """An ext value of a message, its payload decoded (None: not msgpack)."""

    def __init__(self, code: int, value: Any, raw: bytes | None = None) -> None:
        self.code, self.value, self.raw = code, value, raw

    def __repr__(self) -> str:
        return f"Ext({self.code}, {self.value!r})"


def _ext_in(code: int, data: bytes) -> Ext:
    try:
        return Ext(code, msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_in))
    except Exception:
        return Ext(code, None, data)


def _ext_out(x: Any) -> Any:
    if isinstance(x, Ext):
        raw = x.raw if x.raw is not None else msgpack.packb(x.value, default=_ext_out)
        return msgpack.ExtType(x.code, raw)
    raise TypeError(f"cannot pack {type(x).__name__}")


def _frame(header: list, body: Any, buffers: list[bytes]) -> bytes:
    """A frame of the codec's layout (see wire.py) from a header, body and buffers."""
    h = msgpack.packb(header, default=_ext_out)
    b = msgpack.packb(body, default=_ext_out)
    out = bytearray(wire._FIXED.pack(wire._TAG, len(h), len(buffers), len(b)))
    out += h + b"".join(len(x).to_bytes(8, "big") for x in buffers) + b
    for x in buffers:
        out += bytes(-len(out) % wire.ALIGN) + x
    return bytes(out)


def _paths(x: Any, at: tuple = ()) -> list[tuple]:
    """The place of every field of a decoded message (the header's kind excluded)."""
    out = [at] if len(at) > 1 or at[:1] == (1,) else []
    if isinstance(x, list):
        for i, item in enumerate(x):
            out += _paths(item, (*at, i))
    elif isinstance(x, dict):
        for k, v in x.items():
            out += _paths(v, (*at, k))
    elif isinstance(x, Ext) and x.value is not None:
        out += _paths(x.value, (*at, "ext"))
    return [p for p in out if p != (0, 0)]


def _replace(x: Any, at: tuple, value: Any) -> None:
    for step in at[:-1]:
        x = x.value if step == "ext" else x[step]
    if at[-1] == "ext":
        x.value = value
    else:
        x[at[-1]] = value


def _get(x: Any, at: tuple) -> Any:
    for step in at:
        x = x.value if step == "ext" else x[step]
    return x


def _others(v: Any) -> list[Any]:
    """Values of other types (and one out of range) to put in place of ``v``."""
    if isinstance(v, bool) or v is None:
        return [[v], 7]
    if isinstance(v, int):
        return [[v], str(v), -1 if v >= 0 else 2**64 - 1]
    if isinstance(v, str):
        return [[v], 7, ""]
    if isinstance(v, bytes):
        return [v[: len(v) // 2], [1]]
    if isinstance(v, Ext):
        return [v.value, Ext(wire.EXT_TUPLE if v.code != wire.EXT_TUPLE else 1, v.value)]
    if isinstance(v, list):
        return [{"k": v}, 7, v[:-1], v * 2 if v else [None]]  # (* 2: each item twice)
    return [[v], 7]


def _fields(frame: bytes) -> list[tuple[tuple, int]]:
    """(place, which replacement) of every mutation of ``frame`` (see _mutated)."""
    f = wire.decode_frame(frame)
    tree = [f.header, _body(f)]
    return [(at, k) for at in _paths(tree) for k in range(len(_others(_get(tree, at))))]


def _mutated(frame: bytes, at: tuple, k: int) -> tuple[Any, bytes]:
    """``frame`` with the field at ``at`` replaced by its ``k``-th other value."""
    f = wire.decode_frame(frame)
    tree = [f.header, _body(f)]
    value = _others(_get(tree, at))[k]
    _replace(tree, at, value)
    return value, _frame(tree[0], tree[1], [bytes(b) for b in f._buffers])


def _mutations(frame: bytes):
    """``frame`` with one field replaced, for each field and replacement."""
    for at, k in _fields(frame):
        yield at, *_mutated(frame, at, k)


def _body(f: wire.Frame) -> Any:
    return msgpack.unpackb(bytes(f._body), raw=False, strict_map_key=False, ext_hook=_ext_in)


def _kind(frame: bytes) -> tuple:
    """(message kind, function or topic); an RRef's method as "rref:<method>"."""
    h = wire.decode_frame(frame).header
    if h[0] == K_REQ:
        return (h[0], h[2] if type(h[2]) is str else f"rref:{h[2][1]}")
    return (h[0], h[1] if h[0] == K_CAST else None)


@pytest.fixture
def recorded(monkeypatch):
    """(sender, connection, frame) of the frames sent by the workers in ``senders`` (name
    -> worker) to w1, but on their membership connections (closing one of those is
    leaving the cluster, see docs/limits.md)."""
    frames: list[tuple[Any, Any, bytes]] = []
    senders: dict[str, Any] = {}
    send = transport.Connection.send_nowait

    def send_nowait(self, chunks):
        chunks = list(chunks)
        w = senders.get(self.owner)
        if w is not None and self.peer_name == "w1" and not w._is_membership(self):
            frames.append((w, self, b"".join(bytes(c) for c in chunks)))
        return send(self, chunks)

    monkeypatch.setattr(transport.Connection, "send_nowait", send_nowait)
    return frames, senders


async def test_mutated_protocol_messages_get_clear_errors_and_the_worker_serves_on(
    recorded, caplog
):
    frames, senders = recorded
    caplog.set_level(logging.WARNING, "actorgrad")
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    unclear: list[str] = []
    sent = 0
    try:
        async with ag.local_cluster(2, transport="tcp") as c:
            driver, w1, w2 = c.driver, *c.workers
            await ag.rpc("w1", F.put, ("a", np.arange(3.0)))
            await ag.rpc("w2", F.put, ("b", np.arange(3.0) + 1))
            mine = await ag.remote("w1", F.make_param, (np.ones(3),))  # (owned by w1)
            opt = ag.dist.DistributedOptimizer(ag.optim.SGD, [mine], lr=0.1)
            senders.update(driver=driver, w2=w2)
            # a real step: requests and replies with tensors, RRefs of w1's forked to it
            # and released, the backward's messages and credit, the release
            x = ag.tensor(np.arange(3.0), requires_grad=True)
            async with ag.dist.context() as ctx:
                y = await ag.rpc("w1", F.mul, ("a", x))
                z = await ag.rpc("w1", F.mul_then_forward, ("a", "w2", "b", x))
                u = await ag.rpc("w2", F.use_rref, (mine, x))
                await ag.dist.backward(ctx, [(y * z).sum() + u.sum()])
                await ag.rpc("w1", F.backward_here, (ctx, "a", x))  # (w1's pass: credit)
                await opt.step(ctx)  # (an RRef's method called on its owner)
            # (another RRef of w1's, forked to w2 and released by both; ``mine`` and the
            # optimizer stay: the messages sent again refer to them)
            brief = await ag.remote("w1", F.make_param, (np.ones(3),))
            await ag.rpc("w2", F.identity, (brief,))
            rid, brief = brief._rid, None
            # (its releases, one-way, reached w1)
            await until(lambda: rid not in w1.owned, 5)  # (no event tells of it)
            senders.clear()
            first: dict[tuple, tuple] = {}  # (sender, kind) -> its first frame
            for w, conn, frame in frames:
                first.setdefault((w.name, _kind(frame)), (w, conn, frame))
            assert {kind[0] for _, kind in first} >= {0, 1, 6}  # requests, replies, casts

            for (who, kind), (sender, conn, frame) in first.items():
                for at, value, bad in _mutations(frame):
                    if conn.closed:  # (refused: the next one goes on a new connection)
                        conn = await sender._conn_to("w1")
                    f = wire.decode_frame(bad)
                    reply = None
                    if f.header[0] == K_REQ and len(f.header) == 5 and type(f.header[1]) is int:
                        # (a call id of its own, waited for: its reply is the outcome)
                        f.header[1] = 1 << 40 | sent
                        if at[:2] != (0, 4):
                            # (out of its context, released by now: refused in it, the
                            # call's arguments would never reach its function)
                            f.header[4] = None
                        bad = _frame(f.header, _body(f), [bytes(b) for b in f._buffers])
                        reply = loop.create_future()
                        conn.pending[f.header[1]] = (reply, rref.Hooks(sender, "w1", conn))
                    conn.send_nowait([bad])
                    sent += 1
                    what = f"{who}'s {kind} with {at} = {value!r:.60}"
                    try:  # (a round trip behind it: it was handled)
                        await asyncio.wait_for(sender.call_on(conn, F.identity, (1,)), 5)
                    except ag.WorkerLost as exc:  # (refused: closed, saying why)
                        assert "closed the connection on a message from this worker" in str(exc)
                        if UNCLEAR.search(str(exc)):
                            unclear.append(f"{what}: {exc}")
                    if reply is None:
                        continue
                    try:
                        await asyncio.wait_for(reply, 5)
                    except TimeoutError:
                        unclear.append(f"{what}: no reply in 5 s")
                    except ag.ActorgradError as exc:
                        # (the runtime's own targets, and the methods of the optimizer it
                        # made on the owner: a user function's errors are its own)
                        own = kind[1].startswith(("actorgrad.", "rref:"))
                        if own and UNCLEAR.search(str(exc)):
                            unclear.append(f"{what}: {exc}")
            unclear += [
                f"logged: {r.getMessage()}"
                for r in caplog.records
                if r.exc_info or UNCLEAR.search(r.getMessage())
            ]
            # w1 serves on, to both, and holds nothing of theirs
            assert await ag.rpc("w1", F.identity, (5,)) == 5
            z = await ag.rpc("w2", F.chain, (["w1"], "a", ag.tensor(np.ones(3))))
            np.testing.assert_array_equal(z.data, np.arange(3.0))
            await until(lambda: not (w1.status()["in_flight"] or w1._mailbox), 5)
    finally:
        loop.set_exception_handler(None)
    assert not unclear, "\n".join(unclear[:20])
    assert not loop_errors, loop_errors[:5]
    assert sent > 300, sent  # (the walk went over the fields of every kind)


async def test_mutated_gradient_messages_of_a_running_pass_fail_it_clearly(monkeypatch, caplog):
    # A gradient message gets past the checks of its context and pass only in a live
    # context, for a pass not over there: each one goes in a context of its own, for a
    # new pass of the driver's, and the failure its pass's origin is told (the
    # message's handler has no reply) must say what was wrong. (Sent again after the
    # step, as above, each is refused for its released context before that.)
    backward = sys.modules["actorgrad.dist.backward"]
    told: list[BaseException] = []
    fail_run = backward._fail_run

    def record(st: Any, pass_id: int, exc: BaseException) -> None:
        told.append(exc)
        fail_run(st, pass_id, exc)

    monkeypatch.setattr(backward, "_fail_run", record)
    caplog.set_level(logging.WARNING, "actorgrad")
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    unclear: list[str] = []
    passes = itertools.count(1 << 30)  # (past the driver's own pass ids)
    try:
        async with ag.local_cluster(1, transport="tcp") as c:
            driver, w1 = c.driver, c.workers[0]
            await ag.rpc("w1", F.put, ("a", np.arange(3.0)))

            def message(ctx: int, send_id: int) -> bytes:
                pass_id = driver.id << PASS_ID_BITS | next(passes)
                args = [ctx, "driver", pass_id, True, [send_id, np.ones(3)], 1, 0, "driver"]
                return bytes(
                    wire.join_chunks(wire.encode_frame([K_CAST, T_DELIVER], [*args, None, []]))
                )

            fields = _fields(message(1, 1))
            assert len(fields) > 40, fields
            for at, k in fields:
                x = ag.tensor(np.arange(3.0), requires_grad=True)
                told.clear()
                try:
                    async with ag.dist.context() as ctx:
                        await ag.rpc("w1", F.mul, ("a", x))
                        (send_id,) = state_of(w1).contexts[ctx].sends
                        value, bad = _mutated(message(ctx, send_id), at, k)
                        conn = await driver._conn_to("w1")
                        conn.send_nowait([bad])
                        # (a round trip behind it: it was handled)
                        await asyncio.wait_for(driver.call_on(conn, F.identity, (1,)), 5)
                except ag.WorkerLost as exc:  # (refused: closed, saying why)
                    assert "closed the connection on a message from this worker" in str(exc)
                    told.append(exc)
                unclear += [
                    f"{at} = {value!r:.60}: {exc!r}" for exc in told if UNCLEAR.search(str(exc))
                ]
            unclear += [
                f"logged: {r.getMessage()}"
                for r in caplog.records
                if r.exc_info or UNCLEAR.search(r.getMessage())
            ]
            assert await ag.rpc("w1", F.identity, (5,)) == 5
            assert not state_of(w1).contexts and not state_of(driver).contexts
    finally:
        loop.set_exception_handler(None)
    assert not unclear, "\n".join(unclear[:20])
    assert not loop_errors, loop_errors[:5]
