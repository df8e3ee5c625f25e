"""Remote references with distributed reference counting.

Every ``RRef`` object, on any worker (the owner included), stands for one count at
the owner, kept per holder process: ``Owned.holders[(worker_name, cluster_id)]``. The
owner frees the value when the last count goes. (The cluster id tells a process that
joined under a dead holder's name from the dead one: the owner can hear of the death
after the new one's first counts, and drops only the dead one's.)

* Encoding an RRef into a message for worker ``dest`` adds one count for ``dest``
  before the message leaves: the owner adds it directly; any other worker (a "fork")
  registers it with the owner and awaits the ack first (``register_forks``), so the
  receiver's later decref can never overtake the increment. The forking worker's own
  RRef is kept alive until the ack (``_register``: its release need not go out behind
  the registration).
* Decoding an RRef creates a new ``RRef`` object that takes over that count.
* When an ``RRef`` object is collected, a ``weakref.finalize`` callback (any thread)
  schedules the decref on its worker's loop thread-safely: a local decrement on the
  owner, a one-way ``_decref`` message otherwise.
* A holder that leaves the cluster (gracefully, or dead: the registry sees its join
  connection close, or a new process joins under its name) loses all its counts. A
  mere broken connection does not free anything: the holder may still be alive.
* These one-way messages are not lost to a peer that is hung for a while: one that
  cannot be handed to a connection is sent again, with those behind it, until it
  goes out or the peer leaves the cluster (``_tell``).
* Nor is a release handed to a connection that then breaks (unread in the owner's
  socket buffer, in a write that failed): a holder numbers its releases to each owner
  process and keeps them until the owner acknowledges them (``_Releases``; the owner
  sends ``_released``, "all up to n taken", at most once per ``ACK_DELAY`` and
  holder), and a connection with the owner that breaks without a goodbye sends those
  not acknowledged again (``conn_lost``). The owner takes each number once
  (``_Seen``): a copy of a release it read takes nothing (a blind decrement took a
  count the holder still held, and freed a value in use).
* A fork's count waits on its receiver: the owner remembers the forks registered and
  not yet accepted, per registration (the forker's tag for the message, which travels
  in the RRef), and a receiver that decodes a forked RRef tells the owner (a one-way
  ``_accept`` naming the tag). When a forker leaves with forks pending,
  the owner asks each of their receivers to settle (``_settle_forks``): the receiver
  answers (``_forks_settled``, behind its accepts on the same connection) once it
  has handled everything the forker sent it, and the owner drops the counts of the
  forks still pending: their messages never arrived (the forker died before sending,
  or in the middle of it). Without this the owner kept such values for good.
* A forker that gives up on a registration whose outcome it does not know (the owner
  hung past the heartbeat timeout: the connection closed with the request sent) takes
  it back (``_unfork``, as for a message that was not sent), and the owner may read
  the two in either order (the registration came on the old connection): a take-back
  of a registration not seen yet leaves a tombstone that the registration meets
  (``Worker._rref_withdrawn``, for ``WITHDRAWN_TTL``). Without this an owner read a registration its forker
  had given up on and counted the receiver for good (the owner itself, when the
  RRef was passed to its own owner: the value stayed for the owner's life).
* A reply whose caller gave up the call before it came (the callee stopped past the
  heartbeat timeout: the caller dropped the connection) is never read: its counts go
  back when the caller's goodbye, which names the calls given up, is read after the
  reply was sent (``given``, ``take_back_given``, kept by ``Worker._keep_given``); a
  reply to be made after that goodbye is not made. Without this the caller stayed
  counted as a holder until it left the cluster.
* So is a reply lost with a connection that broke without a goodbye (a reset, a
  network fault; both processes live on): the caller's call failed, and it never held
  the RRefs to release them. Both ends of a connection share an id
  (``Connection.pair_id``, drawn from the handshake's nonces); the caller, once its
  end closed (it reads nothing more there), names that id and the calls on it it
  never read a reply to, on another connection (``tell_unread``, a one-way
  ``_unread``). The callee takes back what its replies to those counted: from the
  connection's record if it has not seen the break yet (and a reply it makes later
  to one of them counts nothing, ``Connection.unread``), else from the record it kept
  when the connection closed (``keep_lost_given``, for ``LOST_GIVEN_TTL``). A reply
  the caller did read is not named: its RRefs are the caller's, released by it.
* Nor is a request lost so (its arguments' counts for the callee: the caller's own
  values, forks registered for it), which the callee never decodes nor releases. The
  caller notes the number of the frame that carried each request counting RRefs
  (``sent_on``: frames are numbered in order as they are queued, for their tags) and,
  the connection broken, keeps those still pending (``keep_lost_sent``) and asks, in
  its ``_unread``, how many of its frames the callee read there; the callee, its end
  closed first if it was open still (so the number is final), answers
  (``_frames_read``) from ``Connection.frames_in``, and the caller takes back what
  the requests past that number counted. A request the callee read, and will decode
  (a queued one is decoded even when refused), is not taken back.
* Nor is any other one-way RRef message (an accept, a take-back, the word above
  itself, a settle) handed to a connection that then broke so: each is noted with
  its frame's number (``_told_on``; releases have their own numbers), the same
  question is asked, and those past the answer go again (``_frames_read``). Without
  this a second reset soon after a first lost the word that was to set the first
  one's counts right, and the values stayed until a process left the cluster.
* A request (a call awaiting its reply, ``Worker.call``) to the RRef's owner itself
  carries no fork: the RRef goes as ``[owner, id, 0]`` ("to its owner, unregistered"),
  at once, and the owner, decoding it, counts itself as the holder of the new RRef
  object (its own count, released by that object's finalizer on the owner: no message
  has to come for it, none can be lost). The caller keeps its RRef object (its own
  count) alive until the call is over (``Hooks.direct``: the reply came, the call
  failed or was given up), so the value is alive when the owner decodes a request
  whose caller still waits for it. One decoded later (its caller gave up, its
  connection closed, and the caller's release overtook it on a new connection, or the
  caller died) finds the value alive (then counted as above) or gone: ids are never
  reused, so the decoding fails (LookupError) and the request is refused, never run on
  a freed value. One-way calls, replies and RRefs of a third owner are forked as above.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from actorgrad.errors import ProtocolError, WorkerLost, short_repr
from actorgrad.runtime.calls import inline
from actorgrad.runtime.registry import LOCAL_ID_BITS, MAX_ID, valid_name
from actorgrad.wire import WireRef

if TYPE_CHECKING:
    # (a default of Any: a bare ``RRef`` stays as it was to type checkers, also under
    # ``mypy --strict``, whose "missing type parameters" it would draw otherwise;
    # typing_extensions' stubs come with the checkers, nothing of it runs)
    from typing_extensions import TypeVar as _TypeVar

    from actorgrad.runtime.worker import Worker

    _T = _TypeVar("_T", default=Any)
else:
    _T = TypeVar("_T")


#: A holder process: (worker name, cluster id; 0 where no id is known, a cluster
#: without a registry).
Key: TypeAlias = tuple[str, int]


def peer_key(worker: Worker, name: str, conn: Any) -> Key:
    """The key of the process at the other end of ``conn`` (a connection with worker
    ``name``): the id its hello announced, else the membership's."""
    pid = conn.peer_id if conn is not None else None
    if pid is None:
        member = worker.members.get(name)
        pid = member[0] if member is not None else 0
    return (name, pid)


def _key_of(name: Any, pid: Any) -> Key:
    if type(name) is not str or type(pid) is not int:
        raise TypeError(f"malformed RRef holder {short_repr(name)} (id {short_repr(pid)})")
    return (name, pid)


#: A registration of forks: (forker, its tag for the message).
Reg: TypeAlias = tuple[Key, int]


def _reg_of(forker: Any, forker_id: Any, tag: Any) -> Reg:
    if type(tag) is not int:
        raise TypeError(f"malformed fork tag {short_repr(tag)}")
    return (_key_of(forker, forker_id), tag)


class Owned:
    __slots__ = ("value", "holders", "forks")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.holders: dict[Key, int] = {}
        # registration -> (receiver, its forks of this value not accepted yet) (see the
        # module doc)
        self.forks: dict[Reg, tuple[Key, int]] | None = None


def _fork(o: Owned, reg: Reg, holder: Key, n: int) -> None:
    forks = o.forks
    if forks is None:
        forks = o.forks = {}
    had = forks.get(reg)
    if had is not None and had[0] != holder:
        return  # (not that receiver's: a stray accept)
    c = (had[1] if had is not None else 0) + n
    if c > 0:
        forks[reg] = (holder, c)
    else:
        forks.pop(reg, None)


def _show(rid: Any) -> str:
    """An RRef id as messages show it: hex, the owner's cluster id in the high bits (a
    malformed one from the wire as it came)."""
    return f"{rid:#x}" if type(rid) is int else short_repr(rid)


def _gone(worker: Worker, rid: Any) -> LookupError:
    """The error for an RRef id this worker does not own (any more)."""
    if type(rid) is int and worker.id and rid >> LOCAL_ID_BITS != worker.id:
        # (its owner's cluster id is in the high bits: another process had this name,
        # or the peer made the id up)
        return LookupError(
            f"RRef {_show(rid)} was not made by worker {worker.name!r} of this cluster: "
            f"the id is of cluster id {rid >> LOCAL_ID_BITS}, {worker.name!r} has cluster "
            f"id {worker.id} (an earlier process of that name, or a forged id)"
        )
    return LookupError(f"RRef {_show(rid)} is no longer alive on worker {worker.name!r}")


def _owned(worker: Worker, rid: Any) -> Owned | None:
    """What ``rid`` refers to here, if it is alive (an id from the wire may be of any
    type: a list was looked up as it came, "unhashable type: 'list'")."""
    return worker.owned.get(rid) if type(rid) is int else None


#: Most processes that left the cluster an owner remembers (see peer_lost): the late
#: registrations come within moments of a loss; and few, a cluster id reused (after
#: 65,535 joins) under the same name is not taken for the one that left.
MAX_DEPARTED = 4096


def _add(worker: Worker, rid: int, holder: Key, n: int = 1) -> None:
    o = _owned(worker, rid)
    if o is None:
        raise _gone(worker, rid)
    if holder in worker._rref_departed:  # (it left: nothing of it will release it)
        return
    o.holders[holder] = o.holders.get(holder, 0) + n


def _sub(worker: Worker, rid: int, holder: Key, n: int = 1) -> None:
    o = _owned(worker, rid)
    if o is None:
        return
    c = o.holders.get(holder, 0) - n
    if c > 0:
        o.holders[holder] = c
    else:
        o.holders.pop(holder, None)
        if not o.holders:
            del worker.owned[rid]


def peer_lost(worker: Worker, name: str, pid: int) -> None:
    """Process ``pid`` of worker ``name`` left the cluster: its counts go, and the
    receivers of its pending forks are asked to settle them."""
    gone = (name, pid)
    if pid:
        # Remembered: a fork to it that another worker registers after this (it had
        # not heard of the loss yet, and sent the message into a connection that had
        # not noticed it either: a dead host's) counted it again, and for good, its
        # losses all heard. (Cluster ids are never reused; without one, 0, a process
        # joining under the name would have the same key.)
        departed = worker._rref_departed
        departed[gone] = None
        if len(departed) > MAX_DEPARTED:
            del departed[next(iter(departed))]
    settle: set[str] = set()
    for rid, o in list(worker.owned.items()):
        if o.forks:
            for reg, (holder, _) in list(o.forks.items()):
                if holder == gone:  # (its counts go below: no accept will come)
                    del o.forks[reg]
                elif reg[0] == gone:
                    settle.add(holder[0])
        if o.holders.pop(gone, None) is not None and not o.holders:
            del worker.owned[rid]
    for receiver in settle:
        if receiver == worker.name:
            worker.spawn(_settle_here(worker, gone), name="settle forks")
        else:
            _tell(worker, receiver, _settle_forks, (name, pid, worker.name))
    box = worker._rref_unsent.get(name)
    if box is not None and box.pid == pid:  # (its counts went: nothing to tell it)
        del worker._rref_unsent[name]
    # (its releases to us, and ours to it, are over)
    worker._rref_releases.pop(gone, None)
    worker._rref_seen.pop(gone, None)
    worker._rref_acks.pop(gone, None)
    if worker._rref_withdrawn:  # (no registration of it is to come any more)
        worker._rref_withdrawn = {r: t for r, t in worker._rref_withdrawn.items() if r[0] != gone}
    if worker._rref_lost_given:  # (its counts went: nothing of it to take back)
        lost = worker._rref_lost_given
        for pair in [p for p, rec in lost.items() if rec[0] == gone]:
            worker._rref_lost_given_n -= max(1, len(lost.pop(pair)[1]))
    if worker._rref_lost_sent:  # (its counts went: nothing to take back for it)
        sent = worker._rref_lost_sent
        for pair in [p for p, rec in sent.items() if rec[0] == gone]:
            del sent[pair]


def owned_value(worker: Worker, rid: Any) -> Any:
    o = _owned(worker, rid)
    if o is None:
        raise _gone(worker, rid)
    return o.value


def _release(worker: Worker, owner: str, rid: int) -> None:
    """Finalizer of an RRef object: may run in any thread, even after the loop closed."""
    if worker.closed:
        return
    try:
        worker.loop.call_soon_threadsafe(_release_on_loop, worker, owner, rid)
    except RuntimeError:  # loop closed
        pass


#: The release's wire name (the most frequent RRef message: fn_spec spared), and its
#: acknowledgement's.
_DECREF = "actorgrad.runtime.rref:_decref"
_RELEASED = "actorgrad.runtime.rref:_released"


def _release_on_loop(worker: Worker, owner: str, rid: int) -> None:
    if worker.closed:
        return
    if owner == worker.name:
        _sub(worker, rid, (worker.name, worker.id))
        return
    # Numbered and kept until the owner acknowledges it (see _Releases): handed to a
    # connection that then broke (unread in a socket buffer, in a write that failed),
    # a release was lost, and the owner kept the value for the holder's life. (Not
    # without cluster ids, the holder's or the owner's, which is in the id's high bits:
    # a later process of the name could not be told from the one the numbers were for)
    pid = rid >> LOCAL_ID_BITS
    seq = 0
    if worker.id and pid:
        key = (owner, pid)
        if key in worker._rref_departed:
            # (that process left: its counts went, and no acknowledgement would come;
            # numbered, the release was kept here for good)
            return
        rel = worker._rref_releases.get(key)
        if rel is None:
            rel = worker._rref_releases[key] = _Releases()
        seq = rel.seq = rel.seq + 1
        rel.unacked.append((seq, rid))
    _tell(worker, owner, _DECREF, (rid, worker.name, worker.id, seq))


class _Releases:
    """On a holder: the releases it sent one owner process, numbered from 1, and those
    the owner has not acknowledged yet, in order (sent again when a connection with
    the owner breaks: see conn_lost; dropped when the owner leaves, see peer_lost)."""

    __slots__ = ("seq", "unacked")

    def __init__(self) -> None:
        self.seq = 0
        self.unacked: collections.deque[tuple[int, int]] = collections.deque()  # (seq, id)


class _Seen:
    """On an owner: the numbers of the releases one holder process sent it that it
    took: all up to ``low``, and those above it in ``above`` (a release sent again on
    a new connection can come before the ones left behind on the old one)."""

    __slots__ = ("low", "above")

    def __init__(self) -> None:
        self.low = 0
        self.above: set[int] | None = None

    def take(self, seq: int) -> bool:
        """Record release ``seq``: whether it is new (a copy sent again is not)."""
        above = self.above
        if seq == self.low + 1 and not above:  # (the common case: the next one)
            self.low = seq
            return True
        if seq <= self.low or (above is not None and seq in above):
            return False
        if above is None:
            above = self.above = set()
        above.add(seq)
        low = self.low
        while low + 1 in above:
            low += 1
            above.remove(low)
        self.low = low
        return True


#: Seconds an owner gathers the releases of a holder before acknowledging them, all at
#: once (one small message per holder and period at most, on the connection they came
#: on); meanwhile the holder keeps them.
ACK_DELAY = 0.25


def conn_lost(worker: Worker, name: str, pid: int | None) -> None:
    """A connection with ``name`` (process ``pid``; None: unknown) broke, not at its
    leave: the releases it was not acknowledged go again, on the next connection (they
    may have been lost with this one; the owner takes a copy of one it read as
    nothing, see _decref)."""
    for key, rel in list(worker._rref_releases.items()):
        if key[0] == name and (pid is None or key[1] == pid) and rel.unacked:
            for seq, rid in rel.unacked:
                _tell(worker, name, _DECREF, (rid, worker.name, worker.id, seq))


def _ack_later(worker: Worker, holder: Key, conn: Any) -> None:
    """Acknowledge the releases of ``holder`` (which came on ``conn``) within ACK_DELAY."""
    worker._rref_acks[holder] = conn
    if worker._rref_ack_timer is None:
        worker._rref_ack_timer = worker.loop.call_later(ACK_DELAY, _send_acks, worker)


def _send_acks(worker: Worker) -> None:
    worker._rref_ack_timer = None
    acks, worker._rref_acks = worker._rref_acks, {}
    if worker.closed or worker._closing:
        return
    for holder, conn in acks.items():
        seen = worker._rref_seen.get(holder)
        # (on the connection the releases came on: no new connection to the holder for
        # it. One closed since: on another open one with that process, if any, see
        # _ack_conn; with none, the holder sends its releases again once it sees its
        # connections close, see conn_lost, and they are acknowledged then)
        if seen is not None and (conn := _ack_conn(worker, holder, conn)) is not None:
            worker.notify_on(
                conn,
                _RELEASED,
                (worker.name, worker.id, holder[1], seen.low),
            )


def _ack_conn(worker: Worker, holder: Key, conn: Any) -> Any:
    """The connection to acknowledge ``holder``'s releases on: ``conn``, the one the
    latest came on, while it is open, else another open one with that process.

    The latest may be a copy read on a connection that closed since, the holder having
    sent it again on a new one once its side of the old one had broken, and that new
    copy read first: acknowledged on neither, the holder kept those releases until it
    released another RRef of this owner (whose acknowledgement covers them) or another
    connection broke; for good, if neither came."""
    if conn is not None and not conn.closed and not conn.bye_read:
        return conn
    return next((c for c in worker.conns_with(*holder) if not c.bye_read), None)


#: Seconds between attempts to send a peer the RRef messages it could not be sent.
RETRY_DELAY = 1.0


class _Unsent:
    """RRef messages to a peer that could not be handed to a connection, in order."""

    __slots__ = ("pid", "msgs")

    def __init__(self, pid: int) -> None:
        self.pid = pid  # (the cluster id of the process they are for)
        self.msgs: list[tuple[Any, tuple[Any, ...]]] = []


def _tell(worker: Worker, dest: str, fn: Any, args: tuple[Any, ...]) -> None:
    """Send ``dest`` the one-way RRef message ``fn(*args)``, in order with the others.

    One that cannot be handed to a connection (``dest`` hung a few seconds: the
    heartbeat closed its connection, the reconnect timed out) is kept, with the later
    ones to ``dest`` behind it, and sent again every ``RETRY_DELAY`` s until it goes out
    or ``dest`` leaves the cluster (its counts go then, see peer_lost). Dropped, a
    decref kept the value on its owner for good."""
    box = _live_box(worker, dest)
    if box is not None:
        box.msgs.append((fn, args))
        return
    on_error = functools.partial(_unsent, worker, dest, fn, args)
    if fn == _DECREF:  # (releases have their own numbers, acknowledged: see _Releases)
        worker.notify(dest, fn, args, on_error=on_error)
    else:
        worker.notify(dest, fn, args, on_error=on_error, sent=functools.partial(_told_on, fn, args))


#: Most one-way RRef messages a connection keeps with their frame numbers (_told_on):
#: a reset loses at most what its socket buffers held, the latest frames.
MAX_TOLD = 1024


def _told_on(fn: Any, args: tuple[Any, ...], conn: Any) -> None:
    """The one-way RRef message ``fn(*args)`` was just queued on ``conn``: noted with its
    frame's number (as ``sent_on`` notes a request's). Handed to a connection, it was
    never sent again: one that then broke without a goodbye (a reset, unread in the
    peer's socket) lost it for good, an accept, a take-back, the word of replies never
    read (a second reset soon after a first), and its counts stayed until a process
    left the cluster. Should ``conn`` break so, the peer is asked how many of our frames
    it read there (tell_unread), and those past that number go again (_frames_read):
    each is taken once, as the peer never read them."""
    seq = _queued_number(conn)
    if not seq:  # (in-process connections do not break)
        return
    told = conn.told
    if told is None:
        told = conn.told = collections.deque(maxlen=MAX_TOLD)
    told.append((seq, fn, args))


def _live_box(worker: Worker, dest: str) -> _Unsent | None:
    """The messages kept for ``dest``, if they are for the process of that name that is
    a member now; ones kept for a process that is gone or replaced are dropped (its
    counts went with it)."""
    box = worker._rref_unsent.get(dest)
    if box is not None:
        member = worker.members.get(dest)
        if member is not None and member[0] == box.pid:
            return box
        del worker._rref_unsent[dest]
    return None


def _unsent(worker: Worker, dest: str, fn: Any, args: tuple[Any, ...], exc: BaseException) -> None:
    if worker._closing or worker.closed:
        return
    member = worker.members.get(dest)
    if member is None:  # (not a member: gone, and its counts with it)
        return
    box = _live_box(worker, dest)
    if box is None:
        box = worker._rref_unsent[dest] = _Unsent(member[0])
        worker.loop.call_later(RETRY_DELAY, _resend, worker, dest, box)
    box.msgs.append((fn, args))


def _resend(worker: Worker, dest: str, box: _Unsent) -> None:
    if worker.closed or _live_box(worker, dest) is not box:
        return
    del worker._rref_unsent[dest]
    for fn, args in box.msgs:  # (in order; one that fails again starts a new box)
        _tell(worker, dest, fn, args)


# Generic as torch's RRef is, so that hints written for it (``RRef[np.ndarray]``) work
# here too: evaluated, they raised "type 'RRef' is not subscriptable". (Free at run
# time: typing.Generic adds no __new__, __init__ nor instance state.)
class RRef(WireRef, Generic[_T]):
    """A reference to a value owned by one worker. ``ag.remote`` makes one on another
    worker; ``ag.RRef(value)`` makes one owned by the worker running the code, holding
    ``value`` itself (not a copy), as ``torch.distributed.rpc.RRef(value)`` does: the way
    to hand out references to parameters that already exist, e.g. for a
    ``DistributedOptimizer``. An RRef can be passed as an argument or returned; the
    owner frees the value once no worker holds a reference to it.

    Raises (``RRef(value)``): RuntimeError outside a worker (no cluster joined);
    TypeError for a coroutine (an ``await`` forgotten: ``ag.RRef(make())`` for
    ``ag.RRef(await make())``).

    Example::

        rref = await ag.remote("w1", list, ([1, 2],))   # the list stays on w1
        print(rref.owner, rref.is_owner())              # w1 False
        print(await rref.to_here())                     # [1, 2]

        def param_refs(model_ref):                      # run on the model's owner
            return [ag.RRef(p) for p in model_ref.local_value().parameters()]
    """

    __slots__ = ("_worker", "owner", "_rid", "__weakref__")

    def __init__(self, value: _T) -> None:
        from actorgrad.runtime.worker import current_worker

        if asyncio.iscoroutine(value):
            # (accepted, it held a coroutine nobody could run or fetch, and Python's
            # "never awaited" warning came later, from wherever it was collected)
            raise TypeError(
                f"ag.RRef(value) got a coroutine ({value!r:.80}): that is what calling an "
                "async function gives; await it first, ag.RRef(await f(...))"
            )
        w = current_worker()
        self._bind(w, w.name, _own_from_any_thread(w, value))

    @classmethod
    def _handle(cls, worker: Worker, owner: str, rid: int) -> RRef:
        """The RRef object for id ``rid`` of ``owner``, held by ``worker`` (counted)."""
        r = cls.__new__(cls)
        r._bind(worker, owner, rid)
        return r

    def _bind(self, worker: Worker, owner: str, rid: int) -> None:
        self._worker = worker
        self.owner = owner
        self._rid = rid
        f = weakref.finalize(self, _release, worker, owner, rid)
        f.atexit = False

    def __repr__(self) -> str:
        return f"RRef(owner={self.owner!r}, id={_show(self._rid)}, held_by={self._worker.name!r})"

    # An RRef is a counted handle: a copy the owner did not count would outlive the
    # value (it is freed when the original goes). The same handle serves as a copy.
    def __copy__(self) -> RRef[_T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> RRef[_T]:
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "an RRef cannot be pickled: pass it as an argument or result of ag.rpc / "
            "ag.remote to give it to another worker (the owner counts it then)"
        )

    def _live(self) -> Worker:
        """The worker holding this RRef, if it still runs; else WorkerLost saying so.
        (A later cluster in this process reuses the ids: its workers count from 1
        again, so the RRef would reach another value there.)"""
        w = self._worker
        if w.closed:
            raise WorkerLost(
                f"{self!r}: the worker holding it has shut down; an RRef does not outlive "
                "the worker that holds it (nor its cluster)"
            )
        return w

    def is_owner(self) -> bool:
        """Whether the worker holding this RRef owns the value (``local_value`` works).

        Example::

            rref = await ag.remote("w1", list, ([1, 2],))
            rref.is_owner()                  # False on the driver; True on w1
        """
        return self.owner == self._worker.name

    def local_value(self) -> _T:
        """The value itself; only on the owner (else RuntimeError).

        Example::

            def total(rref):                 # module-level, run on the owner
                return sum(rref.local_value())

            rref = await ag.remote("w1", list, ([1, 2],))
            assert await ag.rpc("w1", total, (rref,)) == 3
        """
        if not self.is_owner():
            raise RuntimeError(
                f"local_value() on worker {self._worker.name!r}, but this RRef is owned by "
                f"{self.owner!r}: use `await rref.to_here()`"
            )
        # (the value itself, as the RRef was made for it: ag.RRef(value) or ag.remote)
        value: _T = owned_value(self._live(), self._rid)
        return value

    async def to_here(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (timeout is API)
        """Fetch a copy of the value from the owner (the value itself on the owner).

        Example::

            rref = await ag.remote("w1", list, ([1, 2],))
            print(await rref.to_here(timeout=5.0))    # [1, 2]
        """
        if self.is_owner():
            from actorgrad.runtime.worker import check_timeout

            check_timeout(timeout, "for no timeout")  # (as a non-owner's: the same call)
            return owned_value(self._live(), self._rid)
        return await self._live().call(
            self.owner, "actorgrad.runtime.rref:_fetch", (self._rid,), timeout=timeout
        )

    def rpc(self, timeout: float | None = None) -> _Proxy[Any]:
        """``await rref.rpc().method(*args, **kwargs)`` runs the method on the owner
        and returns its result.

        Example::

            rref = await ag.remote("w1", list, ([1, 2],))
            await rref.rpc().append(3)
            print(await rref.to_here())      # [1, 2, 3]
        """
        from actorgrad.runtime.worker import MODE_RREF_RPC

        return _Proxy(self, MODE_RREF_RPC, timeout)

    def remote(self, timeout: float | None = None) -> _Proxy[RRef]:
        """``await rref.remote().method(...)`` -> an RRef to the method's result, owned
        by the same worker.

        Example::

            rref = await ag.remote("w1", list, ([1, 2, 1],))
            n = await rref.remote().count(1)     # an RRef owned by w1
            print(await n.to_here())             # 2
        """
        from actorgrad.runtime.worker import MODE_RREF_REMOTE

        return _Proxy(self, MODE_RREF_REMOTE, timeout)

    if not TYPE_CHECKING:  # (it only raises: to type checkers, unknown names stay errors)

        def __getattr__(self, name: str) -> Any:
            # (only names not found: a PyTorch RRef's that have another form here say it)
            hint = _PYTORCH_NAMES.get(name)
            if hint is None:
                raise AttributeError(f"'RRef' object has no attribute {name!r}")
            raise AttributeError(f"'RRef' object has no attribute {name!r} (PyTorch's): {hint}")


# PyTorch RRef methods without a namesake here, and what does their work (see
# docs/porting.md). ``owner`` is an attribute here: ``rref.owner()`` calls a str.
_PYTORCH_NAMES = {
    "rpc_sync": "use `await rref.rpc().method(...)`",
    "rpc_async": "use `asyncio.ensure_future(rref.rpc().method(...))`",
    "owner_name": "use `rref.owner`, the owner's name (an attribute)",
    "confirmed_by_owner": "an RRef is confirmed once `ag.remote` returned it",
}


_R = TypeVar("_R")


class _Proxy(Generic[_R]):
    """``rref.rpc()`` (``_R``: the method's result, Any) or ``rref.remote()`` (``_R``:
    RRef): ``proxy.method`` is a coroutine function running the method on the owner."""

    # (private names: a method of the value called `_mode` reached this field instead)
    __slots__ = ("__rref", "__mode", "__timeout")

    def __init__(self, r: RRef, mode: int, timeout: float | None) -> None:
        self.__rref = r
        self.__mode = mode
        self.__timeout = timeout

    if not TYPE_CHECKING:  # (it only raises: to type checkers, a call stays an error)

        def __call__(self, *args: Any, **kwargs: Any) -> None:
            # (a remote Module called as a local one is, `await rref.rpc()(x)`: Python
            # said "'_Proxy' object is not callable", a private name and no way on)
            from actorgrad.runtime.worker import MODE_RREF_REMOTE

            name = "remote" if self.__mode == MODE_RREF_REMOTE else "rpc"
            raise TypeError(
                f"rref.{name}() is not called itself: it calls a method of the RRef's value "
                f"by name, `await rref.{name}().forward(x)` (a Module's __call__ runs its "
                "forward)"
            )

    def __getattr__(self, method: str) -> Callable[..., Coroutine[Any, Any, _R]]:
        if method.startswith("__"):
            # (an AttributeError all the same: copy, pickle & co. probe such names)
            raise AttributeError(
                f"{method}: rref.rpc()/remote() forward named methods, not special ones "
                "(call e.g. a method that wraps it)"
            )
        r, mode, timeout = self.__rref, self.__mode, self.__timeout

        async def call(*args: Any, **kwargs: Any) -> _R:
            # (_R as the mode says: an RRef for rref.remote(), whatever the method
            # returned for rref.rpc())
            result: _R = await r._live().call(
                r.owner, [r._rid, method], args, kwargs or None, timeout=timeout, mode=mode
            )
            return result

        return call


def new_owned(worker: Worker, value: Any) -> RRef:
    """Store ``value`` on ``worker`` (its owner) and return a local RRef to it."""
    return RRef._handle(worker, worker.name, _own(worker, value))


def _own(worker: Worker, value: Any) -> int:
    """Store ``value`` on ``worker``, held once by ``worker``; its id. On the loop."""
    # (the worker's cluster id in the high bits, as context ids: a process that joins
    # under a dead owner's name counts its own from 1 too, and the dead one's RRefs
    # reached its values, their releases freeing them)
    rid = (worker.id << LOCAL_ID_BITS) | next(worker._rref_ids)
    o = worker.owned[rid] = Owned(value)
    o.holders[(worker.name, worker.id)] = 1
    return rid


def _own_from_any_thread(worker: Worker, value: Any) -> int:
    """``_own`` from the worker's loop or from another thread (a plain function runs in
    the worker's thread pool): there, the loop stores it (its tables are the loop's
    alone) while this thread waits."""
    # (by thread, not by the running loop: a plain function run inline on the loop sees
    # none running, as in the pool; waiting here for the loop, it would block it)
    on_loop = threading.get_ident() == worker.loop_thread and not worker.loop.is_closed()
    if worker.closed:
        raise _closed(worker)
    if on_loop:
        return _own(worker, value)
    done: concurrent.futures.Future[int] = concurrent.futures.Future()
    try:
        worker.loop.call_soon_threadsafe(_own_into, done, worker, value)
    except RuntimeError:  # (its loop closed)
        raise _closed(worker) from None
    while True:
        try:
            return done.result(timeout=0.5)
        except concurrent.futures.TimeoutError:
            if worker.closed:  # (its loop may never run the callback now)
                raise _closed(worker) from None


def _own_into(done: concurrent.futures.Future[int], worker: Worker, value: Any) -> None:
    if worker.closed:
        done.set_exception(_closed(worker))
    else:
        done.set_result(_own(worker, value))


def _closed(worker: Worker) -> WorkerLost:
    return WorkerLost(f"worker {worker.name!r} has shut down: it can own no new value")


class Hooks:
    """Codec hooks of one message between ``worker`` and ``peer`` (RRefs only), over
    connection ``conn`` (its hello tells which process ``peer`` is; None: a message
    to itself)."""

    __slots__ = (
        "worker",
        "peer",
        "conn",
        "forks",
        "tag",
        "added",
        "registered",
        "undone",
        "direct",
        "in_request",
        "gone",
        "seq",
    )

    def __init__(self, worker: Worker, peer: str, conn: Any) -> None:
        self.worker = worker
        self.peer = peer
        self.conn = conn
        self.forks: list[RRef] | None = None
        # this message's forks' registration tag (unique in this process; 0: none yet)
        self.tag = 0
        self.added: list[int] | None = None
        # forks the owners acknowledged registering: (owner, ids) (see register_forks)
        self.registered: list[tuple[str, list[int]]] | None = None
        self.undone = False
        # a request to ``peer`` awaiting its reply (set by Worker.call): its RRefs owned
        # by ``peer`` go unregistered, and are kept here, alive, until the call is over
        # (see the module doc); None: every RRef of another owner is forked
        self.direct: list[RRef] | None = None
        # decoding a request (set by the worker): an RRef sent to this worker, its
        # owner, unregistered whose value is gone does not stop the decoding, it is
        # kept in ``gone`` (the LookupError saying so) and the request refused once
        # decoded (see ref_in)
        self.in_request = False
        self.gone: LookupError | None = None
        # a request that counted RRefs for ``peer``: how many frames had gone on its
        # connection once it went (see sent_on); 0: not known
        self.seq = 0

    @property
    def worker_name(self) -> str:
        return self.worker.name

    @property
    def peer_key(self) -> Key:
        # (computed when an RRef needs it: most messages carry none)
        return peer_key(self.worker, self.peer, self.conn)

    def ref_out(self, ref: Any) -> list[Any]:
        if not isinstance(ref, RRef):
            raise TypeError(f"cannot send {type(ref).__name__}")
        w = self.worker
        if ref._worker is not w:
            # (its counts are the other worker's: sent from here, the owner would count
            # a holder that never took it, or free the value under the other's feet)
            ref._live()
            raise ValueError(
                f"{ref!r} is held by worker {ref._worker.name!r} of this process, not by "
                f"{w.name!r} that sends it: pass an RRef to another worker as an argument "
                "or result of a call"
            )
        if ref.owner == w.name:
            _add(w, ref._rid, self.peer_key)
            if self.added is None:
                self.added = []
            self.added.append(ref._rid)
            return [ref.owner, ref._rid]
        if self.direct is not None and ref.owner == self.peer:
            # (to its owner in a request: the owner counts itself when it decodes it;
            # this RRef, and with it this worker's count, lives as long as the call)
            self.direct.append(ref)
            return [ref.owner, ref._rid, 0]
        if self.forks is None:
            self.forks = []
        if not self.tag:
            self.tag = next(w._fork_tags)
        self.forks.append(ref)
        return [ref.owner, ref._rid, self.tag]

    def check_nbytes(self, nbytes: int) -> None:
        """(wire) Refuse, before it is built, a frame larger than ``conn`` may send."""
        if self.conn is not None:
            self.conn.check_nbytes(nbytes, part=True)

    def ref_in(self, payload: list[Any]) -> RRef | None:
        w, forker = self.worker, self.peer
        n = len(payload)  # (a list: the codec checked)
        if n == 2 or n == 3:
            owner, rid = payload[0], payload[1]
            # (anything was taken: an RRef owned by [1] with the id {'a': 1})
            if (
                not valid_name(owner)
                or type(rid) is not int
                or not 0 < rid < MAX_ID << LOCAL_ID_BITS
            ):
                raise ProtocolError(
                    f"malformed RRef: owner {short_repr(owner)}, id {short_repr(rid)}"
                )
        # (a fork, from a worker that is not the owner, carries its registration's tag)
        if not (n == 2 or n == 3) or (n == 3) != (owner != forker):
            raise ProtocolError(
                f"malformed RRef {short_repr(payload)}: an [owner, id] pair from its "
                "owner, an [owner, id, fork tag] triple from another worker is expected"
            )
        if n == 3:  # a fork: its count waits for this
            tag = payload[2]
            if tag == 0 and type(tag) is int and owner == w.name:
                # (sent to its owner in a request, unregistered: this worker counts itself
                # for the new object; LookupError when the value is gone, the request
                # refused: its caller gave up on it, see the module doc)
                if self.in_request and _owned(w, rid) is None:
                    # The decoding goes on: every RRef after this one in the request was
                    # counted for this worker (or registered as a fork to it), and only
                    # the object decoding makes of it releases that count. Stopped here,
                    # those counts stayed on their owners for good. The worker refuses
                    # the request once it is decoded (its RRefs then released).
                    if self.gone is None:
                        self.gone = _gone(w, rid)
                    return None
                _add(w, rid, (w.name, w.id))
                return RRef._handle(w, owner, rid)
            if type(tag) is not int or not 0 < tag < 1 << 64:
                raise ProtocolError(f"malformed RRef: fork tag {short_repr(tag)}")
            fk = self.peer_key
            if owner == w.name:
                _accepted(w, rid, (fk, tag), (w.name, w.id))
            else:
                _tell(w, owner, _accept, (rid, *fk, tag, w.name, w.id))
        return RRef._handle(w, owner, rid)

    def abandoned(self) -> None:
        """The call's caller stopped waiting; its late reply will still be decoded
        with these hooks (nothing to do for RRefs: those in it are released)."""

    def answered(self) -> None:
        """The late reply of an abandoned call came (or never will: its connection
        closed)."""

    def refused(self) -> None:
        """The callee refused the call before running it (nothing for RRefs: the callee
        released those in it)."""

    def unreadable(self, exc: Exception, reply: bool) -> None:
        """Decoding this message (a ``reply``, else a request) failed part way with
        ``exc`` (nothing for RRefs: those decoded before are released when dropped)."""

    def lost(self) -> None:
        """The connection closed without a goodbye before the reply to this message's
        call came, or the abandoned call was dropped (beyond MAX_ABANDONED): the reply
        may have been sent, and be lost (nothing to do for RRefs)."""

    def undo(self) -> None:
        """The message was not sent: take back the counts added for it, here and on the
        owners that registered its forks (a registration still under way is taken back
        when its owner answers it, ``_registered``: the take-back then follows it on the
        same connection, and no tombstone is left on the owner; see ``_unfork``)."""
        self.undone = True
        take_back_given(self.worker, self.peer, self.conn, (self.added, self.registered, self.tag))
        self.added = self.registered = self.forks = None


def given(hooks: Hooks) -> tuple[Any, ...] | None:
    """What encoding a reply (with ``hooks``) counted for its receiver, its forks
    registered: kept by the sender until it knows whether the reply was read (see
    take_back_given); None: nothing."""
    if hooks.added or hooks.registered:
        return (hooks.added, hooks.registered, hooks.tag)
    return None


def take_back_given(worker: Worker, peer: str, conn: Any, kept: tuple[Any, ...]) -> None:
    """The counts a message to ``peer`` made (``given``) go back: a reply whose caller
    gave up the call before it came, and never reads it; a message not sent
    (``Hooks.undo``). Only those of that message: a later holder's, or the peer's other
    counts of the same values, stay."""
    _take_back_from(worker, peer_key(worker, peer, conn) if kept[0] else None, kept)


def _take_back_from(worker: Worker, key: Key | None, kept: tuple[Any, ...]) -> None:
    """take_back_given for holder ``key`` (None: ``kept`` added no count here)."""
    added, registered, tag = kept
    if added and key is not None:
        for rid in added:
            _sub(worker, rid, key)
    if registered:
        for owner, rids in registered:
            _take_back(worker, owner, tag, rids)


class TensorHooks(Hooks):
    """RRef hooks merged with the interceptor's tensor hooks."""

    __slots__ = ("th",)

    def __init__(self, worker: Worker, peer: str, conn: Any, th: Any) -> None:
        super().__init__(worker, peer, conn)
        self.th = th

    def tensor_out(self, t: Any) -> Any:
        f = getattr(self.th, "tensor_out", None)
        return f(t) if f is not None else None

    def tensor_in(self, array: Any, requires_grad: bool, link: Any) -> Any:
        return self.th.tensor_in(array, requires_grad, link)

    def _tell(self, event: str) -> None:
        """Call the tensor hooks' method ``event``, when they have one."""
        f = getattr(self.th, event, None)
        if f is not None:
            f()

    def undo(self) -> None:
        super().undo()
        self._tell("undo")

    def abandoned(self) -> None:
        self._tell("abandoned")

    def refused(self) -> None:
        # (its arguments never reached the context there: what their encoding recorded
        # here goes, as for a call that never left)
        self._tell("undo")

    def answered(self) -> None:
        self._tell("answered")

    def unreadable(self, exc: Exception, reply: bool) -> None:
        f = getattr(self.th, "unreadable", None)
        if f is not None:
            f(exc, reply)

    def lost(self) -> None:
        self._tell("lost")


async def register_forks(worker: Worker, hooks: Hooks) -> None:
    """Register the forks of a message with their owners (and wait for the acks).

    The registrations go on when this is cancelled (a timeout): each owner's
    acknowledgement is read by ``_registered``, which takes the count back at once if
    the message was given up (``hooks.undo``) meanwhile, as it does when the
    registration failed with its owner reached or not (WorkerLost).

    Raises the first failure: WorkerLost whose ``peer`` is the owner that could not be
    reached (None: this worker shuts down), or the owner's refusal (RemoteError)."""
    # (no RRef in this frame's locals: a failure's traceback holds the frame; the
    # comprehension's own scope keeps them out)
    by_owner = {
        _register(worker, hooks, owner, entries, refs): owner
        for owner, (entries, refs) in _entries_by_owner(hooks.forks or (), hooks.peer_key).items()
    }
    hooks.forks = None
    if by_owner:
        await asyncio.wait(by_owner)  # (not asyncio.gather: cancelling us must not cancel them)
        failed = [(f, owner) for f, owner in by_owner.items() if f.exception() is not None]
        # (raised, the error's traceback holds this frame: kept, the futures holding
        # the error made a cycle that kept the message's arguments, RRefs among them)
        del by_owner
        if failed:
            exc, owner = failed[0][0].exception(), failed[0][1]
            del failed
            assert exc is not None
            if isinstance(exc, WorkerLost) and not worker._closing:
                # (a new one naming the owner as the worker lost: the registration's own
                # said nothing of whom; the message's sender says what it was for. Not
                # when this worker shuts down: that failed it, not the owner)
                exc = WorkerLost(str(exc), peer=owner)
            try:
                raise exc
            finally:
                del exc


def _register(
    worker: Worker, hooks: Hooks, owner: str, entries: list[list[Any]], refs: list[RRef]
) -> asyncio.Future[Any]:
    """Send ``owner`` the registration of ``entries`` (the forks of ``refs``)."""
    fut = worker.call_nowait(
        owner,
        "actorgrad.runtime.rref:_add_holders",
        (entries, worker.name, worker.id, hooks.tag),
    )
    # The forker's own RRefs (its counts) are kept until the owner answered: dropped
    # before (a reply's result is, once encoded), their release could reach the owner
    # first, and free a value the forker alone held before the registration counted
    # the receiver. The two do not always go out in order: with no connection to the
    # owner yet, a release queued behind an accept whose connection is being made went
    # out before the registration, whose request waited for the same connection.
    fut.add_done_callback(functools.partial(_registered, hooks, owner, entries, refs))
    return fut


def _entries_by_owner(
    forks: Iterable[RRef], holder: Key
) -> dict[str, tuple[list[list[Any]], list[RRef]]]:
    """The registrations of ``forks`` for ``holder``, by owner: [id, name, cluster id]
    entries, and the RRefs."""
    by_owner: dict[str, tuple[list[list[Any]], list[RRef]]] = {}
    for r in forks:
        entries, refs = by_owner.setdefault(r.owner, ([], []))
        entries.append([r._rid, *holder])
        refs.append(r)
    return by_owner


def _registered(
    hooks: Hooks,
    owner: str,
    entries: list[list[Any]],
    refs: list[RRef],
    fut: asyncio.Future[Any],
) -> None:
    # (``refs``: held until now, see _register)
    if fut.cancelled():
        return  # (our shutdown)
    rids = [e[0] for e in entries]
    exc = fut.exception()
    if exc is not None:
        if isinstance(exc, WorkerLost):
            # (the request may have reached the owner, which then registers it when it
            # reads it: an owner hung past the heartbeat timeout, a connection that
            # closed after sending. Taken back: see the module doc)
            _take_back(hooks.worker, owner, hooks.tag, rids)
        return  # (else not registered: the owner refused it, or it never left)
    if hooks.undone:
        _take_back(hooks.worker, owner, hooks.tag, rids)
    else:
        if hooks.registered is None:
            hooks.registered = []
        hooks.registered.append((owner, rids))


def _take_back(worker: Worker, owner: str, tag: int, rids: list[int]) -> None:
    """Forks registered (or maybe registered) for a message that was not sent: their
    counts, and the owner's record of them as pending, go back (see ``_unfork``)."""
    _tell(worker, owner, _unfork, (worker.name, worker.id, tag, rids))


# ---- internal RPC targets (run on the owner) -------------------------------------------
# (inline: they change the owner's counts, which the loop changes too; a plain
# function's first calls would run in the worker's thread pool)


@inline
def _fetch(rid: int) -> Any:
    from actorgrad.runtime.worker import current_worker

    return owned_value(current_worker(), rid)


@inline
def _add_holders(entries: list[Any], forker: str, forker_id: int, tag: int) -> None:
    """On the owner: process ``forker_id`` of ``forker`` forks RRefs in its message
    ``tag`` (entries: id, receiver name, receiver's cluster id)."""
    from actorgrad.runtime.worker import current_worker

    w = current_worker()
    reg = _reg_of(forker, forker_id, tag)
    if type(entries) is not list or not all(type(e) is list and len(e) == 3 for e in entries):
        raise TypeError(
            f"malformed fork entries {short_repr(entries)}: a list of [RRef id, receiver, "
            "receiver's cluster id] triples is expected"
        )
    if w._rref_withdrawn and w._rref_withdrawn.pop(reg, None) is not None:
        # (its forker gave up on it and took it back before it came here: see _unfork)
        return
    if reg[0] in w._rref_departed:
        # Read after this worker heard its forker leave the cluster (it sent it, then
        # died): the message it was for never left (it waited for this answer), and
        # the settle of the forker's forks ran before it came. Counted, its receiver
        # stayed a holder for good. (A forker alive after all is refused, as for a
        # value that went: it takes back nothing, and does not send the message.)
        # (not WorkerLost: the forker took that for a registration it cannot know the
        # outcome of, and sent a take-back for it)
        raise LookupError(
            f"worker {forker!r} (cluster id {forker_id}) left the cluster: worker "
            f"{w.name!r} takes no RRef registration of it any more"
        )
    # All or nothing: the forker takes nothing back from a registration that failed (a
    # live RRef's count, made before a stale one in the same message was refused,
    # stayed for good).
    keyed = []
    for rid, name, pid in entries:
        if _owned(w, rid) is None:
            raise _gone(w, rid)
        keyed.append((rid, _key_of(name, pid)))
    for rid, holder in keyed:
        if holder in w._rref_departed:  # (gone: no accept will come, see peer_lost)
            continue
        _add(w, rid, holder)
        _fork(w.owned[rid], reg, holder, 1)


def _accepted(worker: Worker, rid: int, reg: Reg, holder: Key) -> None:
    o = _owned(worker, rid)
    if o is not None and o.forks:
        _fork(o, reg, holder, -1)


@inline
def _accept(rid: int, forker: str, forker_id: int, tag: int, holder: str, holder_id: int) -> None:
    """On the owner: ``holder`` decoded an RRef ``forker`` forked to it in its message
    ``tag``."""
    from actorgrad.runtime.worker import current_worker

    reg = _reg_of(forker, forker_id, tag)
    _accepted(current_worker(), rid, reg, _key_of(holder, holder_id))


#: Most registrations a worker keeps as taken back before they came (see _unfork).
MAX_WITHDRAWN = 1 << 16
#: How long a take-back waits here for its registration (see _unfork). The
#: registration left before the take-back did: once this worker reads the take-back,
#: the registration is read within a few turns of its loop, or it never comes (it never
#: left the forker, which could not connect; or it went down with its connection).
WITHDRAWN_TTL = 60.0


@inline
def _unfork(forker: str, forker_id: int, tag: int, rids: list[Any]) -> None:
    """On the owner: ``forker`` takes back the forks of RRefs ``rids`` it registered
    (or may have: it gave up waiting) in its message ``tag``, which was not sent.

    The registration may still be on its way (on a connection closed since, read after
    this one): then it is remembered as withdrawn for ``WITHDRAWN_TTL``, and dropped
    when it comes."""
    from actorgrad.runtime.worker import current_worker

    w = current_worker()
    reg = _reg_of(forker, forker_id, tag)
    if type(rids) is not list or not all(type(rid) is int for rid in rids):
        raise TypeError(f"malformed RRef ids {short_repr(rids)}")
    seen = False
    for rid in set(rids):
        o = _owned(w, rid)
        f = o.forks.pop(reg, None) if o is not None and o.forks else None
        if f is not None:  # (no accept came: the message was not sent)
            seen = True
            _sub(w, rid, f[0], f[1])
    if not seen:
        withdrawn = w._rref_withdrawn
        now = time.monotonic()
        _drop_expired(withdrawn, now)
        if len(withdrawn) < MAX_WITHDRAWN:
            withdrawn[reg] = now + WITHDRAWN_TTL
            if w._rref_withdrawn_timer is None:
                w._rref_withdrawn_timer = w.loop.call_later(WITHDRAWN_TTL, _expire_withdrawn, w)


def _expiry(record: Any) -> float:
    """When a record of _rref_lost_given or _rref_lost_sent expires (its third item)."""
    when: float = record[2]
    return when


def _drop_expired(
    records: dict[Any, Any], now: float, expiry: Callable[[Any], float] | None = None
) -> list[Any]:
    """Drop the records expired by ``now`` (``expiry(value)``: when one expires; None:
    the value itself), the oldest first: insertion order is expiry order. The values
    dropped."""
    dropped = []
    while records:
        first = next(iter(records))
        value = records[first]
        if (value if expiry is None else expiry(value)) > now:
            break
        dropped.append(records.pop(first))
    return dropped


def _at_next_expiry(
    worker: Worker,
    records: dict[Any, Any],
    expiry: Callable[[Any], float] | None,
    expire: Callable[[Worker], None],
    now: float,
) -> asyncio.TimerHandle | None:
    """The timer that calls ``expire(worker)`` when the oldest of ``records`` expires
    (see _drop_expired), None if there are none."""
    if not records:
        return None
    value = records[next(iter(records))]
    left = (value if expiry is None else expiry(value)) - now
    return worker.loop.call_later(left, expire, worker)


def _expire_withdrawn(worker: Worker) -> None:
    """Drop the take-backs kept past WITHDRAWN_TTL, then again at the next expiry while
    any are left. (Dropped only as a later take-back came, the last ones stayed for
    good: a receiver that died under forks to it left its forkers' take-backs, of
    registrations that had come, on the owner.)"""
    worker._rref_withdrawn_timer = None
    if worker.closed:
        return
    withdrawn = worker._rref_withdrawn
    now = time.monotonic()
    _drop_expired(withdrawn, now)
    worker._rref_withdrawn_timer = _at_next_expiry(worker, withdrawn, None, _expire_withdrawn, now)


#: How long a callee keeps what its replies on a connection that broke without a
#: goodbye counted for the caller (see keep_lost_given), for the caller's word of
#: which it never read: sent as the caller's end closes, at once for a reset, after its
#: heartbeat timeout for a silent network, and again every RETRY_DELAY while the
#: caller cannot reach this worker. Past it, those counts stay until the caller
#: leaves the cluster.
LOST_GIVEN_TTL = 120.0
#: Most such replies kept at once, over all connections: the oldest connection's go
#: first (each connection keeps the latest Worker MAX_GIVEN = 4,096).
MAX_LOST_GIVEN = 1 << 16
#: The wire name of the caller's word (see tell_unread).
_UNREAD = "actorgrad.runtime.rref:_unread"


def keep_lost_given(worker: Worker, conn: Any) -> None:
    """``conn`` (a connection with ``conn.peer_name``) closed without the goodbye of a
    peer that leaves the cluster: what the replies on it counted for the peer (``conn.given``, see
    Worker._keep_given) is kept for LOST_GIVEN_TTL under ``conn.pair_id``. The peer may
    not have read some of them (lost in the socket buffers with the connection): it
    says which, on another connection (``_unread``). Without this, the values those
    replies counted stayed until the peer left the cluster."""
    given = conn.given or {}
    key = peer_key(worker, conn.peer_name, conn)
    lost = worker._rref_lost_given
    _drop_lost_given(worker, time.monotonic())
    # (with how many frames of the peer's were read on it: see _unread)
    lost[conn.pair_id] = (key, given, time.monotonic() + LOST_GIVEN_TTL, conn.frames_in)
    worker._rref_lost_given_n += max(1, len(given))
    while worker._rref_lost_given_n > MAX_LOST_GIVEN:  # (the oldest first)
        worker._rref_lost_given_n -= max(1, len(lost.pop(next(iter(lost)))[1]))
    if worker._rref_lost_given_timer is None:
        worker._rref_lost_given_timer = worker.loop.call_later(
            LOST_GIVEN_TTL, _expire_lost_given, worker
        )


def _drop_lost_given(worker: Worker, now: float) -> None:
    for rec in _drop_expired(worker._rref_lost_given, now, _expiry):
        worker._rref_lost_given_n -= max(1, len(rec[1]))


def _expire_lost_given(worker: Worker) -> None:
    """Drop the records of keep_lost_given kept past LOST_GIVEN_TTL, then again at the
    next expiry while any are left."""
    worker._rref_lost_given_timer = None
    if worker.closed:
        return
    now = time.monotonic()
    _drop_lost_given(worker, now)
    worker._rref_lost_given_timer = _at_next_expiry(
        worker, worker._rref_lost_given, _expiry, _expire_lost_given, now
    )


def tell_unread(worker: Worker, name: str, conn: Any, cids: list[int]) -> None:
    """On a caller: ``conn``, a connection with worker ``name``, closed without a
    goodbye from it, and this worker never read the replies to calls ``cids`` on it:
    the callee takes back what they counted for this worker (see _unread). Sent on
    another connection (made for it if need be), kept and sent again like a release
    (see _tell) while ``name`` cannot be reached. With it, if requests still pending
    on it counted RRefs for ``name`` (see keep_lost_sent), the question how many of
    this worker's frames ``name`` read there (answered by _frames_read)."""
    ask = keep_lost_sent(worker, name, conn)
    _tell(worker, name, _UNREAD, (worker.name, worker.id, conn.pair_id, cids, ask))


def sent_on(conn: Any, hooks: Hooks) -> None:
    """A request whose encoding (``hooks``) counted RRefs for the peer was just queued
    on ``conn``: note how many frames have gone there with it (its frame's number, one
    up), to tell, should the connection break, whether the peer read it (see
    keep_lost_sent). (Connections without frame tags, in-process ones, do not break.)"""
    if hooks.added or hooks.registered:
        hooks.seq = _queued_number(conn)


def _queued_number(conn: Any) -> int:
    """The number of the frame just queued on ``conn`` (see sent_on, _told_on); 0 where
    frames carry none (in-process connections)."""
    mac = conn._mac_out
    if mac is None:
        return 0
    t = conn.transport
    # (a transport closing, a reset read and its loss not reported yet, took nothing:
    # the frame was never numbered, and mac.seq, the frame before it, one the peer
    # read, took it for read too, its counts kept for good. Nothing is numbered after
    # that: one up is a frame never read)
    seq: int = mac.seq + 1 if t is None or t.is_closing() else mac.seq
    return seq


#: Most requests kept at once by keep_lost_sent, over all connections.
MAX_LOST_SENT = 1 << 16


def keep_lost_sent(worker: Worker, name: str, conn: Any) -> bool:
    """On a caller: ``conn`` closed without a goodbye from ``name``; its requests still
    pending (and those given up with an interceptor's hooks) that counted RRefs for
    ``name`` (its counts of our values, forks registered for it) may never have been
    read there (lost in the socket buffers): ``name`` never decodes them, nor releases
    what they counted, which stayed until it left the cluster. Kept, for
    LOST_GIVEN_TTL, with each one's frame number, until ``name`` says how many frames
    it read there (_frames_read). True: some are kept. So are the one-way RRef
    messages queued there (_told_on), to go again if ``name`` never read them."""
    sent = [
        (h.seq, kept)
        for h in (*(hooks for _, hooks in conn.pending.values()), *conn.abandoned.values())
        if h.seq and not h.undone and (kept := given(h)) is not None
    ]
    told = list(conn.told or ())
    if not sent and not told:
        return False
    lost = worker._rref_lost_sent
    now = time.monotonic()
    _drop_expired(lost, now, _expiry)
    while len(lost) >= MAX_LOST_SENT:  # (the oldest: at most one per connection)
        del lost[next(iter(lost))]
    lost[conn.pair_id] = (peer_key(worker, name, conn), sent, now + LOST_GIVEN_TTL, told)
    if worker._rref_lost_sent_timer is None:
        worker._rref_lost_sent_timer = worker.loop.call_later(
            LOST_GIVEN_TTL, _expire_lost_sent, worker
        )
    return True


def _expire_lost_sent(worker: Worker) -> None:
    worker._rref_lost_sent_timer = None
    if worker.closed:
        return
    lost = worker._rref_lost_sent
    now = time.monotonic()
    _drop_expired(lost, now, _expiry)
    worker._rref_lost_sent_timer = _at_next_expiry(worker, lost, _expiry, _expire_lost_sent, now)


@inline
def _frames_read(peer: str, peer_id: int, pair: int, n: int) -> None:
    """On a caller: ``peer`` read ``n`` frames of ours on the connection ``pair``
    before its end closed (it asked, see tell_unread): the requests kept for it
    (keep_lost_sent) that went after those never reached its decoding, and what they
    counted for it goes back. (Frames come in order, and each is numbered as it is
    queued: one read is numbered ``n`` or less.)"""
    from actorgrad.runtime.worker import current_worker

    w = current_worker()
    key = _key_of(peer, peer_id)
    if type(pair) is not int or type(n) is not int:
        raise TypeError(f"malformed frames read: connection {short_repr(pair)}, {short_repr(n)}")
    rec = w._rref_lost_sent.get(pair)
    if rec is None or rec[0] != key:  # (expired)
        return
    del w._rref_lost_sent[pair]
    for seq, kept in rec[1]:
        if seq > n:
            _take_back_from(w, key, kept)
    for seq, fn, args in rec[3]:  # (in the order they went)
        if seq > n:  # (never read there: lost with it)
            _tell(w, peer, fn, args)


@inline
def _unread(holder: str, holder_id: int, pair: int, cids: list[Any], ask: bool = False) -> None:
    """On a callee: ``holder`` never read the replies to calls ``cids`` on the
    connection ``pair`` (its end closed without a goodbye of this worker's): what they
    counted for it goes back. That connection may be open still here (this end has
    not seen the break: a network fault, the reset not read yet): then a reply to one
    made later counts nothing (see Worker._keep_given); else its record is the one
    keep_lost_given kept.

    ``ask``: the holder also asks how many of its frames this worker read on that
    connection (its requests that counted RRefs for this worker may not have come
    through: see keep_lost_sent), answered by ``_frames_read``. An end still open
    here is closed first (the holder's is: nothing more of it is read there), so the
    answer holds."""
    from actorgrad.runtime.worker import current_worker

    w = current_worker()
    key = _key_of(holder, holder_id)
    if type(pair) is not int or type(cids) is not list or not all(type(c) is int for c in cids):
        raise TypeError(
            f"malformed unread replies: connection {short_repr(pair)}, calls {short_repr(cids)}"
        )
    # (open here: taken from the connection's record, and closed if asked, which made
    # the record read below, of what the other replies counted and of the frames read)
    w.replies_unread(key, pair, cids, ask is True)
    rec = w._rref_lost_given.get(pair)
    if rec is None or rec[0] != key:  # (expired, or open here and not asked)
        return
    del w._rref_lost_given[pair]  # (the caller names them once: the rest it read)
    given = rec[1]
    w._rref_lost_given_n -= max(1, len(given))
    for cid in cids:
        kept = given.pop(cid, None)
        if kept is not None:
            _take_back_from(w, key, kept)
    if ask is True and rec[3] is not None:
        _tell(w, holder, _frames_read, (w.name, w.id, pair, rec[3]))


#: How long a receiver waits to have handled everything a gone forker sent it before
#: it answers the owner's settle anyway (a peer that died on a remote host may leave
#: its connection open until the heartbeat or idle timeout closes it).
SETTLE_TIMEOUT = 10.0


async def _handled_all_of(worker: Worker, forker: Key) -> None:
    """Return once every frame the process ``forker`` sent here was handled: its
    connections closed, nothing of it waiting in the mailbox (at most SETTLE_TIMEOUT).
    (Not another process of its name: a new one's open connection held every settle of
    the old one's forks for SETTLE_TIMEOUT.)"""
    deadline = worker.loop.time() + SETTLE_TIMEOUT
    while worker.holds_frames_of(*forker) and worker.loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # (a rare recovery path: no event to wait for)


async def _settle_forks(forker: str, forker_id: int, owner: str) -> None:
    """On a receiver: ``forker`` left; once everything it sent here was handled, tell
    ``owner``, behind the accepts of those frames (the same connection)."""
    from actorgrad.runtime.worker import current_worker

    # (checked here: the owner got them back in its _forks_settled, one-way, whose
    # failure only it logged; the caller, the owner, heard nothing)
    gone = _key_of(forker, forker_id)
    if type(owner) is not str:
        raise TypeError(f"malformed RRef owner {short_repr(owner)}")
    w = current_worker()
    await _handled_all_of(w, gone)
    _tell(w, owner, _forks_settled, (forker, forker_id, w.name, w.id))


async def _settle_here(worker: Worker, forker: Key) -> None:
    """The owner's own share of a settle (RRefs ``forker`` forked back to it)."""
    await _handled_all_of(worker, forker)
    _forks_settled_here(worker, forker, (worker.name, worker.id))


def _forks_settled_here(worker: Worker, forker: Key, holder: Key) -> None:
    for rid, o in list(worker.owned.items()):
        if not o.forks:
            continue
        for reg, (h, n) in list(o.forks.items()):
            if reg[0] == forker and h == holder:
                # (their messages never came: the forker died before or while sending)
                del o.forks[reg]
                _sub(worker, rid, holder, n)


@inline
def _forks_settled(forker: str, forker_id: int, holder: str, holder_id: int) -> None:
    """On the owner: ``holder`` handled everything the gone ``forker`` sent it: the
    forks still pending from one to the other never arrived."""
    from actorgrad.runtime.worker import current_worker

    _forks_settled_here(current_worker(), _key_of(forker, forker_id), _key_of(holder, holder_id))


@inline
def _decref(rid: int, holder: str, holder_id: int, seq: int = 0) -> None:
    """On the owner: ``holder`` released an RRef to ``rid``, its release number ``seq``
    to this process (0: not numbered, taken as it comes). A numbered one is taken once
    (the holder sends again those not acknowledged when a connection breaks: a copy of
    one read before must not take a count it still holds) and acknowledged (see
    _Releases)."""
    from actorgrad.runtime.worker import _current_conn, current_worker

    w = current_worker()
    key = _key_of(holder, holder_id)
    if type(seq) is not int or seq < 0:
        raise TypeError(f"malformed RRef release number {short_repr(seq)}")
    if seq:
        if type(rid) is not int or rid >> LOCAL_ID_BITS != w.id:
            # (for an earlier process of this name: nothing of it here, nor are its
            # numbers this one's; the holder forgets it when it hears that one left)
            return
        if key in w._rref_departed:
            # (from a holder this worker heard leave, whose counts went: taken as
            # nothing, and acknowledged at once, or one that goes on, dropped by the
            # head, kept each of its releases for good)
            conn = _current_conn.get(None)
            if conn is not None:
                w.notify_on(conn, _RELEASED, (w.name, w.id, holder_id, seq))
            return
        seen = w._rref_seen.get(key)
        if seen is None:
            seen = w._rref_seen[key] = _Seen()
        _ack_later(w, key, _current_conn.get(None))
        if not seen.take(seq):
            return
    _sub(w, rid, key)


@inline
def _released(owner: str, owner_id: int, holder_id: int, low: int) -> None:
    """On a holder: ``owner`` took every release this process (``holder_id``) sent it up
    to number ``low``: they are not kept any more."""
    from actorgrad.runtime.worker import current_worker

    w = current_worker()
    key = _key_of(owner, owner_id)
    if type(holder_id) is not int or type(low) is not int:
        raise TypeError(f"malformed RRef release acknowledgement {short_repr([holder_id, low])}")
    rel = w._rref_releases.get(key)
    if rel is None or holder_id != w.id:  # (an earlier process of this name's)
        return
    unacked = rel.unacked
    while unacked and unacked[0][0] <= low:
        unacked.popleft()
