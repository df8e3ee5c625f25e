"""The call interceptor contract (docs/design.md section 3), with a fake interceptor."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars

import numpy as np
import pytest

import actorgrad as ag
from actorgrad.runtime import get_interceptor, set_interceptor

_meta: contextvars.ContextVar = contextvars.ContextVar("test_meta", default=None)
LINKS: list = []
REFUSER = [""]  # the worker whose wire_hooks refuse incoming calls


class FakeHooks:
    def __init__(self, worker, meta, peer):
        self.worker, self.meta, self.peer = worker.name, meta, peer

    def tensor_out(self, t):
        return ["link", self.worker, self.peer]

    def tensor_in(self, array, requires_grad, link):
        LINKS.append((self.worker, link))
        return ag.tensor(array, requires_grad=requires_grad)


class FakeInterceptor:
    def __init__(self):
        self.outgoing_calls = []
        self.returned_calls = []
        self.peer_ids = []  # (worker, peer, the id the connection's hello announced)

    def outgoing(self, worker, dest, peer_id):
        self.outgoing_calls.append((worker.name, dest))
        self.peer_ids.append((worker.name, dest, peer_id))
        if worker.name == "driver":
            return ["ctx", 7]
        return _meta.get()  # forward the caller's context to nested calls

    def returned(self, worker, meta):
        self.returned_calls.append((worker.name, meta))

    def wire_hooks(self, worker, meta, peer, peer_id):
        self.peer_ids.append((worker.name, peer, peer_id))
        if worker.name == REFUSER[0]:
            raise ag.ContextError(f"{worker.name} refuses calls in {meta}")
        return FakeHooks(worker, meta, peer)

    @contextlib.contextmanager
    def enter(self, worker, meta):
        token = _meta.set(meta)
        try:
            yield
        finally:
            _meta.reset(token)


def seen():
    return _meta.get()


async def aseen():
    await asyncio.sleep(0)
    return _meta.get()


async def nested(to):
    return [_meta.get(), await ag.rpc(to, seen)]


def grad_tensor_back(t):
    return t


@pytest.fixture
def interceptor():
    old = get_interceptor()
    fake = FakeInterceptor()
    set_interceptor(fake)
    LINKS.clear()
    try:
        yield fake
    finally:
        set_interceptor(old)


async def test_meta_travels_and_enter_wraps_sync_async_and_inline_calls(cluster, interceptor):
    for _ in range(6):  # the first calls of a sync fn run in the pool, later ones inline
        assert await ag.rpc("w1", seen) == ["ctx", 7]
        assert await ag.rpc("w1", aseen) == ["ctx", 7]
    assert ("driver", "w1") in interceptor.outgoing_calls
    assert _meta.get() is None  # nothing leaked into the caller's context


async def test_nested_calls_see_the_context_entered_by_the_callee(cluster, interceptor):
    assert await ag.rpc("w1", nested, ("w2",)) == [["ctx", 7], ["ctx", 7]]
    assert ("w1", "w2") in interceptor.outgoing_calls


async def call_unknown() -> str:
    try:
        await ag.rpc("no-such-worker", seen)
    except ValueError as exc:
        return str(exc)
    return "reached"


async def test_a_membership_refresh_carries_no_callers_metadata(cluster, interceptor):
    # A call to an unknown name refreshes the caller's membership view from the head
    # first. That internal call ran in the caller's task context, so it carried the
    # caller's metadata: the head took it for a call in the caller's context.
    assert "unknown worker 'no-such-worker'" in await ag.rpc("w1", call_unknown)
    # (the call to no-such-worker fails before it is made: w1 made none with metadata)
    assert not [r for r in interceptor.returned_calls if r[0] == "w1"]


async def test_the_interceptor_is_told_the_id_each_peer_announced(cluster, interceptor):
    # (which process answers under a name: distributed autograd refuses a new process
    # joining under a dead one's name by it, whatever the membership view says yet)
    assert await ag.rpc("w1", nested, ("w2",)) == [["ctx", 7], ["ctx", 7]]
    ids = {w.name: w.id for w in [cluster.driver, *cluster.workers]}
    assert len(set(ids.values())) == len(ids)
    pairs = {(a, b) for a, b, _ in interceptor.peer_ids}
    assert {("driver", "w1"), ("w1", "driver"), ("w1", "w2"), ("w2", "w1")} <= pairs
    for me, peer, peer_id in interceptor.peer_ids:
        assert peer_id == ids[peer], (me, peer, peer_id)


async def test_tensor_hooks_are_used_both_ways(cluster, interceptor):
    t = ag.tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    back = await ag.rpc("w1", grad_tensor_back, (t,))
    np.testing.assert_array_equal(back.data, [1.0, 2.0])
    # request decoded on w1 with the driver's link; reply decoded on the driver
    assert ("w1", ["link", "driver", "w1"]) in LINKS
    assert ("driver", ["link", "w1", "driver"]) in LINKS


async def test_rref_calls_and_to_here_go_through_the_interceptor(cluster, interceptor):
    r = await ag.remote("w1", "builtins:list", ([1, 2],))
    assert await r.to_here() == [1, 2]
    n = len(interceptor.outgoing_calls)
    assert await r.rpc().count(1) == 1
    assert len(interceptor.outgoing_calls) > n


async def test_a_call_the_interceptor_refuses_fails_with_its_error(cluster, interceptor):
    # (the distributed layer refuses calls that arrive in a released context). The
    # runtime refused, not user code: its own error type, not a RemoteError.
    REFUSER[0] = "w1"
    try:
        with pytest.raises(ag.ContextError, match=r"^w1 refuses calls in \['ctx', 7\]$"):
            await asyncio.wait_for(ag.rpc("w1", seen), 10)
        conn = cluster.driver._out["w1"]
    finally:
        REFUSER[0] = ""
    assert await ag.rpc("w1", seen) == ["ctx", 7]
    assert cluster.driver._out["w1"] is conn and not conn.closed  # the connection stayed


async def test_every_call_made_with_metadata_is_returned_once(cluster, interceptor):
    # (the distributed layer counts a context's calls out: one it never heard back from
    # would refuse every later backward in that context)
    async def outcomes():
        yield ag.rpc("w1", seen)  # answered
        yield ag.rpc("w1", "operator:truediv", (1, 0))  # raised there
        yield ag.rpc("w1", "asyncio:sleep", (5,), timeout=0.05)  # timed out
        yield ag.rpc("w1", seen, ([object()],))  # cannot travel: never left
        yield ag.rpc("nobody", seen)  # unknown worker: no metadata made

    async for call in outcomes():
        try:
            await call
        except (ag.ActorgradError, ZeroDivisionError, TypeError, ValueError):
            pass
    made = [c for c in interceptor.outgoing_calls if c[0] == "driver"]
    assert len(made) == 4, made
    assert interceptor.returned_calls == [("driver", ["ctx", 7])] * 4
