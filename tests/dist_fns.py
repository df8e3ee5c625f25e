"""Module-level functions that tests run on workers (in-process or process workers).

Values live in a store keyed by (worker name, key), since in-process workers share
this module.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal as signal_module
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import actorgrad as ag

_store: dict[tuple[str, str], Any] = {}
_hook_calls: dict[tuple[str, str], list[np.ndarray]] = {}


def _k(key: str) -> tuple[str, str]:
    return (ag.worker_name(), key)


def put(key: str, data: Any, requires_grad: bool = True) -> None:
    _store[_k(key)] = ag.tensor(np.asarray(data), requires_grad=requires_grad)


def make_param(data: Any) -> ag.Tensor:
    """For ag.remote: the owner keeps a leaf tensor."""
    return ag.tensor(np.asarray(data), requires_grad=True)


def get(key: str) -> Any:
    return _store[_k(key)]


def param_refs(key: str) -> list[ag.RRef]:
    """RRefs to the parameter stored here, made as torch users make them: RRef(p)."""
    return [ag.RRef(get(key))]


def grad_of(ctx_id: int, key: str) -> np.ndarray | None:
    return ag.dist.get_gradients(ctx_id).get(_store[_k(key)])


def grad_of_rref(ctx_id: int, ref: ag.RRef) -> np.ndarray | None:
    return ag.dist.get_gradients(ctx_id).get(ref.local_value())


def num_grads(ctx_id: int) -> int:
    return len(ag.dist.get_gradients(ctx_id))


def debug_info() -> dict[str, int]:
    return ag.dist.debug_info()


def num_aborted(ctx_id: int) -> int:
    """How many aborted passes context ``ctx_id`` keeps here (to refuse their late
    messages)."""
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    return len(state_of(current_worker()).contexts[ctx_id].aborted_passes)


def mul(key: str, x: ag.Tensor) -> ag.Tensor:
    return x * _store[_k(key)]


def mul_kept(key: str, kept: str, x: ag.Tensor) -> ag.Tensor:
    """x * store[key] * store[kept]: a tensor kept from another call, maybe of another
    context."""
    return x * _store[_k(key)] * _store[_k(kept)]


def sum_kept(keys: list[str], scale: float) -> ag.Tensor:
    """The sum of ``(kept * scale).sum()`` over the tensors ``keep`` kept."""
    total = (_store[_k(keys[0])] * scale).sum()
    for key in keys[1:]:
        total = total + (_store[_k(key)] * scale).sum()
    return total


def rnn_step(key: str, state: str, x: ag.Tensor, detach: bool) -> ag.Tensor:
    """h = tanh(x * store[key] + h), h kept here as store[state] from the call before
    (an RNN cell keeping its hidden state; ``detach``: truncated backpropagation
    through time)."""
    h = _store.get(_k(state))
    if h is not None and detach:
        h = h.detach()
    pre = x * _store[_k(key)]
    _store[_k(state)] = h = (pre if h is None else pre + h).tanh()
    return h


def mul_sum(key: str, x: ag.Tensor) -> ag.Tensor:
    """(x * store[key]).sum(): a 0-d result."""
    return (x * _store[_k(key)]).sum()


#: Values that cannot travel, by name (see mul_unsendable).
UNSENDABLE: dict[str, Any] = {
    "object": object(),
    "33 dims": np.ones((1,) * 33),  # (numpy allows 64: the receiver would refuse it)
    "int tensor": ag.tensor([1.0], requires_grad=True),  # (its .data replaced below)
}
UNSENDABLE["int tensor"]._data = np.array([1])  # (past the setter's own check)


def mul_unsendable(key: str, x: ag.Tensor, what: str = "object") -> list:
    """[x * store[key], UNSENDABLE[what]]: the result cannot travel, after its tensor
    was recorded as sent."""
    return [x * _store[_k(key)], UNSENDABLE[what]]


def mul_then_2d(key: str, x: ag.Tensor) -> list:
    """[x * store[key], a 5x7 array]."""
    return [x * _store[_k(key)], np.zeros((5, 7))]


def mul_ignore_second(key: str, x: ag.Tensor, unused: ag.Tensor) -> ag.Tensor:
    return x * _store[_k(key)]


def tanh_matmul(key: str, x: ag.Tensor) -> ag.Tensor:
    return (x @ _store[_k(key)]).tanh()


def identity(x: Any) -> Any:
    return x


def two_outputs(key: str, x: ag.Tensor) -> tuple[ag.Tensor, ag.Tensor]:
    w = _store[_k(key)]
    return x * w, (x + w).exp()


def in_dict(key: str, d: dict[str, Any]) -> dict[str, Any]:
    w = _store[_k(key)]
    return {"out": [d["a"] * w, d["b"][0] + w], "note": "ok"}


async def mul_then_forward(
    key: str,
    dest: str,
    dest_key: str,
    x: ag.Tensor,
    gate: str | None = None,
    dest_fn: str = "mul",
) -> ag.Tensor:
    """Nested: multiply here, then on ``dest``; return the product squared.
    ``gate``: the backward here blocks (in its thread: SLICE 0) before it sends
    ``dest`` its gradient, as ``add_gated_hook``'s does; ``dest_fn``: the function of
    this module ``dest`` runs, ``mul`` or one like it."""
    y = x * _store[_k(key)]
    z = await ag.rpc(dest, globals()[dest_fn], (dest_key, y))
    if gate is not None:
        z.register_hook(_gated(gate))
    return z * z


async def nap(seconds: float, *payload: Any) -> None:
    await asyncio.sleep(seconds)


async def nap_signalled(name: str, seconds: float, *payload: Any) -> None:
    """Tell the driver (``signal(name)``), then sleep ``seconds``."""
    from actorgrad.runtime import current_worker

    current_worker().notify("driver", signal, (name,))
    await asyncio.sleep(seconds)


async def use_rref(ref: ag.RRef, x: ag.Tensor) -> ag.Tensor:
    w = await ref.to_here()
    return (x * w).tanh()


def _sync_wrapper(fn: Any) -> Any:
    """A sync decorator over an ``async def``, as logging and retry decorators often
    are: the runtime sees a plain function that returns a coroutine."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return fn(*args)

    return wrapper


@_sync_wrapper
async def use_rref_wrapped(ref: ag.RRef, x: ag.Tensor) -> ag.Tensor:
    return await use_rref(ref, x)


def times(a: ag.Tensor, b: ag.Tensor) -> ag.Tensor:
    return a * b


def lose_the_way_to(peer: str, address: str = "127.0.0.1:9") -> None:
    """From here, ``peer``'s address reaches nothing (as a driver's bound to its
    loopback, seen from another host): a port nobody listens on, no local socket; or
    what listens at ``address``."""
    from actorgrad.runtime import current_worker

    w = current_worker()
    _damaged(w, f"lose_the_way_to({peer!r})")
    w.members = {**w.members, peer: (w.members[peer][0], address, "")}
    conn = w._out.pop(peer, None)
    if conn is not None:
        conn.close()


async def call_path(path: list[str], fn: str, args: list[Any]) -> Any:
    """This module's function ``fn`` called with ``args`` on the last worker of
    ``path``, each call made from the one before (here, with an empty path): so the
    caller never connects to the workers past the first."""
    if path:
        return await ag.rpc(path[0], call_path, (path[1:], fn, args))
    out = globals()[fn](*args)
    return await out if asyncio.iscoroutine(out) else out


async def nested_mul(names: list[str], key: str, x: ag.Tensor) -> ag.Tensor:
    """x * store[key] here, then on each of ``names`` in turn, each call made from
    inside the one before."""
    y = mul(key, x)
    if names:
        y = await ag.rpc(names[0], nested_mul, (names[1:], key, y))
    return y


def grad_enabled_here() -> bool:
    return ag.autograd.is_grad_enabled()


async def chain(dests: list[str], key: str, x: ag.Tensor) -> ag.Tensor:
    """x through mul on each of dests in turn, from here."""
    for d in dests:
        x = await ag.rpc(d, mul, (key, x))
    return x


async def nested_chain(names: list[str], slow_on: str, seconds: float, x: ag.Tensor) -> ag.Tensor:
    """tanh of x passed on through ``names``, each call made inside the one before; the
    first backward pass through worker ``slow_on``'s part blocks it for ``seconds``."""
    from actorgrad.runtime import current_worker

    h = x * 1.0
    if current_worker().name == slow_on:
        h.register_hook(_sleep_once(seconds))
    if names:
        h = await ag.rpc(names[0], nested_chain, (names[1:], slow_on, seconds, h))
    return h.tanh()


async def ping_pong(n: int, other: str, me: str, x: ag.Tensor) -> ag.Tensor:
    """x * 2 after n calls back and forth between this worker and other, each made
    inside the one before."""
    if n == 0:
        return x * 2
    return await ag.rpc(other, ping_pong, (n - 1, me, other, x))


async def mul_plus_remote(dest: str, key: str, x: ag.Tensor) -> ag.Tensor:
    """x * store[key] + dest's store[key] (fetched as ones * it): this worker's part of
    a backward ends as it sends that term's gradient to dest (nothing comes back)."""
    term = await ag.rpc(dest, mul, (key, ag.tensor(np.ones(x.shape))))
    return mul(key, x) + term


def add_hook(key: str, scale: float) -> None:
    t = _store[_k(key)]
    calls = _hook_calls[_k(key)] = []

    def hook(g: np.ndarray) -> np.ndarray:
        calls.append(np.array(g))
        return g * scale

    t.register_hook(hook)


def add_held_hook(key: str, value: float) -> None:
    """A hook on store[key] that returns an array this module keeps (as
    ``held[key]``), whatever the gradient."""
    t = _store[_k(key)]
    held = _store[_k("held " + key)] = np.full(t.shape, value, t.dtype)
    t.register_hook(lambda g: held)


def set_held(key: str, value: float) -> None:
    _store[_k("held " + key)][...] = value


def hook_calls(key: str) -> list[np.ndarray]:
    return _hook_calls.get(_k(key), [])


class HookAbort(BaseException):
    """An exception that is not an Exception, as user code may raise."""


_HOOK_ERRORS: dict[str, type[BaseException]] = {
    "ValueError": ValueError,
    "HookAbort": HookAbort,
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "CancelledError": asyncio.CancelledError,
    "ContextError": ag.ContextError,  # (a refusal's type, raised by the graph's own code)
    "ProtocolError": ag.ProtocolError,
}


def add_failing_hook(key: str, times: int, kind: str = "ValueError") -> None:
    """The next ``times`` backward passes through ``key`` raise ``kind`` here."""
    _store[_k(key)].register_hook(_failing(times, kind))


def _failing(times: int, kind: str = "ValueError") -> Callable[[np.ndarray], None]:
    """A hook that raises ``kind`` the first ``times`` times it runs."""
    left = [times]

    def hook(g: np.ndarray) -> None:
        if left[0] > 0:
            left[0] -= 1
            raise _HOOK_ERRORS[kind](f"hook refused gradient on {ag.worker_name()}")
        return None

    return hook


def mul_failing_backward(key: str, x: ag.Tensor) -> ag.Tensor:
    """``mul``, whose product refuses the gradient it gets (a ValueError from a hook)."""
    out = x * _store[_k(key)]
    out.register_hook(_failing(1))
    return out


def add_dying_hook(key: str) -> None:
    """The worker dies as soon as a gradient reaches ``key``."""
    t = _store[_k(key)]

    def hook(g: np.ndarray) -> None:
        os._exit(3)

    t.register_hook(hook)


def _sleep_once(seconds: float) -> Any:
    """A hook that blocks this worker for ``seconds`` the first time it runs."""
    left = [1]

    def hook(g: np.ndarray) -> None:
        if left[0] > 0:
            left[0] -= 1
            time.sleep(seconds)

    return hook


def add_slow_hook(key: str, seconds: float) -> None:
    """The next backward pass through ``key`` blocks this worker for ``seconds``."""
    _store[_k(key)].register_hook(_sleep_once(seconds))


def slow_chain(key: str, x: ag.Tensor, n: int, seconds: float, error: str = "") -> ag.Tensor:
    """x * store[key] through ``n`` more nodes, each with a hook that sleeps
    ``seconds`` in the backward pass (a long part made of many short nodes); with
    ``error`` (a builtin exception's name), the last hook to run raises it."""
    import builtins

    h = x * _store[_k(key)]
    for i in range(n):
        h = h * 1.0
        if error and i == 0:

            def hook(g: np.ndarray) -> None:
                time.sleep(seconds)
                raise getattr(builtins, error)("hook failed on purpose")

            h.register_hook(hook)
        else:
            h.register_hook(lambda g: _nap_counted(key, seconds))
    return h


_naps: dict[str, int] = {}


def _nap_counted(key: str, seconds: float) -> None:
    time.sleep(seconds)
    _naps[key] = _naps.get(key, 0) + 1


def naps(key: str) -> int:
    """How many hooks of :func:`slow_chain` of ``key`` have run in this process."""
    return _naps.get(key, 0)


def status() -> dict[str, Any]:
    """This worker's runtime status (Worker.status)."""
    from actorgrad.runtime import current_worker

    return current_worker().status()


def pid() -> int:
    return os.getpid()


_big: list[int] = []  # (dist.backward.BIG before set_big changed it)


def set_big(n: int) -> None:
    """This process's parts of a pass given gradients of ``n`` elements or more go to
    the thread pool at once (dist.backward.BIG; a worker process's own copy, set back
    by :func:`leftovers`)."""
    import sys

    backward = sys.modules["actorgrad.dist.backward"]
    if not _big:
        _big.append(backward.BIG)
    backward.BIG = n


async def open_context() -> int:
    """Open a context here and leave it (refused inside a call made in a context)."""
    async with ag.dist.context() as ctx_id:
        return ctx_id


async def open_context_and_die(dest: str, key: str) -> None:
    """Open a context, leave a recorded send/recv pair on ``dest``, die without release."""
    x = ag.tensor(np.ones(3), requires_grad=True)
    async with ag.dist.context():
        await ag.rpc(dest, mul, (key, x))
        os._exit(3)


async def wait_no_contexts(deadline: float) -> dict[str, int]:
    """Wait until this worker holds no context, at most ``deadline`` seconds."""
    return await wait_contexts(0, deadline)


async def wait_contexts(n: int, deadline: float) -> dict[str, int]:
    """Wait until this worker holds at most ``n`` contexts, at most ``deadline``
    seconds."""
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    try:
        await asyncio.wait_for(state_of(current_worker()).wait_empty(n), deadline)
    except TimeoutError:
        pass
    return ag.dist.debug_info()


async def fan_out(key: str, dest: str, dest_key: str, x: ag.Tensor) -> tuple[ag.Tensor, ag.Tensor]:
    """h = x * store[key] goes both back to the caller and on to ``dest``; a hook on h
    (a non-leaf) records each gradient it sees."""
    h = x * _store[_k(key)]
    calls = _hook_calls[_k("h")] = []
    h.register_hook(lambda g: calls.append(np.array(g)))
    z = await ag.rpc(dest, mul, (dest_key, h))
    return h, z


async def backward_back_at(dest: str, ctx_id: int, key: str, x: ag.Tensor) -> None:
    """y = x * store[key] here, then a backward of y.sum() started on ``dest`` (by a
    call into it, e.g. back into the caller), in the caller's context."""
    y = x * _store[_k(key)]
    await ag.rpc(dest, backward_of, (ctx_id, y))


async def backward_of(ctx_id: int, y: ag.Tensor) -> None:
    """Start a backward of y.sum() on this worker, in the caller's context."""
    await ag.dist.backward(ctx_id, [y.sum()])


async def via_and_back(dest: str, ctx_id: int, key: str, x: ag.Tensor) -> ag.Tensor:
    """h = x * store[key]; y = a call of ``backward_in_spawned_task`` on ``dest`` with
    h; returns y * store[key]."""
    w = _store[_k(key)]
    y = await ag.rpc(dest, backward_in_spawned_task, (ctx_id, x * w))
    return y * w


async def backward_in_spawned_task(ctx_id: int, h: ag.Tensor) -> ag.Tensor:
    """Returns y = h * 2 at once; a task it spawns (so: in the call's context), after
    blocking this worker's loop a moment (the caller's reply, with y * w, arrives
    meanwhile, unread), starts a backward of y.sum(); its outcome goes to
    ``outcome("spawned backward")``, then ``event("spawned backward done")`` is set."""
    import asyncio

    y = h * 2.0

    async def run() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 (busy: the reply waits unread)
        try:
            await asyncio.wait_for(ag.dist.backward(ctx_id, [y.sum()]), 10)
            _outcomes["spawned backward"] = "ok"
        except Exception as exc:
            _outcomes["spawned backward"] = f"{type(exc).__name__}: {exc}"
        event("spawned backward done").set()

    task = asyncio.ensure_future(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return y


async def backward_here(ctx_id: int, key: str, x: ag.Tensor) -> None:
    """Start a backward pass on this worker, in the caller's context."""
    y = x * _store[_k(key)]
    await ag.dist.backward(ctx_id, [y.sum()])


async def own_context_backward(dest: str, key: str, xv: Any) -> np.ndarray:
    """In a context of this call's own: send a leaf to ``dest`` (times its ``key``),
    backward here, and return the leaf's gradient."""
    x = ag.tensor(xv, requires_grad=True)
    async with ag.dist.context() as ctx:
        y = await ag.rpc(dest, mul, (key, x))
        await ag.dist.backward(ctx, [y.sum()])
        return ag.dist.get_gradients(ctx)[x]


def watching() -> list[str]:
    """The peers this worker's runtime watches (see Worker.watch)."""
    from actorgrad.runtime import current_worker

    return current_worker().status()["watching"]


def silent_peers() -> list[str]:
    """The peers a backward pass's watch found silent here (DistState._silent)."""
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    return sorted(state_of(current_worker())._silent)


# --- late calls in a released context ----------------------------------------------------

_events: dict[str, Any] = {}  # name -> asyncio.Event, in this process
_outcomes: dict[str, str] = {}


def event(name: str) -> Any:
    """This process's asyncio.Event ``name`` (created on first use, and anew on another
    event loop: an Event is bound to the loop of its first wait that blocked, and the
    driver process runs each test on a loop of its own)."""
    import asyncio

    ev = _events.get(name)
    loop = asyncio._get_running_loop()
    if ev is None or (loop is not None and ev._loop not in (None, loop)):
        ev = _events[name] = asyncio.Event()
    return ev


async def signal(name: str) -> None:
    """Set this process's event ``name`` (async: it runs on the loop, not in a thread)."""
    event(name).set()


async def context_until(gate: str, path: list[str], key: str, xv: Any) -> str:
    """A context of this worker's: x (``xv``) through nested_mul along ``path`` from
    here, and a backward pass; then it tells the driver ("held " + gate), and leaves
    the context once ``gate`` is signalled here. Returns how the backward went."""
    from actorgrad.runtime import current_worker

    async with ag.dist.context() as ctx:
        y = await nested_mul(path, key, ag.tensor(xv, requires_grad=True))
        try:
            await ag.dist.backward(ctx, [y.sum()])
            outcome = "ok"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        current_worker().notify("driver", signal, ("held " + gate,))
        await event(gate).wait()
    return outcome


def add_stopping_hook(key: str) -> None:
    """This worker's process stops (SIGSTOP) as soon as a gradient reaches ``key``."""

    def hook(g: np.ndarray) -> None:
        os.kill(os.getpid(), signal_module.SIGSTOP)

    _store[_k(key)].register_hook(hook)


_gates_between_threads: dict[str, Any] = {}  # (in-process workers: one for all)


def thread_gate(name: str) -> Any:
    """The threading.Event ``name`` of this process (for hooks run in a worker's pool)."""
    import threading

    return _gates_between_threads.setdefault(name, threading.Event())


def add_gated_hook(key: str, gate: str) -> None:
    """The next backward pass through ``key`` here sets ``gate + " in"`` and blocks its
    thread until ``gate + " out"`` is set (run it in the pool: SLICE 0)."""
    _store[_k(key)].register_hook(_gated(gate))


def _gated(gate: str) -> Callable[[np.ndarray], None]:
    """A hook that, the first time it runs, sets ``gate + " in"`` and blocks its thread
    until ``gate + " out"`` is set."""
    done = [False]

    def hook(g: np.ndarray) -> None:
        if not done[0]:
            done[0] = True
            thread_gate(gate + " in").set()
            thread_gate(gate + " out").wait(20)

    return hook


def add_blocking_hook(key: str, flag: str) -> None:
    """The next backward pass through ``key`` here creates the file ``flag + ".in"``
    and blocks this worker (its loop too) until the file ``flag`` exists."""
    done = [False]

    def hook(g: np.ndarray) -> None:
        if not done[0]:
            done[0] = True
            with open(flag + ".in", "w"):
                pass
            _block_until_exists(flag, 10.0)

    _store[_k(key)].register_hook(hook)


def debug_infos_for(seconds: float) -> list[str]:
    """Call ``ag.dist.debug_info()`` here again and again for ``seconds`` (a plain
    function that long runs in the worker's thread pool, as user code that checks
    the counters may); returns the errors it raised."""
    errors = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            ag.dist.debug_info()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


async def failing_pass_from_here(names: list[str], key: str) -> str:
    """Open a context here, run :func:`nested_mul` over ``names`` in it and a backward
    expected to fail (a hook on the way refuses): the failure's text."""
    x = ag.tensor(np.ones(3), requires_grad=True)
    async with ag.dist.context() as ctx:
        y = await ag.rpc(names[0], nested_mul, (names[1:], key, x))
        try:
            await ag.dist.backward(ctx, [y.sum()])
        except ag.RemoteError as exc:
            return str(exc)
    raise AssertionError("the backward did not fail")


def no_way() -> list[str]:
    """The origins this worker's backward reports could not reach lately."""
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    return sorted(state_of(current_worker()).no_way)


def forget_context(ctx_id: int) -> None:
    """Release ``ctx_id`` on this worker only (as a lease does)."""
    from actorgrad.dist.api import _release_local
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    _release_local(state_of(current_worker()), ctx_id)


def start_another_pass(dest: str, ctx_id: int) -> None:
    """Send ``dest`` the first message of a backward pass of context ``ctx_id`` started
    here (as a second backward in the context, from this worker, would)."""
    from actorgrad.dist.context import PASS_ID_BITS
    from actorgrad.runtime import current_worker

    w = current_worker()
    pass_id = (int(w.id) << PASS_ID_BITS) | 999_999
    args = (ctx_id, w.name, pass_id, False, [], 1, 0, w.name, None, [])
    w.cast(dest, "dist.deliver", args)


async def warm_up(dests: list[str]) -> None:
    """Open this worker's connections to ``dests`` (a first call waits for one)."""
    for d in dests:
        await ag.rpc(d, identity, (None,))


async def unknown_then_identity(dest: str, x: ag.Tensor) -> ag.Tensor:
    """In the caller's context: a call to a worker that does not exist (its ValueError
    caught: the caller refreshed its membership view first), then identity(x) on dest."""
    try:
        await ag.rpc("no-such-worker", identity, (None,))
    except ValueError:
        pass
    return await ag.rpc(dest, identity, (x,))


async def context_via(first: str, dest: str, xv: Any) -> np.ndarray:
    """Open a context here; ``first`` runs unknown_then_identity(dest) in it; backward of
    the sum; the gradient of x."""
    x = ag.tensor(xv, requires_grad=True)
    async with ag.dist.context() as ctx:
        y = await ag.rpc(first, unknown_then_identity, (dest, x))
        await ag.dist.backward(ctx, [(y * y).sum()])
        return ag.dist.get_gradients(ctx)[x]


async def hold_until(gate: str) -> None:
    """Return once this process's event ``gate`` is set (event ``gate + "-started"``
    tells that it waits)."""
    event(f"{gate}-started").set()
    await event(gate).wait()


async def gated_call(gate: str, dest: str, x: ag.Tensor) -> ag.Tensor:
    """``identity(x)`` called on ``dest``, once this process's event ``gate`` is set
    (event ``gate + "-started"`` tells that it waits)."""
    await hold_until(gate)
    return await ag.rpc(dest, identity, (x,))


async def gated_mul(gate: str, key: str, x: ag.Tensor) -> ag.Tensor:
    """x * store[key], once this process's event ``gate`` is set (``signal``)."""
    await event(gate).wait()
    return mul(key, x)


async def stubborn_gated_mul(gate: str, key: str, x: ag.Tensor) -> ag.Tensor:
    """gated_mul that goes on when its caller stops waiting (it ignores the first
    cancellation, the one its caller's cancel asks for): a callee that does not stop,
    like a plain function in the thread pool, whose reply comes late."""
    import asyncio

    try:
        await event(gate).wait()
    except asyncio.CancelledError:
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await event(gate).wait()
    return mul(key, x)


async def backward_after_gate(gate: str, dest: str, key: str, xv: Any) -> Any:
    """Once this process's event ``gate`` is set (event ``gate + "-started"`` tells that
    this call runs): in a context of its own, x * store[key] on ``dest``, a backward of
    its sum; x's gradient."""
    event(f"{gate}-started").set()
    await event(gate).wait()
    x = ag.tensor(xv, requires_grad=True)
    async with ag.dist.context() as ctx:
        y = await ag.rpc(dest, mul, (key, x))
        await ag.dist.backward(ctx, [y.sum()])
        return ag.dist.get_gradients(ctx)[x]


async def call_then_backward_after_gate(gate: str, dest: str, key: str, xv: Any) -> Any:
    """In a context of its own: x * store[key] on ``dest`` (event ``gate + "-called"``
    tells that it came back), then, once this process's event ``gate`` is set, a
    backward of its sum; x's gradient."""
    x = ag.tensor(xv, requires_grad=True)
    async with ag.dist.context() as ctx:
        y = await ag.rpc(dest, mul, (key, x))
        event(f"{gate}-called").set()
        await event(gate).wait()
        await ag.dist.backward(ctx, [y.sum()])
        return ag.dist.get_gradients(ctx)[x]


async def keep_rref_of(owner: str) -> None:
    """Keep here an RRef to a value made on ``owner``."""
    _store[_k("kept rref")] = await ag.remote(owner, identity, ([1, 2, 3],))


async def kept_rref() -> ag.RRef:
    import asyncio

    await asyncio.sleep(0)  # (a task: a cancel from its caller can reach it)
    return _store[_k("kept rref")]


async def mul_abandoning_a_call(gate: str, key: str, x: ag.Tensor, dest: str) -> ag.Tensor:
    """x * store[key], after a call of ``stubborn_gated_mul`` on ``dest`` with x timed
    out here (its reply comes once ``gate`` is set there)."""
    try:
        await ag.rpc(dest, stubborn_gated_mul, (gate, key, x), timeout=0.2)
    except ag.RpcTimeout:
        pass
    return mul(key, x)


def num_unanswered(ctx_id: int) -> int:
    """Calls made in context ``ctx_id`` on this worker that were given up and whose
    reply has not come."""
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    return len(state_of(current_worker()).contexts[ctx_id].unanswered)


_to_cancel: list[Any] = []  # (in-process workers only: the caller's task)


async def mul_cancelling_the_caller(key: str, x: ag.Tensor) -> ag.Tensor:
    """x * store[key]; the caller's task (``_to_cancel``) is cancelled in the loop turn
    that also reads this reply (in-process workers share the loop)."""
    import asyncio

    asyncio.get_running_loop().call_soon(_to_cancel.pop().cancel)
    return mul(key, x)


async def late_call(flag: str, dest: str, x: ag.Tensor) -> None:
    """Run inside a context: tell the driver we started, block this worker (its loop
    too, so a release waits unread in its socket) until the file ``flag`` exists, then
    call ``dest`` in the context: the request leaves before this worker reads the
    release. Its outcome goes to ``outcome("late")``."""
    from actorgrad.runtime import current_worker

    # one-way, and nothing awaited before blocking: a release sent once the driver
    # heard it cannot be read here before the call below leaves
    current_worker().notify("driver", signal, ("late started",))
    _block_until_exists(flag, 10.0)
    try:
        await ag.rpc(dest, identity, (x,))
        _outcomes["late"] = "ok"
    except Exception as exc:
        _outcomes["late"] = f"{type(exc).__name__}: {exc}"
    event("late done").set()


async def mul_after_blocking(flag: str, key: str, x: ag.Tensor) -> ag.Tensor:
    """Tell the driver we started ("blocked"), block this worker's loop until the file
    ``flag`` exists (its caller takes it for lost meanwhile), then return x * store[key]
    before the loop reads that the caller closed the connection: the reply leaves with
    its send node recorded, and is lost."""
    from actorgrad.runtime import current_worker

    current_worker().notify("driver", signal, ("blocked",))
    _block_until_exists(flag, 20.0)
    return mul(key, x)


def _block_until_exists(path: str, deadline: float) -> None:
    """Block the calling thread (a worker's loop, on purpose) until ``path`` exists."""
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


def watch_refusals() -> None:
    """From now on, record here (as ``outcome("refused")``) the first ContextError with
    which this worker refuses a call that arrives in a context. (Its caller may not see
    it: a call whose caller's connection closed is cancelled at its next await.)"""
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    _damaged(current_worker(), "watch_refusals()")
    st = state_of(current_worker())
    join = st.join

    def recording(ctx_id: int, initiator: str, *args: Any) -> Any:
        try:
            return join(ctx_id, initiator, *args)
        except ag.ContextError as exc:
            if "refused" not in _outcomes:
                _outcomes["refused"] = f"{type(exc).__name__}: {exc}"
                event("refused done").set()
            raise

    st.join = recording  # type: ignore[method-assign]


async def outcome(name: str, deadline: float) -> str:
    """What ``name`` (``late``, ``backward``) ended with here: "ok" or "Type: message"
    (waits for it at most ``deadline`` seconds)."""
    import asyncio

    await asyncio.wait_for(event(f"{name} done").wait(), deadline)
    return _outcomes[name]


# --- a backward started on a worker whose context's initiator dies -------------------------

_tasks: set[Any] = set()


async def forward_via(dest: str, key: str, x: ag.Tensor) -> None:
    """In the caller's context: z = x * store[key] computed on ``dest``, kept here."""
    _store[_k("z")] = await ag.rpc(dest, mul, (key, x))


async def backward_in_background(ctx_id: int) -> None:
    """Start a backward pass here from the kept z and return while it runs; its outcome
    goes to ``outcome("backward")``."""
    import asyncio

    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    z = _store.pop(_k("z"))

    async def run() -> None:
        try:
            await ag.dist.backward(ctx_id, [z.sum()])
            _outcomes["backward"] = "ok"
        except Exception as exc:
            _outcomes["backward"] = f"{type(exc).__name__}: {exc}"
        event("backward done").set()

    task = asyncio.create_task(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    await asyncio.sleep(0)  # one loop turn: the task registers its pass and sends
    assert state_of(current_worker()).runs, "the backward pass did not start"


async def backward_elsewhere_then_die(via: str, dest: str, key: str, stop_pid: int) -> None:
    """Open a context, have ``via`` compute through ``dest`` (then SIGSTOPped, so the
    pass waits for it) and start a backward in it, then die without a release."""
    import signal

    x = ag.tensor(np.ones(3), requires_grad=True)
    async with ag.dist.context() as ctx:
        await ag.rpc(via, forward_via, (dest, key, x))
        os.kill(stop_pid, signal.SIGSTOP)
        await ag.rpc(via, backward_in_background, (ctx,))
        os._exit(3)


# --- random programs (test_dist_random.py) ---------------------------------------------


async def interp(ops: list, outs: list, args: list, me: str, param: Any, call: Any) -> list:
    """Run a small program on ``args``: the same interpreter computes the reference (in
    one process, ``call`` a plain function call) and the distributed version (``call``
    an RPC to the named worker, which runs its part with :func:`run_prog`)."""
    vals = list(args)
    for op in ops:
        kind = op[0]
        if kind == "param":
            vals.append(param(me, op[1]))
        elif kind == "mul":
            vals.append(vals[op[1]] * vals[op[2]])
        elif kind == "add":
            vals.append(vals[op[1]] + vals[op[2]])
        elif kind == "tanh":
            vals.append(vals[op[1]].tanh())
        elif kind == "scale":
            vals.append(vals[op[1]] * 0.5)
        elif kind == "detach":
            vals.append(vals[op[1]].detach())
        elif kind == "call":
            _, dest, sub_ops, sub_outs, idx = op
            vals.extend(await call(dest, sub_ops, sub_outs, [vals[i] for i in idx]))
        else:  # pragma: no cover - the generator makes only these
            raise ValueError(f"unknown op {kind!r}")
    return [vals[i] for i in outs]


def _stored_param(me: str, key: str) -> ag.Tensor:
    return _store[(me, key)]


async def rpc_call(dest: str, ops: list, outs: list, args: list) -> list:
    return list(await ag.rpc(dest, run_prog, (ops, outs, args)))


async def run_prog(ops: list, outs: list, args: list) -> list:
    """This worker's part of a random program (its params live in the store)."""
    return await interp(ops, outs, args, ag.worker_name(), _stored_param, rpc_call)


async def mul_with_a_call_in_background(dest: str, gate: str, key: str, x: ag.Tensor) -> ag.Tensor:
    """x * store[key]; a task it spawns keeps a call of ``gated_mul(gate, key, x)`` on
    ``dest`` out (in the caller's context) after it returned; event "bg calling" is set
    as the call leaves, "bg done" when it returned (its result: store["bg"])."""
    import asyncio

    async def bg() -> None:
        try:
            event("bg calling").set()  # (the request is encoded and sent before it yields)
            _store[_k("bg")] = await ag.rpc(dest, gated_mul, (gate, key, x))
        finally:
            event("bg done").set()

    task = asyncio.get_running_loop().create_task(bg())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return mul(key, x)


def add_signalling_hook(key: str, gate: str) -> None:
    """A hook on store[key] that sets this process's event ``gate`` when it runs."""
    _store[_k(key)].register_hook(lambda g: event(gate).set())


async def call_later_in_background(gate: str, dest: str, key: str, x: ag.Tensor) -> None:
    """Spawn a task (it holds the caller's context) that calls ``mul(key, x)`` on
    ``dest`` once this process's event ``gate`` is set; its outcome goes to
    ``_outcomes["late bg call"]``, its end to event ``gate + " done"``."""
    import asyncio

    async def bg() -> None:
        await event(gate).wait()
        try:
            await ag.rpc(dest, mul, (key, x))
            _outcomes["late bg call"] = "ok"
        except Exception as exc:
            _outcomes["late bg call"] = f"{type(exc).__name__}: {exc}"
        event(f"{gate} done").set()

    task = asyncio.get_running_loop().create_task(bg())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def open_context_and_call_late(flag: str, via: str, dest: str) -> None:
    """Open a context and, in it, call ``late_call(flag, dest, x)`` on ``via``; never
    return (the context stays open here until this worker dies)."""
    import asyncio

    x = ag.tensor(np.ones(3), requires_grad=True)
    async with ag.dist.context():
        task = asyncio.ensure_future(ag.rpc(via, late_call, (flag, dest, x)))
        _tasks.add(task)
        await asyncio.Event().wait()


async def wait_left(peer: str, deadline: float) -> None:
    """Return once ``peer`` is no member here any more (at most ``deadline`` s)."""
    import asyncio

    from actorgrad.runtime import current_worker

    w = current_worker()
    async with asyncio.timeout(deadline):
        while peer in w.members:
            await w._members_changed.wait()


async def wait_lost(peer: str, deadline: float) -> None:
    """Return once this worker took ``peer`` for lost (at most ``deadline`` seconds)."""
    import asyncio

    from actorgrad.runtime import current_worker

    w = current_worker()
    lost = asyncio.Event()
    w.add_peer_lost_callback(lambda name: name == peer and lost.set())
    if not w.is_lost(peer):
        await asyncio.wait_for(lost.wait(), deadline)


# --- traffic of a context while a pass runs in it ------------------------------------------


def keep(key: str, t: ag.Tensor) -> None:
    """Store the received tensor itself (its graph kept here); return nothing."""
    _store[_k(key)] = t


def _on_the_side(gate: str, work: Any) -> None:
    """Spawn a task (in the caller's context) awaiting ``work()``; its outcome goes to
    ``outcome(gate)``: "ok" or "Type: message"."""
    import asyncio

    async def run() -> None:
        try:
            await work()
            _outcomes[gate] = "ok"
        except Exception as exc:
            _outcomes[gate] = f"{type(exc).__name__}: {exc}"
        event(f"{gate} done").set()

    task = asyncio.ensure_future(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def call_on_signal(gate: str, dest: str, key: str) -> None:
    """On the side, once event ``gate`` is set, send this worker's ``key`` to ``dest``
    (keep); its outcome goes to ``outcome(gate)``."""

    async def work() -> None:
        await event(gate).wait()
        await ag.rpc(dest, keep, ("kept", _store[_k(key)]))

    _on_the_side(gate, work)


async def gated_times(gate: str, key: str, factor: float) -> ag.Tensor:
    """store[key] * factor, once event ``gate`` is set (``{gate} entered`` set first)."""
    event(f"{gate} entered").set()
    await event(gate).wait()
    return _store[_k(key)] * factor


async def fetch_on_the_side(gate: str, dest: str, key: str) -> None:
    """On the side, call ``dest``'s gated_times (gate, key, 2) and keep what it returns;
    its outcome goes to ``outcome(gate)``."""

    async def work() -> None:
        _store[_k("fetched")] = await ag.rpc(dest, gated_times, (gate, key, 2.0))

    _on_the_side(gate, work)


async def plain_call_then_slow_chain(
    other: str, key: str, x: ag.Tensor, n: int, seconds: float
) -> ag.Tensor:
    """A plain call (no tensors) to ``other`` in the context, then :func:`slow_chain`:
    ``other`` becomes a peer of the context here that takes no part in its passes."""
    await ag.rpc(other, identity, (1,))
    return slow_chain(key, x, n, seconds)


async def slow_on(dest: str, key: str, x: ag.Tensor, n: int, seconds: float) -> ag.Tensor:
    """x * store[key] plus :func:`slow_chain` of it (detached) on ``dest``. In the
    backward, this worker's part ends as it sends ``dest`` its gradient (nothing comes
    back), and ``dest``'s part (long: its hooks sleep) goes on in its thread pool."""
    h = x * _store[_k(key)]
    return h + await ag.rpc(dest, slow_chain, (key, h.detach(), n, seconds))


def scaled(key: str, factor: float = 1.0) -> ag.Tensor:
    """store[key] * factor: a tensor of this worker's graph, for the caller (nothing sent
    here)."""
    return _store[_k(key)] * factor


def dist_watching() -> list[str]:
    """The peers this worker keeps an eye on for its contexts' latest passes
    (DistContext.watching)."""
    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    st = state_of(current_worker())
    return sorted({p for ctx in st.contexts.values() for p in ctx.watching})


class SlowSGD(ag.optim.SGD):
    """SGD whose update reads the parameter, waits (releasing the GIL, as a large
    numpy update does), then writes: two steps at once on one owner lose an update."""

    def _update(self, p: ag.Tensor, g: np.ndarray, data: np.ndarray) -> None:
        before = p.data.copy()
        time.sleep(0.05)
        data[...] = before - self.lr * g


class FailingSGD(ag.optim.SGD):
    """SGD failing on w2 at once and on w3 after a slow update; slow on the others."""

    def step(self, grads: Any = None) -> None:
        name = ag.worker_name()
        if name == "w2":
            raise RuntimeError("step failed on w2")
        time.sleep(0.2)  # (a long update: the others' steps end after w2's failure)
        if name == "w3":
            raise ValueError("step failed on w3 too")
        super().step(grads)


class MatricesOnlySGD(ag.optim.SGD):
    """SGD whose constructor refuses any parameter that is not a matrix."""

    def __init__(self, params: Any, lr: float) -> None:
        params = list(params)
        if any(p.data.ndim != 2 for p in params):
            raise ValueError("MatricesOnlySGD takes 2-d parameters only")
        super().__init__(params, lr)


class FixedLrSGD(ag.optim.SGD):
    """SGD that sets its base class's lr itself and passes its other options on."""

    def __init__(self, params: Any, **options: Any) -> None:
        super().__init__(params, lr=0.1, **options)


class GatedSGD(ag.optim.SGD):
    """SGD whose step, on a worker, sets the thread gate ``gate + " in " + worker`` and
    blocks its thread until ``gate + " out"`` is set."""

    def __init__(self, params: Any, lr: float, gate: str = "") -> None:
        super().__init__(params, lr)
        self._gate = gate

    def step(self, grads: Any = None) -> None:
        thread_gate(f"{self._gate} in {ag.worker_name()}").set()
        thread_gate(self._gate + " out").wait(20)
        super().step(grads)


async def call_in_context_of(initiator: str, dest: str) -> None:
    """Send a leaf to ``dest`` and back in a context that ``initiator`` made, taken in
    here as a call in it would be (a name no member has: a worker that left before
    this one heard of it)."""
    from actorgrad.dist.context import CONTEXT_ID_BITS, activate, state_of
    from actorgrad.runtime import current_worker

    w = current_worker()
    st = state_of(w)
    ctx_id = (0x7777 << CONTEXT_ID_BITS) | 1
    st.join(ctx_id, initiator)
    with activate(w, ctx_id, (st.new_call_token(),)):
        await ag.rpc(dest, identity, (ag.tensor(np.ones(2), requires_grad=True),))


async def backward_on_signal(gate: str, ctx_id: int, key: str, retain: bool = True) -> None:
    """On the side, once event ``gate`` is set, a backward of the sum of the tensor
    ``keep`` kept as ``key``, in context ``ctx_id``; its outcome goes to
    ``outcome(gate)``."""

    kept = _store[_k(key)]  # (here: once this worker shut down, its name is not ours)

    async def work() -> None:
        await event(gate).wait()
        await ag.dist.backward(ctx_id, [kept.sum()], retain_graph=retain)

    _on_the_side(gate, work)


def route_via(peer: str, address: str, heartbeat_timeout: float) -> None:
    """Reach ``peer`` at ``address`` (a relay) over TCP from now on, and take a peer
    silent for ``heartbeat_timeout`` s for lost; this worker has not called it yet."""
    from actorgrad.runtime import worker as rworker

    w = rworker.current_worker()
    _damaged(w, f"route_via({peer!r})")
    assert peer not in w._out
    wid, _address, _local = w.members[peer]
    w.members[peer] = (wid, address, "")
    rworker.HEARTBEAT_TIMEOUT = heartbeat_timeout


def make_stage(key: str, in_f: int, out_f: int, seed: int, state: Any = None) -> list[ag.RRef]:
    """A float64 Linear kept here under ``key`` (with the weights of ``state``, a
    ``state_dict()``, when given); RRefs of its parameters."""
    stage = ag.nn.Linear(in_f, out_f, seed=seed, dtype="float64")
    if state is not None:
        stage.load_state_dict(state)
    _store[_k(key)] = stage
    return [ag.RRef(p) for p in stage.parameters()]


def run_stage(key: str, x: ag.Tensor, tanh: bool) -> ag.Tensor:
    y = _store[_k(key)](x)
    return y.tanh() if tanh else y


def stage_state(key: str) -> dict[str, np.ndarray]:
    return _store[_k(key)].state_dict()


def set_data(key: str, value: Any) -> None:
    """Give the tensor kept under ``key`` the array ``value`` (the same Tensor)."""
    _store[_k(key)].data = np.asarray(value)


def set_weight(key: str, value: np.ndarray) -> None:
    """Give the weight of the Linear kept under ``key`` the array ``value``."""
    _store[_k(key)].weight.data = value


async def staged_after_loss_of(name: str, deadline: float) -> dict[str, int]:
    """``debug_info()`` once this worker saw ``name`` lost (at most ``deadline`` s)."""
    from actorgrad.runtime import current_worker

    w = current_worker()
    if not w.is_lost(name):
        seen = asyncio.Event()
        w.add_peer_lost_callback(lambda peer: peer == name and seen.set())
        await asyncio.wait_for(seen.wait(), deadline)
    return ag.dist.debug_info()


async def load_and_die_before_commit(refs: list[ag.RRef], state: Any, tell: str) -> None:
    """Load ``state`` into a DistributedOptimizer (SGD) over ``refs``, and die once
    every owner staged its part, before any commit; before that, ``tell`` keeps (``get``
    gives) the owners' debug_info() under "staged" (owner -> its debug_info)."""
    from actorgrad.dist import optimizer as dopt

    called = dopt._called

    async def commit_never(ref: Any, method: str, *args: Any) -> Any:
        if method == "commit":
            owners = {o: await ag.rpc(o, debug_info) for o in sorted({r.owner for r in refs})}
            await ag.rpc(tell, keep, ("staged", owners))
            os._exit(3)
        return await called(ref, method, *args)

    dopt._called = commit_never
    opt = ag.dist.DistributedOptimizer(ag.optim.SGD, refs, lr=0.1, momentum=0.9)
    await opt.load_state_dict(state)


def state_memory_owned(ref: ag.RRef) -> list[bool]:
    """Whether the state arrays of the DistributedOptimizer owner ``ref`` (its local
    optimizer, here) own their memory: ``[True]``, ``[False]`` or both."""
    opt = ref.local_value().optim
    return sorted({v.flags.owndata for e in opt.state.values() for v in e.values()})


# --- the shared process cluster of test_dist.py ----------------------------------------


def _damaged(w: Any, what: str) -> None:
    """Note on worker ``w`` that ``what`` was done to it, which no reset undoes (a
    changed route, a patched method): not fit for the next test of a shared cluster."""
    w.ext.setdefault("damage noted by dist_fns", []).append(what)


async def leftovers(deadline: float, calls: int, reset: bool) -> dict[str, Any]:
    """What the tests so far left on this worker that the next one could trip on (empty:
    nothing): contexts, passes, nodes, parts in the pool, staged loads; requests in the
    mailbox or running (besides this one's ``calls``), calls out, RRefs owned, watches,
    lost peers, background tasks of this module; what :func:`_damaged` noted. The
    contexts are waited for, at most ``deadline`` s (the releases of a context left from
    another task may still be on their way). With ``reset``, this module's values here
    are forgotten and dist.backward.BIG set back (what one test of the shared cluster
    put, hooked or gated is not the next one's)."""
    import asyncio
    import sys

    from actorgrad.dist.context import state_of
    from actorgrad.runtime import current_worker

    w = current_worker()
    try:
        await asyncio.wait_for(state_of(w).wait_empty(0), deadline)
    except TimeoutError:
        pass
    info = ag.dist.debug_info()
    left: dict[str, Any] = {
        k: info[k]
        for k in (
            "num_contexts",
            "num_active_passes",
            "num_send_nodes",
            "num_recv_nodes",
            "num_offloaded_parts",
            "num_staged_loads",
        )
        if info[k]
    }
    status = w.status()
    loop = asyncio.get_running_loop()
    more = {
        "mailbox": status["mailbox"],
        "in_flight": status["in_flight"] - calls,
        "calls out": sum(len(c.pending) for c in list(w._conns)),
        "rrefs": status["rrefs"],
        "rref messages unsent": sorted(w._rref_unsent),
        "watching": status["watching"],
        "dist_watching": dist_watching(),
        "lost": sorted(w._lost),
        "tasks": [t for t in _tasks if t.get_loop() is loop and not t.done()],
        "damage": w.ext.get("damage noted by dist_fns", []),
    }
    left.update((k, v) for k, v in more.items() if v)
    if reset:
        for values in (_store, _hook_calls, _naps, _events, _outcomes, _gates_between_threads):
            values.clear()
        if _big:
            sys.modules["actorgrad.dist.backward"].BIG = _big.pop()
    return left


class ScaledSGD(ag.optim.SGD):
    """SGD whose step is scaled per element by ``scale``: a hyperparameter that is an
    array (of the parameters' shape)."""

    def __init__(self, params: Any, lr: float, scale: Any = 1.0, **options: Any) -> None:
        super().__init__(params, lr, **options)
        self.scale = np.asarray(scale, dtype=np.float64)

    def _update(self, p: ag.Tensor, g: np.ndarray, data: np.ndarray) -> None:
        super()._update(p, g * self.scale, data)


def decode_seconds(n: int) -> float:
    """The best of three times to decode a request of ``n`` empty lists, here."""
    from actorgrad.wire import decode_frame, encode_frame, join_chunks

    probe = join_chunks(encode_frame([0], (([[]] * n,), {})))
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        decode_frame(probe).body()
        took.append(time.perf_counter() - t0)
    return min(took)


def set_slow_decode_rate(rate: int) -> None:
    from actorgrad.runtime import worker as rworker

    rworker.SLOW_DECODE_RATE = rate


class StrRaises(Exception):
    """An error whose ``str()`` raises ``kind`` (a builtin BaseException's name), or,
    with ``in_notes``, whose ``__notes__`` does (what formatting its traceback reads)."""

    def __init__(self, kind: str, in_notes: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.in_notes = in_notes

    def _raise(self) -> Any:
        import builtins

        raise getattr(builtins, self.kind)("raised from the error's own hook")

    def __str__(self) -> str:
        return "an error with broken notes" if self.in_notes else self._raise()

    @property
    def __notes__(self) -> Any:  # type: ignore[override]
        return self._raise() if self.in_notes else []


def raise_str_raises(kind: str, in_notes: bool = False) -> None:
    raise StrRaises(kind, in_notes)


def return_str_raises(kind: str) -> list[Any]:
    return [StrRaises(kind)]


def msgpack_value(kind: str) -> Any:
    """A result holding one of msgpack's own values, which msgpack packs itself."""
    import msgpack

    return {"a": [msgpack.Timestamp(1, 0) if kind == "Timestamp" else msgpack.ExtType(42, b"x")]}


class ReprRaises(Exception):
    """An error whose ``repr()`` raises KeyboardInterrupt (a log line's %r of it)."""

    def __repr__(self) -> str:
        raise KeyboardInterrupt("raised from the error's __repr__")


@ag.runtime.calls.inline
def raise_repr_raises() -> None:
    raise ReprRaises("a one-way call's error")
