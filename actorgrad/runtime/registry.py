"""The cluster registry, hosted by the first worker (the head).

It gives each worker a unique id in [1, 2**16) and the addresses of the others. Workers
join over a connection to the head (``_join``), whose answer holds the member list;
the head then pushes each membership change alone to all members (``_member``, one-way
on the join connections, versioned: a member that sees a gap fetches the whole list,
``_snapshot``). A member whose join connection closes has left.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actorgrad import wire
from actorgrad.errors import ProtocolError, short_repr
from actorgrad.runtime.calls import inline

if TYPE_CHECKING:
    from actorgrad.runtime.transport import Connection
    from actorgrad.runtime.worker import Worker

log = logging.getLogger("actorgrad.runtime")

MAX_ID = 2**16
#: a cluster's identity (``Registry.key``) is in [1, CLUSTER_KEYS); 0 says "none"
CLUSTER_KEYS = 2**64
#: Ids a worker makes (RRef ids; distributed autograd's context ids) hold its cluster id
#: above this many bits of its own count: unique across the cluster with no coordination
#: (a process that joins under a dead one's name has another cluster id).
LOCAL_ID_BITS = 48
#: the longest worker name (in characters)
MAX_NAME = 255


def issued_before(a: int, b: int) -> bool:
    """Whether the registry issued cluster id ``a`` before ``b`` (both in [1, MAX_ID)).
    Ids are issued in turn and wrap around after MAX_ID - 1 (the head's 1 skipped as
    used): after 65,534 joins a process can get a smaller id than one it replaces, so
    "smaller" alone took the new for the old and the old for the new. Read in serial
    number arithmetic (RFC 1982): the half of the cycle behind ``b`` is older."""
    return 0 < (b - a) % (MAX_ID - 1) < (MAX_ID - 1) // 2


class NameTaken(ValueError):
    """A join refused because a member holds the name. Its own type (a ValueError, as
    documented for a join) so that ``actorgrad worker --wait`` can tell it from the
    refusals that waiting does not cure (a bad name, a name kept for another process):
    a supervisor restarting a worker whose predecessor the head still holds (a dead
    host's connection open until the head's silence timeout, or a process still
    leaving) waits for the name instead of failing at once."""


def _printable_word(x: Any, most: int) -> bool:
    """Whether ``x`` is a str of 1 to ``most`` printable characters without whitespace
    (what goes into log lines and the CLI's output as it came from the wire)."""
    return (
        isinstance(x, str)
        and 0 < len(x) <= most
        and x.isprintable()  # (False for every whitespace but " ")
        and " " not in x
    )


def valid_name(name: Any) -> bool:
    """Whether ``name`` can name a worker on the wire: a str of 1 to MAX_NAME printable
    characters without whitespace (names go into log lines and the CLI's output)."""
    return _printable_word(name, MAX_NAME)


#: the longest address a worker joins with (a host name of 253 characters, an IPv6
#: address with its scope, a port: far less)
MAX_ADDRESS = 512


def valid_address(address: Any, blank: bool = False) -> bool:
    """Whether ``address`` (``blank``: or "") can be a member's address (or local socket
    name) from the wire: a str of printable characters without whitespace, as a name
    (addresses go into every member's view, the CLI's status table and log lines)."""
    return (blank and address == "") or _printable_word(address, MAX_ADDRESS)


class Registry:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # name -> (id, address, local socket name or "")
        self.members: dict[str, tuple[int, str, str]] = {
            worker.name: (1, worker.address, worker.local_address)
        }
        worker.id = 1
        # The cluster's identity, made here at its start, handed to each member in its
        # join's answer and said in every hello after (see Worker.cluster): names and
        # cluster ids are alike in any two clusters (w1.., ids from 1), so two given
        # one token took each other's workers for their own without it.
        worker.cluster = (secrets.randbelow(CLUSTER_KEYS - 1) + 1, worker.address)
        self.version = 0
        self.conns: dict[Connection, str] = {}
        self._next_id = 2
        self._changed = asyncio.Event()
        self.closed = False
        # called with ("joined" or "left", name, address) on each change (the CLI's log)
        self.listeners: list[Callable[[str, str, str], None]] = []
        # name -> key: names kept for the worker processes the head started, until
        # they join with the key they were given (anyone holding the token could take
        # "w30" while the cluster's own w30 was starting, and that one failed)
        self.reserved: dict[str, str] = {}
        worker._apply_members(*self.snapshot())

    def reserve(self, names: list[str], key: str) -> None:
        """Keep ``names`` for joins that give ``key``."""
        for name in names:
            self.reserved[name] = key

    def snapshot(self) -> tuple[int, dict[str, list[Any]]]:
        return self.version, {n: list(entry) for n, entry in self.members.items()}

    def _alloc_id(self) -> int:
        used = {entry[0] for entry in self.members.values()}
        for _ in range(MAX_ID):
            i = self._next_id
            self._next_id = i + 1 if i + 1 < MAX_ID else 1
            if i not in used:
                return i
        raise RuntimeError("the cluster is full (65535 workers)")

    def join(
        self, name: str, address: str, local: str, conn: Connection, key: str = ""
    ) -> list[Any]:
        if self.closed:
            raise RuntimeError("the cluster is shutting down")
        if not valid_name(name):
            raise ValueError(f"invalid worker name {name!r:.80}")
        kept = self.reserved.get(name)
        # (as bytes: compare_digest refuses a str with non-ASCII characters, a TypeError)
        if kept is not None and not (
            isinstance(key, str) and hmac.compare_digest(key.encode(), kept.encode())
        ):
            raise ValueError(
                f"the name {name!r} is kept for the worker process of that name the "
                "cluster is starting: join under another name"
            )
        if name in self.members:
            raise NameTaken(self._taken(name))
        if conn.peer_name != name:
            raise ValueError(
                f"cannot join as {name!r:.80} over a connection that said hello as "
                f"{conn.peer_name!r:.80}"
            )
        if not (valid_address(address) and valid_address(local, blank=True)):
            # (a str was taken as it came, a newline or a terminal escape in it; and
            # another value was shown with its whole repr)
            raise ValueError(
                f"invalid address {short_repr(address, 80)} / {short_repr(local, 80)} of "
                f"worker {name!r}"
            )
        wid = self._alloc_id()
        self.members[name] = (wid, address, local)
        self.reserved.pop(name, None)
        self.conns[conn] = name
        # (its hello on this connection came before it had an id: it said 0)
        conn.peer_id = wid
        self._changed_now(name, "joined", address)
        return [wid, *self.snapshot(), list(self.worker.cluster)]

    def _taken(self, name: str) -> str:
        """Why a join under ``name``, a member's, is refused: naming the holder (its
        cluster id and address: a second host started under the name, or the process
        being replaced) and, when the head has not heard from it for longer than a live
        member stays silent (it pings at least every ``IDLE_TIMEOUT / 6``), for how
        long: a dead host's connection stays open until the head drops it."""
        from actorgrad.runtime.worker import IDLE_TIMEOUT

        wid, address, _ = self.members[name]
        said = f"a worker named {name!r} is already in the cluster (cluster id {wid}, at {address}"
        now = time.monotonic()
        heard = [now - c.last_recv for c, n in self.conns.items() if n == name and not c.closed]
        if heard and min(heard) > IDLE_TIMEOUT / 5:
            said += (
                f"; silent for {min(heard):.0f} s: the head drops a member silent for "
                f"{IDLE_TIMEOUT:g} s"
            )
        return said + ")"

    def leave(self, name: str) -> None:
        if name in self.members and name != self.worker.name:
            address = self.members.pop(name)[1]
            for c, n in list(self.conns.items()):
                if n == name:
                    del self.conns[c]
            self._changed_now(name, "left", address)

    def _tell(self, what: str, name: str, address: str) -> None:
        # A listener's failure is its own, logged: raised, it failed the join it was
        # told of after the member was in and every member told so (the joiner took
        # itself for refused), and on a leave it escaped into the closed connection's
        # callback, the listeners after it never told (the CLI's, printing a name its
        # stdout could not encode).
        for fn in list(self.listeners):
            try:
                fn(what, name, address)
            except Exception:
                log.exception("a listener of the cluster's members failed on %r %s", name, what)

    def conn_lost(self, conn: Connection) -> None:
        name = self.conns.pop(conn, None)
        if name is not None and not self.closed:
            self.leave(name)

    def _changed_now(self, name: str, what: str, address: str) -> None:
        """Worker ``name`` (at ``address``) joined or left (``what``): the change goes to
        every member (and this worker's own view), then to the listeners."""
        from actorgrad.runtime.worker import K_REQ, MODE_RPC

        self.version += 1
        entry = self.members.get(name)
        wire_entry = None if entry is None else list(entry)  # (None: it left)
        self.worker._apply_member(self.version, name, wire_entry)
        chunks = wire.encode_frame(
            [K_REQ, 0, "actorgrad.runtime.registry:_member", MODE_RPC, None],
            [[self.version, name, wire_entry], None],
        )
        data = b"".join(bytes(c) for c in chunks)
        failed = []
        for c in list(self.conns):
            if c.closed:
                continue
            try:
                c.send_nowait([data])
            except Exception as exc:
                # One member that cannot be sent the change (its frame limit below it,
                # memory out as it is written): raised, the error kept the change from
                # the members after it, and from the head's own waiters.
                failed.append((c, exc))
        self._changed.set()
        self._changed = asyncio.Event()
        # (before the failed members are dropped below: each one's leave is a change of
        # its own, told in there; told after, a joiner that could not be sent its own
        # join was heard to leave, then to join, the last word of a worker gone)
        self._tell(what, name, address)
        for c, err in failed:
            # (its view would lag for good: it is dropped, as a lost member is; after
            # the loop, so that its leave, a change of its own, comes after this one)
            log.warning("cannot send worker %r the change of %r: %r", self.conns.get(c), name, err)
            c.abort(ProtocolError(f"cannot send this member a change of the membership: {err!r}"))

    async def wait_for(
        self,
        names: list[str],
        timeout: float | None = None,  # noqa: ASYNC109 (a deadline for the whole wait)
        check: Any = None,
    ) -> None:
        """Wait until every name in ``names`` has joined; ``check()`` is called on each
        change (it may raise, e.g. when a worker process died)."""
        async with asyncio.timeout(timeout):
            while True:
                if check is not None:
                    check()
                if all(n in self.members for n in names):
                    return
                ev = self._changed
                try:
                    async with asyncio.timeout(0.1):
                        await ev.wait()
                except TimeoutError:
                    pass

    def close(self) -> None:
        self.closed = True


# ---- internal RPC targets --------------------------------------------------------------
# (inline: they touch the registry, connections and the loop, which a plain function's
# first calls would do from the worker's thread pool)


def _registry() -> Registry:
    from actorgrad.runtime.worker import current_worker

    w = current_worker()
    reg = w.registry
    if reg is None:
        # (ValueError: the caller gave a wrong address; join and status raise it as is)
        raise ValueError(
            f"{w.address} is worker {w.name!r}, not the cluster's head: give the head's "
            "address (the one `actorgrad cluster` printed)"
        )
    return reg


@inline
def _join(name: str, address: str, local: str = "", key: str = "") -> list[Any]:
    from actorgrad.runtime.worker import _current_conn

    return _registry().join(name, address, local, _current_conn.get(), key)


@inline
def _leave(name: str) -> None:
    from actorgrad.runtime.worker import _current_conn

    reg = _registry()
    conn = _current_conn.get()
    # (taken while the head drains; not once it closes, as conn_lost takes none then:
    # the members hear the head go)
    if reg.conns.get(conn) == name and not reg.closed:
        reg.leave(name)


@inline
def _snapshot() -> tuple[Any, ...]:
    return _registry().snapshot()


@inline
def _quiet(name: str, wid: int) -> float:
    """How long process ``wid`` of member ``name`` said it may be silent from now, on
    its connections with the head, its membership one among them (see
    Worker.going_quiet), 0 if it did not."""
    return _registry().worker.quiet_heard(name, wid)


@inline
def _member(version: int, name: str, entry: list[Any] | None) -> None:
    from actorgrad.runtime.worker import _current_conn, current_worker

    w = current_worker()
    conn = _current_conn.get(None)
    if conn is None or conn not in (w.registry_conn, w.joining_conn):
        # (only the head says who is in the cluster: another peer's word made members
        # drop a live worker's contexts and RRef counts)
        raise ProtocolError(
            f"a membership change for {short_repr(name)} from a peer that is not the cluster's head"
        )
    if (
        type(version) is not int
        or not valid_name(name)
        or not (
            entry is None
            or (
                type(entry) is list
                and 2 <= len(entry) <= 3
                and type(entry[0]) is int
                and all(type(x) is str for x in entry[1:])
            )
        )
    ):
        raise ProtocolError(f"malformed membership change {short_repr([version, name, entry])}")
    w._apply_member(version, name, entry)


@inline
def _worker_status() -> dict[Any, Any]:
    from actorgrad.runtime.worker import current_worker

    return _not_counting_this_call(current_worker().status())


def _not_counting_this_call(status: dict[Any, Any]) -> dict[Any, Any]:
    """A worker's status as seen from outside: the status query itself (in flight while
    it is answered) is not counted."""
    status["in_flight"] = max(0, status.get("in_flight", 1) - 1)
    return status


async def _status(timeout: float = 5.0) -> dict[Any, Any]:  # noqa: ASYNC109 (timeout is API)
    from actorgrad.errors import ActorgradError
    from actorgrad.runtime.worker import current_worker

    w = current_worker()
    reg = _registry()

    async def one(name: str, wid: int, address: str) -> dict[Any, Any] | None:
        try:
            if name == w.name:
                return _not_counting_this_call(w.status())
            status: dict[Any, Any] = await w.call(name, _worker_status, timeout=timeout)
            return status
        except (ActorgradError, OSError, ValueError) as exc:
            if reg.members.get(name, (None,))[0] != wid or w.said_goodbye(name, wid):
                # It left the cluster while asked (a driver that ended, as drivers come
                # and go): no row. It was listed as unreachable, and `actorgrad status`
                # exited 1 as for a hung worker. (Or it is leaving: its goodbye on the
                # call's connection came first, its leave comes on the membership.)
                return None
            return {"name": name, "id": wid, "address": address, "error": str(exc)}

    from actorgrad.runtime.worker import natural_key

    entries = sorted(reg.members.items(), key=lambda kv: natural_key(kv[0]))
    rows = await asyncio.gather(*(one(n, e[0], e[1]) for n, e in entries))
    return {"address": w.address, "workers": [r for r in rows if r is not None]}
