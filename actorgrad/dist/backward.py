"""The distributed backward pass: the local engine with remote edges.

Design (see docs/distributed.md for the long form):

* Every worker holding part of a context's graph runs one ``GraphTask`` of the local
  engine per pass. Its sources are the context's send nodes (their gradients arrive as
  messages); its roots are the loss tensors (initiator) and the context's recv nodes
  (with no gradient of their own: a recv whose tensor the loss never used is ready at
  once and fires ``None``). Dependency counts cover the whole fragment, so every node
  runs exactly once per pass, with the sum of everything that reaches it, also when
  the parts come from different workers: a node waits until each consumer edge has
  delivered a gradient or a ``None``.
* A recv node that fires produces a message to the worker holding its send node. Each
  send node therefore receives exactly one message per pass, ``None`` included: no
  send waits forever (PyTorch's FAST mode hangs on an unused send).
* A worker that starts a pass also starts the workers holding the recv nodes of its
  send nodes (an empty message, or piggy-backed on a gradient message), so every part
  of the graph gets going even where no gradient flows to it.
* Relays: the origin of a pass lets the gradient of a tensor it received and passed on
  unchanged go straight from the worker it passed it to, to the worker it came from
  (see ``_plan_relays``).
* Completion is credit recovery: the initiator starts with credit 1, every message
  carries a share of its sender's credit, and a worker that handled a message and sent
  nothing further returns its share to the initiator. ``backward`` returns when the
  initiator holds 1 again: then every message has been handled, every send node
  delivered, every task finished, every leaf gradient accumulated on its worker.
  A worker whose part is not finished keeps the credit of a message that gave it
  nothing to send (e.g. a start) and passes it on with its next message, so starts
  cost no credit messages.
* Each message is a one-way protocol message (``Worker.cast``) handled inline on the
  receiver's loop: no reply, no task, no function lookup. (The abort of a failed pass
  is acknowledged by credit too, so that the initiator knows every worker dropped it
  and the ends of pairs it had freed: see _clean_up.) A
  failure in a worker's part is reported by that worker to the pass's origin as the
  original error (``RemoteError`` naming it); a message that cannot be sent, or a peer
  lost after it was sent a message of the pass (its process died; or it went silent
  for the heartbeat timeout: the sender keeps an eye on the peers it sent to until the
  context's next pass starts there or the context is released, see
  ``DistState.watch``), is reported by the sender as ``WorkerLost``. The origin then
  floods an abort so every worker drops the pass.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from time import perf_counter
from typing import Any

import numpy as np

from actorgrad.autograd import GraphTask, add, grad_node, seed_grad, unused_zeros
from actorgrad.dist.context import (
    PASS_ID_BITS,
    DistContext,
    DistState,
    RecvNode,
    check_peers,
    int_list,
    replaced_with_part,
    running_chain,
    state_of,
    still_broken,
)
from actorgrad.errors import (
    ContextError,
    ProtocolError,
    RemoteError,
    WorkerLost,
    check_retain_graph,
    refusal_type,
    short_repr,
    type_name,
)
from actorgrad.runtime import loop_worker, on_cast
from actorgrad.runtime import worker as _runtime
from actorgrad.tensor import Tensor, broadcast_view

log = logging.getLogger("actorgrad.dist")

__all__ = ["PassState", "backward"]

_Outgoing = dict[str, list[Any]]  # dest worker -> [send_id, grad, send_id, grad, ...]

# topics of the pass's one-way messages (Worker.cast)
T_DELIVER = "dist.deliver"
T_CREDIT = "dist.credit"
T_FAIL = "dist.fail"
T_ABORT = "dist.abort"
T_UNPAIR = "dist.unpair"
T_RELAY = "dist.relay"
# the clean-up of an aborted pass (see _clean_up)
T_CLEAN = "dist.clean"  # (ctx id, pass id, origin, sender, credit num, exp)
T_CLEAN_UNPAIR = "dist.clean_unpair"  # (ctx id, peer, recv ids, send ids, origin, pass id, credit)
T_CLEANED = "dist.cleaned"  # to the origin: (ctx id, pass id, credit num, exp)
# the reports a T_RELAY carries to a pass's origin, with their number of arguments (a
# clean-up's share back too: see _cleaned_share)
_REPORTS = {T_CREDIT: 4, T_FAIL: 3, T_CLEANED: 4}


#: Broadcast gradients at least this big travel compact (smaller ones as they are: the
#: view costs more to rebuild than the bytes it saves).
COMPACT_MIN_BYTES = 4096


def _pack_grad(g: np.ndarray | None) -> Any:
    """A gradient for the wire. A big broadcast view (``sum``'s backward gives one the
    size of its input, with zero strides) travels as its compact base and the full
    shape."""
    if g is None:
        return None
    if type(g) is not np.ndarray:  # numpy ops on 0-d arrays give numpy scalars
        return np.asarray(g)
    if g.nbytes < COMPACT_MIN_BYTES or 0 not in g.strides:
        return g
    compact = g[tuple(slice(0, 1) if st == 0 else slice(None) for st in g.strides)]
    return [np.ascontiguousarray(compact), list(g.shape)]


def _unpack_grad(v: Any) -> np.ndarray | None:
    if v is None or type(v) is np.ndarray:
        return v
    if (
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], np.ndarray)
        and isinstance(v[1], list)
        and all(type(d) is int and d >= 0 for d in v[1])
    ):
        base, shape = v
        if base.ndim != len(shape) or any(
            b != d and b != 1 for b, d in zip(base.shape, shape, strict=True)
        ):
            raise ProtocolError(
                f"broadcast gradient of shape {base.shape} does not fit shape {tuple(shape)}"
            )
        return broadcast_view(base, tuple(shape))
    raise ProtocolError(f"gradient must be an array or None, got {type(v).__name__}")


def _leaf(contrib: dict[Tensor, np.ndarray], t: Tensor, grad: np.ndarray | None) -> None:
    """The task's leaf sink: a leaf's gradient of this pass, kept in ``contrib``."""
    prev = contrib.get(t)
    if grad is None:
        if prev is None:
            # Reached but got no gradient: reported as zeros (an unused input).
            contrib[t] = unused_zeros(t.data)
        return
    if prev is not None:
        contrib[t] = add(prev, grad)
    elif (
        grad.dtype != t.data.dtype or not grad.flags.writeable or isinstance(grad.base, np.ndarray)
    ):
        # The user gets this array: make it one the context owns, in the leaf's dtype.
        # (A gradient decoded from a frame is a writable array over that frame's buffer,
        # whose values no other array shares, so it is kept without a copy; it keeps
        # the frame's whole buffer alive, as any received array does: see limits.md.
        # But for what wire._array_from makes as a reshape of a 1-d view, copied: a
        # dtype not in wire._CASTS (float16, bool, complex, another byte order), a
        # zero-size array, one sent inline, under 64 KiB.)
        contrib[t] = np.array(grad, dtype=t.data.dtype)
    else:
        contrib[t] = grad


def _boundary(
    ctx_id: int,
    out: _Outgoing,
    redirect: dict[tuple[str, int], tuple[str, int]],
    node: Any,
    grad: np.ndarray | None,
) -> None:
    """The task's boundary handler: a recv node's gradient becomes part of a message,
    to the worker holding its send node, or where the pass's origin relays it."""
    if not isinstance(node, RecvNode):
        return
    if node.ctx_id != ctx_id:
        if grad is None:
            return  # (the loss does not reach it)
        # A tensor received in another context: its gradient would have to go back
        # through that context's send node, which this pass does not drive. Stopping
        # here lost it silently (the sender's leaves got part of their gradient).
        raise RuntimeError(
            f"backward of distributed autograd context {ctx_id:#x} reached a tensor "
            f"received from worker {node.src!r} in another context ({node.ctx_id:#x}): "
            "its gradient cannot go back to its sender in this pass. Compute it inside "
            "this context, or use tensor.detach() to take it as a constant"
        )
    if node.freed:
        # Its send node is gone too (freed there, or being dropped: see _unpair), so
        # nobody waits for this message: a None (the loss does not reach it through
        # this graph) sends nothing. A gradient is a second backward through a freed
        # graph. (A stale recv node not yet marked sends to a freed send node instead:
        # "no send node", a ContextError.)
        if grad is None:
            return
        raise RuntimeError(
            f"{node!r}: trying to backward through the graph a second time; it was freed "
            "by an earlier backward pass in this context (a pass without retain_graph "
            "frees the context's whole graph on every worker, also the parts its loss did "
            "not reach). Pass retain_graph=True to the earlier backward() if you need to "
            "run it again."
        )
    dest, send_id = node.src, node.send_id
    if redirect:
        to = redirect.get((dest, send_id))
        if to is not None:
            dest, send_id = to
    out.setdefault(dest, []).extend((send_id, _pack_grad(grad)))


def _plan_relays(
    ctx: DistContext, task: GraphTask, me: str, roots: Sequence[tuple[Any, Any]]
) -> dict[str, list[Any]]:
    """On the origin, before its part runs: the tensors it received and sent on
    unchanged (the driver of a pipeline). Such a send node's gradient, coming back from
    worker B, would only flow into the recv node it came from and leave again, to the
    worker A that sent the tensor: B can send it to A directly, one message instead of
    two and nothing to do here. A pair qualifies when the recv node feeds only that
    send node and is not a root of the pass (so no other gradient has to be added to
    it first) and has no hooks (they must see the gradient here). The pair is taken out
    of this part's task;
    the relay (send id, A, A's send id) goes to B with the origin's first message of
    the pass, which B waits for before any of its recv nodes from the origin fires."""
    relays: dict[str, list[Any]] = {}
    skip: list[Any] = []
    seeded = {node for node, _ in roots}
    for s in ctx.sends.values():
        r = s.next[0] if s.next else None
        if (
            type(r) is RecvNode
            and r.ctx_id == ctx.id
            and not r.freed  # (its send node is gone: nothing to relay to)
            and not r._hooks
            and task.consumers(r) == 1
            and r not in seeded
            and me != r.src != s.dest != me
        ):
            relays.setdefault(s.dest, []).extend((s.send_id, r.src, r.send_id))
            skip += (s, r)
    if skip:
        task.skip(skip)
    return relays


#: A PassState's task once its part finished: a task with no nodes (finished).
_FINISHED = GraphTask(())


class PassState:
    """One backward pass of one context on one worker."""

    __slots__ = (
        "ctx",
        "pass_id",
        "origin",
        "task",
        "contrib",
        "out",
        "started_peers",
        "credit",
        "watching",
        "worker",
        "redirect",
        "relays",
        "busy",
        "backlog",
        "held",
        "exempt",
    )

    def __init__(
        self,
        worker: Any,
        ctx: DistContext,
        pass_id: int,
        origin: str,
        roots: Sequence[tuple[Any, np.ndarray | None]],
        retain_graph: bool,
        exempt: Sequence[int] = (),
    ) -> None:
        calls = ctx.calls_out.difference(exempt) if ctx.calls_out else None
        if calls:
            # A call made in the context here by a task other than the one that started
            # the pass (whose calls, ``exempt``, wait for it) is out: its request or
            # reply may be on its way, with send nodes recorded and no recv nodes yet,
            # and the pass would wait for their gradients for good. Checked on every
            # worker a pass reaches, when its part starts (before it runs any node).
            raise ContextError(
                f"context {ctx.id:#x}: {len(calls)} call(s) made in it on worker "
                f"{worker.name!r} by other tasks have not returned; their messages may "
                "carry tensors of the graph, so a backward pass now could wait for "
                "their gradients for good. Await them first (e.g. gather the tasks "
                "making them), then call backward"
            )
        check_peers(worker, ctx)
        if ctx.unanswered:
            peer = next(iter(ctx.unanswered))
            raise ContextError(
                f"context {ctx.id:#x}: a call to worker {peer!r} made in it on worker "
                f"{worker.name!r} timed out or was cancelled, and its reply, which may "
                "hold tensors of the graph, has not come back; a backward pass now could "
                "wait for their gradients for good. Wait for that worker to answer (and "
                "retry), or use a new context"
            )
        if ctx.broken is not None and still_broken(worker, ctx):
            raise ContextError(ctx.broken)
        self.worker = worker
        self.ctx = ctx
        self.pass_id = pass_id
        # The call chain of the task that started the pass, while the handler of its
        # innermost call runs on the origin (context.running_chain): those calls wait
        # for the pass. Every message of the pass carries it.
        self.exempt = list(exempt)
        # The worker that called backward: it collects the credit and the failures
        # (usually the context's initiator, but any worker in the context may start one).
        self.origin = origin
        self.contrib: dict[Tensor, np.ndarray] = {}
        self.out: _Outgoing = {}
        # (src, send id) of a recv node here -> (worker, send id) its gradient goes to
        # instead: relays set up by the origin (see _plan_relays)
        self.redirect: dict[tuple[str, int], tuple[str, int]] = {}
        all_roots: list[tuple[Any, np.ndarray | None]] = list(roots)
        all_roots.extend((r, None) for r in ctx.recvs)
        # (The callbacks hold the dicts, not this object: bound methods would make pass
        # and task a reference cycle that only the garbage collector frees, and the
        # step's whole graph and context with it.)
        self.task = GraphTask(
            all_roots,
            sources=ctx.sends.values(),
            retain_graph=retain_graph,
            leaf_sink=functools.partial(_leaf, self.contrib),
            on_boundary=functools.partial(_boundary, ctx.id, self.out, self.redirect),
        )
        if not retain_graph:
            for n in self.task.boundaries:
                if isinstance(n, RecvNode) and n.ctx_id != ctx.id:
                    # It reaches a tensor received in another context: a gradient that
                    # gets there fails the pass (see _boundary), and the nodes run
                    # before it, freed on the way, were the other context's graph (its
                    # own backward then failed, "backward through the graph a second
                    # time"). They are left to it.
                    self.task.retain_graph = True
                    break
        # On the origin: per worker, the relays its first message carries.
        self.relays: dict[str, list[Any]] = (
            _plan_relays(ctx, self.task, origin, roots) if origin == worker.name else {}
        )
        # Workers holding the recv nodes of our sends must run their part too (the
        # origin runs its part anyway: no start message to it).
        self.started_peers = {s.dest for s in ctx.sends.values()}
        self.started_peers.discard(origin)
        # Credit held here: received, not yet passed on (see _forward).
        self.credit: Credit = NO_CREDIT
        ctx.last_pass = (pass_id, origin)
        ctx.settle(origin, pass_id)
        ctx.sent_to.clear()
        ctx.watching.clear()
        # On the origin, the peers watched by the runtime (``Worker.watch``: one silent
        # for the heartbeat timeout, hung, is taken for lost, and the pass fails, see
        # context._on_peer_lost) until the whole pass is done (backward unwatches):
        # every peer holding an end of a pair of the origin's (one the origin never
        # sends to may hold credit: a relay's target, the sender of a tensor it passed
        # on) and those it sends to, as a caller watches the peers its calls wait on.
        # Not a peer the context only exchanged calls without tensors with: no part of
        # the pass, it was taken for lost when silent (its loop blocked) meanwhile,
        # though nothing waited on it. The context's initiator only if sent to: its
        # loss reclaims the context (the lease). Elsewhere, the peers sent to are only
        # kept an eye on (DistState.watch): never the origin, the one waiting.
        self.watching: set[str] = set()
        if origin == worker.name:
            # (the holders of our sends' recv nodes are started_peers, the origin left out)
            for peer in self.started_peers.union(r.src for r in ctx.recvs):
                if peer != origin and peer != ctx.initiator:
                    worker.watch(peer)
                    self.watching.add(peer)
        # A part that ran longer than SLICE goes on in the worker's thread pool (see
        # _step): meanwhile the messages of the pass wait in ``backlog`` and what the
        # part made before it moved waits in ``held``.
        self.busy = False
        self.backlog: list[tuple[list[Any], int, int]] = []
        self.held: _Outgoing = {}

    def watch(self, dest: str) -> None:
        """A message of this part goes to ``dest``: watch it (its loss is reported to the
        origin, see context._on_peer_lost)."""
        sent = self.ctx.sent_to
        if dest in sent:
            return
        sent.add(dest)
        worker, ctx = self.worker, self.ctx
        if dest == self.origin or dest == worker.name:
            return
        if worker.name != self.origin:
            state_of(worker).watch(ctx, dest)
        elif dest not in self.watching:  # (else watched from the start)
            worker.watch(dest)
            self.watching.add(dest)

    def unwatch(self) -> None:
        """The origin's pass is done or dropped: stop watching (idempotent)."""
        watching, self.watching = self.watching, set()
        for dest in watching:
            self.worker.unwatch(dest)

    def __repr__(self) -> str:
        return (
            f"PassState(ctx={self.ctx.id:#x}, pass={self.pass_id:#x}, "
            f"finished={self.task.finished}, leaves={len(self.contrib)})"
        )

    def deliver(self, items: list[Any]) -> int:
        """Hand the task the gradients of a message; returns how many elements they
        hold."""
        size = 0
        if type(items) is not list or len(items) % 2:
            raise ProtocolError(
                f"gradient message must hold (send id, gradient) pairs, got {short_repr(items)}"
            )
        sends = self.ctx.sends
        for i in range(0, len(items), 2):
            send_id, grad = items[i], items[i + 1]
            # (one of another type was looked up as it came: "unhashable type: 'list'")
            node = sends.get(send_id) if type(send_id) is int else None
            if node is None:
                # (also for a None: ignoring it would hide a pass that started before a
                # clean-up reached some worker, which then waits for good, see _unpair)
                raise ContextError(
                    f"context {self.ctx.id:#x} has no send node {short_repr(send_id)} here "
                    "(graph already freed, or a gradient arrived twice)"
                )
            if not self.task.waits_for(node):
                # (one gradient per pass reaches a send node: the engine added a second
                # one to the first, and the leaves behind it got twice theirs, silently)
                raise ProtocolError(
                    f"a second gradient for send node {send_id} of context "
                    f"{self.ctx.id:#x} in backward pass {self.pass_id:#x}"
                )
            g = _unpack_grad(grad)
            if g is not None:
                if g.shape != node.shape:
                    raise ProtocolError(
                        f"gradient of shape {g.shape} for send node {send_id} of context "
                        f"{self.ctx.id:#x}, which sent a tensor of shape {node.shape}"
                    )
                if g.dtype.kind != "f":  # (complex ones lost their imaginary part)
                    raise ProtocolError(
                        f"gradient of dtype {g.dtype} for send node {send_id} of context "
                        f"{self.ctx.id:#x}: gradients are floating point"
                    )
                size += g.size
            self.task.deliver(node, g)
        return size

    def run(self, until: float | None = None) -> _Outgoing:
        """Run what is ready (until ``until``, see GraphTask.run); return the messages to
        send (start messages included)."""
        self.task.run(until)
        return self.collect()

    def collect(self) -> _Outgoing:
        """The messages the task made so far (start messages included), taken."""
        out = dict(self.out)  # (the dict itself stays: the task's callback fills it)
        self.out.clear()
        for peer in self.started_peers:
            out.setdefault(peer, [])
        self.started_peers = set()
        return out

    def finish(self, st: DistState, retain_graph: bool) -> None:
        ctx = self.ctx
        freed = None if retain_graph else ctx.free_graph()
        ctx.commit(self.pass_id, self.origin, self.contrib, freed)
        # (its nodes and bookkeeping are done with: not kept for the garbage collector
        # to scan while the origin's backward waits for its turn to return, thousands
        # of them with as many contexts in flight)
        self.task = _FINISHED
        ctx.active_pass = None
        ctx.done_upto[self.pass_id >> PASS_ID_BITS] = self.pass_id
        st.num_backward_passes += 1


# --- credit-based completion ----------------------------------------------------------
#
# The initiator starts a pass holding credit 1. Every message carries part of its
# sender's credit; a worker that handled a message and sent nothing further returns
# the credit it got to the initiator. The pass is complete when the initiator holds 1
# again: every message has then been handled (a message's credit can only come back
# after it was handled, and after the messages it caused were sent with their share).
# Credits are exact dyadic fractions ``num / 2**exp``; msgpack carries the two ints, a
# numerator past 63 bits as its big-endian bytes (``_credit_out``): a part that holds
# the shares of many splits has one of about as many bits as its exponent (a loop of 65
# steps, each sending to two workers, passed 64 bits: its credit message could not be
# encoded, and the backward waited for good).

Credit = tuple[int, int]  # (num, exp): num / 2**exp
NO_CREDIT: Credit = (0, 0)


def add_credit(a: Credit, b: Credit) -> Credit:
    """``a + b``, exactly, on integers (Fraction is ~10x slower on this hot path)."""
    (na, ea), (nb, eb) = a, b
    if ea < eb:
        (na, ea), (nb, eb) = (nb, eb), (na, ea)
    return na + (nb << (ea - eb)), ea


def _norm(num: int, exp: int) -> Credit:
    while exp and not num & 1:
        num >>= 1
        exp -= 1
    return num, exp


#: Largest credit exponent a message may carry. Each split of a pass's credit among k
#: messages adds about log2(k) to it: one per step of a loop whose steps each send to
#: two workers (10,000 steps: 10,000-bit numerators, 1.25 KiB a message); a bigger one
#: is a malformed message (whose ints would cost memory: 128 KiB at most).
MAX_CREDIT_EXP = 1 << 20


def _credit_out(credit: Credit) -> Credit | tuple[bytes, int]:
    """``credit`` as a message carries it (see the section's comment)."""
    num, exp = credit
    if num < 1 << 63:
        return credit
    return num.to_bytes((num.bit_length() + 7) // 8, "big"), exp


def _check_credit(num: Any, exp: Any) -> int:
    """The numerator of the credit ``num / 2**exp`` a message carried (an int, or its
    bytes); ProtocolError unless the credit is in (0, 1]."""
    if type(num) is bytes and len(num) <= MAX_CREDIT_EXP // 8 + 1:
        num = int.from_bytes(num, "big")
    if (
        type(num) is not int
        or type(exp) is not int
        or not 0 <= exp <= MAX_CREDIT_EXP
        or num <= 0
        # (num <= 2**exp, without making 2**exp: up to 128 KiB a message)
        or (num.bit_length() > exp and num != 1 << exp)
    ):
        raise ProtocolError(f"malformed credit {short_repr(num)}/2**{short_repr(exp)}")
    return num


def split_credit(credit: Credit, k: int) -> list[Credit]:
    """``k`` credits adding up to ``credit`` exactly (none of them zero)."""
    num, exp = credit
    if k == 1:
        return [credit]
    j = (k - 1).bit_length()  # 2**j >= k
    if exp + j > MAX_CREDIT_EXP:
        # (its receiver would refuse it as "malformed credit": say what it means)
        raise ValueError(
            "this backward pass's graph is too long for one pass: its completion credit "
            f"was split past 2**-{MAX_CREDIT_EXP} (about one split per remote step, more "
            "when a step sends to several workers: a million steps in a row); cut the "
            "computation into several contexts or backward passes"
        )
    part = _norm(num, exp + j)
    first = _norm(num * ((1 << j) - k + 1), exp + j)
    return [first] + [part] * (k - 1)


class InitiatorRun:
    """The initiator's view of one pass: the credit back so far and the outcome."""

    __slots__ = ("num", "exp", "done", "ctx_id", "pass_id")

    def __init__(self, ctx_id: int, pass_id: int) -> None:
        self.ctx_id = ctx_id
        self.pass_id = pass_id
        self.num, self.exp = 0, 0  # credit back so far: num / 2**exp
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return (
            f"InitiatorRun(ctx={self.ctx_id:#x}, pass={self.pass_id:#x}, "
            f"credit={self.num}/2**{self.exp})"
        )

    def add_credit(self, credit: Credit) -> None:
        self.num, self.exp = add_credit((self.num, self.exp), credit)
        # (num >= 2**exp, i.e. all of it back; bit_length: no 2**exp made per message)
        if self.num.bit_length() > self.exp and not self.done.done():
            if self.num == 1 << self.exp:
                self.done.set_result(None)
            else:  # (the pass must not pass for complete: its parts may still run)
                self.done.set_exception(
                    ProtocolError(
                        f"distributed backward pass {self.pass_id:#x} of context "
                        f"{self.ctx_id:#x} got back more credit than it gave out (a "
                        "report came twice, or from a worker outside the pass)"
                    )
                )

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            if type(exc) is StopIteration:
                # (a hook's `next()` of an exhausted iterator, in this worker's part run
                # by a message handler: a future refuses a StopIteration with a
                # TypeError, which left the handler, only logged, and backward waited
                # for good. As a coroutine raising one does, and the pool's jobs.)
                err = RuntimeError(f"{exc!r} raised in the backward pass")
                err.__cause__ = exc
                exc = err
            self.done.set_exception(exc)


def _failure_record(exc: BaseException, me: str, refused: bool = False) -> list[Any]:
    """What a failure becomes on the wire: ["lost", message, the worker lost or None],
    ["refused", type name,
    message] (``refused``: the protocol's check of the message failed, not the graph's
    code) or ["error", RemoteError] (the codec keeps a RemoteError's fields, so the
    worker where it happened stays)."""
    if isinstance(exc, WorkerLost):
        return ["lost", str(exc), exc.peer]
    # (the protocol's refusals reach the origin as their own type, as its own do)
    if refused and refusal_type(name := type_name(type(exc))) is not None:
        return ["refused", name, f"{exc} (refused by worker {me!r})"]
    return ["error", RemoteError.from_exception(me, exc)]


def _failure_from(record: Any) -> BaseException:
    if type(record) is list and len(record) == 3 and record[0] == "lost":
        _, message, peer = record
        if type(message) is str and (peer is None or type(peer) is str):
            return WorkerLost(message, peer=peer)
    if type(record) is list and len(record) == 2:
        kind, payload = record
        if kind == "error" and isinstance(payload, RemoteError):
            return payload
    if type(record) is list and len(record) == 3 and record[0] == "refused":
        cls = refusal_type(record[1])
        if cls is not None and type(record[2]) is str:
            return cls(record[2])
    raise ProtocolError(f"malformed backward failure report {short_repr(record)}")


def _report(
    st: DistState,
    ctx_id: int,
    origin: str,
    pass_id: int,
    exc: BaseException,
    refused: bool = False,
    via: str | None = None,
) -> None:
    """Tell the pass's origin that the pass failed (here, or at a worker we sent to).
    ``refused``: by this worker's checks of a message of the pass (see _failure_record).
    ``via``: where it goes if it cannot go straight there (see _relay)."""
    if origin == st.worker.name:
        # The origin's own part, run by a message handler (A -> B -> A): its error is
        # raised as it is, as when that part runs inside backward() itself.
        _fail_run(st, pass_id, exc)
    else:
        record = _failure_record(exc, st.worker.name, refused)
        _to_origin(st, origin, T_FAIL, (ctx_id, pass_id, record), via)


def _return_credit(
    st: DistState,
    ctx_id: int,
    origin: str,
    pass_id: int,
    credit: Credit,
    via: str | None = None,
) -> None:
    if origin == st.worker.name:
        run = st.runs.get(pass_id)
        if run is not None:
            run.add_credit(credit)
    else:
        st.num_backward_messages += 1
        _to_origin(st, origin, T_CREDIT, (ctx_id, pass_id, *_credit_out(credit)), via)


def _to_origin(
    st: DistState, origin: str, topic: str, args: tuple[Any, ...], via: str | None = None
) -> None:
    """Send a report (``topic`` T_CREDIT, T_FAIL or T_CLEANED, ``args`` starting with the
    context and pass ids) to the pass's origin, by another way if it cannot go straight
    there (see _unsent_to_origin)."""
    # (the way back taken now, not when the try straight there failed: meanwhile, the
    # connect to the origin waiting, the first message of the context's next pass came
    # and took ctx.via, and this report, without a way, was lost: the origin's backward
    # waited for good; socket fuzz seed 116, 1 run in 10)
    via = _way_back(st, args, via)
    tried = st.no_way.get(origin)
    if tried is not None:
        # (tried again after a while, a firewall may have opened; or once the origin
        # has a connection with this worker: it reached us)
        if (
            perf_counter() - tried < NO_WAY_FOR
            and not st.worker.connected_to(origin)
            and _relay(st, origin, topic, args, None, via)
        ):
            return
        del st.no_way[origin]
    st.worker.cast(
        origin,
        topic,
        args,
        on_error=functools.partial(_unsent_to_origin, st, origin, topic, args, via),
    )


#: Seconds the reports for an origin they could not reach go another way before one
#: is tried straight again.
NO_WAY_FOR = 30.0


def _ignore(exc: BaseException) -> None:
    pass


def _unsent_to_origin(
    st: DistState,
    origin: str,
    topic: str,
    args: tuple[Any, ...],
    via: str | None,
    exc: BaseException,
) -> None:
    """A pass's credit or failure report could not be sent to its origin (its address
    does not reach it from here, and it never connected to this worker). It goes to
    ``via`` or the worker that brought this one into the pass, to be passed on
    (``T_RELAY``, see _relay): that worker reached this one, and got the pass from the
    origin or from a worker that did, so back along that way it gets there. Without a
    way (the origin gone waits for nothing; or this worker got the pass from the origin
    itself, over a connection since closed), it is said, not silently dropped: the
    origin's backward waits for this part for good."""
    w = st.worker
    if origin not in w.members or w.is_lost(origin):
        return
    st.no_way[origin] = perf_counter()
    if not _relay(st, origin, topic, args, exc, via):
        _no_way_to_origin(st, origin, topic, args, exc)


def _way_back(st: DistState, args: tuple[Any, ...], via: str | None) -> str | None:
    """Where a report about pass ``args[1]`` of context ``args[0]`` goes back to reach
    its origin: the worker that brought this one into that pass, when this worker has
    it, before ``via`` (the sender of the message the report is about: an error of the
    part here, on a message from downstream, went back down, and waited out that
    worker's own way first)."""
    ctx = st.contexts.get(args[0])
    if ctx is not None and ctx.via[0] == args[1]:
        return ctx.via[1]
    return via


def _relay(
    st: DistState,
    origin: str,
    topic: str,
    args: tuple[Any, ...],
    exc: BaseException | None,
    via: str | None = None,
) -> bool:
    """Send a report for ``origin`` (see _to_origin) to be passed on by the worker that
    brought this one into its pass, else by ``via`` (the sender of the message it is
    about: a refusal of a pass not taken here), if there is one: whether it went.
    (Either got the pass before this one did, and its own ``via`` before it, so the
    relays end at the origin, or at a worker with no way on, which says so.)"""
    w = st.worker
    via = _way_back(st, args, via)
    if via is None or via in (origin, w.name):
        return False
    w.cast(
        via,
        T_RELAY,
        (origin, topic, args),
        on_error=lambda relay_exc: _no_way_to_origin(
            st,
            origin,
            topic,
            args,
            f"{exc or 'no way there lately'}; nor through worker {via!r}: {relay_exc}",
        ),
    )
    return True


def _no_way_to_origin(
    st: DistState, origin: str, topic: str, args: tuple[Any, ...], why: Any
) -> None:
    """Say that a report could not reach the origin, which waits for it — unless the
    pass is over here anyway (aborted here; the context released here; a credit of a
    pass whose part failed here, or without the context), the origin is gone, or this
    worker is shutting down (the origin hears that it left: its pass fails with
    WorkerLost, it does not wait). (A failure report without the context, never
    released here, is said.)"""
    w = st.worker
    ctx_id, pass_id = args[0], args[1]
    ctx = st.contexts.get(ctx_id)
    if (
        w.closing
        or (ctx is None and (topic == T_CREDIT or st.released_here(ctx_id)))
        or (ctx is not None and ctx.is_aborted(pass_id))
        or (ctx is not None and topic == T_CREDIT and ctx.failed == pass_id)
        or origin not in w.members
        or w.is_lost(origin)
    ):
        return
    log.warning(
        "worker %s: backward pass %#x cannot report to its origin %r (%s): the "
        "origin's backward waits for it (see docs/limits.md, Cluster)",
        w.name,
        pass_id,
        origin,
        why,
    )


@on_cast(T_RELAY)
def _relayed(worker: Any, origin: str, topic: str, args: list[Any]) -> None:
    """Message handler: a report for a pass's origin that could not go straight there
    (see _unsent_to_origin). At the origin, handled as if it came straight; elsewhere,
    sent on (and on again, if this worker cannot reach it either)."""
    if (
        type(origin) is not str
        or type(topic) is not str
        or topic not in _REPORTS
        or type(args) not in (list, tuple)
        or len(args) != _REPORTS[topic]
    ):
        raise ProtocolError(
            f"malformed relayed report: origin {short_repr(origin)}, topic "
            f"{short_repr(topic)}, arguments {short_repr(args)}"
        )
    _check_ids(args[0], args[1])
    st = state_of(worker)
    if origin != worker.name:
        # Not connected with the origin, this worker most likely cannot reach it either
        # (the origin never called it): on up the way the pass came, to a worker that
        # the origin reached, without trying. (Each worker on the way waited out its
        # own connect timeout first: 3 s each behind a firewall, 9 s at depth 3.)
        if worker.connected_to(origin) or not _relay(st, origin, topic, tuple(args), None):
            _to_origin(st, origin, topic, tuple(args))
    elif topic == T_CREDIT:
        _credit(worker, *args)
    elif topic == T_CLEANED:
        _cleaned(worker, *args)
    else:
        _fail(worker, *args)


def _forward(st: DistState, ps: PassState, retain: bool, out: _Outgoing) -> None:
    """Send ``out``, splitting the credit held among the messages. With nothing to
    send, a finished part returns its credit to the origin; an unfinished one keeps it
    for its next message (its part is not done, so the origin must not be either)."""
    ctx, origin, pass_id = ps.ctx, ps.origin, ps.pass_id
    credit, ps.credit = ps.credit, NO_CREDIT
    if not out:
        if ps.task.finished:
            _return_credit(st, ctx.id, origin, pass_id, credit)
        else:
            ps.credit = credit
        return
    worker = st.worker
    msgs: Any = out.items()
    if max(map(len, out.values())) > 2:  # (several gradients for a peer)
        most = min(GRAD_MESSAGE_BYTES, worker.max_frame_size // 4)
        msgs = [(dest, part) for dest, items in msgs for part in _cut(items, most)]
    parts = split_credit(credit, len(msgs))
    me = worker.name
    relays = ps.relays
    st.num_backward_messages += len(msgs)
    for (dest, items), part in zip(msgs, parts, strict=True):
        # From now on its loss fails this pass (see context._on_peer_lost).
        ps.watch(dest)
        worker.cast(
            dest,
            T_DELIVER,
            (
                ctx.id,
                origin,
                pass_id,
                retain,
                items,
                *_credit_out(part),
                me,
                relays.pop(dest, None),
                ps.exempt,
            ),
            on_error=functools.partial(_send_failed, st, ctx, pass_id, origin),
        )


#: Most bytes of gradients in one backward message (and a quarter of the worker's
#: largest frame at most): a part's gradients for one peer go in several messages past
#: it. (In one, three gradients of 0.72 GB each, of three calls whose frames were each
#: under the largest frame, were over it: the pass failed.)
GRAD_MESSAGE_BYTES = 1 << 29


def _cut(items: list[Any], most: int) -> list[list[Any]]:
    """``items`` (send id, gradient, ...) in parts of at most ``most`` bytes of
    gradients (a gradient alone over it stays whole)."""
    parts: list[list[Any]] = [[]]
    size = 0
    for i in range(0, len(items), 2):
        g = items[i + 1]
        n = g.nbytes if type(g) is np.ndarray else 0 if g is None else g[0].nbytes
        if size + n > most and parts[-1]:
            parts.append([])
            size = 0
        parts[-1] += items[i : i + 2]
        size += n
    return parts


def _send_failed(
    st: DistState, ctx: DistContext, pass_id: int, origin: str, exc: BaseException
) -> None:
    # The message could not leave (the receiver is gone, or an argument cannot travel):
    # the pass cannot complete.
    ctx.drop_pass(pass_id)
    _report(st, ctx.id, origin, pass_id, exc)


#: Longest a part of a pass runs on the worker's loop (seconds): the rest goes on in the
#: worker's thread pool, so the loop keeps reading frames and answering heartbeats (a
#: part that blocked it for longer than the heartbeat timeout got its worker declared
#: lost by the peers watching it). The engine stops between nodes: one node that takes
#: longer still blocks the loop, so a part given gradients of ``BIG`` elements or more
#: (whose ops are likely to be long: the backward of a 4096 x 4096 matmul takes seconds
#: on one core) goes to the pool at once. Parts of small graphs never leave the loop.
SLICE = 0.05
BIG = 1 << 23


def _step(st: DistState, ps: PassState, retain: bool, size: int = 0) -> _Outgoing | None:
    """Run this part of the pass with what it got (``size``: elements of the gradients
    it just got). Returns the messages to send now, or None when the part went on in a
    thread (``_resume`` then sends them, with the credit held meanwhile)."""
    out = ps.run(perf_counter() + SLICE) if size < BIG else ps.collect()
    if ps.task.has_ready:
        fut = st.worker.offload(ps.task.run)
        _merge(ps.held, out)
        ps.busy = True
        ps.ctx.offloaded += 1
        st.offloaded_parts += 1
        fut.add_done_callback(functools.partial(_resume, st, ps, retain))
        return None
    if ps.task.finished:
        ps.finish(st, retain)
    return out


def _merge(into: _Outgoing, out: _Outgoing) -> None:
    for dest, items in out.items():
        into.setdefault(dest, []).extend(items)


def _resume(st: DistState, ps: PassState, retain: bool, fut: asyncio.Future[Any]) -> None:
    """The part's run in a thread ended: go on with it on the loop (the messages that
    came meanwhile, then what is ready), or report its failure."""
    ctx = ps.ctx
    ctx.offloaded -= 1
    st.offloaded_parts -= 1
    ps.busy = False
    if not ctx.offloaded and ctx.held_shares:
        shares, ctx.held_shares = ctx.held_shares, []
        for pass_id, origin, credit, via in shares:
            _cleaned_share(st, ctx.id, pass_id, origin, credit, via)
    exc = fut.exception() if not fut.cancelled() else WorkerLost("the worker is shutting down")
    if ctx.active_pass is not ps:
        return  # dropped meanwhile (aborted, a peer lost, released): nothing to send
    if exc is not None:  # (any BaseException of the part's code: reported, not raised)
        ctx.drop_pass(ps.pass_id)
        _report(st, ctx.id, ps.origin, ps.pass_id, exc)
        return
    _merge(ps.held, ps.collect())
    checked = False
    try:
        backlog, ps.backlog = ps.backlog, []
        size = 0
        for items, num, exp in backlog:
            ps.credit = add_credit(ps.credit, (num, exp))
            size += ps.deliver(items)
        checked = True
        out = _step(st, ps, retain, size)
        if out is None:  # (went on in a thread again: sent with what it makes then)
            return
        held, ps.held = ps.held, {}
        _merge(held, out)
        # (in here: a send that fails, its credit split too far, fails the pass, where
        # an error out of a message handler was only logged and the pass waited)
        _forward(st, ps, retain, held)
    except BaseException as err:  # (the part's code, hooks, may raise any: reported)
        ctx.drop_pass(ps.pass_id)
        _report(st, ctx.id, ps.origin, ps.pass_id, err, refused=not checked)


@on_cast(T_DELIVER)
def _deliver(
    worker: Any,
    ctx_id: int,
    origin: str,
    pass_id: int,
    retain: bool,
    items: list[Any],
    num: int,
    exp: int,
    sender: str,
    relay: list[Any] | None,
    exempt: list[int],
) -> None:
    """Message handler: gradients for some of this worker's send nodes (maybe none:
    then it only starts this worker's part of the pass), and from the origin, the
    relays of this worker's recv nodes (see _plan_relays). Runs what they made ready
    and sends the resulting messages on with this message's credit. ``exempt``: the
    tokens of the calls the pass was started inside (see PassState). A failure here is
    reported to the pass's origin (there is no reply)."""
    _check_ids(ctx_id, pass_id)
    if type(origin) is not str or type(sender) is not str or type(retain) is not bool:
        raise ProtocolError(
            f"malformed gradient message: origin {short_repr(origin)}, sender "
            f"{short_repr(sender)}, retain_graph {short_repr(retain)}"
        )
    st = state_of(worker)
    ctx = st.contexts.get(ctx_id)
    checked = False  # past the protocol's checks of the message: the graph runs
    try:
        if ctx is None:
            if not st.released_here(ctx_id):
                # A gradient message goes only to a worker that holds an end of a pair
                # of the sender's (or is its relay's target): one that joined the
                # context. Not knowing it, never released here: this process is not the
                # one the sender exchanged tensors with. That one was lost, and this one
                # joined under its name, the sender's view not showing it yet (its
                # membership update late: check_peers saw the old id). A ContextError
                # ("unknown or released") read as a misused context id. (Or a release
                # here that RELEASED_MEMORY contexts pushed out: a message that late
                # belongs to a pass long over, its report dropped at the origin.)
                raise WorkerLost(
                    f"{replaced_with_part(st.worker.name, ctx_id)} (the backward pass "
                    f"reached the new process, from worker {sender!r})",
                    peer=st.worker.name,
                )
            why = st.released_why(ctx_id)
            if why:
                # Reclaimed here on the loss of its initiator (a connection of it reset,
                # say, while it lived on), with no pass of it running then (that one is
                # failed so by forget): the pass fails with that loss, to be retried in
                # a new context, as a call in it would say. "Unknown or released" alone
                # read as a misused context id.
                raise WorkerLost(
                    f"distributed autograd context {ctx_id:#x} was released on worker "
                    f"{st.worker.name!r}{why}"
                )
            raise ContextError(
                f"distributed autograd context {ctx_id:#x} is unknown or released on "
                f"worker {st.worker.name!r}"
            )
        if ctx.is_aborted(pass_id):
            raise ContextError(
                f"backward pass {pass_id:#x} of context {ctx_id:#x} was aborted on worker "
                f"{st.worker.name!r} (it failed or was cancelled); late message dropped"
            )
        if pass_id == ctx.failed:
            return  # (its part here was dropped, the pass reported failed)
        num = _check_credit(num, exp)
        if relay is not None and (sender != origin or not _relay_ok(relay)):
            raise ProtocolError(f"malformed relay {short_repr(relay)} from {sender!r}")
        ps = ctx.active_pass
        early: list[tuple[Any, ...]] | None = None
        if ps is None or ps.pass_id != pass_id:
            if ctx.pass_done(pass_id):
                if items:
                    raise ProtocolError(
                        f"gradient for pass {pass_id:#x} of context {ctx_id:#x} arrived "
                        "after that pass finished here"
                    )
                # A start message for a part already done.
                _return_credit(st, ctx_id, origin, pass_id, (num, exp), sender)
                return
            if ps is not None:
                raise ContextError(
                    f"another backward pass is running in context {ctx_id:#x}; "
                    "concurrent backward calls in one context are not supported"
                )
            _check_not_offloaded(ctx, st.worker.name)
            if ctx.via[0] != pass_id:  # (its first message of the pass taken here)
                ctx.via = (pass_id, sender)
            if sender != origin and any(r.src == origin for r in ctx.recvs):
                # The origin's message (it sends one to every holder of its tensors)
                # may relay our recv nodes from it elsewhere: none may fire before.
                ctx.early.setdefault(pass_id, []).append((items, num, exp))
                return
            if not int_list(exempt):
                raise ProtocolError(f"malformed call chain {short_repr(exempt)} from {sender!r}")
            ps = ctx.active_pass = PassState(st.worker, ctx, pass_id, origin, (), retain, exempt)
            early = ctx.early.pop(pass_id, None) if ctx.early else None
        if relay:
            for i in range(0, len(relay), 3):
                ps.redirect[(origin, relay[i])] = (relay[i + 1], relay[i + 2])
        if ps.busy:  # (its part runs in a thread: the message waits for it, see _resume)
            ps.backlog.append((items, num, exp))
            return
        # this message, then any of the pass that came before the origin's
        size = 0
        for m_items, m_num, m_exp in ((items, num, exp), *(early or ())):
            ps.credit = add_credit(ps.credit, (m_num, m_exp))
            size += ps.deliver(m_items)
        checked = True
        out = _step(st, ps, retain, size)
        if out is not None:
            _forward(st, ps, retain, out)  # (in here: see _resume)
    except BaseException as exc:  # (the part's code, hooks, may raise any: reported)
        if ctx is not None:
            ctx.drop_pass(pass_id)
        _report(st, ctx_id, origin, pass_id, exc, refused=not checked, via=sender)


def _check_not_offloaded(ctx: DistContext, me: str) -> None:
    """ContextError while the part of a dropped pass still runs in a thread here (it
    runs nodes of this graph: a new pass would run them at the same time)."""
    if ctx.offloaded:
        raise ContextError(
            f"context {ctx.id:#x}: the part of an aborted backward pass still runs on "
            f"worker {me!r} (it went on in a thread); retry once it ended"
        )


def _check_ids(ctx_id: Any, pass_id: Any) -> None:
    """ProtocolError (the cast's connection is closed) unless both ids are ints: without
    them a message cannot even be reported to the pass it belongs to."""
    if type(ctx_id) is not int or type(pass_id) is not int:
        raise ProtocolError(
            f"malformed backward message: context id {short_repr(ctx_id)}, pass id "
            f"{short_repr(pass_id)}"
        )


def _relay_ok(relay: Any) -> bool:
    return (
        isinstance(relay, list)
        and len(relay) % 3 == 0
        and all(
            type(relay[i]) is int and type(relay[i + 1]) is str and type(relay[i + 2]) is int
            for i in range(0, len(relay), 3)
        )
    )


@on_cast(T_CREDIT)
def _credit(worker: Any, ctx_id: int, pass_id: int, num: int, exp: int) -> None:
    """Handler on the initiator: credit of a finished branch of the pass. A malformed
    one fails the pass (its credit could never add up: backward would hang)."""
    _check_ids(ctx_id, pass_id)
    _credit_to(state_of(worker).runs.get(pass_id), num, exp)


def _credit_to(run: InitiatorRun | None, num: Any, exp: Any) -> None:
    """Add the credit ``num / 2**exp`` a message brought to ``run`` (None: nobody waits
    for it any more); a malformed one fails the run."""
    if run is None:
        return
    try:
        num = _check_credit(num, exp)
    except ProtocolError as exc:
        run.fail(exc)
        return
    run.add_credit((num, exp))


def _fail_run(st: DistState, pass_id: int, exc: BaseException) -> None:
    run = st.runs.get(pass_id)
    if run is not None:
        run.fail(exc)


@on_cast(T_FAIL)
def _fail(worker: Any, ctx_id: int, pass_id: int, record: list[Any]) -> None:
    """Handler on the initiator: the pass failed somewhere (a malformed report still
    fails it, with the ProtocolError that names what was wrong)."""
    _check_ids(ctx_id, pass_id)
    try:
        exc = _failure_from(record)
    except ProtocolError as bad:
        exc = bad
    _fail_run(state_of(worker), pass_id, exc)


@on_cast(T_ABORT)
def _abort_cast(worker: Any, ctx_id: int, pass_id: int) -> None:
    """Handler: the abort of a pass, one-way (the flood of a worker that learnt of it
    from a call, see abort_known, or a clean-up's to a peer taken for lost)."""
    _check_ids(ctx_id, pass_id)
    st = state_of(worker)
    ctx = st.contexts.get(ctx_id)
    if ctx is not None:
        _abort_and_flood(st.worker, ctx, pass_id)


def _abort_and_flood(worker: Any, ctx: DistContext, pass_id: int) -> bool:
    """Drop pass ``pass_id`` here, tell the peers to drop the ends of the pairs its part
    here freed, and send its abort on to the peers, all one-way (see _abort_here,
    _flood_abort), unless it was aborted here already; whether it was news here."""
    if ctx.is_aborted(pass_id):
        return False
    freed = _abort_here(worker, ctx, pass_id)
    if freed:
        ctx.unpaired[pass_id] = freed  # (sent again if its acknowledged clean-up comes)
        for peer, (recv_ids, send_ids) in freed.items():
            worker.cast(peer, T_UNPAIR, (ctx.id, worker.name, send_ids, recv_ids), on_error=_ignore)
    _flood_abort(worker, ctx, pass_id)
    return True


def abort_known(worker: Any, ctx: DistContext, pass_id: int) -> None:
    """A call in ``ctx`` came from a worker that knows pass ``pass_id`` of it aborted
    (its metadata says so: see DistInterceptor): aborted here too if it was not, as its
    abort, which may come after the call, would (and passed on, ahead of this worker's
    later messages). So is a part running here of an older pass of the same origin: an
    origin starts a pass of a context only once its last one there is over, and a part
    of it still running means that it failed."""
    key = pass_id >> PASS_ID_BITS
    ps = ctx.active_pass
    if ps is not None and ps.pass_id >> PASS_ID_BITS == key and ps.pass_id < pass_id:
        _abort_and_flood(worker, ctx, ps.pass_id)
    if not _abort_and_flood(worker, ctx, pass_id):
        ctx.note_aborted(pass_id, here=False)  # (the calls carrying it: found at once)


def _abort_here(
    worker: Any, ctx: DistContext, pass_id: int
) -> dict[str, tuple[list[int], list[int]]]:
    """Drop pass ``pass_id`` on this worker: its running part, what it committed here,
    and (refused from now on) its late messages. Returns the pairs its part here freed,
    if it had finished without retain_graph, per peer other than this worker (see
    DistContext.free_graph): the peers must drop their ends of them. Their parts did
    not finish (or the pass would not have failed), and those ends would wait in every
    later pass of the context for gradients nobody holds any more."""
    ctx.aborted_passes.add(pass_id)
    ctx.note_aborted(pass_id)
    ctx.drop_pass(pass_id)
    freed = ctx.undo_pass(pass_id)
    # (pairs within this worker went whole when its part finished)
    return {p: ids for p, ids in freed.items() if p != worker.name} if freed else {}


@on_cast(T_UNPAIR)
def _unpair(worker: Any, ctx_id: int, peer: str, recv_ids: list[int], send_ids: list[int]) -> None:
    """Message handler: ``peer``'s part of an aborted pass had finished and freed its
    ends of some pairs of context ``ctx_id``; drop ours (see _abort_here). A pass
    running here that waits for a gradient at one of the dropped send nodes fails
    (it could not end otherwise, and has no credit to go on without it): retry it."""
    if (
        type(ctx_id) is not int
        or type(peer) is not str
        or not (int_list(recv_ids) and int_list(send_ids))
    ):
        raise ProtocolError(f"malformed unpair message from {short_repr(peer)}")
    st = state_of(worker)
    ctx = st.contexts.get(ctx_id)
    if ctx is None:
        return
    dropped = ctx.unpair(peer, recv_ids, send_ids)
    ps = ctx.active_pass
    # (also one the origin relays: the peer it told to send the gradient there on holds
    # nothing to send it from, and the worker waiting for it would wait for good)
    if ps is not None and any(ps.task.waits_for(node) or ps.task.skipped(node) for node in dropped):
        ctx.drop_pass(ps.pass_id)
        err = ContextError(
            f"context {ctx_id:#x}: this backward pass ran into the clean-up of an earlier "
            f"one that failed after worker {peer!r} had freed its part of the graph; "
            "run the forward again and retry"
        )
        _report(st, ctx_id, ps.origin, ps.pass_id, err, refused=True)


def _flood_abort(worker: Any, ctx: DistContext, pass_id: int) -> None:
    """Send the abort of ``pass_id`` one-way to every peer of the context that may
    hold a part of it (DistContext.pass_peers: those it exchanged tensors with, and
    those this worker sent messages of the pass to: a relay's target may be neither's
    peer here, and the abort must reach it ahead of this worker's messages of a later
    pass (the origin's own can come after them, a pass started when its clean-up's
    wait was cut short: the target then started the later pass, which settled the
    aborted one, and kept what that one had committed). The clean-up of a failed or
    cancelled pass (_clean_up) goes to the same peers."""
    for peer in ctx.pass_peers():
        if peer != worker.name:
            worker.cast(peer, T_ABORT, (ctx.id, pass_id), on_error=_ignore)


# The clean-up of a failed (or cancelled) pass: an acknowledged abort flood. A worker whose part of
# the pass had finished (without retain_graph) freed its ends of pairs whose other ends,
# on workers whose parts did not finish, must go too (see _abort_here); until they do,
# a new pass reaching those ends fails ("ran into the clean-up"). Sent one-way, the
# unpair of such ends (from w2 to w1) is unordered with everything that worker sends
# the peer on the peer's connection (w2's reply to w1's call of the next forward), so
# the origin's next pass could reach w1 first. So the origin of the pass floods
# the abort with a share of a credit of 1 (as the pass itself does, see the module's
# docstring): each worker, the first time the clean-up reaches it, aborts the pass,
# sends its unpairs and the flood on to its peers, and splits its share among those
# messages; a worker reached again, an unpair's receiver once the ends are gone, and a
# worker with nothing to send give their share back. All of it back: every worker the
# flood reaches has dropped the pass and the stale ends. Duplicates answer at once, so
# cycles cannot deadlock, and every worker's first clean-up carries credit the origin
# waits for. A worker that died (or hung) holding a share never gives it back: no share
# goes to one taken for lost or found silent (it gets the one-way messages), the origin
# does not wait if it knows of one in the context, its wait ends when it hears of a
# loss, and after clean_up_wait at most.

#: Seconds the origin of a failed or cancelled pass waits at most for its clean-up
#: (None: the heartbeat timeout, after which a silent worker is taken for lost anyway).
#: Past it, the failed ``backward`` raises all the same (the next one starts), and a
#: pass started before the clean-up reached a worker may fail there with "ran into the
#: clean-up".
CLEAN_UP_WAIT: float | None = None


def clean_up_wait() -> float:
    return _runtime.HEARTBEAT_TIMEOUT if CLEAN_UP_WAIT is None else CLEAN_UP_WAIT


def _start_clean_up(
    st: DistState, ctx: DistContext, pass_id: int, lost: str | None = None
) -> asyncio.Task[None] | None:
    """On the origin of pass ``pass_id``, which failed (``lost``: on the loss of that
    worker) or was cancelled: abort it here and on every worker of the context that may
    hold a part of it (see DistContext.pass_peers), their stale ends of freed pairs
    dropped (see the comment above). Returns the task that waits for all of it (None:
    not waited for), which the next backward started here in the context waits for
    too."""
    worker = st.worker
    freed = _abort_here(worker, ctx, pass_id)
    peers = ctx.pass_peers()
    if (
        worker.closing
        # (lost, or hung, on another worker's watch: a worker that had not found it
        # silent may pass it a share, and this one would not hear of it, not its peer)
        or (lost is not None and lost != worker.name and lost not in peers)
        or ctx.released
        # (over every peer of the context, not only those told: one called here without
        # tensors may have taken a part from another worker, which then waits for it)
        or any(st.unreachable(p) and not _gone(worker, p) for p in ctx.peers | peers)
    ):
        # (a worker lost, or hung, already: others may have passed it a share before
        # they knew, held for good; a loss heard from now on ends the wait. Not one no
        # longer a member: it left the cluster, or the head took it for dead, and a
        # share sent to it fails and comes back; counted, never heard from again, it
        # turned the wait off in its contexts for good. Nor when this worker shuts
        # down, nothing runs here afterwards, or the context was released here, its
        # initiator's lease say: no next pass to wait for.)
        _clean_up(st, ctx, pass_id, worker.name, (1, 0), freed)
        return None
    run = st.cleanups[pass_id] = InitiatorRun(ctx.id, pass_id)
    # (as a caller watches the peers its calls wait on: one that hangs is taken for lost
    # after the heartbeat timeout, which ends the wait, see DistState.end_cleanups)
    watched = [p for p in peers if p != worker.name]
    for peer in watched:
        worker.watch(peer)
    wait = _await_clean_up(st, ctx.id, pass_id, run, watched)
    try:
        _clean_up(st, ctx, pass_id, worker.name, (1, 0), freed)
    except BaseException:
        wait.close()
        _end_clean_up(st, pass_id, watched)
        raise
    ctx.cleaning = worker.spawn(wait, name=f"clean-up-{pass_id:#x}")
    return ctx.cleaning


def _gone(worker: Any, peer: str) -> bool:
    """Whether ``peer`` is no member of the cluster any more (in one with a registry)."""
    return bool(worker.members) and peer not in worker.members


async def _await_clean_up(
    st: DistState, ctx_id: int, pass_id: int, run: InitiatorRun, watched: list[str]
) -> None:
    try:
        await asyncio.wait_for(run.done, clean_up_wait())
    except (TimeoutError, ProtocolError, WorkerLost) as exc:
        # (the pass failed all the same: what is raised is its error)
        log.debug("clean-up of backward pass %#x of context %#x: %r", pass_id, ctx_id, exc)
    finally:
        _end_clean_up(st, pass_id, watched)


def _end_clean_up(st: DistState, pass_id: int, watched: list[str]) -> None:
    del st.cleanups[pass_id]
    for peer in watched:
        st.worker.unwatch(peer)


def _clean_up(
    st: DistState,
    ctx: DistContext,
    pass_id: int,
    origin: str,
    credit: Credit,
    freed: dict[str, tuple[list[int], list[int]]],
    via: str | None = None,
) -> None:
    """The clean-up of ``pass_id`` reached this worker for the first time: send the
    unpairs of ``freed`` and the clean-up on to the peers (but the origin), ``credit``
    split among them, or give it back if there is nothing to send (``via``: the sender
    of the clean-up, see _cleaned_share)."""
    worker = st.worker
    # (an older pass of the same origin is over, its clean-up too, as far as it waited:
    # the set keeps one per origin, also where no pass of it ever starts to prune it,
    # see settle. A late duplicate of a clean-up cut short floods once more: harmless.)
    if ctx.cleaned:
        key = pass_id >> PASS_ID_BITS
        ctx.cleaned = {p for p in ctx.cleaned if p >> PASS_ID_BITS != key or p > pass_id}
    ctx.cleaned.add(pass_id)
    out: list[tuple[str, str, tuple[Any, ...]]] = []
    args: tuple[Any, ...]
    for peer, (recv_ids, send_ids) in freed.items():
        if st.unreachable(peer):
            # (no share for a peer taken for lost here, or hung: it would hold it for
            # good, and the origin may not hear of it. Alive after all, it drops the
            # ends once it reads this.)
            args = (ctx.id, worker.name, send_ids, recv_ids)
            worker.cast(peer, T_UNPAIR, args, on_error=_ignore)
        else:
            args = (ctx.id, worker.name, send_ids, recv_ids, origin, pass_id)
            out.append((peer, T_CLEAN_UNPAIR, args))
    for peer in ctx.pass_peers():
        if peer == worker.name or peer == origin:
            continue
        if st.unreachable(peer):
            worker.cast(peer, T_ABORT, (ctx.id, pass_id), on_error=_ignore)
        else:
            out.append((peer, T_CLEAN, (ctx.id, pass_id, origin, worker.name)))
    # (a part of a dropped pass still running in a thread here: a share waits for its
    # end, so that the failed backward raises, and a cancelled one's next pass starts,
    # once a new pass would not be refused here for it, "still runs ... in a thread")
    hold = ctx.offloaded > 0
    if not out and not hold:
        _cleaned_share(st, ctx.id, pass_id, origin, credit, via)
        return
    shares = split_credit(credit, len(out) + hold)
    if hold:
        ctx.held_shares.append((pass_id, origin, shares.pop(), via))
    for (peer, topic, args), share in zip(out, shares, strict=True):
        # (one that cannot go: its receiver is gone, with the ends it held; its share
        # comes back at once)
        on_error = functools.partial(_unsent_share, st, ctx.id, pass_id, origin, share, via)
        worker.cast(peer, topic, (*args, *_credit_out(share)), on_error=on_error)


def _cleaned_share(
    st: DistState,
    ctx_id: int,
    pass_id: int,
    origin: str,
    credit: Credit,
    via: str | None = None,
) -> None:
    """Give a share of a clean-up's credit back to the origin of the aborted pass (by
    another way if it cannot go straight there, as the pass's credit: see _to_origin;
    ``via``: the sender of the message whose share it is)."""
    if origin == st.worker.name:
        run = st.cleanups.get(pass_id)
        if run is not None:
            run.add_credit(credit)
    else:
        # (one that cannot reach the origin, whose reports of the pass went through the
        # worker that brought it in, gives its share back that way too: dropped, the
        # failed backward waited out clean_up_wait every time. Not connected with the
        # origin, as a relayed report, on up that way without trying: behind a firewall
        # each try waits out a connect timeout, as long as clean_up_wait)
        args = (ctx_id, pass_id, *_credit_out(credit))
        if st.worker.connected_to(origin) or not _relay(st, origin, T_CLEANED, args, None, via):
            _to_origin(st, origin, T_CLEANED, args, via)


def _unsent_share(
    st: DistState,
    ctx_id: int,
    pass_id: int,
    origin: str,
    credit: Credit,
    via: str | None,
    exc: BaseException,
) -> None:
    _cleaned_share(st, ctx_id, pass_id, origin, credit, via)


def _check_clean(origin: Any, num: Any, exp: Any) -> Credit:
    if type(origin) is not str:
        raise ProtocolError(f"malformed clean-up message: origin {short_repr(origin)}")
    return _check_credit(num, exp), exp


@on_cast(T_CLEAN)
def _clean(
    worker: Any, ctx_id: int, pass_id: int, origin: str, sender: str, num: Any, exp: int
) -> None:
    """Handler: the acknowledged abort of pass ``pass_id`` (see _clean_up), from
    ``sender``: the way its share goes back if this worker cannot reach the origin and
    has no other (it does not hold the context, or took no part in the pass)."""
    _check_ids(ctx_id, pass_id)
    credit = _check_clean(origin, num, exp)
    if type(sender) is not str:
        raise ProtocolError(f"malformed clean-up message: sender {short_repr(sender)}")
    st = state_of(worker)
    ctx = st.contexts.get(ctx_id)
    if ctx is None or pass_id in ctx.cleaned:
        _cleaned_share(st, ctx_id, pass_id, origin, credit, sender)
    elif ctx.is_aborted(pass_id):
        # aborted here before, one-way (known aborted from a call's metadata): its
        # unpairs went unacknowledged, they go again (dropping an end is idempotent)
        _clean_up(st, ctx, pass_id, origin, credit, ctx.unpaired.pop(pass_id, {}), sender)
    else:
        freed = _abort_here(st.worker, ctx, pass_id)
        _clean_up(st, ctx, pass_id, origin, credit, freed, sender)


@on_cast(T_CLEAN_UNPAIR)
def _clean_unpair(
    worker: Any,
    ctx_id: int,
    peer: str,
    recv_ids: list[int],
    send_ids: list[int],
    origin: str,
    pass_id: int,
    num: Any,
    exp: int,
) -> None:
    """Handler: an unpair (see _unpair) of the clean-up of pass ``pass_id``,
    acknowledged: its share of credit goes back to the origin once the ends are gone."""
    _check_ids(ctx_id, pass_id)
    credit = _check_clean(origin, num, exp)
    _unpair(worker, ctx_id, peer, recv_ids, send_ids)
    _cleaned_share(state_of(worker), ctx_id, pass_id, origin, credit, peer)


@on_cast(T_CLEANED)
def _cleaned(worker: Any, ctx_id: int, pass_id: int, num: Any, exp: int) -> None:
    """Handler on the origin of an aborted pass: a share of its clean-up's credit back."""
    _check_ids(ctx_id, pass_id)
    # (none: its wait ended, timed out or cut by a loss)
    _credit_to(state_of(worker).cleanups.get(pass_id), num, exp)


def _check_roots(roots: Any, context_id: Any = None) -> list[tuple[Any, np.ndarray]]:
    if isinstance(roots, Tensor):
        roots = [roots]
    try:
        roots = list(roots)
    except TypeError:
        swapped = ""
        if isinstance(context_id, Tensor) or (
            isinstance(context_id, (list, tuple)) and any(isinstance(r, Tensor) for r in context_id)
        ):
            # (torch's is backward(context_id, roots) too, but loss first reads naturally)
            swapped = ": the arguments are swapped? backward(context_id, roots)"
        raise TypeError(
            f"roots must be a list of tensors, got {type(roots).__name__}{swapped}"
        ) from None
    if not roots:
        raise ValueError("backward needs at least one root tensor; roots is empty")
    out = []
    for i, r in enumerate(roots):
        if not isinstance(r, Tensor):
            raise TypeError(f"roots[{i}] is a {type(r).__name__}, not an actorgrad Tensor")
        if not r.requires_grad:
            raise ValueError(f"roots[{i}] does not require grad (no graph to differentiate)")
        if r.data.size != 1:
            raise ValueError(
                f"roots[{i}] has shape {tuple(r.shape)}; distributed backward roots must be "
                "one-element (scalar) tensors"
            )
        node = grad_node(r)
        out.append((node, seed_grad(r.data)))
    return out


async def backward(context_id: int, roots: Sequence[Tensor], retain_graph: bool = False) -> None:
    """Run the backward pass of the distributed graph from ``roots``.

    Returns once every gradient of the whole distributed graph has been accumulated on
    its worker (read them with ``get_gradients`` there). ``.grad`` is never written.

    Raises:
        ValueError: empty roots, a root that does not require grad or has more than
            one element.
        TypeError: roots not a list (or a single Tensor) of Tensors.
        ContextError: unknown or released context id (or not an integer).
        RemoteError: an error in another worker's part of the pass (names that
            worker); an error in this worker's own part is raised as it is.
        WorkerLost: a worker holding part of the graph died during the pass.
        RuntimeError: a second backward through a freed graph (see ``retain_graph``).
        ProtocolError: a peer's report broke the protocol (credit back twice, a
            malformed message); the pass is aborted everywhere.

    Example::

        x = ag.tensor([1.0, 2.0], requires_grad=True)
        async with ag.dist.context() as ctx:
            y = await ag.rpc("w1", operator.mul, (x, x))    # x * x, computed on w1
            await ag.dist.backward(ctx, [y.sum()])
            print(ag.dist.get_gradients(ctx)[x])            # [2. 4.]
    """
    checked = _check_roots(roots, context_id)
    # (it travels: the peers take a bool only; "no" would be true)
    retain_graph = check_retain_graph(retain_graph)
    worker = loop_worker()
    st = state_of(worker)
    ctx = st.get(context_id)
    context_id = ctx.id  # (an int: it travels, a numpy integer would not)
    if ctx.lock is None:
        ctx.lock = asyncio.Lock()
    async with ctx.lock:  # two backward calls in one context run one after the other
        cleaning = ctx.cleaning
        if cleaning is not None and not cleaning.done():
            # (the clean-up of a pass cancelled, or whose wait was, goes on: a pass now
            # could run into it; cancelling this wait leaves it running)
            await asyncio.wait((cleaning,))
        if ctx.released:  # (while this one waited for the lock, or the clean-up)
            raise ContextError(
                f"distributed autograd context {context_id:#x} was released on worker "
                f"{worker.name!r} while this backward waited for the one before it"
            )
        if ctx.active_pass is not None:
            raise ContextError(
                f"another backward pass is running in context {context_id:#x} "
                "(started from another worker)"
            )
        _check_not_offloaded(ctx, worker.name)
        if worker.closing:
            raise WorkerLost(f"worker {worker.name!r} has shut down: no backward pass here")
        pass_id = st.new_pass_id()
        # (the pass state first: if building it fails, no run is left registered)
        ps = ctx.active_pass = PassState(
            worker, ctx, pass_id, worker.name, checked, retain_graph, running_chain(worker)
        )
        run = st.runs[pass_id] = st.run_of[context_id] = InitiatorRun(context_id, pass_id)
        try:
            ps.credit = (1, 0)
            out = _step(st, ps, retain_graph)
            if out is not None:
                _forward(st, ps, retain_graph, out)
            await run.done
            if ctx.active_pass is ps:
                # (all the credit back while this worker's own part still runs: the
                # completion argument forbids it, unless a report came twice or from a
                # worker outside the pass. Failed, so that nothing of it stays.)
                raise ProtocolError(
                    f"distributed backward pass {pass_id:#x} of context {context_id:#x} "
                    f"got all its credit back before the part of worker {worker.name!r}, "
                    "which started it, finished (a report came twice, or from a worker "
                    "outside the pass)"
                )
        except BaseException as exc:
            # The pass failed or was cancelled: nothing of it stays, here or on the peers.
            # (The error's traceback holds this frame; the run's future holds the error.)
            run = None  # type: ignore[assignment]
            lost = exc.peer if isinstance(exc, WorkerLost) else None
            cleaning = _start_clean_up(st, ctx, pass_id, lost)
            # (cancelled, it ends now: the next backward here in the context waits for
            # the clean-up, see ctx.cleaning; so does it if this wait is cancelled)
            if cleaning is not None and isinstance(exc, Exception):
                # (not shield: the task cut at a shutdown must not turn the pass's
                # error into a CancelledError)
                await asyncio.wait((cleaning,))
            raise
        finally:
            del st.runs[pass_id]
            # (no local for it: this frame is in the error's traceback, see `run = None`)
            if getattr(st.run_of.get(context_id), "pass_id", None) == pass_id:
                del st.run_of[context_id]
            ps.unwatch()
