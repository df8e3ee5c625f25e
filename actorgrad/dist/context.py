"""Distributed autograd contexts and the send/recv recording of the forward pass.

A context is a record, on every worker it reached, of the tensors that crossed worker
boundaries while it was current:

* sending a tensor that requires grad creates a ``SendNode`` on the sender: a node
  whose only input is the sent tensor's grad node. It is a *source* of the backward
  pass there: its gradient arrives later, as a message.
* receiving it creates a ``RecvNode`` on the receiver: the ``grad_fn`` of the received
  tensor, a *boundary* node: the gradient that reaches it is sent, as a message, to the
  worker holding the matching send node.

The pair is keyed by (context id, sender worker, send id). Context ids carry the
creating worker's id in the high 16 bits, so they are unique across the cluster
without coordination (as in PyTorch).

The runtime knows nothing of this: ``DistInterceptor`` plugs into its call path
(``runtime.set_interceptor``) and the codec's tensor hooks.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import itertools
import logging
import operator
import threading
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from actorgrad.autograd import Node, add, grad_enabled, grad_node, is_unused
from actorgrad.errors import ContextError, ProtocolError, WorkerLost, short_repr
from actorgrad.runtime import worker as _runtime
from actorgrad.runtime.registry import LOCAL_ID_BITS, MAX_ID, issued_before
from actorgrad.tensor import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from actorgrad.dist.backward import PassState
    from actorgrad.runtime import Worker

__all__ = ["DistContext", "DistState", "RecvNode", "SendNode", "current_context", "state_of"]

# (worker, context id, call chain) of the context current in this task. The worker is
# kept so that an in-process worker running a call does not mistake its caller's
# context for its own. The chain: the tokens of the calls of this context this task
# runs inside (its own call's last), whatever worker made them (see calls_out).
_current: contextvars.ContextVar[tuple[Any, int, tuple[int, ...]] | None] = contextvars.ContextVar(
    "actorgrad_dist_context", default=None
)

#: Ids made on a worker start with its cluster id, above these many bits of a counter
#: of its own: unique across the cluster, and they name the worker that made them
#: (a context's initiator, a pass's origin). 48 bits each, the cluster id's 16 above
#: them (ids fit in msgpack's 64): a counter of 32 bits ran into the cluster id after
#: 2**32 passes of one worker (two weeks at 3,000 a second), its ids then lower than
#: the last ones (its later passes in a context were refused as late ones of aborted
#: passes) or another worker's; 48 bits last 3,000 years at that rate.
CONTEXT_ID_BITS = LOCAL_ID_BITS
PASS_ID_BITS = LOCAL_ID_BITS
CALL_TOKEN_BITS = LOCAL_ID_BITS
#: How many released context ids a worker remembers, to refuse calls that arrive in one
#: late (sent before their sender saw the release: a cancelled caller's callee calling
#: on, say). Beyond that, a worker still refuses the contexts it created itself.
RELEASED_MEMORY = 4096

#: How long a context whose initiator is no member of the cluster (as far as this worker
#: knows) is kept before the lease reclaims it (see DistState.join): news of a join
#: reaches every member within milliseconds; a head not heard from since, longer.
ORPHAN_CONTEXT_GRACE = 30.0

log = logging.getLogger("actorgrad.dist")


class SendNode(Node):
    """Where a tensor left this worker. Identity in backward: the gradient the peer
    sends back flows into the sent tensor's graph."""

    __slots__ = ("send_id", "dest", "shape")

    def __init__(self, send_id: int, dest: str, inp: Node | None, shape: tuple[int, ...]) -> None:
        super().__init__((inp,))
        self.send_id = send_id
        self.dest = dest
        self.shape = shape  # of the sent tensor: a gradient coming back must have it

    def apply(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        return (grad,)

    def __repr__(self) -> str:
        return f"SendNode(id={self.send_id}, to={self.dest!r})"


class RecvNode(Node):
    """Where a tensor arrived on this worker. A boundary: its gradient is sent back to
    the worker holding send node ``send_id``."""

    __slots__ = ("ctx_id", "src", "send_id", "freed")
    boundary = True

    def __init__(self, ctx_id: int, src: str, send_id: int) -> None:
        super().__init__()
        self.ctx_id = ctx_id
        self.src = src
        self.send_id = send_id
        # its send node is gone (a backward without retain_graph passed): a second
        # backward through it fails here, as the local engine's freed nodes do
        self.freed = False

    def apply(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        # (only a local backward applies it: the distributed one takes the gradient)
        raise RuntimeError(
            f"backward reached a tensor received from worker {self.src!r} in distributed "
            f"autograd context {self.ctx_id:#x}: its gradient must go back to that "
            "worker, which only `await ag.dist.backward(ctx, [loss])` does (not "
            "loss.backward(), a local pass)"
        )

    def __repr__(self) -> str:
        return f"RecvNode(ctx={self.ctx_id:#x}, from={self.src!r}, send={self.send_id})"


class _Commit(NamedTuple):
    """What a finished pass added to a context's leaf gradients on one worker."""

    pass_id: int
    contrib: dict[Tensor, np.ndarray]  # its gradient of each leaf
    before: dict[Tensor, np.ndarray | None]  # the context's gradient before it
    after: dict[Tensor, np.ndarray]  # the context's gradient it left
    # the pairs whose ends here it freed (without retain_graph): per peer, the peer's
    # send ids of our recv nodes and our send ids of its recv nodes
    freed: dict[str, tuple[list[int], list[int]]] | None


class DistContext:
    """One distributed autograd context, as seen by one worker."""

    __slots__ = (
        "id",
        "initiator",
        "sends",
        "recvs",
        "peers",
        "linked",
        "grads",
        "active_pass",
        "done_upto",
        "aborted_passes",
        "started_upto",
        "aborted_mark",
        "lock",
        "released",
        "sent_to",
        "watching",
        "last_pass",
        "via",
        "failed",
        "undo",
        "early",
        "unanswered",
        "calls_out",
        "offloaded",
        "held_shares",
        "peer_ids",
        "broken",
        "broken_by",
        "cleaned",
        "unpaired",
        "cleaning",
        "__weakref__",
    )

    def __init__(self, ctx_id: int, initiator: str) -> None:
        self.id = ctx_id
        self.initiator = initiator
        self.sends: dict[int, SendNode] = {}
        self.recvs: list[RecvNode] = []
        # Workers this context exchanged calls with: where a release must go.
        self.peers: set[str] = set()
        # Those of them it exchanged tensors with (a send or recv node for the peer was
        # ever made here, freed since or not): a pass goes along pairs (and relays, see
        # sent_to) only, so these are where the abort of a failed one must go (see
        # pass_peers).
        self.linked: set[str] = set()
        # Leaf gradients accumulated on this worker, over every finished pass.
        self.grads: dict[Tensor, np.ndarray] = {}
        self.active_pass: PassState | None = None
        # Per origin (the worker id in a pass id's high bits), the newest of its passes
        # whose part finished here. An origin runs one pass of a context at a time and
        # starts the next only once the last completed (every message of it handled,
        # see backward's credit) or failed, so any older pass of that origin is over
        # too: a mark per origin, not a set growing by one per pass (a context kept
        # for a whole training run).
        self.done_upto: dict[int, int] = {}
        # Passes aborted here that may still get late messages: those not older than
        # their origin's newest pass started here (``started_upto``). A message of an
        # older pass of that origin is a late one of an aborted pass too (a pass that
        # completed has no message left on its way), so a new pass prunes the set: it
        # keeps at most a pass or two per origin, not one per failed pass.
        self.aborted_passes: set[int] = set()
        self.started_upto: dict[int, int] = {}
        # The latest pass of the context aborted here (0: none): each call made here in
        # the context carries it (see DistInterceptor), and its callee aborts it too if
        # it has not yet. The abort of a cancelled backward goes out one-way: a call made
        # right after it, through another worker, could reach a worker of the pass first,
        # while the pass's part still runs there (which refuses the call).
        self.aborted_mark = 0
        self.lock: Any = None  # asyncio.Lock, made by the first backward called here
        self.released = False
        # Peers this worker sent backward messages to (their loss is reported to the
        # origin of the latest pass), and the (pass id, origin) of that pass.
        self.sent_to: set[str] = set()
        self.last_pass: tuple[int, str] | None = None
        # (pass id, worker): the worker that sent this one its first message of the
        # latest pass it took (a refused message of another pass leaves it). A report
        # for that pass's origin that cannot reach it (the origin's address does not
        # reach it from here) goes there to be passed on: that worker reached this one,
        # and got the pass from the origin, or from a worker that did (see
        # backward._unsent_to_origin).
        self.via: tuple[int, str] = (-1, "")
        # The latest pass whose running part here was dropped (it failed here, a peer
        # was lost: the pass cannot complete): a later message of it (sent before its
        # sender heard) is dropped. It started the part again, which sent its peers
        # gradients they had had, whose refusal could reach the origin first: backward
        # raised that, not the error. (One pass runs here at a time: one mark.)
        self.failed = -1
        # Of those, the ones this worker keeps an eye on for that pass as a worker
        # other than its origin (see DistState.check_watched): until the context's
        # next pass starts here, or it is released here. Not only while its part runs:
        # a part that finished passed its credit on to them, and the origin may not
        # know them (a second hop, a relay's target), so nobody else would notice one
        # that hung on it before the idle timeout, 60 s.
        self.watching: set[str] = set()
        # Per origin, what its last pass that finished here committed (see commit):
        # until that origin's next pass starts here, an abort of it (it failed on
        # another worker) takes it back, so a failed pass leaves no gradient behind.
        self.undo: dict[str, _Commit] = {}
        # Messages of a pass that came before the pass's origin reached this worker
        # (see backward._deliver): held until it does.
        self.early: dict[int, list[tuple[Any, ...]]] = {}
        # Calls made here in this context whose caller stopped waiting (timeout,
        # cancellation) and whose reply has not come: it may hold tensors of the graph,
        # sent from recorded send nodes whose recv nodes only its arrival creates here.
        # A pass meanwhile would wait for them: refused (see PassState).
        self.unanswered: dict[str, int] = {}
        # Tokens of the calls made here in this context that have not returned
        # (DistInterceptor): a message of one may be on its way, its send nodes
        # recorded on one side and its recv nodes not yet on the other; a pass started
        # here now would wait for their gradients for good: refused (see backward),
        # but for the calls the starting task runs inside (its call chain: they wait
        # for it, no message of theirs is on its way).
        self.calls_out: set[int] = set()
        # Parts of passes running in the worker's thread pool (backward._step).
        self.offloaded = 0
        # Shares of clean-ups (backward._clean_up) held while a part of a dropped pass
        # still runs in a thread here: given back when it ends (its origin then knows
        # a retry will not meet it), as (pass id, origin, credit, via).
        self.held_shares: list[tuple[int, str, tuple[int, int], str | None]] = []
        # The cluster id of each peer when this context first exchanged a call with
        # it: a process that joins under a dead peer's name has another one, and does
        # not hold the dead one's part (see check_peer).
        self.peer_ids: dict[str, int] = {}
        # Why no backward pass can complete in this context any more (None: it can): a
        # reply to a call made here in it may hold tensors that have send nodes on the
        # callee and no recv nodes here (it could not be decoded, or its connection
        # closed first: see _Hooks.unreadable and lost). A pass reaching the callee's
        # part would wait for good for their gradients, and any such pass reaches this
        # worker too (the callee starts the holders of its sends' recv nodes, or this
        # worker is the origin): it fails here instead.
        self.broken: str | None = None
        # The callee of that reply and its cluster id (see still_broken).
        self.broken_by: tuple[str, int | None] = ("", None)
        # Failed passes whose acknowledged clean-up (backward._clean_up) went on from
        # here: a second one's credit goes straight back to its origin.
        self.cleaned: set[int] = set()
        # Per pass aborted here without acknowledgement (cancelled, or known aborted
        # from a call's metadata), the pairs its part here had freed, whose unpair
        # messages went out unacknowledged: sent again, acknowledged, if the pass's
        # clean-up comes (it failed, and its origin waits for every unpair).
        self.unpaired: dict[int, dict[str, tuple[list[int], list[int]]]] = {}
        # The wait for the clean-up of the last pass started here that failed or was
        # cancelled (backward._start_clean_up): the next one started here waits for it.
        self.cleaning: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"DistContext(id={self.id:#x}, initiator={self.initiator!r}, "
            f"sends={len(self.sends)}, recvs={len(self.recvs)}, peers={sorted(self.peers)}, "
            f"grads={len(self.grads)}, active_pass={self.active_pass is not None}, "
            f"calls_out={len(self.calls_out)}, offloaded={self.offloaded}, "
            f"cleaning={self.cleaning is not None and not self.cleaning.done()}, "
            f"released={self.released})"
        )

    def pass_done(self, pass_id: int) -> bool:
        """Whether pass ``pass_id`` (or a later one of its origin) finished here."""
        return pass_id <= self.done_upto.get(pass_id >> PASS_ID_BITS, 0)

    def drop_pass(self, pass_id: int | None = None) -> None:
        """Forget the pass running here (only if it is ``pass_id``, when given): its
        pending gradients go with its task. (The origin's abort flood then marks the
        pass aborted, so late messages for it are refused.)"""
        ps = self.active_pass
        if ps is not None and (pass_id is None or ps.pass_id == pass_id):
            self.active_pass = None
            self.failed = ps.pass_id
            ps.unwatch()
        if self.early:
            if pass_id is None:
                self.early.clear()
            else:
                self.early.pop(pass_id, None)

    def commit(
        self,
        pass_id: int,
        origin: str,
        contrib: dict[Tensor, np.ndarray],
        freed: dict[str, tuple[list[int], list[int]]] | None = None,
    ) -> None:
        """Add the leaf gradients of pass ``pass_id`` (started by ``origin``), whose part
        finished here, and keep what an abort of it needs to take them back (and the
        pairs whose ends here it ``freed``: see free_graph, backward._unpair)."""
        grads = self.grads
        before: dict[Tensor, np.ndarray | None] = {}
        after: dict[Tensor, np.ndarray] = {}
        for t, g in contrib.items():
            prev = before[t] = grads.get(t)
            # a new array (never in place): the one before stays intact for an undo;
            # (an unused leaf's zeros add nothing, and keep it unused if it was)
            after[t] = grads[t] = g if prev is None else prev if is_unused(g) else add(prev, g)
        if contrib or freed:  # (the origin's older record went when this pass started)
            self.undo[origin] = _Commit(pass_id, contrib, before, after, freed)

    def settle(self, origin: str, pass_id: int) -> None:
        """Pass ``pass_id`` of ``origin`` starts here: its previous ones can no longer be
        aborted (their abort would have come first: the abort of a pass reaches every
        worker before any message of a later pass of the same origin)."""
        if self.undo:
            self.undo.pop(origin, None)
        key = pass_id >> PASS_ID_BITS
        self.started_upto[key] = pass_id
        if self.aborted_passes:
            self.aborted_passes = {
                p for p in self.aborted_passes if p >> PASS_ID_BITS != key or p >= pass_id
            }
        # (an older pass of this origin is over, its clean-up too: see aborted_passes)
        if self.cleaned:
            self.cleaned = {p for p in self.cleaned if p >> PASS_ID_BITS != key or p >= pass_id}
        if self.unpaired:
            self.unpaired = {
                p: f for p, f in self.unpaired.items() if p >> PASS_ID_BITS != key or p >= pass_id
            }

    def pass_peers(self) -> set[str]:
        """The peers that may hold a part of a pass this worker took part in: those
        it exchanged tensors with, and those it sent messages of its latest pass to (a
        relay's target may be neither's peer here). A peer the context only made
        calls without tensors with holds no part of any pass: told of an aborted one,
        it only gave the clean-up's share back, every time a pass failed."""
        return self.linked | self.sent_to if self.sent_to else self.linked

    def note_aborted(self, pass_id: int, here: bool = True) -> None:
        """Keep pass ``pass_id`` as the mark a call made here carries (see
        aborted_mark): it was aborted ``here`` (the latest, unless an older pass of the
        origin of the mark), or is known aborted (kept only over no mark or an older
        pass of the same origin, so that the calls carrying it find it here at once)."""
        mark = self.aborted_mark
        if pass_id >> PASS_ID_BITS == mark >> PASS_ID_BITS:
            if pass_id > mark:
                self.aborted_mark = pass_id
        elif here or not mark:
            self.aborted_mark = pass_id

    def is_aborted(self, pass_id: int) -> bool:
        """Whether pass ``pass_id`` was aborted here (or is older than its origin's
        newest pass started here: then it ended, and any message of it is a late one
        of an aborted pass)."""
        return pass_id in self.aborted_passes or pass_id < self.started_upto.get(
            pass_id >> PASS_ID_BITS, 0
        )

    def undo_pass(self, pass_id: int) -> dict[str, tuple[list[int], list[int]]] | None:
        """Take back the leaf gradients that pass ``pass_id`` committed here (it failed
        elsewhere after its part here finished). Exact when no other pass committed to
        a leaf since (the array before it is put back); otherwise its contribution is
        subtracted, keeping what the other pass added (a pass of another origin can
        overtake the abort). Returns the pairs whose ends here its part freed (their
        other ends, on peers whose parts did not finish, must go too)."""
        origin = next((o for o, c in self.undo.items() if c.pass_id == pass_id), None)
        if origin is None:
            return None
        commit = self.undo.pop(origin)
        grads = self.grads
        for t, g in commit.contrib.items():
            now = grads.get(t)
            if now is commit.after[t]:
                before = commit.before[t]
                if before is None:
                    del grads[t]
                else:
                    grads[t] = before
            elif now is not None:
                grads[t] = np.asarray(now - g)  # (a 0-d one stays an array)
        return commit.freed

    def free_graph(self) -> dict[str, tuple[list[int], list[int]]]:
        """Forget the send/recv nodes (after a backward that did not retain the graph).
        Returns the pairs freed, per peer: (its send ids of our recv nodes, our send ids
        of its recv nodes)."""
        pairs: dict[str, tuple[list[int], list[int]]] = {}
        for send in self.sends.values():
            pairs.setdefault(send.dest, ([], []))[1].append(send.send_id)
        for r in self.recvs:
            r.freed = True
            pairs.setdefault(r.src, ([], []))[0].append(r.send_id)
        self.sends.clear()
        self.recvs.clear()
        return pairs

    def unpair(self, peer: str, recv_ids: list[int], send_ids: list[int]) -> list[SendNode]:
        """Drop our ends of pairs whose ends on ``peer`` it freed: the recv nodes of its
        send ids ``recv_ids``, our send nodes ``send_ids`` (to it). Returns the send
        nodes dropped."""
        dropped = []
        for sid in send_ids:
            node = self.sends.get(sid)
            if node is not None and node.dest == peer:
                dropped.append(self.sends.pop(sid))
        if recv_ids:
            gone = set(recv_ids)
            keep = []
            for r in self.recvs:
                if r.src == peer and r.send_id in gone:
                    r.freed = True
                else:
                    keep.append(r)
            self.recvs[:] = keep
        return dropped


def as_context_id(x: Any) -> int:
    """``x`` as a context id: an int, or any integer that converts exactly (a numpy
    integer, as indexing takes one); not a bool.

    Raises:
        ContextError: anything else (the API says ContextError for a bad id).
    """
    if type(x) is int:
        return x
    if not isinstance(x, bool):
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise ContextError(
        "a distributed autograd context id is the int that `async with "
        f"ag.dist.context() as ctx` gives, not {type(x).__name__} {short_repr(x)}"
    )


class DistState:
    """Per-worker state of distributed autograd (lives in ``worker.ext["dist"]``)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.contexts: dict[int, DistContext] = {}
        self._ids = itertools.count(1)
        self._send_ids = itertools.count(1)
        self._pass_ids = itertools.count(1)
        self._call_tokens = itertools.count(1)
        # tokens of the calls whose handlers run here (activate)
        self.running_calls: set[int] = set()
        self._lock = threading.Lock()  # sync user code may send tensors from a thread
        self.num_backward_passes = 0
        self.num_backward_messages = 0  # sent by this worker: gradients, starts, credits
        # Parts of passes running in the worker's thread pool (backward._step), also
        # those of contexts released since (their threads run on, see _resume): counted
        # over the contexts held, a worker whose thread still ran the nodes of a context
        # it had let go showed the 0 of an idle one.
        self.offloaded_parts = 0
        # (at most this many contexts left, future) of wait_empty
        self._empty_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.runs: dict[int, Any] = {}  # pass id -> InitiatorRun, for passes started here
        # pass id -> InitiatorRun of the clean-up of a pass started here that failed or
        # was cancelled (the credit of its acknowledged abort flood, see
        # backward._start_clean_up)
        self.cleanups: dict[int, Any] = {}
        # Peers check_watched found silent for the heartbeat timeout (hung: not taken
        # for lost, nothing closed), and when they were last heard from then: until
        # heard from again, a clean-up gives them no share of its credit (see unreachable).
        self._silent: dict[str, float | None] = {}
        # context id -> its pass started here (one at a time: the context's lock), so
        # that a context's run is found without a scan of all (quadratic with 8,000
        # contexts in one process)
        self.run_of: dict[int, Any] = {}
        # the timer of check_watched (None: not scheduled), and the contexts it looks at
        # (those that watched a peer since its last tick: not every live one)
        self._watch_timer: asyncio.TimerHandle | None = None
        self._watching: dict[int, DistContext] = {}
        # the last RELEASED_MEMORY context ids released here (see join)
        self._released: set[int] = set()
        self._released_order: collections.deque[int] = collections.deque()
        # (of those: the ones reclaimed because their initiator was lost, here or by the
        # worker whose release came, and how: the words a late call's refusal puts
        # after "when", see released_why)
        self._reclaimed: dict[int, str] = {}
        # Initiators lost here but members, asked for a sign of life (_ask_for_life)
        self._asking: set[str] = set()
        # Origins of passes whose reports could not go straight to them (a one-way
        # firewall drops the connection: each try waited out the connect timeout, 3 s
        # per report), and when: their reports go the other way for a while.
        self.no_way: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"DistState(worker={self.worker.name!r}, contexts={len(self.contexts)}, "
            f"backward_passes={self.num_backward_passes})"
        )

    def new_context_id(self) -> int:
        wid = int(self.worker.id)
        if not 0 <= wid < MAX_ID:  # pragma: no cover - the registry guarantees it
            raise ContextError(f"worker id {wid} does not fit in 16 bits")
        return (wid << CONTEXT_ID_BITS) | next(self._ids)

    def new_pass_id(self) -> int:
        return (int(self.worker.id) << PASS_ID_BITS) | next(self._pass_ids)

    def new_call_token(self) -> int:
        """A token for a call made here in a context, unique across the cluster."""
        return (int(self.worker.id) << CALL_TOKEN_BITS) | next(self._call_tokens)

    def get(self, ctx_id: int) -> DistContext:
        ctx = self.contexts.get(ctx_id) if type(ctx_id) is int else None
        if ctx is None:
            ctx_id = as_context_id(ctx_id)
            ctx = self.contexts.get(ctx_id)
        if ctx is None:
            raise ContextError(
                f"unknown or released distributed autograd context {ctx_id:#x} "
                f"on worker {self.worker.name!r}"
                f"{self.released_why(ctx_id) or self._left_here(ctx_id)}"
            )
        return ctx

    def check_not_left_here(self, ctx_id: int) -> None:
        """Raise get's ContextError when ``ctx_id`` is a context this worker opened and
        has released since (its block was left): a step of it would be refused by every
        owner, each naming itself (see DistributedOptimizer.step)."""
        if ctx_id not in self.contexts and self._left_here(ctx_id):
            self.get(ctx_id)

    def _left_here(self, ctx_id: int) -> str:
        """Words after get's "on worker 'w1'" for a context this worker opened and is
        no longer in: the only way out of it here is its ``async with`` block ending (an
        initiator's own contexts are not reclaimed), and "unknown or released" alone
        left a step or get_gradients written one indent too far out unexplained."""
        wid = int(self.worker.id)
        if wid == 0 or ctx_id >> CONTEXT_ID_BITS != wid:  # (0: not a member yet)
            return ""
        return (
            ": this worker opened it and released it when its `async with "
            "ag.dist.context()` block was left; backward, get_gradients and "
            "DistributedOptimizer.step of it belong inside that block"
        )

    def create(self, ctx_id: int) -> DistContext:
        """A new context initiated here (``new_context_id``)."""
        ctx = self.contexts[ctx_id] = DistContext(ctx_id, self.worker.name)
        return ctx

    def join(
        self, ctx_id: int, initiator: str, peer: str | None = None, peer_id: int | None = None
    ) -> DistContext:
        """The context a call made or received in ``ctx_id`` belongs to here, created
        when the first call of it reaches this worker (``peer``: the worker the call
        came from, ``peer_id`` the cluster id its hello gave).

        Raises:
            ContextError: this worker released the context already (a call sent before
                its sender saw the release: it would bring the context back here, and
                nothing would ever release it again), or created it itself and it is
                gone, or its initiator is gone (its lease ran out here before the call
                came: nothing would reclaim it again), or the id is not of the
                process that holds the initiator's name here, nor of one that joined
                under it since.
        """
        ctx = self.contexts.get(ctx_id)
        if ctx is None:
            worker = self.worker
            creator = ctx_id >> CONTEXT_ID_BITS  # (the worker id of its initiator)
            if ctx_id in self._released or creator == int(worker.id):
                raise ContextError(
                    f"distributed autograd context {ctx_id:#x} was released on worker "
                    f"{worker.name!r}{self.released_why(ctx_id)}; a call that arrives "
                    "in it late is refused"
                )
            member = worker.members.get(initiator)
            # A process that joined under the name after the one known here (ids are
            # issued in turn): this worker has not read the head's word of the old
            # one's leave and the new one's join yet (a link to the head slower than to
            # the new process, or its updates behind the in-flight cap). Taken in: the
            # lease goes by the process (see _on_peer_lost), so that leave, read later,
            # leaves it alone; it was refused, and a user's first backward after a
            # restart failed for a race of milliseconds. A loss of the name reported
            # here meanwhile is the old one's (one of a process that is not the member
            # known here is not reported: see Worker._on_lost).
            later = (
                member is not None and member[0] != creator and issued_before(member[0], creator)
            )
            if later and peer == initiator and peer_id is not None and peer_id != creator:
                # (the only check of such an id this worker can make before the news:
                # the process that sent it under the initiator's name is another one.
                # One that came through another worker is taken in, and the orphan check
                # below reclaims it if no such process joins: a forged id)
                raise ContextError(
                    f"distributed autograd context {ctx_id:#x} is of cluster id {creator}, "
                    f"but the process of worker {initiator!r} that sent it has cluster id "
                    f"{peer_id} (a forged id); the call is refused"
                )
            if not later and worker.is_lost(initiator):
                # (taken in, the context would stay here for good if the initiator is
                # dead: its lease ran already)
                if initiator in worker.members:
                    # Maybe alive: lost to this worker only, after its own stall, say
                    # (the initiator closed their connection). A loss, not a context
                    # gone: it was a ContextError, which tells a caller to run the step
                    # again in a new context, where this one may work on a retry.
                    self._ask_for_life(initiator)
                    raise WorkerLost(
                        f"distributed autograd context {ctx_id:#x}: worker "
                        f"{worker.name!r} lost contact with its initiator {initiator!r}; "
                        "a call in it is refused until that worker is heard from again "
                        "(it is asked now: retry)"
                    )
                raise ContextError(
                    f"distributed autograd context {ctx_id:#x}: its initiator "
                    f"{initiator!r} is gone (worker {worker.name!r} saw it leave); a call "
                    "that arrives in it late is refused"
                )
            if member is not None and member[0] != creator and not later:
                # (an earlier process of that name, replaced since, or a forged id)
                raise ContextError(
                    f"distributed autograd context {ctx_id:#x} was not made by the "
                    f"worker {initiator!r} of this cluster: the id is of cluster id "
                    f"{creator}, {initiator!r} has cluster id {member[0]} (an earlier "
                    "process of that name, or a forged id); the call is refused"
                )
            ctx = self.contexts[ctx_id] = DistContext(ctx_id, initiator)
            if (member is None and worker.members) or later:
                # Its initiator is no member here: one that joined just now (this
                # worker has not heard of it yet), or one that left before this worker
                # joined, whose context a call of a live peer brings here (no lease
                # would ever reclaim it: its leave was never seen here). So for a
                # process later than the member known: it may leave before its join is
                # read here (its leave then comes after it, and reclaims the context),
                # or be none (a forged id: no leave would ever come).
                self._check_orphan_later(ctx_id, initiator, time.monotonic())
        return ctx

    def _ask_for_life(self, initiator: str) -> None:
        """Call ``initiator``, lost here but a member, whose context a call brought here
        (see join): the call is news of it, which ends its loss here (the hello of the
        connection it opens when none is left; with one left, the echo of the probe
        the worker sent there at the loss comes first: see Worker._probe), so that the
        next call in its contexts is taken in. Else, one that reached this worker only
        through others since (their connection broke, a network fault or a malformed
        frame; it lives on) was never heard from again here, and every call in its
        contexts was refused for good. One question at a time per initiator."""
        if initiator in self._asking:
            return
        from actorgrad.dist.api import _gone_contexts

        self._asking.add(initiator)
        fut = self.worker.call_nowait(initiator, _gone_contexts, ([],))
        fut.add_done_callback(functools.partial(_asked, self._asking, initiator))

    def _check_orphan_later(self, ctx_id: int, initiator: str, taken: float) -> None:
        self.worker.loop.call_later(
            ORPHAN_CONTEXT_GRACE, self._check_orphan, ctx_id, initiator, taken
        )

    def _check_orphan(self, ctx_id: int, initiator: str, taken: float) -> None:
        """A context taken in (at ``taken``) when its initiator was no member: if that
        process still is none, and the head has been heard from since (a head that
        stalls sends no news of joins: the initiator may be a member by now), the lease
        reclaims the context as for a dead initiator."""
        worker = self.worker
        if ctx_id not in self.contexts or worker.registry_lost.is_set() or worker.closing:
            return  # (registry_lost: no news of members comes any more)
        member = worker.members.get(initiator)
        if member is not None and member[0] == ctx_id >> CONTEXT_ID_BITS:
            return  # (the process that made it: it joined meanwhile)
        head = worker.registry_conn
        if head is not None and head.last_recv <= taken:
            self._check_orphan_later(ctx_id, initiator, taken)
            return
        log.warning(
            "worker %s: context %#x's initiator %r (the process that made it) is no "
            "member of the cluster %g s or more after a call brought the context here: "
            "reclaiming it",
            worker.name,
            ctx_id,
            initiator,
            ORPHAN_CONTEXT_GRACE,
        )
        # (this context alone: another process may answer to that name now)
        cause = (
            f"the process that made it was no member of the cluster {ORPHAN_CONTEXT_GRACE:g} s "
            "after a call brought the context here"
        )
        _reclaim(self, ctx_id, initiator, cause=cause)

    def watch(self, ctx: DistContext, peer: str) -> None:
        """Keep an eye on ``peer`` for the latest pass of ``ctx`` (see ``watching``)."""
        ctx.watching.add(peer)
        self._watching[ctx.id] = ctx
        self.worker.expect_heartbeats(peer)
        if self._watch_timer is None:
            self._watch_timer = self.worker.loop.call_later(
                _runtime.HEARTBEAT_INTERVAL, self.check_watched, time.monotonic()
            )

    def check_watched(self, since: float) -> None:
        """Every heartbeat interval while some context watches a peer: a watched peer
        silent for the heartbeat timeout (hung, its connection open) is reported to the
        origin of the latest pass here, once, which fails that pass if it still runs
        (a pass that completed is left alone). Nothing closes, nobody is taken for
        lost: a worker busy for seconds after a pass, its loop blocked, loses no
        connection and no call. (A peer whose connection closed is reported by
        _on_peer_lost.)"""
        from actorgrad.dist.backward import _report

        self._watch_timer = None
        worker = self.worker
        if worker.closed:
            return
        now = time.monotonic()
        # (the runtime's timeout, read here each round: ACTORGRAD_HEARTBEAT_TIMEOUT sets it
        # for this process, and a pass fails on a hung peer after the same silence as a
        # call does; the interval is fixed, as the runtime's pings are)
        lagged = now - since > _runtime.HEARTBEAT_INTERVAL + 1.0  # (our own loop was blocked)
        heard_from: dict[str, float | None] = {}  # (once a round per peer, not per context)
        for ctx in list(self._watching.values()):
            if not ctx.watching or ctx.last_pass is None or ctx.released:
                del self._watching[ctx.id]  # (watches nobody now, or gone)
                continue
            for peer in list(ctx.watching):
                if peer in heard_from:
                    heard = heard_from[peer]
                else:
                    worker.expect_heartbeats(peer)  # (go on asking: an idle peer pings seldom)
                    heard = heard_from[peer] = worker.heard_from(peer)
                if lagged or heard is None or now - heard <= _runtime.HEARTBEAT_TIMEOUT:
                    continue
                ctx.watching.discard(peer)
                self._silent[peer] = heard
                pass_id, origin = ctx.last_pass
                _report(
                    self,
                    ctx.id,
                    origin,
                    pass_id,
                    # (who heard nothing: the origin may hear from the peer all along,
                    # the link between the two stalled; "hung" alone blamed the peer)
                    WorkerLost(
                        f"worker {peer!r} was lost during the backward pass (worker "
                        f"{worker.name!r} heard nothing from it for "
                        f"{_runtime.HEARTBEAT_TIMEOUT:g} s: it hung, or the network between "
                        "them is down)",
                        peer=peer,
                    ),
                )
        if self._watching:
            self._watch_timer = worker.loop.call_later(
                _runtime.HEARTBEAT_INTERVAL, self.check_watched, now
            )

    def record_send(self, ctx: DistContext, t: Tensor, dest: str) -> int:
        with self._lock:
            send_id = next(self._send_ids)
        ctx.sends[send_id] = SendNode(send_id, dest, grad_node(t), t.data.shape)
        ctx.linked.add(dest)
        return send_id

    def record_recv(self, ctx: DistContext, array: np.ndarray, src: str, send_id: int) -> Tensor:
        node = RecvNode(ctx.id, src, send_id)
        ctx.recvs.append(node)
        ctx.linked.add(src)
        t = Tensor(array, requires_grad=True)
        t.grad_fn = node
        return t

    def fail_runs(self, ctx_id: int, exc: BaseException) -> None:
        """Fail the backward passes started here in ``ctx_id`` that still wait."""
        run = self.run_of.get(ctx_id)
        if run is not None:
            run.fail(exc)

    def unreachable(self, peer: str) -> bool:
        """Whether ``peer`` is taken for lost here, or was found silent for the heartbeat
        timeout (see check_watched) and not heard from since."""
        if self.worker.is_lost(peer):
            return True
        if peer not in self._silent:
            return False
        if self.worker.heard_from(peer) == self._silent[peer]:
            return True
        del self._silent[peer]
        return False

    def end_cleanups(self, why: str) -> None:
        """Stop waiting for the clean-ups of passes started here that failed or were
        cancelled (a worker that held part of their credit may be gone: see
        backward._start_clean_up)."""
        for run in self.cleanups.values():
            run.fail(WorkerLost(f"{why} during the clean-up of a failed backward pass"))

    def released_here(self, ctx_id: int) -> bool:
        """Whether this worker released ``ctx_id`` lately (its release came, or its
        lease ran out: see forget)."""
        return ctx_id in self._released

    def reclaimed(self, ctx_id: int, why: str) -> None:
        """Note that ``ctx_id``, released here, was reclaimed on the loss of its
        initiator, ``why`` (words after "when": "it lost the context's initiator, worker
        'w1' (...)", see lost_initiator): a late call in it says so (see
        released_why)."""
        if ctx_id in self._released:
            self._reclaimed[ctx_id] = why

    def released_why(self, ctx_id: int) -> str:
        """Why ``ctx_id`` was released here, when it was not its initiator's release
        (then ""), as words to put after "released on worker 'w1'"."""
        why = self._reclaimed.get(ctx_id)
        return "" if why is None else f" when {why}: start a new context"

    def forget(self, ctx_id: int, why: str = "") -> DistContext | None:
        """Drop a context from this worker (released, or reclaimed by the lease). Its id
        is remembered (see join) also when this worker does not hold it (yet): a
        release can overtake the first call of the context to reach this worker (its
        sender hung meanwhile, say). ``why``: the release of a context reclaimed, how
        (words after "when", see api._release), which a backward running in it here
        fails with."""
        if ctx_id not in self._released:
            order = self._released_order
            if len(order) >= RELEASED_MEMORY:
                old = order.popleft()
                self._released.discard(old)
                self._reclaimed.pop(old, None)
            order.append(ctx_id)
            self._released.add(ctx_id)
        ctx = self.contexts.pop(ctx_id, None)
        if ctx is not None:
            ctx.released = True
            ctx.drop_pass()
            ctx.watching.clear()
            self._watching.pop(ctx_id, None)
            if ctx_id in self.run_of:  # a backward still waiting in it: fails now
                # (the error made only then: every release passes here)
                released = (
                    f"distributed autograd context {ctx_id:#x} was released on worker "
                    f"{self.worker.name!r} while its backward pass ran"
                )
                # (reclaimed by a worker that lost its initiator: the pass fails with that
                # loss, as on that worker (see _reclaim). A ContextError, the user's
                # own doing, said nothing of it)
                self.fail_runs(
                    ctx_id,
                    WorkerLost(f"{released}, when {why}: start a new context")
                    if why
                    else ContextError(released),
                )
        if self._empty_waiters:
            left = len(self.contexts)
            waiters, self._empty_waiters = self._empty_waiters, []
            for at_most, fut in waiters:
                if fut.done():  # (its wait timed out or was cancelled)
                    continue
                if left > at_most:
                    self._empty_waiters.append((at_most, fut))
                else:
                    fut.set_result(None)
        return ctx

    async def wait_empty(self, at_most: int = 0) -> None:
        """Return once this worker holds no context, or at most ``at_most`` (for tests
        and tools)."""
        if len(self.contexts) > at_most:
            fut = asyncio.get_running_loop().create_future()
            self._empty_waiters.append((at_most, fut))
            await fut

    def stats(self) -> dict[str, int]:
        # (a snapshot first, in one C call: debug_info may run in a pool thread, and
        # iterating the dict itself there raised "dictionary changed size during
        # iteration" whenever the loop took a context in or released one meanwhile)
        contexts = list(self.contexts.values())
        return {
            "num_contexts": len(contexts),
            "num_backward_passes": self.num_backward_passes,
            "num_backward_messages": self.num_backward_messages,
            "num_active_passes": sum(c.active_pass is not None for c in contexts),
            "num_send_nodes": sum(len(c.sends) for c in contexts),
            "num_recv_nodes": sum(len(c.recvs) for c in contexts),
            "num_offloaded_parts": self.offloaded_parts,
        }


def _asked(asking: set[str], initiator: str, fut: asyncio.Future[Any]) -> None:
    """The question of DistState._ask_for_life ended: the next refusal may ask again
    (a failure, the initiator out of reach, is only logged: refused, the calls say so)."""
    asking.discard(initiator)
    _log_failure("the question for a sign of life", initiator, fut)


def state_of(worker: Worker) -> DistState:
    """The distributed autograd state of ``worker``, created on first use."""
    st = worker.ext.get("dist")
    if st is None:
        st = worker.ext["dist"] = DistState(worker)
        worker.add_status_provider("dist", st.stats)
        worker.add_process_lost_callback(functools.partial(_on_peer_lost, st))
        worker.add_closing_callback(functools.partial(_on_closing, st))
    return st


def _on_closing(st: DistState) -> None:
    # This worker shuts down: no message of a pass comes or goes from now on, nor is
    # the loss of a peer reported, so a backward started here that still waits fails
    # now (it waited for good: the driver leaving local_cluster during a backward).
    for run in list(st.runs.values()):
        run.fail(WorkerLost(f"worker {st.worker.name!r} shut down during the backward pass"))
    st.end_cleanups(f"worker {st.worker.name!r} shut down")
    if st._watch_timer is not None:
        # (it would find the worker closed and stop, but held the worker and its state
        # until then: 41 closed workers were alive after 200 in-process clusters in a row)
        st._watch_timer.cancel()
        st._watch_timer = None


def lost_initiator(initiator: str, cause: str) -> str:
    """How a worker that reclaimed a context lost its ``initiator`` (``cause``: how the
    loss showed, see Worker.lost_cause; "": its heartbeat), as the words after the
    reclaimer ("it", "worker 'w2'") in a late call's refusal (see released_why)."""
    # (the cause, as it showed: a connection reset or a worker leaving was put as the
    # heartbeat's "a worker silent for 3 s ... is taken for lost")
    because = cause or (
        f"a worker silent for {_runtime.HEARTBEAT_TIMEOUT:g} s, its process stopped or "
        "its loop blocked, is taken for lost as a dead one is"
    )
    return f"lost the context's initiator, worker {initiator!r} ({because})"


def _reclaim(
    st: DistState, ctx_id: int, initiator: str, why: str | None = None, cause: str = ""
) -> None:
    """The lease of context ``ctx_id``, whose ``initiator`` is gone: released here and
    on the workers this one brought into it. ``why``: the initiator lives on, and closed
    its connection with this worker saying why (see Worker.dropped_by); ``cause``: how
    the initiator's loss showed, when not as the runtime reported it (Worker.lost_cause)."""
    from actorgrad.dist.api import _start_release

    # (a backward started here in it fails with the cause, not with the ContextError
    # of the release that follows)
    if why is None:
        lost = WorkerLost(
            f"worker {initiator!r}, the initiator of context {ctx_id:#x}, was lost "
            "during the backward pass (its context is reclaimed everywhere)"
        )
    else:
        lost = WorkerLost(
            f"worker {st.worker.name!r} was lost during the backward pass in context "
            f"{ctx_id:#x} (its initiator, worker {initiator!r}, closed its connection "
            f"with it: {why}); the context is released here"
        )
    st.fail_runs(ctx_id, lost)
    ctx = st.contexts.get(ctx_id)
    if ctx is not None:
        # The origin of its latest pass, if another worker: an initiator that lives on
        # (a connection of it broke, or it dropped this worker) waited for good for the
        # credit this worker's part held, or that of the workers the release below
        # reaches (a reset from a connection it gave up on, read here after the link
        # came back, ended its next pass so). A pass that is over ignores it.
        ps = ctx.active_pass
        told = (ps.pass_id, ps.origin) if ps is not None else ctx.last_pass
        if told is not None and told[1] != st.worker.name:
            from actorgrad.dist.backward import _report

            _report(
                st,
                ctx_id,
                told[1],
                told[0],
                WorkerLost(
                    f"worker {st.worker.name!r} was lost during the backward pass: it lost "
                    f"contact with worker {initiator!r}, the initiator of context "
                    f"{ctx_id:#x} ({why or cause or st.worker.lost_cause(initiator)}), and "
                    "released the context there"
                ),
            )
    if why:  # (named: the words also go to the workers below)
        cause = f"it dropped worker {st.worker.name!r}: {why}"
    lost_it = lost_initiator(initiator, cause or st.worker.lost_cause(initiator))
    # Passed on to the workers this one brought into the context: when only a
    # connection of the initiator closed here (it lives on), they do not see it go, and
    # its release, sent here, finds nothing left to forward to them. Never to the
    # initiator itself (named gone: nobody forwards it there): a live one keeps its
    # context until it leaves it (its calls and backward passes through the workers
    # that dropped it fail). It says why, as this worker does to a late call: a late
    # call on those workers said "released on worker 'w2'", no cause.
    acks = _start_release(st, ctx_id, gone=[initiator], why=f"worker {st.worker.name!r} {lost_it}")
    st.reclaimed(ctx_id, f"it {lost_it}")
    if acks is not None:
        st.worker.spawn(acks, name=f"reclaim-{ctx_id:#x}")


def _on_peer_lost(st: DistState, name: str, pid: int | None = None) -> None:
    # The lease: a context whose initiator died can never be released by it, so the
    # survivors reclaim it now. Passes that depended on the dead worker are dropped,
    # a pass this worker initiated fails at once with WorkerLost, and the origin of a
    # pass that sent the dead worker a message from here is told (backward messages
    # have no replies: this is how a loss further down reaches the origin).
    # ``pid``: the cluster id of the process lost (None: not known, taken as any).
    from actorgrad.dist.api import _ask_initiators
    from actorgrad.dist.backward import _report

    me = st.worker.name
    taken_for_lost = st.worker.is_lost(name)
    if taken_for_lost:
        # (taken for lost, it is unreachable until heard from again without this
        # record of a watch that found it silent; kept, the record stayed for good when
        # no pass asked about it again: one per hung worker that then died, where
        # workers come and go under new names)
        st._silent.pop(name, None)
    if taken_for_lost or name not in st.worker.members:
        # (a report for it is dropped now, not sent: the record that it had no way
        # from here stayed until a report to it was tried again, for good once it had
        # gone, one per such origin where workers come and go under new names)
        st.no_way.pop(name, None)
    # (the share of a clean-up's credit it held is gone with it, or with a worker it
    # passed it to: the origin does not know which, and stops waiting)
    st.end_cleanups(f"worker {name!r} was lost")
    # A peer that closed on us for our silence (this worker's process was stopped) lives
    # on: it is this worker that it lost.
    why = st.worker.dropped_by(name)
    ask: dict[str, list[int]] = {}  # initiator -> ids of its contexts the dead peer held
    for ctx_id, ctx in list(st.contexts.items()):
        # (sent_to: a peer this worker sent backward messages to without ever calling
        # it, on a relay the origin set up (w2 -> w1 of a pipeline the driver called
        # stage by stage): its loss was ignored here, and the origin waited out the
        # idle timeout, 60 s, for the credit it held)
        carried = name in ctx.peers or name in ctx.sent_to
        if pid is not None and _of_a_later_process(ctx, name, pid):
            # (a process that joined under the name after the lost one: its contexts,
            # or those it took part in, taken in here before this worker read the head's
            # word of the old one's leave. By name, that leave reclaimed them, and
            # the new process's first backward after its restart failed)
            continue
        if ctx.initiator == name:
            if why is None or carried:
                _reclaim(st, ctx_id, name, why)
            else:
                # (a live initiator's context this worker was brought into by another:
                # reclaimed, it was released on the workers around it too, a live
                # context of another task. Its release may have been missed while this
                # worker was stopped: the live initiator says whether it is gone)
                ask.setdefault(name, []).append(ctx_id)
            continue
        if not carried:
            continue
        if ctx.initiator != me:
            ask.setdefault(ctx.initiator, []).append(ctx_id)
        ps = ctx.active_pass
        if not _takes_part(ctx, name, ps):
            # (a peer the context only exchanged calls without tensors with here, a
            # status or metrics call: it holds no end of this worker's pairs, and no
            # credit this worker gave: a pass goes on without it, as one started after
            # its loss does. Its loss failed the backward running at that moment.)
            continue
        ctx.drop_pass()
        if why is None:
            # (with how its loss showed: a worker that shut down or left the cluster
            # reads so, as when the pass is refused because it left before the pass
            # reached it; which of the two a user sees is a matter of timing)
            cause = st.worker.lost_cause(name)
            lost = WorkerLost(
                f"worker {name!r} was lost during the backward pass"
                + (f": {cause}" if cause else ""),
                peer=name,
            )
        else:  # (its report names the worker that was stopped, as the peer's does)
            lost = WorkerLost(
                f"worker {me!r} was lost during the backward pass (worker {name!r} closed "
                f"its connection with it: {why})",
                peer=me,
            )
        st.fail_runs(ctx_id, lost)
        # The origin is told when this worker's part of a pass was dropped (with the
        # credit it held: the pass could never complete, and nobody else might tell),
        # or when the lost peer got messages of the latest pass from here (it held
        # their credit).
        told = (ps.pass_id, ps.origin) if ps is not None else None
        if told is None and name in ctx.sent_to:
            told = ctx.last_pass
        if told is not None and told[1] not in (name, me):
            _report(st, ctx_id, told[1], told[0], lost)
    if ask:
        # The release of these contexts may have been on its way through the dead peer
        # (it brought this worker into them): a worker hung past the heartbeat timeout
        # was taken for lost by the one that brought it in, whose forwarded release
        # could not get through; the initiator lives on, so no lease reclaims them, and
        # they stayed for good once it came back. Their initiators say which are gone.
        st.worker.spawn(_ask_initiators(st, name, ask), name=f"ask-initiators-{name}")


def _of_a_later_process(ctx: DistContext, name: str, pid: int) -> bool:
    """Whether worker ``name`` is, in ``ctx``, a process that joined under that name
    after the one of cluster id ``pid`` (ids are issued in turn: see issued_before): its
    initiator (the id is of its cluster id), or the peer it exchanged calls with. The
    earlier one took no part in it: a context holds one process of a name (a call to
    or from another one is refused, see check_peer)."""
    if ctx.initiator == name:
        return issued_before(pid, ctx.id >> CONTEXT_ID_BITS)
    known = ctx.peer_ids.get(name)
    return known is not None and issued_before(pid, known)


def _takes_part(ctx: DistContext, peer: str, ps: PassState | None) -> bool:
    """Whether ``peer`` takes part in this worker's passes of ``ctx``: it holds the
    other end of a send/recv pair of this worker's (gradients go between them), got
    messages of the latest pass from here (it holds credit of it), started the pass
    running here (its origin, where the part reports) or is a relay's target of it.
    (A worker it reached only through others is watched by them: see PassState.watch.)"""
    if peer in ctx.sent_to:
        return True
    if ps is not None and (
        ps.origin == peer or any(dest == peer for dest, _ in ps.redirect.values())
    ):
        return True
    return _holds_pair(ctx, peer)


def check_peer(ctx: DistContext, peer: str, peer_id: int | None) -> None:
    """WorkerLost if ``peer`` is not the process ``ctx`` exchanged calls with before
    (``peer_id``: the cluster id of the one a message to it reaches now): it died and
    another one joined under its name. That one knows nothing of the dead one's part of
    the graph: a call reaching it went on in the context, and the next backward pass
    waited for the dead one's gradients for good. (A peer only taken for lost, a
    connection of it broken, keeps its id: it goes on in the context.)"""
    if peer_id is None:
        return  # (not a member: a call to it fails; or a cluster without a registry)
    known = ctx.peer_ids.get(peer)
    if known is None:
        ctx.peer_ids[peer] = peer_id
    elif known != peer_id:
        if not _holds_pair(ctx, peer):
            # (it only exchanged calls without tensors with this worker, a status call,
            # or a backward pass without retain_graph freed the pairs of the tensors it
            # did exchange: which one is not kept. "Held part of the graph" sent its
            # author looking for a tensor it never sent, and "(no tensors)" for a call
            # that never was. Still refused: the new one does not know the context, nor
            # the workers the lost one brought into it, whose release went through it)
            raise WorkerLost(
                f"worker {peer!r} was lost after it exchanged calls of distributed "
                f"autograd context {ctx.id:#x} with this worker (it holds no part of the "
                "graph here: it exchanged no tensors with this worker, or a backward pass "
                "freed their part), and another process joined under its name; that one "
                "does not know the context, so the context cannot use it: start a new "
                "context"
            )
        raise WorkerLost(replaced_with_part(peer, ctx.id))


def replaced_with_part(peer: str, ctx_id: int) -> str:
    """Why context ``ctx_id`` cannot use worker ``peer``: the process that held part of
    its graph was lost, and the one now under its name does not hold that part."""
    return (
        f"worker {peer!r} was lost while it held part of the graph of distributed "
        f"autograd context {ctx_id:#x}, and another process joined under its name; "
        "it does not hold that part, so the context cannot use it: start a new context"
    )


def check_peers(worker: Worker, ctx: DistContext) -> None:
    """:func:`check_peer` for every peer of ``ctx`` that holds an end of a send/recv
    pair of this worker's (a backward pass needs them all; a peer the context only
    exchanged calls without tensors with is no part of it, and its replacement, a new
    process under its name, was refused as one)."""
    for peer, known in ctx.peer_ids.items():
        now = worker.peer_id(peer)
        if now is not None and now != known and _holds_pair(ctx, peer):
            check_peer(ctx, peer, now)


def _holds_pair(ctx: DistContext, peer: str) -> bool:
    """Whether ``peer`` holds the other end of a send/recv pair of ``ctx`` here."""
    return any(s.dest == peer for s in ctx.sends.values()) or any(r.src == peer for r in ctx.recvs)


def current_context(worker: Worker) -> DistContext | None:
    """The context current in this task for ``worker`` (None outside any)."""
    cur = _current.get()
    if cur is None or cur[0] is not worker:
        return None
    return state_of(worker).contexts.get(cur[1])


def running_chain(worker: Worker) -> tuple[int, ...]:
    """The tokens of the calls of its context the current task runs inside: its chain,
    while the handler of its innermost call still runs here. (A task spawned by a
    handler inherits its chain but not its waiting: once the handler returned, its
    call's reply, maybe carrying tensors, is on its way.)"""
    cur = _current.get()
    if cur is None or not cur[2] or cur[2][-1] not in state_of(worker).running_calls:
        return ()
    return cur[2]


def start_calls(
    worker: Worker, peers: Iterable[str], fn: Any, args: tuple[Any, ...]
) -> list[tuple[str, asyncio.Future[Any]]]:
    """Send protocol handler ``fn(*args)`` to every peer but this worker, now (requests
    without a task each, and outside any context: ``call_nowait`` carries no context
    metadata). Each outcome is read by a callback (logged if it failed), so nobody has
    to wait for them."""
    started = []
    for p in peers:
        if p == worker.name:
            continue
        fut = worker.call_nowait(p, fn, args)
        fut.add_done_callback(functools.partial(_log_failure, fn, p))
        started.append((p, fut))
    return started


async def finish_calls(worker: Worker, started: list[tuple[str, asyncio.Future[Any]]]) -> set[str]:
    """Wait for calls of ``start_calls`` — except those to peers already reported lost
    (alive after all, they handle it once reconnected, but a hung one would hold us for
    the connection deadlines). A peer that fails or is gone has nothing left to clean:
    not raised. Returns the peers that failed or were not waited for."""
    failed: set[str] = set()
    waiting = []
    for p, fut in started:
        if worker.is_lost(p):
            failed.add(p)
        else:
            waiting.append((p, fut))
    for p, fut in waiting:
        # (cancelling this wait does not cancel the remote calls: nothing is lost)
        try:
            await fut
        except Exception:  # logged by _log_failure; cancellation does propagate
            failed.add(p)
    return failed


async def call_peers(
    worker: Worker, peers: Iterable[str], fn: Any, args: tuple[Any, ...]
) -> set[str]:
    """``start_calls`` then ``finish_calls``: run protocol handler ``fn(*args)`` on every
    peer but this worker, all in flight together; returns the peers that failed or were
    not waited for."""
    return await finish_calls(worker, start_calls(worker, peers, fn, args))


def _log_failure(fn: Any, peer: str, fut: asyncio.Future[Any]) -> None:
    exc = None if fut.cancelled() else fut.exception()
    if exc is not None:
        log.debug("%s on %s failed: %r", getattr(fn, "__name__", fn), peer, exc)


class activate:
    """Makes context ``ctx_id`` of ``worker`` current in a ``with`` block (a class, not a
    generator-based context manager: it wraps every call made inside a context)."""

    __slots__ = ("_value", "_token")

    def __init__(self, worker: Worker, ctx_id: int, chain: tuple[int, ...]) -> None:
        self._value = (worker, ctx_id, chain)

    def __enter__(self) -> None:
        self._token = _current.set(self._value)
        worker, _, chain = self._value
        state_of(worker).running_calls.add(chain[-1])  # (its handler runs: running_chain)

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)
        worker, _, chain = self._value
        state_of(worker).running_calls.discard(chain[-1])


class _Hooks:
    """Codec hooks for one message of one context with one peer."""

    __slots__ = ("state", "ctx", "peer", "peer_id", "sent", "got")

    def __init__(
        self, state: DistState, ctx: DistContext, peer: str, peer_id: int | None = None
    ) -> None:
        self.state = state
        self.ctx = ctx
        self.peer = peer
        self.peer_id = peer_id  # (the peer's cluster id on the connection: which process)
        self.sent: list[int] | None = None  # send ids recorded for this message
        self.got: list[int] | None = None  # send ids of the recv nodes its decoding made

    def tensor_out(self, t: Tensor) -> int | None:
        # (called for a tensor that requires grad only: see wire.WireHooks)
        if self.ctx.active_pass is not None:
            # (the reply of a call that came before the pass started, made while our
            # part runs: its send node would go when the part ends, without a
            # gradient, and its recv node on the caller would send to nothing; a
            # request is refused before, in outgoing)
            raise ContextError(
                f"context {self.ctx.id:#x}: a tensor that requires grad cannot be sent to "
                f"worker {self.peer!r} in it while a backward pass runs in it on worker "
                f"{self.state.worker.name!r}; send it before the backward or after it returned"
            )
        send_id = self.state.record_send(self.ctx, t, self.peer)
        if self.sent is None:
            self.sent = [send_id]
        else:
            self.sent.append(send_id)
        return send_id

    def undo(self) -> None:
        """The message was not sent (its encoding failed, it was too large, the call was
        cancelled before it left): its send nodes go, or every later pass would wait for
        gradients their recv nodes, which do not exist, can never send."""
        ctx = self._context()
        if self.sent and ctx is not None:
            for send_id in self.sent:
                ctx.sends.pop(send_id, None)
        self.sent = None

    def abandoned(self) -> None:
        """The call of this message was abandoned after it left (see DistContext). The
        runtime keeps these hooks until the reply comes, maybe never: from now on they
        hold the context weakly, or a released context and its graph would stay."""
        ctx = self.ctx
        un = ctx.unanswered
        un[self.peer] = un.get(self.peer, 0) + 1
        self.ctx = weakref.ref(ctx)  # type: ignore[assignment]

    def _context(self) -> DistContext | None:
        ctx = self.ctx
        return ctx() if isinstance(ctx, weakref.ref) else ctx

    def answered(self) -> None:
        ctx = self._context()
        if ctx is None:
            return  # (released meanwhile)
        un = ctx.unanswered
        n = un.get(self.peer, 0) - 1
        if n > 0:
            un[self.peer] = n
        else:
            un.pop(self.peer, None)

    def tensor_in(self, array: np.ndarray, requires_grad: bool, link: Any) -> Tensor:
        if link is None:
            return Tensor(array, requires_grad=requires_grad)
        if type(link) is not int:  # (a bool is no send id: True paired with send id 1)
            raise ProtocolError(f"tensor link must be an int, got {type(link).__name__}")
        ctx = self._context()
        if ctx is None or ctx.released:  # (a late reply into a released context)
            return Tensor(array, requires_grad=requires_grad)
        if self.got is None:
            self.got = [link]
        else:
            self.got.append(link)
        return self.state.record_recv(ctx, array, self.peer, link)

    def unreadable(self, exc: Exception, reply: bool) -> None:
        """Decoding this message failed part way (``exc``): the recv nodes made for the
        tensors before the failure go (nothing will ever use them). The sender holds a
        send node for every tensor of the message, also those never decoded, which no
        recv node here will ever answer. A request's sender gets the call refused and
        takes its send nodes back (``undo``); after a reply, the context is broken."""
        ctx = self._context()
        if ctx is None:
            return
        if self.got:
            ctx.unpair(self.peer, self.got, [])
            self.got = None
        if reply:
            self._break(
                ctx,
                f"a reply of worker {self.peer!r} in it could not be taken in by worker "
                f"{self.state.worker.name!r} ({exc})",
            )

    def lost(self) -> None:
        """The connection of this message's call closed without a goodbye before its
        reply came (a hung callee taken for lost, say), or the abandoned call was
        dropped (beyond MAX_ABANDONED): the reply may have left the callee, with send
        nodes recorded for its tensors, and be lost. The context is broken."""
        ctx = self._context()
        if ctx is None:
            return
        if isinstance(self.ctx, weakref.ref):
            self.answered()  # (abandoned: it no longer waits for this reply)
        self._break(
            ctx,
            f"the connection to worker {self.peer!r} closed while a call to it made in "
            f"it on worker {self.state.worker.name!r} waited for its reply, which may have "
            "left with tensors",
        )

    def _break(self, ctx: DistContext, why: str) -> None:
        if ctx.broken is None and not ctx.released:
            ctx.broken = (
                f"context {ctx.id:#x}: {why}; their gradients cannot flow back to "
                "where they were sent from, so no backward pass can complete in this "
                "context. Leave it and run the forward pass again in a new one"
            )
            ctx.broken_by = (self.peer, self.peer_id)


# a call's (context id, initiator, call chain[, latest pass of the context aborted on
# the caller: see DistContext.aborted_mark])
_Meta = tuple[int, str, tuple[int, ...]] | tuple[int, str, tuple[int, ...], int]


class DistInterceptor:
    """Joins the runtime's call path to distributed autograd (``runtime.set_interceptor``).

    The metadata of a call made inside a context is ``[context_id, initiator, chain]``:
    ``chain`` the tokens of the calls of the context the call is made inside, then its
    own (see DistContext.calls_out); then, once a pass of the context was aborted on the
    caller, the latest such pass (its ``aborted_mark``), which the callee aborts before
    it takes the call if it has not yet. The caller's is the tuple ``outgoing`` makes
    (it travels as a list), already in the form ``_parse_meta`` gives a request's.
    """

    def outgoing(self, worker: Worker, dest: str, peer_id: int | None) -> _Meta | None:
        cur = _current.get()
        if cur is None or cur[0] is not worker:
            return None
        st = state_of(worker)
        ctx = st.contexts.get(cur[1])
        if ctx is None:
            # (a task still holding a context that was left or reclaimed meanwhile: a
            # child of the task that left it, or a task a call handler spawned. Its
            # call would go out without the context, its tensors unrecorded.)
            why = st.released_why(cur[1])  # (reclaimed: not the user's doing)
            guess = " (a task that outlived the `async with ag.dist.context()` block?)"
            guess = "" if why else guess
            raise ContextError(
                f"distributed autograd context {cur[1]:#x} was released on worker "
                f"{worker.name!r}{why}; a call cannot be made in it any more{guess}"
            )
        if not grad_enabled():
            # Under no_grad() nothing is recorded, as by the local engine's ops (and by
            # PyTorch's RPC): the call goes out as outside a context, its tensors
            # unlinked (its result's tensors arrived linked and gave its arguments
            # gradients).
            return None
        if ctx.active_pass is not None or ctx.id in st.run_of:
            # (a call of another task of the context while a pass runs in it: its
            # request or reply may bring tensors whose send/recv pair only one end's
            # part of the pass holds, and that part would wait for good or the pass
            # complete without it; the task running backward waits for it)
            raise ContextError(
                f"context {ctx.id:#x}: a call cannot be made in it from worker "
                f"{worker.name!r} while a backward pass runs in it there; make it "
                "before the backward or after it returned"
            )
        if len(cur[2]) >= MAX_CHAIN:
            # (checked here, where it is the caller's mistake: the callee could only
            # call the metadata malformed)
            raise ContextError(
                f"calls nested more than {MAX_CHAIN} deep in distributed autograd context "
                f"{ctx.id:#x} (a call made inside a call inside a call...: a runaway "
                "recursion?)"
            )
        if dest != worker.name:
            check_peer(ctx, dest, peer_id)
            ctx.peers.add(dest)
        token = st.new_call_token()
        ctx.calls_out.add(token)
        mark = ctx.aborted_mark
        if mark:
            return (ctx.id, ctx.initiator, (*cur[2], token), mark)
        return (ctx.id, ctx.initiator, (*cur[2], token))

    def returned(self, worker: Worker, meta: _Meta) -> None:
        ctx = state_of(worker).contexts.get(meta[0])
        if ctx is not None:
            ctx.calls_out.discard(meta[2][-1])

    def wire_hooks(self, worker: Worker, meta: Any, peer: str, peer_id: int | None) -> _Hooks:
        meta = _parse_meta(meta)
        ctx_id = meta[0]
        st = state_of(worker)
        ctx = st.join(ctx_id, meta[1], peer, peer_id)
        if len(meta) == 4 and meta[3] != ctx.aborted_mark:
            # The caller knows a pass of the context aborted that this worker may not
            # have heard of yet: the caller's own abort of it, one-way, can come after
            # this call (the call came through another worker, on another connection),
            # and its part here may still run. Aborted here first, as that abort would.
            from actorgrad.dist.backward import abort_known

            abort_known(worker, ctx, meta[3])
        if ctx.active_pass is not None and peer != worker.name:
            # A request from a worker whose part of the pass is done (so its own check,
            # in outgoing, let it go: a task a handler spawned, say): its tensors would
            # get recv nodes here in the middle of our part, which frees them when it
            # ends, while their send nodes there wait in every later pass (one pass
            # completed without their gradients, the next was refused for good).
            raise ContextError(
                f"context {ctx_id:#x}: a call from worker {peer!r} cannot be taken in it "
                f"on worker {worker.name!r} while a backward pass runs in it there; make "
                "it before the backward or after it returned"
            )
        if peer != worker.name:
            check_peer(ctx, peer, peer_id)
            ctx.peers.add(peer)
        return _Hooks(st, ctx, peer, peer_id)

    def enter(self, worker: Worker, meta: Any) -> Any:
        # (checked: the runtime gave this request's meta to wire_hooks first)
        return activate(worker, meta[0], tuple(meta[2]))


def still_broken(worker: Worker, ctx: DistContext) -> bool:
    """Whether ``ctx`` is broken here (see DistContext.broken), and the callee that
    made it so still lives: the orphan send nodes of a process that died went with it
    (a pass reaching it fails with WorkerLost), and the mark goes."""
    if ctx.broken is None:
        return False
    peer, peer_id = ctx.broken_by
    member = worker.members.get(peer)
    if peer == worker.name or (member is not None and (peer_id is None or member[0] == peer_id)):
        return True
    ctx.broken = None
    return False


#: Longest call chain a call's metadata may carry (calls nested inside calls of one
#: context); deeper is a malformed message (or a runaway recursion).
MAX_CHAIN = 1024


def int_list(x: Any) -> bool:
    """Whether ``x``, decoded from a message, is a list of ints (ids, call tokens)."""
    return type(x) is list and all(type(i) is int for i in x)


def _parse_meta(meta: Any) -> _Meta:
    """A call's metadata, checked: ``meta`` from a request's header (a list), or the
    caller's own, which ``outgoing`` made in this form (a tuple: nothing to check; a
    header from the wire holds no tuple, its decoding refuses ext types)."""
    if type(meta) is tuple:
        return meta
    if type(meta) is list and 3 <= len(meta) <= 4:
        ctx_id, initiator, chain = meta[0], meta[1], meta[2]
        if (
            type(ctx_id) is int
            and 0 < ctx_id < MAX_ID << CONTEXT_ID_BITS
            and type(initiator) is str
            and type(chain) is list
            and 0 < len(chain) <= MAX_CHAIN
            and all(type(t) is int for t in chain)
        ):
            if len(meta) == 3:
                return ctx_id, initiator, tuple(chain)
            aborted = meta[3]  # (a pass id: the worker's id above PASS_ID_BITS bits)
            if type(aborted) is int and 0 < aborted < MAX_ID << PASS_ID_BITS:
                return ctx_id, initiator, tuple(chain), aborted
            raise ProtocolError(
                "malformed distributed autograd call metadata: its aborted pass "
                f"{short_repr(aborted)} is no pass id: {short_repr(meta)}"
            )
    raise ProtocolError(f"malformed distributed autograd call metadata: {short_repr(meta)}")
