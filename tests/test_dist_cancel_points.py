"""Cancellation at every point: each operation runs as a task that cancels itself right
after its k-th step that left it waiting (k = 1, 2, ... until it completes first), over
TCP between in-process workers. After each point: the canceller saw CancelledError,
every worker holds no context, pass, call or RRef of it (waited for, with a deadline:
the releases and aborts of a cancelled task go out one-way), no task of it is left
pending, nothing was logged, and a fresh call and one-hop backward on each worker give
the local engine's gradients. A backward's context stays usable: a new forward and
backward in it give exact gradients (limits.md: a retry may first meet the clean-up of
the cancelled pass, "no send node" or "ran into the clean-up").

(test_dist_random.py cancels random programs after random numbers of loop turns; this
one walks every await at which each public operation really waits.)
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import dist_fns as F
import numpy as np
import pytest

import actorgrad as ag

X = np.array([1.0, -2.0, 0.5])
P = {"w1": np.array([0.5, 1.5, -1.0]), "w2": np.array([2.0, -0.5, 0.25]), "w3": [-1.0, 3.0, 0.75]}


class _CancelAtStep(asyncio.tasks._PyTask):  # type: ignore[name-defined,misc]
    """A task that cancels itself right after its ``at``-th step that left it waiting:
    the cancellation lands at that await (the pure-Python Task: its step can be
    wrapped)."""

    at = 0
    steps = 0
    fired = False

    def _Task__step(self, exc: BaseException | None = None) -> None:
        super()._Task__step(exc)
        if not self.done():
            self.steps += 1
            if self.steps == self.at:
                self.fired = True
                self.cancel()


def _task_names() -> collections.Counter[str]:
    me = asyncio.current_task()
    return collections.Counter(
        getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks() if t is not me
    )


async def _settled(names: list[str], tasks: collections.Counter[str], rrefs: dict) -> None:
    """Every worker idle (contexts, passes, graph nodes, staged loads, calls, RRefs) and
    no task left beyond ``tasks``, within 5 s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while True:
        now = {}
        for name in [*names, "driver"]:
            info = await ag.rpc(name, F.wait_no_contexts, (5.0,))
            status = await ag.rpc(name, F.status)
            busy = {k: v for k, v in info.items() if k.startswith("num_") and v}
            busy.pop("num_backward_passes", None)
            busy.pop("num_backward_messages", None)
            busy.update({k: status[k] for k in ("mailbox",) if status[k]})
            if status["in_flight"] > 2:  # (F.status and wait_no_contexts's own calls)
                busy["in_flight"] = status["in_flight"]
            if status["rrefs"] != rrefs[name]:
                busy["rrefs"] = status["rrefs"]
            if busy:
                now[name] = busy
        extra = _task_names() - tasks
        if not now and not extra:
            return
        if loop.time() > end:
            raise AssertionError(f"not settled: {now}, tasks left: {dict(extra)}")
        await asyncio.sleep(0.005)


async def _fresh_backward(names: list[str]) -> None:
    """A call and a one-hop backward on each worker: the local engine's gradients."""
    for w in names:
        x = ag.tensor(X, requires_grad=True)
        async with ag.dist.context() as ctx:
            y = await asyncio.wait_for(ag.rpc(w, F.mul, ("p", x)), 5)
            await asyncio.wait_for(ag.dist.backward(ctx, [y.sum()]), 5)
            got_x = ag.dist.get_gradients(ctx)[x]
            got_p = await ag.rpc(w, F.grad_of, (ctx, "p"))
        xl, pl = ag.tensor(X, requires_grad=True), ag.tensor(P[w], requires_grad=True)
        (xl * pl).sum().backward()
        np.testing.assert_array_equal(got_x, xl.grad)
        np.testing.assert_array_equal(got_p, pl.grad)


async def _forward(kind: str, x: ag.Tensor) -> ag.Tensor:
    if kind == "one hop":
        return (await ag.rpc("w1", F.mul, ("p", x))).sum()
    if kind == "two hops":  # driver -> w1 -> w2
        return (await ag.rpc("w1", F.nested_mul, (["w2"], "p", x))).sum()
    ys = await asyncio.gather(*(ag.rpc(w, F.mul, ("p", x)) for w in ("w1", "w2", "w3")))
    return (ys[0] + ys[1] + ys[2]).sum()


def _grad_x(kind: str) -> np.ndarray:
    if kind == "one hop":
        return P["w1"]
    if kind == "two hops":
        return P["w1"] * P["w2"]
    return P["w1"] + P["w2"] + np.array(P["w3"])


async def _in_context(aw: Callable[[], Awaitable[Any]]) -> Any:
    async with ag.dist.context():
        return await aw()


async def _remote_to_here() -> Any:
    ref = await ag.remote("w1", F.make_param, (X,))
    return await ref.to_here()


async def _step(x: ag.Tensor) -> np.ndarray:
    async with ag.dist.context() as ctx:
        y = await ag.rpc("w1", F.mul, ("p", x))
        await ag.dist.backward(ctx, [y.sum()])
        return ag.dist.get_gradients(ctx)[x]


OPS: dict[str, Callable[[dict], Awaitable[Any]]] = {
    "rpc": lambda s: ag.rpc("w1", F.mul, ("p", ag.tensor(X, requires_grad=True))),
    "rpc in a context": lambda s: _in_context(
        lambda: ag.rpc("w1", F.nested_mul, (["w2"], "p", ag.tensor(X, requires_grad=True)))
    ),
    "remote, to_here": lambda s: _remote_to_here(),
    "remote, to_here in a context": lambda s: _in_context(_remote_to_here),
    "rref.rpc() in a context": lambda s: _in_context(lambda: s["ref"].rpc().sum()),
    "context, rpc, backward": lambda s: _step(ag.tensor(X, requires_grad=True)),
    "a context of the callee's own": lambda s: ag.rpc("w1", F.own_context_backward, ("w2", "p", X)),
}


async def _points(
    op: Callable[[], Awaitable[Any]],
    check: Callable[[bool], Awaitable[None]],
    names: list[str] | None,
    caplog: pytest.LogCaptureFixture,
) -> int:
    """Cancel ``op()`` at each of its waits in turn, ``check`` after each; returns how
    many points there were. ``names``: the workers to find idle after each point (None:
    a context stays open across the points, checked once it is left)."""
    tasks = _task_names()
    rrefs = {n: (await ag.rpc(n, F.status))["rrefs"] for n in [*(names or ()), "driver"]}
    at = 1
    while True:
        caplog.clear()
        task = _CancelAtStep(op())
        task.at = at
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        assert cancelled == task.fired, (at, task)
        del task  # (its CancelledError's traceback holds the frames of op, RRefs and all)
        await check(cancelled)
        gc.collect()
        if names is not None:
            await _settled(names, tasks, rrefs)
            await _fresh_backward(names)
        assert not caplog.records, (at, caplog.text)
        if not cancelled:
            return at - 1
        at += 1


async def _nothing(cancelled: bool) -> None:
    pass


@pytest.fixture
async def tcp3():
    async with ag.local_cluster(3, transport="tcp") as c:
        for w in c.names:
            await ag.rpc(w, F.put, ("p", P[w]))
        yield c.names


@pytest.mark.parametrize("name", list(OPS))
async def test_cancelled_at_every_wait_leaves_nothing_behind(tcp3, caplog, name):
    caplog.set_level(logging.WARNING)
    state = {"ref": await ag.remote("w1", F.make_param, (X,))}
    assert await _points(lambda: OPS[name](state), _nothing, tcp3, caplog) >= 1


@pytest.mark.parametrize("kind", ["one hop", "two hops", "fan-out"])
async def test_backward_cancelled_at_every_wait_leaves_its_context_usable(tcp3, caplog, kind):
    caplog.set_level(logging.WARNING)
    async with ag.dist.context() as ctx:
        loss: list[ag.Tensor] = []

        async def backward() -> None:
            loss[:] = [await _forward(kind, ag.tensor(X, requires_grad=True))]
            await ag.dist.backward(ctx, loss)

        async def check(cancelled: bool) -> None:
            # a new forward and backward in the same context: exact (a retry may meet
            # the clean-up of the cancelled pass first: limits.md)
            for _ in range(3):
                x = ag.tensor(X, requires_grad=True)
                try:
                    await asyncio.wait_for(ag.dist.backward(ctx, [await _forward(kind, x)]), 5)
                except ag.ContextError as exc:
                    assert "no send node" in str(exc) or "clean-up" in str(exc), exc
                    continue
                np.testing.assert_array_equal(ag.dist.get_gradients(ctx)[x], _grad_x(kind))
                return
            raise AssertionError("no backward in the context after the cancelled one")

        tasks = _task_names()
        assert await _points(backward, check, None, caplog) >= 1
    await _settled(tcp3, tasks, {n: 0 for n in [*tcp3, "driver"]})
    await _fresh_backward(tcp3)


async def test_optimizer_cancelled_at_every_wait_keeps_working(tcp3, caplog):
    caplog.set_level(logging.WARNING)
    for w in ("w1", "w2"):  # (parameters of their own: the fresh backwards use "p")
        await ag.rpc(w, F.put, ("q", P[w]))
    refs = [(await ag.rpc(w, F.param_refs, ("q",)))[0] for w in ("w1", "w2")]
    opt = ag.dist.DistributedOptimizer(ag.optim.SGD, refs, lr=0.1, momentum=0.9)

    async def works(cancelled: bool) -> None:
        state = await asyncio.wait_for(opt.state_dict(), 5)
        await asyncio.wait_for(opt.load_state_dict(state), 5)

    async with ag.dist.context() as ctx:
        x = ag.tensor(X, requires_grad=True)
        ys = [await ag.rpc(w, F.mul, ("q", x)) for w in ("w1", "w2")]
        await ag.dist.backward(ctx, [(ys[0] + ys[1]).sum()])
        assert await _points(lambda: opt.step(ctx), works, None, caplog) >= 1
    state = await opt.state_dict()
    assert await _points(opt.state_dict, works, tcp3, caplog) >= 1
    assert await _points(lambda: opt.load_state_dict(state), works, tcp3, caplog) >= 1
