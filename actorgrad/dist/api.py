"""Public entry points of distributed autograd: ``context``, ``get_gradients``,
``debug_info`` and the release protocol."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np

from actorgrad.dist.context import (
    DistContext,
    DistState,
    _current,
    call_peers,
    current_context,
    finish_calls,
    int_list,
    log,
    start_calls,
    state_of,
)
from actorgrad.errors import ContextError, ProtocolError, WorkerLost, cut_text, short_repr
from actorgrad.runtime import current_worker, inline, loop_worker
from actorgrad.tensor import Tensor

__all__ = ["context", "debug_info", "get_gradients"]


def context() -> _Context:
    """Open a distributed autograd context; yields its id (an int unique in the cluster).

    The context follows the asyncio task (contextvars): tasks started inside inherit
    it, concurrent tasks each open their own. Leaving it releases the context on every
    worker it reached (second hops too) and waits for their acknowledgement.

    Raises:
        ContextError: a context is already open in this task (nesting).

    Example::

        x = ag.tensor([1.0, 2.0], requires_grad=True)
        async with ag.dist.context() as ctx:
            loss = (await ag.rpc("w1", operator.mul, (x, 3.0))).sum()
            await ag.dist.backward(ctx, [loss])
            print(ag.dist.get_gradients(ctx)[x])   # [3. 3.]
    """
    return _Context()


class _Context:
    """``async with`` object of :func:`context` (a class, not a generator-based context
    manager: it is entered and left once per training step)."""

    __slots__ = ("_st", "_id", "_token")
    _id: int

    def __repr__(self) -> str:
        cid = getattr(self, "_id", None)
        if cid is None:
            return "<dist context not entered>"
        state = "open" if cid in self._st.contexts else "released"
        return f"<dist context {cid:#x} {state}>"

    # (hidden from type checkers: to them a `with` of it stays the error it is at run time)
    if not TYPE_CHECKING:

        def __enter__(self) -> None:
            # (Python's own message, "'_Context' object does not support the context
            # manager protocol", named neither the fix nor the public name)
            raise TypeError(
                "ag.dist.context() is entered with `async with`, not `with`: "
                "`async with ag.dist.context() as ctx:`"
            )

        # (never called, __enter__ raises; but `with` looks both methods up before calling
        # __enter__: without this one, `with ag.dist.context()` fails with a TypeError about
        # the protocol instead of __enter__'s message)
        def __exit__(self, *exc_info: object) -> None:
            return None

    async def __aenter__(self) -> int:
        if getattr(self, "_token", None) is not None:
            # (a second task entering the object took it over: the first one's exit
            # released the second's context and left its own open on every worker,
            # with the first task still inside it)
            raise ContextError(
                f"this ag.dist.context() object is already entered (context {self._id:#x}, "
                "maybe by another task): each `async with` needs its own ag.dist.context()"
            )
        worker = loop_worker()
        open_ctx = current_context(worker)
        if open_ctx is not None:
            if open_ctx.initiator != worker.name:
                # (code run by a call made inside a context: "open in this task" sent its
                # author looking for a context the code never opened)
                where = (
                    f"this code runs in distributed autograd context {open_ctx.id:#x} of "
                    f"worker {open_ctx.initiator!r}: the call running it was made inside "
                    "that context, and a call runs in its caller's context"
                )
            else:
                where = (
                    f"a distributed autograd context ({open_ctx.id:#x}) is already open in "
                    "this task, or in the task that created it (a task shares the context "
                    "of the task it was created in)"
                )
            raise ContextError(f"{where}; contexts do not nest")
        st = self._st = state_of(worker)
        ctx_id = self._id = st.new_context_id()
        st.create(ctx_id)
        self._token = _current.set((worker, ctx_id, ()))
        return ctx_id

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        token = getattr(self, "_token", None)
        if token is None:
            raise ContextError("a distributed autograd context left that was not entered")
        del self._token  # (left once: a second exit would release another's id)
        try:
            _current.reset(token)
        except ValueError:
            # Left from another task than the one that entered it: an async generator
            # that yielded inside the block and was dropped, closed by the loop's
            # finalizer in a task of its own. That task cannot reset the variable (a
            # ValueError skipped the release: the context stayed on every worker); the
            # release below still runs, and the entering task, released, is outside it
            # (current_context finds no such context; a call in it is refused, saying so).
            pass
        # Left because the task is cancelled (or the process is stopping): the releases
        # go out but nobody waits for their acknowledgements, as a cancelled backward's
        # abort: a cancelled task must end now, not after a hung peer's heartbeat
        # timeout (a lost release is what the lease is for).
        wait = exc_type is None or issubclass(exc_type, Exception)
        await _release_everywhere(self._st, self._id, wait=wait)


async def _release_everywhere(st: DistState, ctx_id: int, wait: bool = True) -> None:
    acks = _start_release(st, ctx_id)
    if acks is None:
        return
    if wait:
        await acks
    else:
        # nobody waits (the requests are out), but the protocol runs to its end in the
        # background: a peer that turns out gone must still get the others told
        st.worker.spawn(acks, name=f"release-{ctx_id:#x}")


def _start_release(
    st: DistState,
    ctx_id: int,
    sender: str | None = None,
    gone: list[str] | None = None,
    why: str = "",
) -> Coroutine[Any, Any, None] | None:
    """Release ``ctx_id`` here, then send its release to this worker's peers in it but
    ``sender`` (it came from there; None: it starts here) and the ``gone`` ones (nobody
    forwards it to them either). ``why``: the context was reclaimed, how (see
    context._reclaim), which the release carries. Returns the wait for their
    acknowledgements (None: nobody to tell)."""
    # Release locally first, so a forwarded release coming back finds nothing to do.
    # (cut once: kept here, and passed on to the workers below as kept)
    why = cut_text(why, MAX_WHY) if why else ""
    ctx = _release_local(st, ctx_id, why)
    if ctx is None:
        return None
    worker = st.worker
    peers = ctx.peers - {worker.name, sender}
    if gone:
        peers.difference_update(gone)
    # Another process answers under the name of a replaced peer now: it acknowledges
    # the release (it may hold the context too, brought in by a worker that never knew
    # the old one), but nobody forwards it to the workers the dead one brought in, so a
    # release that starts here tells every member. (Only where it starts: each worker
    # it reaches telling every member again cost K^2 messages for K workers.)
    tell_all = sender is None and any(
        worker.peer_id(p) not in (None, known) for p, known in ctx.peer_ids.items()
    )
    if not peers and not tell_all:
        return None
    # Peers already taken for lost here are named gone too: the others skip them when
    # they forward it (a second hop waited out its connection deadline to a hung first
    # hop the driver knew was lost). They are still sent it: alive after all, they
    # handle it once reconnected.
    lost = [p for p in peers if worker.is_lost(p)]
    if lost:
        gone = sorted({*lost, *(gone or ())})
    # (the initiator, where a release starts, has it: a member told because a peer was
    # gone, it was called too, and an initiator its workers cannot reach, behind a
    # firewall, held every such release for the connect timeout, 3 s)
    told = {sender or worker.name, ctx.initiator}
    return _release_on(worker, peers, ctx_id, told, gone, tell_all, why)


def _release_on(
    worker: Any,
    peers: set[str],
    ctx_id: int,
    told: set[str],
    gone: list[str] | None = None,
    tell_all: bool = False,
    why: str = "",
) -> Coroutine[Any, Any, None]:
    """Send the release of ``ctx_id`` to ``peers`` now (each forwards it to its own
    peers, but the ``gone`` ones); returns the wait for their acknowledgements.
    ``told``: workers that have the release already."""
    started = start_calls(worker, peers, _release, _release_args(ctx_id, worker.name, gone, why))
    return _await_releases(worker, started, ctx_id, told, gone, tell_all, why)


def _release_args(ctx_id: int, sender: str, gone: list[str] | None, why: str) -> tuple[Any, ...]:
    """The arguments of a ``_release`` call (``why`` only when there is one: a
    context's own release stays as short as it was)."""
    return (ctx_id, sender, gone, why) if why else (ctx_id, sender, gone)


async def _await_releases(
    worker: Any,
    started: list[Any],
    ctx_id: int,
    told: set[str],
    gone: list[str] | None = None,
    tell_all: bool = False,
    why: str = "",
) -> None:
    """Wait for the releases ``started`` by ``_release_on``. A peer that is gone cannot
    forward it to the workers it brought into the context (second hops, whose initiator
    lives on: no lease reclaims it there), so then (or with ``tell_all``: a peer was
    gone before) every other member is told too (workers without the context just
    acknowledge), but the ``gone`` ones and those ``told`` already."""
    me = worker.name
    try:
        failed = await finish_calls(worker, started)
    except asyncio.CancelledError:
        # The waiting task was cancelled (a timeout around a whole training step): the
        # rest runs in the background, as for a context left by a cancelled task (a
        # second hop of a hung peer kept the context until the idle timeout, 60 s). The
        # answer the cancellation cut is lost: that peer counts as failed.
        cut = any(f.cancelled() for _, f in started)
        uncut = [(p, f) for p, f in started if not f.cancelled()]
        again = _await_releases(worker, uncut, ctx_id, told, gone, tell_all or cut, why)
        worker.spawn(again, name=f"release-{ctx_id:#x}")
        raise
    if failed or tell_all:
        out = failed.union(gone or ())
        rest = set(worker.worker_names()) - {p for p, _ in started} - {me, *told} - out
        if rest:
            # (the gone ones named: those that have them as peers do not forward the
            # release to them, which would wait out a connection's deadlines if one
            # hung; the release sent them before reaches them if they come back)
            await call_peers(worker, rest, _release, _release_args(ctx_id, me, sorted(out), why))


def _release_local(st: DistState, ctx_id: int, why: str = "") -> DistContext | None:
    """Release ``ctx_id`` here (``why``: it was reclaimed, how, see DistState.forget);
    returns the context released (None: not here)."""
    ctx = st.forget(ctx_id, why)
    if ctx is not None:
        if ctx.sends or ctx.recvs:  # (else freed already: by a pass without retain_graph)
            ctx.free_graph()
        ctx.grads.clear()
    return ctx


#: The most of a reclaimed context's release's ``why`` a worker keeps (characters).
MAX_WHY = 2000


@inline
def _release(
    ctx_id: int, sender: str, gone: list[str] | None = None, why: str = ""
) -> Awaitable[None] | None:
    """Handler: release the context here, then on our own peers (second hops) but the
    ``gone`` ones (the sender could not reach them); the reply waits for theirs. Inline:
    without second hops it answers at once. ``why``: the context was reclaimed, how
    ("worker 'w1' lost the context's initiator, ..."), which a late call in it here is
    told (unless this worker had released it before)."""
    if (
        type(ctx_id) is not int
        or type(sender) is not str
        or not (gone is None or (type(gone) is list and all(type(p) is str for p in gone)))
        or type(why) is not str
    ):
        # (each was used as it came: "unhashable type: 'list'", "'int' object is not
        # iterable")
        raise ProtocolError(
            f"malformed context release: context id {short_repr(ctx_id)}, sender "
            f"{short_repr(sender)}, gone {short_repr(gone)}, why {short_repr(why)}"
        )
    st = state_of(current_worker())
    first = not st.released_here(ctx_id)
    # (cut: it came from a peer, and stays while the id is remembered)
    why = cut_text(why, MAX_WHY) if why else ""
    acks = _start_release(st, ctx_id, sender, gone, why)
    if why and first:
        # (kept for a late call's refusal, as a cause of this worker's own)
        st.reclaimed(ctx_id, why)
    return acks


async def _ask_initiators(st: DistState, lost: str, ask: dict[str, list[int]]) -> None:
    """Release here the contexts of ``ask`` (initiator -> context ids) that their
    initiator no longer has, then on this worker's other peers in them (not ``lost``,
    the peer whose loss made us ask). Each initiator apart: a slow one holds up no
    other's answer. An initiator that cannot answer is left alone: if it is gone, its
    loss reclaims its contexts here (the lease)."""
    await asyncio.gather(*(_ask_initiator(st, lost, i, ids) for i, ids in ask.items()))


async def _ask_initiator(st: DistState, lost: str, initiator: str, ids: list[int]) -> None:
    worker = st.worker
    # (a member out of this worker's reach, on another host bound to its loopback or
    # behind a one-way firewall, is asked by the cluster's head, which it joined:
    # without, these contexts stayed here until it left the cluster)
    head = worker.registry_conn.peer_name if worker.registry_conn is not None else None
    try:
        try:
            gone = await worker.call_nowait(initiator, _gone_contexts, (ids,))
        except WorkerLost:
            if head in (None, initiator, worker.name) or initiator not in worker.members:
                raise
            gone = await worker.call_nowait(head, _gone_contexts_at, (initiator, ids))
    except Exception as exc:  # (lost, left the cluster: ValueError, unknown worker)
        log.debug(
            "worker %s: %s could not say which contexts are gone: %r", worker.name, initiator, exc
        )
        return
    if not int_list(gone):
        log.warning(
            "worker %s: malformed answer from %s: %r", worker.name, initiator, short_repr(gone)
        )
        return
    waits = []
    for ctx_id in gone:
        ctx = st.contexts.get(ctx_id)
        if ctx is not None and ctx.initiator == initiator:
            acks = _start_release(st, ctx_id, gone=[lost])
            if acks is not None:
                waits.append(acks)
    await asyncio.gather(*waits)


async def _gone_contexts_at(initiator: str, ids: list[int]) -> list[int]:
    """Handler, on the cluster's head: ask ``initiator`` which of ``ids`` it no longer
    has, for a worker that cannot reach it (see _ask_initiator)."""
    if type(initiator) is not str:
        raise ProtocolError(f"initiator must be a worker name, got {short_repr(initiator)}")
    gone: list[int] = await current_worker().call_nowait(initiator, _gone_contexts, (ids,))
    return gone


@inline
def _gone_contexts(ids: list[int]) -> list[int]:
    """Handler, on an initiator: which of ``ids`` it no longer has (released, or never
    started here)."""
    if not int_list(ids):
        raise ProtocolError(f"context ids must be a list of ints, got {short_repr(ids)}")
    contexts = state_of(current_worker()).contexts
    return [i for i in ids if i not in contexts]


def get_gradients(context_id: int) -> dict[Tensor, np.ndarray]:
    """The leaf gradients this worker accumulated in ``context_id``.

    Keys are this worker's leaf tensors that were reached by a backward pass of the
    context, and the leaves behind every tensor this worker sent in it (the leaf itself
    when it was sent; ``x`` for a sent ``x * 2``, which is no key): zeros when the loss
    did not depend on it (its call did not use it, or the call's result went unused),
    where a local backward would leave its ``.grad`` None; values add up over repeated
    backward calls. ``.grad`` is never written by a distributed backward. The arrays
    are the context's own (as PyTorch's tensors are): changing one in place changes
    what later calls return and what ``DistributedOptimizer.step`` applies; copy one to
    keep or change it.

    Raises:
        ContextError: unknown or released context id (or not an integer).

    Example::

        grads = ag.dist.get_gradients(ctx)
        g_w = grads[w]
    """
    worker = current_worker()
    ctx = state_of(worker).get(context_id)
    return _Gradients(ctx.grads, ctx.id, worker.name)


class _Gradients(dict[Tensor, np.ndarray]):
    """What :func:`get_gradients` returns: a dict whose missing key says why it may
    be missing (a bare ``KeyError: tensor(...)`` did not)."""

    def __init__(self, grads: dict[Tensor, np.ndarray], ctx_id: int, worker: str) -> None:
        super().__init__(grads)
        self._where = (ctx_id, worker)

    def __missing__(self, key: Any) -> np.ndarray:
        if not isinstance(key, Tensor):
            raise KeyError(f"{key!r:.80}: the keys are tensors")
        ctx_id, worker = self._where
        raise KeyError(
            f"no gradient of {key!r:.80} in context {ctx_id:#x} on worker {worker!r}: only "
            "leaves of this worker that a backward pass of the context reached have one "
            "(a tensor another worker sent or holds has its gradient there; a non-leaf, "
            "or one that does not require grad, has none)"
        )


def debug_info() -> dict[str, int]:
    """Counters of this worker. Now: ``num_contexts`` (live here), ``num_active_passes``
    (backward passes with a part here running), ``num_send_nodes``, ``num_recv_nodes``,
    ``num_offloaded_parts`` (parts running in the thread pool). Since the worker
    started: ``num_backward_passes`` (parts of passes it ran to their end),
    ``num_backward_messages`` (sent: gradients, starts, returned credits). Also now:
    ``num_staged_loads`` and ``staged_load_bytes``, the parts of
    ``DistributedOptimizer.load_state_dict`` checked here and kept until their load
    commits or aborts. An idle worker shows 0 for each of the first group.

    Example::

        assert ag.dist.debug_info()["num_contexts"] == 0
    """
    from actorgrad.dist.optimizer import staged_stats  # (it imports this module)

    worker = current_worker()
    return {**state_of(worker).stats(), **staged_stats(worker)}
