"""The worker actor: mailbox, call dispatch, connections, heartbeats, peers.

Execution model (how a CPU-heavy user function cannot starve a worker):

* Requests arrive on connections and go into one bounded mailbox per worker. When it is
  full the worker stops reading from the connection that filled it (``pause_reading``)
  and resumes once the mailbox is half empty, so memory stays bounded and the sender
  feels backpressure through TCP.
* Replies never go through the mailbox: they resolve the caller's future directly from
  the connection's ``data_received``, so a full mailbox can never block a reply
  (no deadlock on re-entrant calls: A -> B -> A is just two independent requests).
* At most ``MAX_IN_FLIGHT`` calls run at once per worker; further requests wait in
  the mailbox (so a flood of calls ends up as TCP backpressure, not unbounded tasks).
  Only more than that many *simultaneously blocked re-entrant* calls into one worker
  could deadlock. A one-way message (cast) waits only behind the requests queued
  before it on its own connection: the calls holding the slots may be waiting for it
  (a backward pass's gradient message from another worker). When the actor is idle
  and nothing waits, a request is started straight from the connection's read
  callback (same order, one loop iteration less).
* The dispatcher task (the actor's "running" phase) starts each request:
  - ``async def`` functions run as tasks on the loop;
  - plain functions run in a thread pool (in a copy of the call's contextvars) until
    they have proven fast (observed under ``FAST_CALL`` seconds ``INLINE_AFTER`` times in
    a row, each without blocking its thread: a call that waited, for a lock or another
    call, proves nothing); after that they run inline on the loop (the tiny-call round
    trip stays fast). An inline call that takes longer than ``FAST_CALL`` sends that function back
    to the pool, so a heavy function can block the loop at most once.
  - plain functions marked ``__actorgrad_inline__ = True`` (:func:`inline`, for short
    non-blocking protocol handlers) always run inline, never in the pool nor timed.
  Every task is owned by the worker (``_tasks``) and cancelled/awaited at teardown.
* Heartbeats: a connection on which either side waits for the other (calls pending,
  a peer watched) is pinged every ``HEARTBEAT_INTERVAL`` when nothing else went out
  (the waiting side asks for it with ``[K_ASK]``), any other one every
  ``IDLE_TIMEOUT / 6``; a connection with calls waiting on it that has received
  nothing for ``HEARTBEAT_TIMEOUT`` (counted from the first ask) is closed, which
  fails those calls with ``WorkerLost`` and reports the peer lost (a silent
  connection without waiting calls is kept until ``IDLE_TIMEOUT``, so a driver busy
  computing is not dropped by its workers; so is a registry membership connection:
  closing it is leaving the cluster). A closed connection (a dead process) does the
  same immediately. A worker whose own loop was
  blocked does not blame its peers for the silence it caused. A peer reported lost
  on a connection's close that answers, on another connection, the probe this worker
  sent it there then (or connects again) is no longer taken for lost; its frames read
  before that answer may have been sent before it died (see ``Worker._old_news``).

Phases: setup (:meth:`Worker.start`: listener, pool, dispatcher, heartbeat), running
(the dispatcher), teardown (:meth:`Worker.shutdown`, one path, idempotent).

Messages (frame headers; bodies are codec values):

* ``[K_REQ, call_id, target, mode, meta]`` body ``[args, kwargs]`` — ``call_id`` 0 is a
  one-way call; ``target`` is ``"module:qualname"``, ``["__main__:qualname", path]`` or
  ``[rref_id, method]`` (RRef modes); ``meta`` is the interceptor's.
* ``[K_OK, call_id]`` body: the result; ``[K_ERR, call_id]`` body: a RemoteError.
* ``[K_CANCEL, call_id]``: the caller stopped waiting for the call (timeout,
  cancellation): a coroutine running it is cancelled, a request still in the mailbox
  refused when its turn comes; either way the caller gets an error reply (dropped
  there), which tells its context the call is over. A plain function in the thread
  pool runs to its end.
* ``[K_CAST, topic]`` body ``args``: a one-way protocol message for the handler
  registered under ``topic`` (:func:`on_cast`); no function lookup, no task, no
  interceptor, no reply (see :meth:`Worker.cast`).
* ``[K_PING]`` (a heartbeat), ``[K_ASK]`` (a heartbeat asking the peer to ping this
  connection every ``HEARTBEAT_INTERVAL`` for the next ``ASK_WINDOW``: this worker
  waits on it), ``[K_ASK, n]`` (probe ``n``, an ask too: this worker reported the
  peer lost, a connection of theirs closed without a goodbye, and asks whether it
  lives; answered at once with ``[K_ECHO, n]``, see :meth:`Worker._probe`),
  ``[K_PING, seconds]`` (this worker may be silent for
  so long, 0: no longer; see :meth:`Worker.going_quiet`), ``[K_HELLO, name, id,
  address, largest frame, goodbyes, cluster key, head address]`` (first frame each
  way after the handshake; ``goodbyes``: how many of the next kind this worker sent
  the peer, see :meth:`Worker._stale_end`; the cluster's identity, 0 and "" before
  its join, see ``Worker.cluster``), ``[K_BYE]`` (graceful close), ``[K_BYE, why, n,
  call ids]`` (closing on a peer it heard nothing from, saying so: its n-th such
  goodbye to it, and the calls on the connection it gave up, see ``_given_up``),
  ``[K_BYE, why, "refused"]`` (closing on a message of the peer's it refused:
  malformed, or a one-way call that cannot start).

Outgoing calls use the connections this worker opened (one per peer, lazily);
requests arriving on incoming connections are answered on them.

Contracts for higher layers (docs/design.md section 3): :func:`current_worker`,
:func:`set_interceptor`, ``Worker.name/id/ext``, :meth:`Worker.add_peer_lost_callback`,
:meth:`Worker.add_status_provider`, :meth:`Worker.call`, :meth:`Worker.call_nowait`,
:meth:`Worker.cast` with :func:`on_cast`, :func:`inline`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import itertools
import logging
import math
import numbers
import os
import re
import signal
import socket
import threading
import time
import weakref
from asyncio import events as asyncio_events
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

try:
    import resource

    _RUSAGE_THREAD: int | None = resource.RUSAGE_THREAD  # (Linux)
    resource.getrusage(resource.RUSAGE_THREAD)  # (a sandbox may refuse it: EINVAL)
except (ImportError, AttributeError, OSError, ValueError):
    _RUSAGE_THREAD = None

from actorgrad import wire
from actorgrad.errors import (
    ActorgradError,
    AuthError,
    ProtocolError,
    RemoteError,
    RpcTimeout,
    WorkerLost,
    clip_text,
    one_each,
    refusal_type,
    short_repr,
    type_name,
)
from actorgrad.runtime import calls, rref, transport
from actorgrad.runtime.pool import CallPool
from actorgrad.runtime.procs import env_address, open_files_count, open_files_limit
from actorgrad.runtime.registry import (
    CLUSTER_KEYS,
    MAX_ID,
    NameTaken,
    Registry,
    issued_before,
    valid_address,
    valid_name,
)
from actorgrad.runtime.transport import Connection

log = logging.getLogger("actorgrad.runtime")

# message kinds (first header entry)
K_REQ, K_OK, K_ERR, K_PING, K_HELLO, K_BYE, K_CAST, K_CANCEL, K_ASK, K_ECHO = range(10)
# (heartbeat 0 a plain ping, 1 one that asks for pings: see Worker._heartbeat)
transport.set_heartbeat_frames(
    b"".join(wire.encode_frame([K_PING], None)), b"".join(wire.encode_frame([K_ASK], None))
)
# request modes
MODE_RPC, MODE_REMOTE, MODE_RREF_RPC, MODE_RREF_REMOTE = range(4)

#: How errors name the parts of a request's body (``(at args[1])``, not ``body[0][1]``).
_CALL = ("args", "kwargs")

#: How often a worker pings a connection someone waits on. Fixed, whatever
#: ``ACTORGRAD_HEARTBEAT_TIMEOUT`` says: the pinging side does not know the timeout its
#: peer judges it by (each process reads its own), so it pings often enough for the
#: shortest one allowed (MIN_HEARTBEAT_TIMEOUT, 4 intervals). Scaled with a longer
#: timeout, a worker set to 30 s would ping every 5 s, and a peer left at the default
#: 3 s would take it for lost between two pings. Pings go out only where someone waits
#: (see Worker._heartbeat), so a longer timeout gains nothing from fewer of them.
HEARTBEAT_INTERVAL = 0.5
#: How long a peer that someone here waits on (calls pending on its connection, a
#: protocol watching it) may send nothing before it is taken for lost: its connections
#: close, the calls waiting on it fail with WorkerLost, a backward pass watching it
#: fails. ``ACTORGRAD_HEARTBEAT_TIMEOUT`` sets it (see read_settings): a loop blocked,
#: or a link stalled, for longer than this makes a live worker look lost; a dead one
#: (its process stopped, its host cut off) is found this long after it went silent. A
#: closed connection (a process that died) is found at once, whatever the setting.
HEARTBEAT_TIMEOUT = 3.0
#: How long a ``[K_ASK]`` keeps its receiver pinging every ``HEARTBEAT_INTERVAL`` (see
#: Worker._heartbeat): part of the protocol, the same on both ends whatever their
#: timeouts (the asker takes a longer gap between its asks for a new start). Not scaled
#: with the timeout: an asker asks every interval, so the window is renewed for as long
#: as the asks get through; when they stop (the link one way stalled) the receiver
#: pings on for this window, and the asker's silence counts from its last ping, so a
#: stall of the asks is tolerated for this window plus the asker's own timeout.
ASK_WINDOW = 3.0
#: Bytes of a message's msgpack part a peer is given a second to decode before its
#: silence counts: at about 2-100 MB/s (empty lists to floats, on the 2-core VM) a
#: 100 MB list of ints kept a callee's loop busy past HEARTBEAT_TIMEOUT, and its
#: caller took the live worker for lost. Arrays travel beside that part: they cost
#: nothing to decode.
SLOW_DECODE_RATE = 500_000
#: Longest each step of connecting to a peer may take (the handshake's 5 s otherwise):
#: a peer that does not answer for the heartbeat timeout is hung, as lost as one silent
#: on an open connection, and a backward pass or a release that waits on it fails as
#: soon (a pipeline stage hung on a relayed gradient failed backward after 5.3 s).
#: Follows ``ACTORGRAD_HEARTBEAT_TIMEOUT``: a peer whose loop is blocked for less than
#: the timeout is alive to calls already waiting on it, and so to a new connection (its
#: kernel accepts, its loop answers once free). The cost is the same: a hung or cut off
#: peer is found that much later also when connecting.
PEER_CONNECT_TIMEOUT = HEARTBEAT_TIMEOUT
#: A connection without pending calls is dropped only after this long in silence
#: (half-open connections, a hung head); a dead process closes its sockets at once.
#: Also the registry's limit both ways: a cluster's head drops a member it heard nothing
#: from for this long, a member leaves a head silent this long. Fixed: idle
#: connections are pinged every ``IDLE_TIMEOUT / 6`` (9-10 s), and a process that
#: waited longer would have peers (set otherwise) ping it too seldom.
IDLE_TIMEOUT = 60.0
#: The environment variable that sets HEARTBEAT_TIMEOUT (and PEER_CONNECT_TIMEOUT), in
#: seconds, for the processes that read it (see read_settings).
ENV_HEARTBEAT_TIMEOUT = "ACTORGRAD_HEARTBEAT_TIMEOUT"
#: Shortest timeout it may set: 4 heartbeat intervals, 3 pings missed before a peer is
#: lost (a timeout of about one interval took a live peer for lost at every scheduling
#: hiccup: a ping's own delivery, a round of the heartbeat loop come late).
MIN_HEARTBEAT_TIMEOUT = 4 * HEARTBEAT_INTERVAL
#: Longest: half the head's limit for a silent member (IDLE_TIMEOUT). A worker whose loop
#: is blocked for just under the timeout, tolerated by its peers, must not be dropped
#: from the cluster by its head meanwhile: its membership connection is pinged only
#: every 9 s when idle, so the head may hear nothing from it for the block plus 9 s,
#: and some more on a loaded machine. A longer block is better moved off the loop
#: (``asyncio.to_thread``, a plain function in the thread pool).
MAX_HEARTBEAT_TIMEOUT = IDLE_TIMEOUT / 2
#: How long a worker importing a driver's script (its top level runs on the worker's
#: loop) may be silent before its peers take it for hung (see Worker.going_quiet).
SCRIPT_IMPORT_GRACE = 60.0
#: The longest silence a peer may announce.
MAX_QUIET = 3600.0
MAILBOX_SIZE = 1024
#: Names of workers lost or gone that a worker remembers (for "has left the cluster"
#: errors and to report each loss once), at most: the oldest not members go first.
LOST_MEMORY = 4096
MAX_IN_FLIGHT = 10_000
FAST_CALL = 0.001
INLINE_AFTER = 3
SHUTDOWN_TIMEOUT = 10.0
# how long a shutdown waits for its tasks to end once cancelled (see _teardown)
CANCEL_GRACE = 1.0
#: The longest a shutdown waits for connections its listeners accepted to be set up.
LISTENER_CLOSE_WAIT = 1.0
POOL_THREADS = 8

#: Whether this process read ``ACTORGRAD_HEARTBEAT_TIMEOUT`` (see read_settings).
_settings_read = False


def heartbeat_timeout_setting() -> float | None:
    """The heartbeat timeout ``ACTORGRAD_HEARTBEAT_TIMEOUT`` sets, in seconds (None: unset
    or blank); ValueError naming the variable and the value for one that is not a finite
    number of seconds from MIN_HEARTBEAT_TIMEOUT to MAX_HEARTBEAT_TIMEOUT. (Refused, not
    replaced by the default with a warning as a tuning knob's: a user who set it counts
    on its tolerance, and a worker then lost is the surprise it was set against.)"""
    raw = os.environ.get(ENV_HEARTBEAT_TIMEOUT, "")
    text = raw.strip()
    if not text:
        return None
    shown = f"{ENV_HEARTBEAT_TIMEOUT}={clip_text(raw, 80)!r}"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{shown}: not a number of seconds") from None
    if not math.isfinite(value):
        raise ValueError(f"{shown}: not a finite number of seconds")
    if value <= 0:
        raise ValueError(f"{shown}: must be a positive number of seconds")
    if value < MIN_HEARTBEAT_TIMEOUT:
        raise ValueError(
            f"{shown}: must be at least {MIN_HEARTBEAT_TIMEOUT:g} s (4 heartbeat intervals "
            f"of {HEARTBEAT_INTERVAL:g} s)"
        )
    if value > MAX_HEARTBEAT_TIMEOUT:
        raise ValueError(
            f"{shown}: must be at most {MAX_HEARTBEAT_TIMEOUT:g} s (half the "
            f"{IDLE_TIMEOUT:g} s a cluster's head waits on a silent member)"
        )
    return value


def read_settings() -> None:
    """Read ``ACTORGRAD_HEARTBEAT_TIMEOUT`` unless read already (once per process): by
    ``ag.init``, ``ag.local_cluster``, the ``actorgrad`` command and worker processes
    as they start, and at the first Worker. Set, it sets HEARTBEAT_TIMEOUT and
    PEER_CONNECT_TIMEOUT (the module's constants, read where they are used: code that
    replaces them, tests, keeps its value; unset, they are left as they are).
    ValueError for a bad value (see heartbeat_timeout_setting), which is read again
    next time. Not at import: a bad value would make ``import actorgrad`` fail, and the
    command could not say it as its other usage errors.

    Each process judges its peers by its own timeout. The processes a cluster starts
    inherit the environment (``actorgrad cluster``, ``actorgrad run``,
    ``local_cluster(processes=True)``); workers started on other hosts need it set
    there too. Processes set otherwise work together: pings go out at the same
    interval whatever the setting, so a peer is lost to each after that one's own
    timeout (the tolerant one waits longer for a blocked peer than the other does)."""
    global _settings_read, HEARTBEAT_TIMEOUT, PEER_CONNECT_TIMEOUT
    if _settings_read:
        return
    value = heartbeat_timeout_setting()
    if value is not None:
        HEARTBEAT_TIMEOUT = PEER_CONNECT_TIMEOUT = value
    _settings_read = True


_current: contextvars.ContextVar[Worker] = contextvars.ContextVar("actorgrad_worker")
_current_conn: contextvars.ContextVar[Connection] = contextvars.ContextVar("actorgrad_conn")


def _importing(busy: bool) -> None:
    """calls.on_import: the worker resolving a call tells its peers it may be silent."""
    w = _current.get(None)
    if w is not None:
        w.going_quiet(SCRIPT_IMPORT_GRACE if busy else 0)


calls.on_import = _importing
_process_worker: Worker | None = None
_interceptor: Any = None
#: every worker made in this process (the driver and in-process workers of
#: local_cluster): those a function defined interactively can be called on
_here: weakref.WeakSet[Worker] = weakref.WeakSet()


def _forked() -> None:
    """In the child of a fork (``os.fork()``, multiprocessing's "fork" start method, as
    ``multiprocessing.Pool`` uses by default on Linux before Python 3.14): the workers of
    this process are the parent's, and the child holds copies of their sockets. Those
    copies kept the parent's connections open after the parent closed them (its peers
    heard no end: ``local_cluster(processes=True)`` waited out its 3 s grace, then
    SIGTERMed worker processes that were waiting for its connection to close) and kept
    its listening ports bound. Each copy is replaced by /dev/null here (not closed: the
    number stays the socket object's to close, and nothing done with it then reaches
    the parent's sockets or event loop); the copies of the workers are closed, and
    using one says it belongs to the parent (``wrong_loop``).

    The signals the parent's loops took (``loop.add_signal_handler``: a worker
    process's SIGTERM and SIGINT) get their default handling back, and their wake-up
    socket is let go: a signal to the child (a Pool's ``terminate()``) was ignored
    there (the Pool waited for it for good) and its number written to that socket, so
    the parent's loop ran its handler (the worker process stopped). They were blocked
    from before the fork (_before_fork) until then: one that came first did so too."""
    try:
        live = [w for w in _here if not w.closed]
        if live:
            _let_go(live)
    finally:
        if (
            getattr(_fork_mask, "mask", None) is not None
            and signal.SIGINT in signal.sigpending()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            # (a SIGINT that came as the child started ends it, as an uncaught
            # KeyboardInterrupt would: raised here, in an at-fork hook, it was lost)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        _unblock()


def _loop_signals(loops: list[asyncio.AbstractEventLoop]) -> list[int]:
    """The signals whose handler is one an event loop put there (add_signal_handler)."""
    return [
        sig
        for sig in signal.valid_signals()
        if (h := signal.getsignal(sig)) is _asyncio_noop
        or any(getattr(h, "__self__", None) is lp for lp in loops)
    ]


#: .mask: the forking thread's signal mask before _before_fork blocked the loops'
#: signals (per thread: two threads may fork at once, and a mask is a thread's own)
_fork_mask = threading.local()


def _before_fork() -> None:
    """Block the signals the workers' loops took, in the thread that forks, until the
    child has their default handling back (_forked): one that came in between ran the
    Python handler the child had of the parent's, which wrote it to the parent's
    wake-up socket (a SIGTERM sent to a child as it started stopped the parent)."""
    live = [w for w in _here if not w.closed]
    if live:
        try:
            sigs = _loop_signals([w.loop for w in live])
            if sigs:
                _fork_mask.mask = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        except (ValueError, OSError):
            pass


def _unblock() -> None:
    """After a fork, in the parent and the child: the mask _before_fork changed back."""
    mask = getattr(_fork_mask, "mask", None)
    _fork_mask.mask = None
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _let_go(live: list[Worker]) -> None:
    """_forked's work, in the child, for the parent's workers ``live``."""
    loops = [w.loop for w in live]
    try:
        signal.set_wakeup_fd(-1)
        for sig in _loop_signals(loops):
            signal.signal(
                sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            )
    except (ValueError, OSError):
        pass
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for w in live:
            w.closed = True  # (its RRefs' finalizers send nothing now)
            for fd in w._socket_fds():
                try:
                    os.dup2(null, fd, inheritable=False)
                except OSError:
                    pass
    finally:
        os.close(null)


#: what an asyncio loop's add_signal_handler puts in Python's handler's place
_asyncio_noop = getattr(getattr(asyncio, "unix_events", None), "_sighandler_noop", None)

if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_unblock, after_in_child=_forked)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_NOT_INIT = "actorgrad is not initialized: call `await ag.init(...)` or use `ag.local_cluster()`"


def caller_id(peer: str) -> int | None:
    """The cluster id of the process whose call is running here, if that call came
    from worker ``peer`` and its hello gave one (None otherwise: no call from ``peer``
    runs in this task). A higher layer that keeps something for a peer by name can
    tell, at the peer's loss, that process from another one that joined since under
    its name (see ``Worker.left_cluster``)."""
    conn = _current_conn.get(None)
    if conn is None or conn.peer_name != peer:
        return None
    return conn.peer_id


def current_worker() -> Worker:
    """The worker whose code is running (set while a worker handles a call), else the
    process's own worker. RuntimeError when there is none."""
    w = _current.get(None)
    if w is not None and not w.closed:
        return w
    if _process_worker is not None:
        return _process_worker
    if w is not None:
        return w
    if env_address():  # (set by `actorgrad run` for its script)
        raise RuntimeError(
            _NOT_INIT + "; a cluster is waiting at $ACTORGRAD_ADDRESS (`actorgrad run`?): "
            '`await ag.init("driver")` joins it'
        )
    raise RuntimeError(_NOT_INIT)


def loop_worker() -> Worker:
    """:func:`current_worker`, for async code that awaits on its event loop: RuntimeError
    (:func:`wrong_loop`) when the running loop is another one. (What the worker's loop
    sets never wakes another loop's awaits: ``ag.dist.backward`` awaited on another
    thread's loop ran the pass from that thread, then waited until something else woke
    its loop, for good in an idle one.)"""
    w = current_worker()
    if asyncio.get_running_loop() is not w.loop:
        raise wrong_loop(w)
    return w


def wrong_loop(w: Worker) -> RuntimeError:
    """The error for using worker ``w`` from an event loop that is not its own."""
    if w.pid != os.getpid():
        return RuntimeError(
            f"worker {w.name!r} belongs to process {w.pid}, and this process is a fork of "
            "it (os.fork(), multiprocessing's 'fork' start method): a worker does not cross "
            "a fork; `await ag.init(...)` here makes one of this process's own"
        )
    if w.loop.is_closed():
        return RuntimeError(
            f"the event loop of worker {w.name!r} has closed (an asyncio.run() that "
            "returned?): init and use actorgrad within one event loop; "
            "`await ag.shutdown()` forgets that worker, then ag.init() works again"
        )
    # (a driver's thread, as a data loader's: "not from another one" alone left the way
    # docs/limits.md gives unsaid)
    how = (
        ": from another thread, hand the coroutine to that loop, "
        "`asyncio.run_coroutine_threadsafe(ag.rpc(...), loop)`, with the loop that ran "
        "ag.init() or local_cluster() (asyncio.get_running_loop() there)"
    )
    if _current_conn.get(None) is not None:
        # (code a call runs, a plain function in the thread pool or inline: a ported RPC
        # target calling on with `asyncio.run(ag.rpc(...))`, for PyTorch's rpc_sync. Its
        # user had started no thread nor loop of their own, which is all the rest says)
        how = (
            f": this code runs in a call to {w.name!r}, off that loop (a plain function, or "
            "a thread of its own); code that calls other workers is an `async def` that "
            "awaits them (`return await ag.rpc(...)`, where PyTorch's RPC targets call "
            "rpc_sync)"
        )
    return RuntimeError(
        f"actorgrad must be used from the event loop worker {w.name!r} runs on, not from "
        f"another one (another thread's, or a second asyncio.run()){how}"
    )


def set_process_worker(w: Worker | None) -> Worker | None:
    global _process_worker
    old, _process_worker = _process_worker, w
    return old


def set_interceptor(i: Any) -> None:
    """Install the process-wide call interceptor (design.md section 3); None removes it."""
    global _interceptor
    _interceptor = i


def get_interceptor() -> Any:
    return _interceptor


def _advertised_ip(family: int = socket.AF_INET) -> str:
    """The address others can reach a wildcard-bound listener of ``family`` at (best
    effort: the source address of the default route, else loopback). An IPv6 wildcard
    listener is IPv6 only (asyncio sets IPV6_V6ONLY): it needs an IPv6 address."""
    v6 = family == socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            # no packet is sent: this only picks a route (to a documentation address)
            s.connect(("2001:db8::1", 9) if v6 else ("192.0.2.1", 9))
            return str(s.getsockname()[0])
    except OSError:
        return "::1" if v6 else "127.0.0.1"


def _is_dual_stack(sock: socket.socket) -> bool:
    """Whether listening ``sock`` takes IPv4 connections as well as IPv6 ones."""
    if sock.family != socket.AF_INET6:
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except (OSError, AttributeError):
        return False


def _as_uvloop_raises(exc: BaseException) -> BaseException:
    """A failed connect's error as uvloop raises it, whichever loop runs. asyncio's own
    says "[Errno 111] Connect call failed ('127.0.0.1', 4000)" where uvloop says
    "[Errno 111] Connection refused" (the address is said already, the cause was not);
    and for a name of several addresses (``localhost``: ::1 and 127.0.0.1) all refused,
    a bare OSError "Multiple exceptions: [Errno 111] Connect call failed ('::1', 4000,
    0, 0), [Errno 111] ..." where uvloop raises the one ConnectionRefusedError they all
    are (without, a join there missed its "nothing listens there")."""
    if not isinstance(exc, OSError):
        return exc
    errno_ = 0
    if (
        exc.errno
        and isinstance(exc.strerror, str)
        and exc.strerror.startswith("Connect call failed ")
    ):
        errno_ = exc.errno
    elif exc.errno is None and str(exc).startswith("Multiple exceptions: [Errno "):
        errnos = set(re.findall(r"\[Errno (\d+)\] Connect call failed ", str(exc)))
        if len(errnos) == 1 and str(exc).count("[Errno ") == str(exc).count("Connect call"):
            errno_ = int(errnos.pop())
    if not errno_:
        return exc
    same = OSError(errno_, os.strerror(errno_))  # (of errno's subclass: ConnectionRefusedError)
    same.__cause__ = exc
    return same


def nobody_listens(exc: WorkerLost) -> WorkerLost:
    """``exc``, a failure to connect to a cluster's head, saying what a refused
    connection means there (a join's most common mistake, and a status's): ``exc``
    itself otherwise."""
    if not isinstance(exc.__cause__, ConnectionRefusedError):
        return exc
    return WorkerLost(
        f"{exc} (nothing listens there: is the cluster's head running, and is this its address?)"
    )


def natural_key(name: str) -> list[Any]:
    """Sort key putting "w2" before "w10"."""
    # (the split's odd parts are its runs of decimal digits: str.isdigit() is also true
    # of "²" and "①", which int() refuses: ag.workers() raised a ValueError)
    return [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]


_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, tuple, dict})

#: The membership's own calls, taken while a worker drains (a graceful shutdown refuses
#: new calls): a member's view of the cluster as the head pushes it, the head's member
#: list for a member whose view lags, and a member's leave. Refused, a draining member's
#: view stopped at its drain, and the calls it let finish used it: one to a worker
#: restarted under its name meanwhile went to the dead process's address ("cannot
#: connect"), and ``ag.wait_for_workers`` never saw a worker that joined.
_MEMBERSHIP_CALLS = frozenset(
    {
        "actorgrad.runtime.registry:_member",
        "actorgrad.runtime.registry:_snapshot",
        # (whether a member it cannot reach said it may be silent: see _quiet_left)
        "actorgrad.runtime.registry:_quiet",
        # (a member's word that it leaves, on a draining head: refused, the head kept
        # the member, in every member's view too, until its connection's close came)
        "actorgrad.runtime.registry:_leave",
    }
)


#: topic -> (handler, number of arguments after the worker); see on_cast
_cast_handlers: dict[str, tuple[Callable[..., None], int]] = {}


def on_cast(topic: str) -> Callable[[F], F]:
    """Register the handler of the one-way protocol messages sent under ``topic`` with
    :meth:`Worker.cast`: ``handler(worker, *args)``, run on the receiving worker's loop
    in the order the messages arrived (behind requests still waiting in its mailbox).

    For a higher layer's own protocol, where a generic one-way call costs too much: a
    cast skips the function lookup, the call's context copy, the per-function stats and
    the argument hooks (a cast's arguments carry no tensors or RRefs). The handler must
    not block and should handle its own errors: one that escapes is logged, except a
    ``ProtocolError``, which says the message was malformed: like a cast with an unknown
    topic or the wrong number of arguments, it closes the connection it came on.

    Example::

        @on_cast("myproto.ping")
        def _ping(worker: Worker, n: int) -> None:
            log.info("%s got ping %d", worker.name, n)

        worker.cast("w2", "myproto.ping", (1,))
    """

    def register(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())[1:]
        if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
            raise TypeError(f"cast handler {fn.__qualname__} must take plain positional arguments")
        old = _cast_handlers.get(topic)
        if old is not None and old[0] is not fn:
            raise ValueError(f"cast topic {topic!r} already has a handler ({old[0].__qualname__})")
        _cast_handlers[topic] = (fn, len(params))
        return fn

    return register


def _check_call_args(args: Any, kwargs: Any) -> None:
    if type(args) is not tuple and not isinstance(args, (tuple, list)):
        # (`args=(x)` is x itself: "not Tensor" alone left the missing comma to be found)
        raise TypeError(
            f"args must be a tuple or list, not {type(args).__name__} (one argument goes as "
            "`(x,)`, with the comma: `(x)` is x itself)"
        )
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
        for key in kwargs:
            if not isinstance(key, str):  # (the callee said so, a round trip later)
                raise TypeError(f"kwargs keys must be strs (argument names), got {key!r:.40}")


_NOT_READING = " (waiting to send it: it is large, or the peer is not reading)"


def _take_back_unsent(conn: Connection, cid: int, hooks: rref.Hooks) -> None:
    """A request of call_nowait (call ``cid`` on ``conn``) whose send failed: unless the
    connection's loss took it (it may have reached the peer then, see _on_lost), it
    never left, and what its encoding recorded is taken back, as call does. (The largest
    frame is checked as it is sent: an RRef in one over it stayed counted for the peer,
    its value kept by its owner for good.)"""
    if conn.pending.pop(cid, None) is not None:
        hooks.undo()


def _oneway_frame(target: str | list[Any], args: tuple[Any, ...]) -> list[Any]:
    """The frame of a one-way call of ``target`` (a wire name) with ``args``
    (Worker.notify, Worker.notify_on)."""
    return wire.encode_frame([K_REQ, 0, target, MODE_RPC, None], [list(args), None], None, _CALL)


def _expect_decoding(conn: Connection, chunks: list[Any]) -> None:
    """``chunks``, a request just queued on ``conn``, has a large msgpack part: its
    peer, decoding it on its loop, may send nothing for a while (its heartbeats
    included); give it the time before its silence counts (``SLOW_DECODE_RATE``)."""
    until = time.monotonic() + wire.body_nbytes(chunks) / SLOW_DECODE_RATE
    if until > conn.decoding_until:
        conn.decoding_until = until


async def _drained(conn: Connection) -> None:
    """``conn.drain()`` for a call; a connection lost meanwhile raises what its worker
    made of the loss (the peer silent for the heartbeat timeout, gone, or dropping this
    worker), as the calls already waiting for their replies get it. (The transport's
    own "closed while sending" said nothing of why: the calls behind a request that
    took a slow link seconds to pass failed with only that.)"""
    try:
        await conn.drain()
    except WorkerLost:
        err = conn.lost_error
        if err is None:
            raise
        raise one_each(err) from None


async def _by_deadline(
    aw: Awaitable[T], deadline: float | None, target: Any, dest: str, seconds: Any, doing: str
) -> T:
    """``await aw``, an RpcTimeout saying what the call was ``doing`` at ``deadline``."""
    if deadline is None:
        return await aw
    timer = asyncio.timeout_at(deadline)
    try:
        async with timer:
            return await aw
    except TimeoutError:
        if not timer.expired():
            raise
    # (raised out here, with the timer dropped: raised in the except clause, the error
    # kept the TimeoutError as its context, whose traceback kept this frame, the timer
    # and through it the task, which holds the error: a cycle keeping the call's
    # arguments until the garbage collector ran)
    del timer
    raise RpcTimeout(
        f"call of {calls.describe(target)} on worker {dest!r} timed out after {seconds} s" + doing
    )


def _not_registered(exc: WorkerLost, target: Any, dest: str) -> WorkerLost:
    """The error of a call not sent because an RRef among its arguments could not be
    registered for ``dest`` with its owner, ``exc.peer``, lost (``exc``). (The owner's
    own error alone, "worker 'w1' has left the cluster" from a call to w2, read as the
    callee's loss; and the call never left.)"""
    return WorkerLost(
        f"call of {calls.describe(target)} on worker {dest!r} not sent: worker "
        f"{exc.peer!r}, the owner of an RRef among its arguments, could not register it "
        f"for {dest!r}: {exc}",
        peer=exc.peer,
    )


def _worker_name(dest: Any) -> str:
    """``dest`` as a plain str (a str subclass, such as numpy's str_, is taken as its
    text); TypeError for anything else."""
    if not isinstance(dest, str):
        swapped = (
            ": the worker comes first, then the function: ag.rpc(to, fn, args)"
            if callable(dest)
            else ""
        )
        raise TypeError(f"worker name must be a str, not {type(dest).__name__}{swapped}")
    return str.__str__(dest)


#: asyncio's errors for what needs a running loop (a future, a task) made where none
#: runs: in a plain function called on a worker, as the execution model has it (a class
#: whose __init__ makes a future, made with ag.remote, failed with only this).
#: get_running_loop()'s, and asyncio.Future()'s (get_event_loop()'s) in a pool thread
NO_LOOP = "no running event loop"
NO_CURRENT_LOOP = "There is no current event loop in thread "
NO_LOOP_HINT = (
    " (a plain function called on a worker runs where no event loop runs, in the "
    "worker's thread pool or as if there: make futures and tasks in an async def, e.g. "
    "an async def factory for a class that makes them in its __init__)"
)


def check_timeout(timeout: Any, none_means: str, hint: str = "") -> None:
    """TypeError for a ``timeout`` that is not a number (a bool is not one), ValueError
    unless it is a number of seconds > 0 (NaN is not) or None (which means
    ``none_means``): the rule of every timeout of the API."""
    if timeout is None:
        return
    if type(timeout) is bool or not isinstance(timeout, numbers.Real):  # (numpy's too)
        raise TypeError(
            f"timeout must be a number of seconds > 0, or None {none_means}; got "
            f"{type(timeout).__name__} {timeout!r:.80}"
        )
    try:
        seconds = float(timeout)
    except OverflowError:  # (an int or a Fraction beyond a float's range: 10**400)
        raise ValueError(
            f"timeout of {type(timeout).__name__} {timeout!r:.40}... s is too large for a "
            f"number of seconds; use None {none_means}"
        ) from None
    if not seconds > 0:
        raise ValueError(
            f"timeout must be a number of seconds > 0, or None {none_means}; got "
            f"{timeout!r:.80}{hint}"
        )


def _silent_for(peer: str, seconds: float) -> WorkerLost:
    """The loss of ``peer``, found silent for ``seconds`` (see _silent_too_long)."""
    return WorkerLost(
        f"worker {peer!r} sent nothing for {seconds:g} s (heartbeat lost: its process "
        "stopped, its event loop blocked by code that does not await, or the network down?)"
    )


def _member_entry(v: Any) -> tuple[int, str, str]:
    """A member entry off the wire: (cluster id, address, local socket name or "")."""
    return int(v[0]), str(v[1]), str(v[2]) if len(v) > 2 else ""


def _no_stop_iteration(fn: Callable[[], Any]) -> Any:
    """``fn()``, a StopIteration it raises turned into a RuntimeError (asyncio cannot put
    a StopIteration into a future: the future would never complete), as a generator
    turns one into a RuntimeError (PEP 479)."""
    try:
        return fn()
    except StopIteration as exc:
        raise RuntimeError(f"{exc!r} raised in a job of the worker's thread pool") from exc


def _unhold(sp: Any, _fut: Any) -> None:
    sp.held -= 1


def _refusal(err: RemoteError) -> BaseException:
    """The error of a call the peer's runtime refused, as its own type: an ActorgradError
    named by the reply (anything else stays the RemoteError it came as)."""
    cls = refusal_type(err.remote_type)
    return err if cls is None else cls(err.remote_message)


def _cut_repr(x: Any, limit: int) -> str:
    """``f"{x!r:.{limit}}"`` for a value from the wire, which may fail to repr: a list
    nested 990 levels deep (valid msgpack) raised RecursionError while the message
    naming it was made, which escaped the frame's handling (asyncio closed the
    connection with a traceback, and the peer heard no reason). Such a value shows as
    ``<list>``, as ``short_repr`` shows it."""
    return short_repr(x, 1 << 62)[:limit]


def _probe_number(x: Any) -> bool:
    """Whether ``x``, from the wire, can number a probe (see Worker._probe): an int in
    [1, 2**63)."""
    return type(x) is int and 0 < x < 1 << 63


def _printable(text: str) -> str:
    """``text`` from the wire (a goodbye's reason) as log lines and errors may show it:
    escaped where it holds what is not printable (went as it came, a newline in it
    wrote a line of its own into the log, an escape colored the terminal)."""
    return text if text.isprintable() else repr(text)[1:-1]


#: Most bytes of replies a connection holds unsent (its peer does not read them) before
#: the worker stops reading that peer's requests until they are sent (see
#: Connection.max_unsent); a single larger reply still goes.
MAX_UNSENT_REPLIES = 64 << 20

#: Rejected connections logged per minute and worker (see Worker._log_rejected).
REJECTED_LOG_LINES = 20
#: That minute (seconds).
REJECTED_LOG_WINDOW = 60.0

#: Open connections, as a share of the files its process may still open when it starts,
#: from which a worker warns (once a minute) that it nears the limit (Worker._accept).
NEAR_FILE_LIMIT = 0.8

#: Most connections a worker holds in their token handshake at once. Anyone who can
#: connect opens such connections, and each holds a file until the handshake deadline:
#: strangers opening them as fast as they could filled the process's open files, and a
#: token holder's connection was then closed at once ("out of open files"). Beyond it
#: the OLDEST one is closed, not the new one: a token holder's handshake is done in a
#: round trip, a stranger's stays pending, so the oldest is a stranger's (a token
#: holder's handshake is closed only when more than this many connections came during
#: it). The same, with fewer (half the files left), once the worker's connections near
#: its limit of open files (see NEAR_FILE_LIMIT and Worker._near_limit_handshakes).
MAX_HANDSHAKING = 1024
#: Of those, most from one remote address (one stranger's host takes no more; others'
#: connections are not shed for its): not on loopback, which every process of this
#: host shares (local workers among them), nor over local Unix sockets.
MAX_HANDSHAKING_PER_HOST = 256

#: Largest frame a peer may send before its hello (a hello is ~100 bytes).
HELLO_MAX_FRAME = 1 << 16

#: Most abandoned calls kept per connection (see _abandon); beyond, the oldest go.
MAX_ABANDONED = 65536


def _abandon(conn: Connection, cid: int, hooks: rref.Hooks) -> None:
    """The caller stopped waiting for call ``cid`` (timeout, cancellation) after its
    request left, in a context of an interceptor: keep its hooks, so that a late reply
    is decoded with them. The reply's tensors were recorded as sent by the callee: their
    receiving ends must exist, or every later backward in the context would wait for
    them (the interceptor's hooks hear ``abandoned``, then ``answered`` once the reply
    came or the peer said goodbye, ``lost`` if the connection closed first)."""
    abandoned = conn.abandoned
    if len(abandoned) >= MAX_ABANDONED:
        abandoned.pop(next(iter(abandoned))).lost()  # (its late reply: decoded without)
    abandoned[cid] = hooks
    hooks.abandoned()


#: Most calls given up whose replies a goodbye for the peer's silence lists (see
#: _gave_up, Worker._keep_given): the latest ones; a reply to an older one, sent
#: before the callee read the goodbye, keeps its RRef counts for this worker.
MAX_GIVEN = 4096


def _gave_up(conn: Connection, cid: int) -> None:
    """The caller stopped waiting for call ``cid`` (no interceptor's meta: see
    _abandon for those), whose late reply may yet come: remembered until it does, so
    that a goodbye for the peer's silence can name it (see _given_up)."""
    gave_up = conn.gave_up
    if gave_up is None:
        gave_up = conn.gave_up = {}
    elif len(gave_up) >= MAX_GIVEN:
        del gave_up[next(iter(gave_up))]
    gave_up[cid] = None


def _given_up(conn: Connection) -> list[int]:
    """The calls on ``conn`` whose replies this worker will not read, as it drops the
    connection for the peer's silence (the latest MAX_GIVEN): those pending, and those
    given up whose late reply has not come. The peer, stopped and running again, may
    have sent a reply to one before reading the goodbye: it takes back the RRef counts
    that reply made for this worker (see Worker._keep_given)."""
    cids = [*conn.pending, *conn.abandoned, *(conn.gave_up or ())]
    # (and within the largest frame the peer takes, at 9 bytes an id and 1 KiB for the
    # rest: a goodbye larger was refused there, and lost)
    most = min(MAX_GIVEN, max(0, (conn.send_limit - 1024) // 9))
    if len(cids) > most:
        cids = sorted(cids)[len(cids) - most :]  # (ids grow: the latest)
    return cids


def _send_cancel(conn: Connection, cid: int) -> None:
    """Tell the callee that the caller of request ``cid`` stopped waiting (K_CANCEL)."""
    try:
        conn.send_nowait(wire.encode_frame([K_CANCEL, cid], None))
    except ActorgradError:  # (the connection closed meanwhile: nothing runs there now)
        pass


def _cancel_if_running(conn: Connection, cid: int, task: asyncio.Task[Any]) -> None:
    """Cancel ``task``, the call ``cid`` its caller cancelled, unless it has come to its
    reply meanwhile (the reply goes out whole: see Worker._run_task)."""
    if cid in conn.running:
        task.cancel()


def _close_coroutine(coro: Any, task: asyncio.Task[Any]) -> None:
    coro.close()  # (no-op once it ran to its end)


#: In ``Connection.running``: the call runs a plain function in the thread pool, which
#: a cancel cannot stop; the cancel is remembered instead (the entry becomes None) and
#: what the function returns is dropped (see Worker._pool_call_done).
_IN_POOL: Any = object()


def _caller_gone() -> ActorgradError:
    """The error a call cancelled by its caller is answered with (the caller drops it)."""
    return ActorgradError("call cancelled: its caller stopped waiting for it")


class _Raised:
    """What a function raised in the thread pool, carried to the loop as a value."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


#: Worker.registry_lost_why when the cluster's head said goodbye (it shut down)
HEAD_SHUT_DOWN = "it shut down"
#: Worker.registry_lost_why when its connection to the head closed without a word
HEAD_CONN_CLOSED = "its connection closed"
#: The start of Worker.registry_lost_why when the head dropped this worker, saying why
_DROPPED = "dropped: "
#: Worker.dropped_by of a peer whose hello said it took this worker for lost, its
#: goodbye not come (see Worker._new_session)
DROPPED_UNSAID = (
    "it took this worker for lost (its goodbye, or the reset of its connection, has not "
    "come: held up by a network that failed?)"
)


def head_lost(why: str) -> str:
    """How a worker says it lost the cluster's head, ``why`` being its
    ``registry_lost_why``: "the cluster's head went away (it shut down)"; "the
    cluster's head dropped this worker (...)" when the head said so as it closed the
    connection (after a SIGSTOP of over 60 s, "went away" was said of a live head);
    else "this worker's connection to the cluster's head closed (...)" or "... broke
    (...)": the head may live on."""
    if why.startswith(_DROPPED):
        return f"the cluster's head dropped this worker ({why.removeprefix(_DROPPED)})"
    if why == HEAD_SHUT_DOWN:
        return f"the cluster's head went away ({why})"
    # (a connection that broke with the head alive was said as "the head went away")
    if why == HEAD_CONN_CLOSED:
        return (
            "this worker's connection to the cluster's head closed (the head died, or the "
            "connection broke)"
        )
    return f"this worker's connection to the cluster's head broke ({why})"


def _waits() -> int:
    """How many times the calling thread blocked so far (its voluntary context
    switches; 0 where the system does not count them per thread). (A thread that
    waited to take the GIL back after a numpy call counts too: that call proves
    nothing, the next ones may.)"""
    if _RUSAGE_THREAD is None:
        return 0
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


class _FnStats:
    """How a function (or a type's method) runs, learnt from its calls. ``what``: the
    function (a new version of it, re-imported from an edited driver script, starts
    anew: it may be async now), the type for a method (keyed by the type's name: a new
    version of the class starts anew too)."""

    __slots__ = ("fast", "is_async", "inline", "what")

    def __init__(self, fn: Any, what: Any) -> None:
        self.what = what
        self.fast = 0
        self.is_async = inspect.iscoroutinefunction(fn)
        self.inline = not self.is_async and getattr(fn, "__actorgrad_inline__", False) is True


class Worker:
    """One worker (an actor). Created and started by ``init``/``local_cluster``."""

    def __init__(
        self,
        name: str,
        *,
        token: str,
        transport_kind: str = "tcp",
        host: str = "127.0.0.1",
        port: int = 0,
        mailbox_size: int = MAILBOX_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_frame_size: int | None = None,
        local_sockets: bool | None = None,
        advertise: tuple[str, int | None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"worker name must be a non-empty string, not {name!r}")
        read_settings()  # (ACTORGRAD_HEARTBEAT_TIMEOUT, once per process)
        token = transport.check_token(token)
        if type(port) is not int or not 0 <= port <= 65535:
            raise ValueError(
                f"port must be an int in 0..65535 (0: any free port), not {port!r:.80}"
            )
        max_frame_size = transport.check_frame_size(max_frame_size)
        for what, n in (("mailbox_size", mailbox_size), ("max_in_flight", max_in_flight)):
            # (taken as they came: 0 in flight ran no call ever, its callers waited for
            # good; a mailbox of 0 stopped reading a connection after each message it
            # read; a float or a bool passed for a count)
            if type(n) is not int or n < 1:
                raise (TypeError if type(n) is not int else ValueError)(
                    f"{what} must be an int >= 1, not {n!r:.80}"
                )
        if transport_kind not in ("tcp", "inproc"):
            raise ValueError(f"unknown transport {transport_kind!r}")
        if advertise is not None and transport_kind != "tcp":
            raise ValueError("only a TCP worker advertises an address (advertise=...)")
        self.name = name
        self.id = 0
        #: the identity of its cluster (a random key its head made, the head's address),
        #: from its join's answer; (0, ""): in none yet. Said in each hello: a peer of
        #: another cluster that shares the token is refused (see _foreign)
        self.cluster: tuple[int, str] = (0, "")
        self.ext: dict[str, Any] = {}
        self.token = token
        self.transport_kind = transport_kind
        # TCP workers also listen on, and prefer, local Unix sockets (transport.py)
        self.local_sockets = (
            transport.local_sockets() if local_sockets is None else local_sockets
        ) and transport_kind == "tcp"
        self.host = host
        self.port = port
        #: where others reach it when not where it listens (a NAT, a published port of
        #: a container, a tunnel): (host, port or None for the listening one), checked
        #: by cluster.check_advertise; None: the address of its listener
        self.advertise = advertise
        self.address = ""
        self.loop = asyncio.get_running_loop()
        self.pid = os.getpid()  # (a forked child has a copy of it: see _forked)
        #: the thread that runs the loop (code of this worker runs in it, or in its pool)
        self.loop_thread = threading.get_ident()
        self.closed = False
        self.started = False
        self._stopping = False
        # A shutdown drains first (_stopping: new calls are refused, the running ones
        # may still connect, call, send and receive one-way messages, learn of lost
        # peers), then closes (_closing: nothing goes out or comes in any more).
        self._closing = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: transport.Listener | None = None
        # the abstract Unix socket co-located peers connect to (transport.listen_local)
        self._local_server: transport.Listener | None = None
        self.local_address = ""
        self._conns: set[Connection] = set()
        # every connection this worker made or accepted, while it lives: the shutdown
        # makes sure each one's socket is closed (see _teardown)
        self._every_conn: weakref.WeakSet[Connection] = weakref.WeakSet()
        _here.add(self)
        self._out: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Task[Connection]] = {}
        self._mailbox: collections.deque[tuple[Connection, Any]] = collections.deque()
        self._mailbox_size = mailbox_size
        self._max_in_flight = max_in_flight
        self.max_frame_size = max_frame_size
        self._mb_waiter: asyncio.Future[None] | None = None
        # The context messages are handled in: nothing of its creator's (a cluster started
        # under no_grad ran every in-process worker's calls without grad, for good);
        # start() sets _current = self in it. (Here, not in start: a client that never
        # starts, e.g. `actorgrad status`, handles what its connections bring too.)
        self._dctx = contextvars.Context()
        self._paused: set[Connection] = set()
        self._inflight = 0
        # of those, calls in the thread pool whose callers gave up (see _cancel_request)
        self._given_up = 0
        self._asking = 0  # calls running here that await this worker's own shutdown
        # rejected connections logged in the current minute (see _log_rejected), and
        # the timer that counts those not logged when it ends
        self._rejected_since = -math.inf
        self._rejected_logged = self._rejected_unlogged = 0
        self._rejected_timer: asyncio.TimerHandle | None = None
        # connections from which _accept warns of the open-files limit (a share of the
        # files not open yet), and when it did
        limit = open_files_limit() if transport_kind != "inproc" else None
        used = None if limit is None else open_files_count()
        self._near_file_limit = (
            math.inf if limit is None or used is None else int((limit - used) * NEAR_FILE_LIMIT)
        )
        # From there on, connections in their handshake beyond half the files left past
        # it are too many (see _accept): a burst of token holders' handshakes that fits
        # there is left alone (closing the oldest at every new one closed all but the
        # last of a burst), and strangers' take the other half at most.
        self._near_limit_handshakes = (
            MAX_HANDSHAKING
            if limit is None or used is None
            else max(1, (limit - used - self._near_file_limit) // 2)
        )
        self._file_limit_warned = -math.inf
        # accepted connections still in their token handshake, oldest first (see
        # MAX_HANDSHAKING; the value: the remote host counted against
        # MAX_HANDSHAKING_PER_HOST, "" for none), those per host, and how many were
        # closed to make room since the last warning of it (see _say_shed)
        self._handshaking: dict[Connection, str] = {}
        self._handshaking_from: dict[str, dict[Connection, None]] = {}
        self._shed = 0
        self._shed_warned = -math.inf
        self._shed_last: tuple[Any, str] = (None, "")  # (where the last came from, why)
        self._shed_timer: asyncio.TimerHandle | None = None
        # set when _inflight drops to 0 while a graceful shutdown waits for it
        self._idle_waiter: asyncio.Future[None] | None = None
        self._stats: dict[Any, _FnStats] = {}
        self._pool: CallPool | None = None
        # (fn, whether it takes the lost process's cluster id too; see
        # add_process_lost_callback)
        self._peer_lost_cbs: list[tuple[Callable[..., None], bool]] = []
        self._closing_cbs: list[Callable[[], None]] = []
        self._drain_cut = False  # (see cut_drain)
        self._status_providers: dict[str, Callable[[], dict[Any, Any]]] = {}
        # (a dict: in the order they were lost, see _peer_lost; the value: what the peer
        # said when it closed on us, see dropped_by, how the loss showed here, see
        # lost_cause, and the number of the probe whose echo ends it, see _old_news)
        self._lost: dict[str, tuple[str | None, str, int]] = {}
        self._probes = itertools.count(1)  # (numbers of the probes: see _probe)
        # (the peer whose connections this worker closes for its silence, meanwhile: no
        # probe for that loss, see _on_lost)
        self._dropping: str | None = None
        # Sessions with each peer (see _stale_end): how many goodbyes for its silence
        # this worker sent it (numbered, and told in each hello to it), and the number
        # of the latest goodbye of that kind from it that this worker took in, per peer
        # process (its cluster id).
        self._drops: dict[str, int] = {}
        self._seen_drops: dict[str, tuple[int | None, int]] = {}
        # member -> the cluster id of its process that said goodbye (it shuts down: what
        # it sent before, read after, is no news that it lives; see _old_news). Kept
        # after it left, while _lost keeps the name (bounded as _lost is)
        self._left: dict[str, int] = {}
        self._watched: dict[str, int] = {}  # peer -> watch count (see watch)
        # peer -> until when it is asked for pings (see expect_heartbeats)
        self._expecting: dict[str, float] = {}
        # one-way calls waiting for a connection, per peer, in order (see notify)
        self._notify_queues: dict[str, list[tuple[Any, Any, Any, Any]]] = {}
        # peer -> the task connecting to it for the one-way messages queued there
        self._notifying: dict[str, asyncio.Task[None]] = {}
        # membership (from the registry)
        self.members: dict[str, tuple[int, str, str]] = {}  # name -> (id, address, local)
        self._members_version = -1
        self._members_refreshing = False  # (a fetch of the whole list is on its way)
        self._early_changes: list[tuple[int, str, Any]] = []  # (see _apply_member)
        self._members_changed = asyncio.Event()
        self.registry: Registry | None = None  # (on the head)
        self.registry_conn: Connection | None = None
        # peers (name, cluster id) whose address did not reach them, said once (see
        # _connect_peer)
        self._unreachable_warned: set[tuple[str, int]] = set()
        # connections closed for their peer's silence whose sockets stay open a while,
        # so that the peer reads the goodbye (see Connection.part): aborted at teardown.
        # Weak: one whose peer closed its end is let go with its buffers (kept until
        # the next parting, one stayed for good on a worker that parted from no other).
        # A lingering one is held by its transport, and that by the linger's timer.
        self._parting: weakref.WeakSet[Connection] = weakref.WeakSet()
        # the connection a join is on, until its answer comes (membership changes come
        # over it from then on: see registry._member)
        self.joining_conn: Connection | None = None
        # (a join told to wait out its head's silence: see join)
        self._join_patient = False
        self.registry_lost = asyncio.Event()
        # (how: HEAD_SHUT_DOWN, "... sent nothing for 60 s ...", set with registry_lost)
        self.registry_lost_why = ""
        # rrefs owned here
        self.owned: dict[int, rref.Owned] = {}
        self._rref_ids = itertools.count(1)
        # peer -> RRef messages it could not be sent yet (see rref._tell)
        self._rref_unsent: dict[str, rref._Unsent] = {}
        # tags of the RRef forks this worker registers; registrations taken back
        # before they came here (see rref._unfork)
        self._fork_tags = itertools.count(1)
        self._rref_withdrawn: dict[tuple[tuple[str, int], int], float] = {}  # -> expiry
        # (the timer that drops them once expired: see rref._expire_withdrawn)
        self._rref_withdrawn_timer: asyncio.TimerHandle | None = None
        # connections (by pair id) that closed without the peer's goodbye -> (the peer
        # process, what the replies on them counted for it by call id, expiry), how many
        # replies those hold, and the timer that drops them (see rref.keep_lost_given)
        # (and how many of its frames came in on them, None: frames without tags)
        self._rref_lost_given: dict[
            int, tuple[tuple[str, int], dict[int, Any], float, int | None]
        ] = {}
        self._rref_lost_given_n = 0
        self._rref_lost_given_timer: asyncio.TimerHandle | None = None
        # (as a caller) connections that closed without the peer's goodbye -> (the peer
        # process, the requests still pending there that counted RRefs for it, each
        # with its frame's number, expiry), and the timer that drops them (see
        # rref.keep_lost_sent)
        # (and the one-way RRef messages queued there, each with its frame's number: see
        # rref._told_on)
        self._rref_lost_sent: dict[
            int, tuple[tuple[str, int], list[Any], float, list[tuple[int, Any, Any]]]
        ] = {}
        self._rref_lost_sent_timer: asyncio.TimerHandle | None = None
        # processes that left the cluster, latest last: no count is added for them
        # any more (see rref.peer_lost)
        self._rref_departed: dict[tuple[str, int], None] = {}
        # owner process -> the releases sent it, those not acknowledged yet kept; holder
        # process -> the numbers of its releases taken here; holders whose releases are
        # to be acknowledged, on which connection, and the timer that does it (see
        # rref._Releases)
        self._rref_releases: dict[tuple[str, int], Any] = {}
        self._rref_seen: dict[tuple[str, int], Any] = {}
        self._rref_acks: dict[tuple[str, int], Connection | None] = {}
        self._rref_ack_timer: asyncio.TimerHandle | None = None

    def _socket_fds(self) -> list[int]:
        """The file numbers of this worker's listening and connected sockets (see
        _forked)."""
        socks: list[Any] = [
            sock
            for lst in (self._server, self._local_server)
            if lst is not None
            for sock in lst.sockets
        ]
        for conn in list(self._every_conn):
            if conn.transport is not None:
                socks.append(conn.transport.get_extra_info("socket"))
        fds = []
        for sock in socks:
            try:
                fd = sock.fileno()
            except (AttributeError, OSError, ValueError):
                continue
            if fd >= 0:
                fds.append(fd)
        return fds

    # ------------------------------------------------------------------ public bits
    def __repr__(self) -> str:
        state = "closed" if self.closed else ("stopping" if self._stopping else "running")
        out = sum(len(c.pending) for c in self._conns)
        return (
            f"<Worker {self.name!r} id={self.id} {state} {self.address}"
            f" mailbox={len(self._mailbox)}/{self._mailbox_size} in_flight={self._inflight}"
            f" waiting={out} peers={sorted({c.peer_name or '?' for c in self._conns})}"
            f" rrefs={len(self.owned)}>"
        )

    def add_peer_lost_callback(self, fn: Callable[[str], None]) -> None:
        """``fn(peer_name)`` is called once when a peer is known dead/disconnected/left."""
        self._peer_lost_cbs.append((fn, False))

    def add_process_lost_callback(self, fn: Callable[[str, int | None], None]) -> None:
        """``fn(peer_name, pid)`` is called as a peer-lost callback is, with the cluster
        id of the process lost (None: not known, a peer whose hello gave none; taken as
        whichever process holds the name). A name is not a process: one that joined
        under the name of a lost one can be heard from here (its calls, its contexts)
        before this worker reads the head's word of the old one's leave, whose report
        is then no loss of the new one (see dist.context's lease)."""
        self._peer_lost_cbs.append((fn, True))

    def add_closing_callback(self, fn: Callable[[], None]) -> None:
        """``fn()`` is called once when this worker starts closing (a graceful shutdown
        has waited for its running calls), before its connections close: the losses
        of peers are not reported from then on."""
        self._closing_cbs.append(fn)

    @property
    def closing(self) -> bool:
        """Whether this worker is closing or closed (no more calls or messages)."""
        return self._closing

    def add_status_provider(self, name: str, fn: Callable[[], dict[Any, Any]]) -> None:
        """``fn()`` is merged into :meth:`status` (shown by ``actorgrad status``)."""
        self._status_providers[name] = fn

    def status(self) -> dict[Any, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "id": self.id,
            "address": self.address,
            "mailbox": len(self._mailbox),
            "in_flight": self._inflight,
            "rrefs": len(self.owned),
            "peers": sorted({c.peer_name for c in self._conns if c.peer_name}),
            "watching": sorted(self._watched),
        }
        for pname, fn in list(self._status_providers.items()):
            try:
                extra = fn()
            except Exception as exc:  # a provider must not break status
                extra = {pname: f"<error: {exc!r}>"}
            if isinstance(extra, dict):
                d.update(extra)
        return d

    def holds_frames_of(self, peer: str, pid: int | None = None) -> bool:
        """Whether frames of ``peer`` (its process of cluster id ``pid``, when given) may
        still be handled here: a connection with it is open, or a request of it waits
        in the mailbox (see rref's settle)."""

        def of_it(c: Connection) -> bool:
            # (a connection whose hello gave no id may be that process's)
            return c.peer_name == peer and (pid is None or c.peer_id in (pid, None))

        return any(of_it(c) and not c.closed for c in self._conns) or any(
            of_it(c) for c, _ in self._mailbox
        )

    def left_cluster(self, peer: str, pid: int) -> bool:
        """Whether the process of cluster id ``pid`` of worker ``peer`` left the
        cluster, as far as this worker heard (the head's word of its leave; the last
        MAX_DEPARTED such processes are remembered, see rref.peer_lost)."""
        return (peer, pid) in self._rref_departed

    @property
    def owned_count(self) -> int:
        """Number of values owned here that some RRef still refers to."""
        return len(self.owned)

    def worker_names(self) -> list[str]:
        # (a snapshot first, in one C call: this runs in pool threads too, ag.workers()
        # of a plain function, while the loop changes the dict, see _apply_member)
        names = [n for n in list(self.members) if not n.startswith("_")]
        if self.registry_lost.is_set():  # (no head will remove those lost: they are gone)
            names = [n for n in names if not self.is_lost(n)]
        if self.name not in self.members and not self.name.startswith("_"):
            names.append(self.name)
        return sorted(names, key=natural_key)

    # ------------------------------------------------------------------ setup
    async def start(self) -> None:
        """Setup phase: listener, thread pool, dispatcher and heartbeat tasks."""
        if self.started:
            return
        self.started = True
        self._pool = CallPool(POOL_THREADS, f"actorgrad-{self.name}")
        try:
            await self._listen()
        except BaseException:
            # (a port in use, or cancelled meanwhile: nothing of it stays open, and a
            # later start tries again instead of returning with no address)
            for server in (self._server, self._local_server):
                if server is not None:
                    server.close()
            self._server = self._local_server = None
            self._pool.shutdown(wait=False)
            self.started = False
            raise
        self._dctx.run(_current.set, self)
        self.spawn(self._running(), name=f"actorgrad-dispatch-{self.name}")
        self.spawn(self._heartbeat(), name=f"actorgrad-heartbeat-{self.name}")

    async def _listen(self) -> None:
        if self.transport_kind == "inproc":
            self.address = transport.inproc_listen(self._accept)
            return
        socks = await transport.bind_tcp(self.loop, self.host, self.port)
        self._server = transport.Listener(
            self.loop, socks, self._accept, f"worker {self.name}", self._make_room
        )
        sock = socks[0]
        host, *rest = sock.getsockname()  # (port, and an IPv6 address's flow and scope)
        if host in ("0.0.0.0", "::"):
            host = _advertised_ip(sock.family)
            if _is_dual_stack(sock) and transport.is_loopback(host):
                # (no IPv6 route: the host's IPv4 address, which the socket takes too;
                # "[::1]" was advertised, and other hosts joining over IPv4 got it)
                host = _advertised_ip(socket.AF_INET)
        self.address = transport.host_port((host, *rest))
        if self.advertise is not None:
            host, port = self.advertise
            self.address = transport.host_port((host, port or rest[0]))
        local = (
            transport.listen_local(self.loop, self._accept, f"worker {self.name}", self._make_room)
            if self.local_sockets
            else None
        )
        if local is not None:
            self._local_server, self.local_address = local

    def spawn(
        self, coro: Any, *, name: str | None = None, context: Any = None
    ) -> asyncio.Task[Any]:
        """Run ``coro`` as a background task of this worker: referenced until done,
        cancelled when the worker shuts down, an exception it ends with logged.

        Example::

            worker.spawn(finish_later(), name="finish")
        """
        t = self.loop.create_task(coro, name=name, context=context)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def offload(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn()`` in this worker's thread pool, in a copy of the current
        contextvars; the future (on this loop) gets its result or exception. For work of
        a protocol handler that may be too long for the loop: the loop meanwhile goes on
        reading frames and answering heartbeats.

        Example::

            worker.offload(task.run).add_done_callback(on_done)
        """
        assert self._pool is not None, "offload before the worker started"
        fut = self.loop.run_in_executor(
            self._pool, contextvars.copy_context().run, functools.partial(_no_stop_iteration, fn)
        )
        sp = transport._spinner(self.loop)
        if sp is not None:  # (the loop does not spin while the job runs: see _Spinner)
            sp.held += 1
            fut.add_done_callback(functools.partial(_unhold, sp))
        return fut

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if (
            not t.cancelled()
            and t.exception() is not None
            and not t.get_name().startswith("actorgrad-connect")
        ):
            log.error("worker %s: task %s failed", self.name, t.get_name(), exc_info=t.exception())

    # ------------------------------------------------------------------ cluster
    def host_registry(self) -> Registry:
        """Make this (started) worker the head: it hosts the registry, id 1 (returned)."""
        reg = self.registry = Registry(self)
        return reg

    async def join(
        self,
        address: str,
        timeout: float = 30.0,  # noqa: ASYNC109 (timeout is API)
        key: str = "",
        until: float | None = None,
    ) -> None:
        """Join the cluster whose registry is at ``address``. ValueError when the name is
        taken; AuthError on a wrong token; WorkerLost when nobody answers. ``key``: the
        one a head that started this process gave it, for the name it keeps for it.
        ``until``: a ``time.monotonic()`` up to which a head that does not answer (its
        process stopped, its loop blocked) is waited for, at each step (the handshake,
        the hello, the join's answer; never less than the handshake's deadline and the
        heartbeat timeout it is given otherwise), on one connection, the request sent
        once (``actorgrad worker --wait``)."""
        patient = until is not None
        until = -math.inf if until is None else until
        # (never shorter than the usual deadlines: a short wait keeps those)
        step = max(transport.HANDSHAKE_TIMEOUT, until - time.monotonic())
        try:
            conn = await self.open_connection(address, deadline=step if patient else None)
        except WorkerLost as exc:
            raise nobody_listens(exc) from exc.__cause__
        self._advertise_route_to(conn)
        self.joining_conn = conn
        sent = time.monotonic()
        if patient:
            # Its silence is waited out until then (see _silent_too_long), on this
            # connection: closed for it, the request sent could still be taken by the
            # head once it went on, and a join tried again meanwhile on another one
            # could be refused as a duplicate of itself. (A head that went on just as
            # the handshake used the wait up gets the usual time.)
            timeout = max(HEARTBEAT_TIMEOUT, until - sent)
            self._join_patient = True
        try:
            wid, version, members, cluster = await self.call_on(
                conn,
                "actorgrad.runtime.registry:_join",
                (self.name, self.address, self.local_address, key),
                timeout=timeout,
            )
        except BaseException as exc:
            self.joining_conn = None
            self._join_patient = False
            # (also timed out or cancelled: the head may have taken the join, and keeps
            # a member while its connection stays; closed, it leaves: the name was taken
            # for good, and the changes piled up here)
            conn.close()
            self._early_changes.clear()
            if isinstance(exc, RemoteError) and exc.remote_type == "ValueError":
                raise ValueError(exc.remote_message) from None
            if isinstance(exc, RemoteError) and exc.remote_type == type_name(NameTaken):
                # (its own type: `actorgrad worker --wait` waits for such a name)
                raise NameTaken(exc.remote_message) from None
            if patient and isinstance(exc, RpcTimeout):
                # (named as the head that did not answer, not as a call of an internal
                # function that timed out)
                raise WorkerLost(
                    f"the cluster's head at {address} took the connection but did not "
                    f"answer the join within {time.monotonic() - sent:.1f} s (its process "
                    "stopped, or its event loop blocked, for all that time?)"
                ) from None
            raise
        self._join_patient = False
        self.id = int(wid)
        self.cluster = (int(cluster[0]), str(cluster[1]))
        self.registry_conn = conn
        self.joining_conn = None
        self._apply_members(version, members)
        self._apply_early_changes()
        self._warn_if_out_of_reach(conn.peer_name, address)

    def _advertise_route_to(self, conn: Connection) -> None:
        """A worker listening on every interface advertises the address it reaches the
        head from (on a host with several, the one routed towards the cluster), unless
        no listener of it takes that address's family (an IPv6-only one: advertised at
        an IPv4 address, nothing answered there) or the address is a loopback one
        (joined at 127.0.0.1 on the head's host: others could not reach it there): then
        the address it took from its default route stays."""
        if self.transport_kind != "tcp" or self._server is None or self.advertise is not None:
            return
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is None:
            return
        # (host "" listens on both families, one socket each; "::" on both with one)
        ports = [
            s.getsockname()[1]
            for s in self._server.sockets
            if (s.family == sock.family or _is_dual_stack(s))
            and s.getsockname()[0] in ("0.0.0.0", "::")
        ]
        host = sock.getsockname()
        if ports and not transport.is_loopback(host[0]):
            self.address = transport.host_port((host[0], ports[0], *host[2:]))

    def _warn_if_out_of_reach(self, head: str | None, joined_at: str) -> None:
        """Warn when this worker advertises a loopback address in a cluster with members
        at other addresses: workers on other hosts cannot connect to it. (A driver on
        the head's host joining it at 127.0.0.1 bound its loopback, as a cluster on one
        host wants, and silently: calls to it from other hosts failed, "cannot connect".)"""
        if (
            self.transport_kind != "tcp"
            or not transport.is_loopback(self.host)
            or self.advertise is not None  # (reached where it says, a tunnel's end)
        ):
            return
        away = sorted(
            e[1]
            for e in list(self.members.values())
            if type(e[1]) is str and not transport.is_loopback(transport.split_address(e[1])[0])
        )
        if not away:
            return
        head_at = self.members[head][1] if head in self.members else "?"
        if transport.is_loopback(transport.split_address(joined_at)[0]):
            # (and no loopback host given: told to join elsewhere alone, a worker given
            # one stayed bound to it)
            fix = f"join at the cluster's own address ({head_at}), not at a loopback one, "
            fix += "with no loopback host given, to bind every interface"
        else:  # (it joined at the cluster's address: its host was given, as a loopback one)
            fix = "bind every interface (host 0.0.0.0 or ::) or one they reach"
        log.warning(
            "worker %s is bound to %s in a cluster with members at %s: workers on other "
            "hosts cannot connect to it (they use its own connections to them, if any); %s",
            self.name,
            self.host,
            ", ".join(away[:3]) + (", ..." if len(away) > 3 else ""),
            fix,
        )

    # ------------------------------------------------------------------ connections
    def _hello_header(self, peer: str | None) -> list[Any]:
        """The first frame this worker sends on a connection after the handshake: who
        it is, where it listens, the largest frame it takes, and how many goodbyes for
        its silence it sent ``peer`` (the worker at the other end, if known)."""
        drops = self._drops.get(peer, 0) if peer is not None else 0
        key, head = self.cluster
        return [K_HELLO, self.name, self.id, self.address, self.max_frame_size, drops, key, head]

    def _new_conn(self, kind: str | None = None) -> Connection:
        kind = kind or self.transport_kind
        cls = transport.StreamConnection if kind != "inproc" else Connection
        conn = cls(
            kind=kind,
            on_frame=self._on_frame,
            on_lost=self._on_lost,
            on_refuse=self._refused,
            # (until the peer's hello, the only frame it may send: a frame length read
            # before allocated a buffer that big at once, kept for as long as the
            # connection stayed open)
            max_frame_size=min(HELLO_MAX_FRAME, self.max_frame_size),
            owner=self.name,
            frame_front=wire.front_nbytes,
        )
        self._every_conn.add(conn)
        return conn

    def _accept(self) -> Connection:
        conn = self._new_conn()
        conn.max_unsent = MAX_UNSENT_REPLIES
        self._conns.add(conn)
        if len(self._conns) >= self._near_file_limit:
            self._warn_file_limit()
            if len(self._handshaking) >= self._near_limit_handshakes:
                # (room for this one: see MAX_HANDSHAKING)
                self._shed_handshake(next(iter(self._handshaking)), "near the open-files limit")
        if self._closing:
            # closed now: its transport, not made yet, is aborted the moment it is
            # (connection_made), not a loop turn later (the peer waited out its
            # handshake deadline, 5 s, and its socket could outlive the loop)
            conn.close(WorkerLost(f"worker {self.name!r} is shutting down"))
        else:
            if len(self._handshaking) >= MAX_HANDSHAKING:
                self._shed_handshake(next(iter(self._handshaking)), "too many in their handshake")
            self._handshaking[conn] = ""
            self.spawn(self._accept_handshake(conn))
        return conn

    async def _accept_handshake(self, conn: Connection) -> None:
        hello = conn.hello = self.loop.create_future()  # type: ignore[attr-defined]
        self._count_host(conn)
        try:
            await transport.handshake(conn, self.token, server=True)
        except AuthError as exc:
            # (news when the client failed it; not when it left first: it gave up
            # waiting for us, or went away)
            if transport.closed_mid_handshake(exc):
                log.debug("worker %s rejected a connection: %s", self.name, exc)
            else:
                self._log_rejected("worker %s rejected a connection: %s", self.name, exc)
            self._conns.discard(conn)
            return
        finally:
            self._handshake_over(conn)
        # The hello has a deadline too: a peer that passed the handshake and said
        # nothing more kept its connection (and what it had sent) for good, since
        # heartbeats watch named peers only.
        try:
            async with asyncio.timeout(transport.HANDSHAKE_TIMEOUT):
                await asyncio.shield(hello)
        except TimeoutError:
            self._log_rejected(
                "worker %s closed a connection from %s: no hello within %s s of the handshake",
                self.name,
                conn.peer_addr,
                transport.HANDSHAKE_TIMEOUT,
            )
            conn.abort(ProtocolError("no hello after the handshake"))
        except ActorgradError:
            pass  # (closed before its hello: see _on_lost)

    def _count_host(self, conn: Connection) -> None:
        """Count ``conn``, just accepted, against its remote host's share of the
        connections in their handshake (its address is known now, not when it was
        made), and close that host's oldest beyond MAX_HANDSHAKING_PER_HOST."""
        if conn not in self._handshaking or conn.kind != "tcp":
            return  # (closed already; a local one)
        host, _ = transport.split_address(str(conn.peer_addr))
        host = host.removeprefix("::ffff:")  # (an IPv4 peer of a dual-stack socket)
        if not host or transport.is_loopback(host):
            return
        self._handshaking[conn] = host
        mine = self._handshaking_from.setdefault(host, {})
        mine[conn] = None
        if len(mine) > MAX_HANDSHAKING_PER_HOST:
            self._shed_handshake(next(iter(mine)), f"too many in their handshake from {host}")

    def _make_room(self, n: int) -> int:
        """Close up to ``n`` of the oldest connections in their handshake, a quarter of
        them at most: this process is out of open files, and new connections wait (see
        transport.Listener). How many it closed. (All of them at once, the newest went
        too: a token holder's accepted a turn before, its handshake all but done.)"""
        n = min(n, max(1, len(self._handshaking) // 4))
        closed = 0
        while closed < n and self._handshaking:
            self._shed_handshake(next(iter(self._handshaking)), "out of open files")
            closed += 1
        return closed

    def _handshake_over(self, conn: Connection) -> None:
        """``conn`` is no longer in its handshake (done, failed or closed)."""
        host = self._handshaking.pop(conn, None)
        if host:
            mine = self._handshaking_from[host]
            del mine[conn]
            if not mine:  # (a dict per host seen: strangers' hosts would pile up)
                del self._handshaking_from[host]

    def _shed_handshake(self, conn: Connection, why: str) -> None:
        """Close ``conn``, the oldest of the connections in their handshake (``why``:
        there are too many), to make room for a new one; say so once a minute."""
        self._handshake_over(conn)
        conn.abort(AuthError(f"closed in its handshake by worker {self.name!r}: {why}"))
        self._shed += 1
        self._shed_last = (conn.peer_addr, why)
        if self._shed_timer is None:
            wait = self._shed_warned + REJECTED_LOG_WINDOW - self.loop.time()
            if wait <= 0:
                self._say_shed()
            else:
                # (at the minute's end, whether more come or not: said only with the
                # next one after it, the rest of a flood that stopped went unsaid)
                self._shed_timer = self.loop.call_later(wait, self._say_shed)

    def _say_shed(self) -> None:
        """Say how many connections in their handshake were closed to make room since
        this was last said (at once, then at most once a minute: REJECTED_LOG_WINDOW)."""
        timer, self._shed_timer = self._shed_timer, None
        if timer is not None:
            timer.cancel()
        if not self._shed:
            return
        self._shed_warned = self.loop.time()
        where, why = self._shed_last
        log.warning(
            "worker %s closed %d connection(s) still in their handshake (the oldest, "
            "from %s last: a stranger's, or a peer that did not complete it) to make "
            "room for new ones: %s (%d in their handshake, at most %d, %d from one "
            "remote host; %d connections open, ulimit -n %s)",
            self.name,
            self._shed,
            where,
            why,
            len(self._handshaking),
            MAX_HANDSHAKING,
            MAX_HANDSHAKING_PER_HOST,
            len(self._conns),
            open_files_limit(),
        )
        self._shed = 0

    def _warn_file_limit(self) -> None:
        """Say, once a minute, that this worker's connections near the process's limit
        of open files: beyond it, a new connection is closed at once (and the
        listener says so), and its peer hears only that the connection closed before
        its handshake."""
        now = self.loop.time()
        if now - self._file_limit_warned >= 60.0:
            self._file_limit_warned = now
            log.warning(
                "worker %s has %d connections open, near this process's limit of open "
                "files (%s, ulimit -n): the oldest connections still in their handshake "
                "are closed to make room for new ones (those that do not complete it "
                "close after %g s); beyond the limit, new connections are closed at once",
                self.name,
                len(self._conns),
                open_files_limit(),
                transport.HANDSHAKE_TIMEOUT,
            )

    def _log_rejected(self, msg: str, *args: Any) -> None:
        """Log a rejected connection: at most REJECTED_LOG_LINES a minute, then one line
        saying that more are not logged (3,000 stalled connections wrote 3,000 lines),
        and at the minute's end how many were not."""
        now = self.loop.time()
        if now - self._rejected_since >= REJECTED_LOG_WINDOW:
            self._count_unlogged()  # (done by its timer, as a rule)
            self._rejected_since = now
        if self._rejected_logged < REJECTED_LOG_LINES:
            self._rejected_logged += 1
            log.warning(msg, *args)
            if self._rejected_logged == REJECTED_LOG_LINES:
                log.warning(
                    "worker %s: not logging further rejected connections for up to %g s",
                    self.name,
                    REJECTED_LOG_WINDOW,
                )
        else:
            if self._rejected_timer is None:
                # (at the minute's end, whether more come or not: said only with the next
                # rejection after it, a flood that stopped was never counted, or was
                # counted hours later, with a stranger's next try)
                self._rejected_timer = self.loop.call_later(
                    self._rejected_since + REJECTED_LOG_WINDOW - now, self._count_unlogged
                )
            self._rejected_unlogged += 1

    def _count_unlogged(self) -> None:
        """Say how many rejected connections of the minute ending were not logged."""
        timer, self._rejected_timer = self._rejected_timer, None
        if timer is not None:
            timer.cancel()
        if self._rejected_unlogged:
            log.warning(
                "worker %s: %d more rejected connections in those %g s were not logged",
                self.name,
                self._rejected_unlogged,
                REJECTED_LOG_WINDOW,
            )
        self._rejected_logged = self._rejected_unlogged = 0

    async def open_connection(
        self,
        address: str,
        local: str = "",
        deadline: float | None = None,
        peer: str | None = None,
    ) -> Connection:
        """Connect, handshake and exchange hellos. AuthError on a wrong token,
        WorkerLost when nobody listens there, or when a step takes longer than
        ``deadline`` seconds (default ``transport.HANDSHAKE_TIMEOUT``). With ``local``
        (the peer's advertised Unix socket) reachable from here, that is tried first,
        and TCP if it fails. ``peer``: the worker expected there, if known."""
        if local and self.local_sockets and transport.local_reachable(local):
            try:
                return await self._open(address, local, deadline, peer)
            except transport.Unanswered:
                raise  # (hung: TCP would wait out its deadline again)
            except (ActorgradError, OSError) as exc:
                # nobody there (it died, is shutting down, or went elsewhere), or an
                # impostor failing the handshake: TCP reaches the real worker. Only the
                # impostor is news.
                impostor = isinstance(exc, AuthError) and not transport.closed_mid_handshake(exc)
                log.log(
                    logging.WARNING if impostor else logging.DEBUG,
                    "worker %s: local socket of %s failed (%s); using TCP",
                    self.name,
                    address,
                    exc,
                )
        return await self._open(address, "", deadline, peer)

    async def _open(
        self, address: str, local: str, deadline: float | None, peer: str | None
    ) -> Connection:
        if deadline is None:
            deadline = transport.HANDSHAKE_TIMEOUT
        conn = self._new_conn("unix" if local else None)
        conn.outgoing = True
        try:
            if local:
                async with asyncio.timeout(deadline):
                    await transport.open_local(self.loop, local, conn)
            elif address.startswith("inproc://"):
                transport.open_inproc(address, conn)
            else:
                host, port = transport.split_address(address)
                async with asyncio.timeout(deadline):
                    await self.loop.create_connection(lambda: conn, host, int(port))
        except TimeoutError:
            # (the time it had: "timed out" alone read as the network's, after a
            # `status --timeout 1e-9` of the user's)
            raise WorkerLost(
                f"cannot connect to {address}: no answer within {deadline:g} s"
            ) from None
        except (OSError, ValueError) as exc:
            err = _as_uvloop_raises(exc)
            raise WorkerLost(f"cannot connect to {address}: {err}") from err
        self._conns.add(conn)
        conn.hello = self.loop.create_future()  # type: ignore[attr-defined]
        try:
            await transport.handshake(conn, self.token, server=False, timeout=deadline)
            conn.send_nowait(wire.encode_frame(self._hello_header(peer), None))
            async with asyncio.timeout(deadline):
                await conn.hello  # type: ignore[attr-defined]
        except TimeoutError:
            conn.abort(None)
            # (said as the handshake's own deadline says it: a join to a head stopped or
            # blocked right after the handshake read "no hello from 127.0.0.1:4000",
            # no cause, no time; a peer's is said again by _unreachable)
            raise transport.Unanswered(
                f"{address} completed the handshake but sent no hello within {deadline:g} s "
                "(the process is hung or overloaded)"
            ) from None
        except BaseException:
            conn.abort(None)
            self._conns.discard(conn)
            raise
        return conn

    async def _conn_to(self, dest: str) -> Connection:
        conn = self._out.get(dest)
        if conn is not None and not conn.closed and not conn.bye_read:
            return conn
        if self._closing:
            raise WorkerLost(f"worker {self.name!r} is shutting down")
        task = self._connecting.get(dest)
        if task is None:
            # (in a context of its own: the connection serves every caller, and its
            # internal calls, a membership refresh, must carry no caller's state, such
            # as the interceptor's context: the head refused that one)
            task = self.spawn(
                self._connect_peer(dest),
                name=f"actorgrad-connect-{dest}",
                context=contextvars.Context(),
            )
            self._connecting[dest] = task
            task.add_done_callback(lambda t: self._connecting.pop(dest, None))
        try:
            return await asyncio.shield(task)
        except ActorgradError as exc:  # (each caller its own: see one_each)
            # (the task's own error, shared, has this frame in its traceback now: with the
            # task still in it, each call to a lost worker left a reference cycle)
            del task
            raise one_each(exc) from exc.__cause__
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # (the shutdown cancelled the connecting task, the worker's own: its
                # CancelledError ended a caller nobody cancelled, and a TaskGroup or
                # asyncio.run took that caller for cancelled)
                raise WorkerLost(f"worker {self.name!r} shut down") from None
            raise

    async def _connect_peer(self, dest: str) -> Connection:
        entry = self.members.get(dest)
        unasked = None
        if entry is None:
            unasked = await self._refresh_members()
            entry = self.members.get(dest)
        if entry is None:
            back = self._opened_by(dest)
            if back is not None:
                # (a process the head dropped (stopped for IDLE_TIMEOUT, then went on):
                # no member, yet alive, and it reached us. It goes on calling, and a
                # backward pass it starts waits for this worker's reports: dropped, they
                # left its backward waiting for good)
                return self._reach_lost(dest, back)
            if dest in self._lost:
                raise WorkerLost(f"worker {dest!r} has left the cluster")
            if unasked is not None:
                # (the head could not say whether it joined: a worker that had, its
                # news on the way over a stalled link or from a head whose loop was
                # blocked for the heartbeat timeout, was called "unknown", a ValueError
                # that reads as a wrong name, not worth a retry)
                raise WorkerLost(
                    f"worker {dest!r} is not in this worker's view of the cluster, and the "
                    f"cluster's head did not give its member list: {unasked}"
                )
            known = self.worker_names()
            shown = repr(known)
            if len(known) > 20:  # (names are short, their number is not)
                shown = f"{repr(known[:20])[:-1]}, ...] ({len(known)} in all)"
            alone = ""
            if self.registry is not None and known == [self.name]:
                # (a driver started with `python train.py` where `actorgrad run` was
                # meant, or without ACTORGRAD_ADDRESS exported: its ag.init() made a
                # cluster of its own, and "unknown worker 'w1'" named a worker its user
                # saw running elsewhere, without saying why this one could not see it)
                alone = (
                    f" (worker {self.name!r} started a cluster of its own, as ag.init() "
                    "without an address and without ACTORGRAD_ADDRESS does, and no worker "
                    "has joined it: to use a running cluster, pass its address, "
                    "ag.init(name, address=...), or set ACTORGRAD_ADDRESS and "
                    "ACTORGRAD_TOKEN as `actorgrad cluster` prints them; to start one for "
                    "a script, run it with `actorgrad run -n N script.py`; for workers "
                    "that join this one, `await ag.wait_for_workers(...)` first)"
                )
            raise ValueError(
                f"unknown worker {short_repr(dest, 80)}; known workers: {shown}{alone}"
            )
        later = self._opened_by(dest, later_than=entry[0])
        if later is not None:
            # A process that joined under the name after the member known here reached
            # this worker (its hello says so; ids are issued in turn): that member left
            # (a name is one member's at a time), and the head's word of the leave and
            # the join is not read here yet (a link to the head slower than to the new
            # process). The member's address may be the dead one's (another port, or
            # host): a backward pass in a context the new process started, taken in
            # here (see dist.context), sent its gradients there, and the new process's
            # backward waited for good. What goes to the name goes over the connection
            # the new process opened until the news comes (its address with it). Its
            # close reports no loss meanwhile (no member's: see _on_lost): a pass
            # waiting on it finds it silent (see heard_from).
            self._out[dest] = later
            return later
        if self.said_goodbye(dest, entry[0]):
            # (that process shuts down: its listener is closed, and a connection it
            # opened to us, its goodbye unread yet, is read no more: see _opened_by)
            raise WorkerLost(f"worker {dest!r} has left the cluster")
        tried = time.monotonic()
        # (a connection it opened to us, if any, tells below whether it lives: it pings
        # that one seldom while nobody waits on it)
        self._ask_all(dest, tried)
        waited = PEER_CONNECT_TIMEOUT  # (the deadline of each step of connecting)
        try:
            try:
                conn = await self.open_connection(entry[1], entry[2], waited, dest)
            except transport.Unanswered:
                quiet = await self._quiet_left(dest, entry[0])
                if quiet <= 0:
                    raise
                # (it said it may be silent so long, its loop busy importing a script:
                # waited for, as its peers that heard it wait on their connections)
                waited = quiet + PEER_CONNECT_TIMEOUT
                conn = await self.open_connection(entry[1], entry[2], waited, dest)
        except (WorkerLost, AuthError) as exc:
            now = self.members.get(dest)
            if now is not None and now[0] != entry[0]:
                # (another process joined under the name meanwhile, a restarted driver:
                # its address and connections now. The messages waiting for this
                # connection failed with the dead one's address)
                return await self._connect_peer(dest)
            back = self._opened_by(dest, entry[0])
            if isinstance(exc, AuthError):
                # Something at its address that is no worker of this cluster (a server
                # of another kind, a worker of another cluster, an impostor): the peer
                # itself, which proved our token to reach us, is over there, as where
                # nothing answers. (Raised, a backward pass's report to its origin was
                # dropped, "cannot report", and the origin waited for good.) With no
                # such way, the peer is unreachable, WorkerLost naming it: this worker
                # joined with the cluster's token, so the token is not what is wrong
                # (an AuthError said so, and named only the address).
                if back is None:
                    raise self._unreachable(dest, entry, exc, waited) from None
                return self._use_opened_by(dest, entry, back, exc)
            if back is None or (
                # (hung: silent on its own connection too while we waited, where it
                # pings every HEARTBEAT_INTERVAL once asked (above): as lost. Not
                # silent: the address reaches something else)
                isinstance(exc, transport.Unanswered) and back.last_recv <= tried
            ):
                raise self._unreachable(dest, entry, exc, waited) from None
            return self._use_opened_by(dest, entry, back, exc)
        if conn.peer_name != dest:
            conn.close()
            other = WorkerLost(f"{entry[1]} is now worker {conn.peer_name!r}, not {dest!r}")
            back = self._opened_by(dest, entry[0])
            if back is None:
                raise other
            return self._use_opened_by(dest, entry, back, other)
        self._out[dest] = conn
        return conn

    def conns_with(self, peer: str, pid: int) -> Iterator[Connection]:
        """This worker's open connections with the process of cluster id ``pid`` of
        worker ``peer``."""
        return (c for c in self._conns if c.peer_name == peer and c.peer_id == pid and not c.closed)

    def quiet_heard(self, peer: str, pid: int) -> float:
        """How long from now the process of cluster id ``pid`` of worker ``peer`` said,
        on a connection with this worker, that it may be silent (see going_quiet); 0 if
        it did not."""
        until = max((c.quiet_until for c in self.conns_with(peer, pid)), default=0.0)
        return max(0.0, until - time.monotonic())

    async def _quiet_left(self, peer: str, wid: int) -> float:
        """How long process ``wid`` of member ``peer`` said it may be silent from now
        (see going_quiet), 0 if it did not: as one of this worker's connections with it
        heard, else as the cluster's head did. It says so only to the peers it talks
        to; the head is always one, and a worker that joined after it spoke, or never
        talked with it, learns it there (without it, it took the peer for hung)."""
        heard = self.quiet_heard(peer, wid)
        if heard > 0:
            return heard
        head = self.registry_conn
        if self.registry is not None or head is None or head.closed or head.peer_name == peer:
            return 0.0  # (the head: its own connections said it; or no head to ask)
        try:
            left = await self.call_on(
                head, "actorgrad.runtime.registry:_quiet", (peer, wid), timeout=HEARTBEAT_TIMEOUT
            )
        except (ActorgradError, OSError, ValueError) as exc:  # (only a question: 0)
            log.debug(
                "worker %s: cannot ask the head whether %r is quiet: %s", self.name, peer, exc
            )
            return 0.0
        if type(left) not in (int, float) or not 0 <= left <= MAX_QUIET:
            return 0.0
        return float(left)

    def _use_opened_by(
        self, dest: str, entry: Any, back: Connection, exc: WorkerLost | AuthError
    ) -> Connection:
        """Worker ``dest``'s address does not reach it from here (it bound a loopback
        address, a firewall lets connections one way only: nothing answers there, or
        something else does), but it reached us: what we send it goes over its
        connection ``back``. (Without, a backward pass whose origin no worker could
        reach waited for good for their gradients and credit.) Not warned of when the
        address reached it shutting down (it closed in the handshake): the address is
        right, and a cluster stopping with calls connecting warned so, wrongly."""
        if isinstance(exc, transport.ClosedInHandshake):
            log.debug("worker %s: %s; using the connection it opened", self.name, exc)
        elif (dest, entry[0]) not in self._unreachable_warned:  # (once per process)
            self._unreachable_warned.add((dest, entry[0]))
            log.warning(
                "worker %s: cannot connect to worker %r at its address (%s); using the "
                "connection it opened to this worker",
                self.name,
                dest,
                exc,
            )
        self._out[dest] = back
        return self._reach_lost(dest, back)

    def _reach_lost(self, dest: str, conn: Connection) -> Connection:
        """``conn``, a connection with ``dest`` taken to reach it (one it opened to us,
        or a one-way message's): marked with the loss if ``dest`` was reported lost (the
        head said it left, another connection of its closed). Its close then reports
        that loss again (see _on_lost): a message sent there may be lost unsaid (a
        worker that left, its goodbye there unread yet, or one that died), and whatever
        waits for its answer (a backward pass started after the loss) heard of no loss.
        Only that loss (its own record, by identity): heard from since and lost again,
        the peer's later loss is reported once, as any (twice, a drop's too, and the
        greeting of a peer that dropped us skipped)."""
        if self.is_lost(dest):
            conn.reached_lost = self._lost[dest]  # (this loss: see _on_lost)
        return conn

    def connected_to(self, peer: str) -> bool:
        """Whether a message to ``peer`` leaves at once, over an open connection: one to
        its address, or one it opened to this worker (where its address does not reach
        it from here, see _connect_peer)."""
        conn = self._out.get(peer)
        if conn is not None and not conn.closed:
            return True
        entry = self.members.get(peer)
        return entry is not None and self._opened_by(peer, entry[0]) is not None

    def _opened_by(
        self, dest: str, dest_id: int | None = None, later_than: int | None = None
    ) -> Connection | None:
        """An open connection that worker ``dest`` (the process of cluster id ``dest_id``;
        None: any process that joined a cluster; or one that joined after the process of
        cluster id ``later_than``) opened to this one, if any."""
        for c in self._conns:
            if (
                c.peer_name == dest
                and not c.outgoing
                and not c.closed
                # (nor one it said goodbye on: it reads nothing more there, and its
                # close, a read later, reports no loss of a worker that left the
                # cluster meanwhile: a one-way message sent on it was lost unsaid, and
                # a backward pass waiting for it waited for good. Nor one of a process
                # that said goodbye on another: its own goodbye may be unread yet,
                # and the loss was reported at the other's close)
                and not c.bye_read
                and self._left.get(dest) != c.peer_id
                and c.peer_id is not None
                and (dest_id is None or c.peer_id == dest_id)
                and (later_than is None or issued_before(later_than, c.peer_id))
            ):
                return c
        return None

    def _is_membership(self, conn: Connection) -> bool:
        """Whether ``conn`` is this worker's connection with the registry's head (or, on
        the head, a member's with it): closing it is leaving the cluster."""
        return conn is self.registry_conn or (
            self.registry is not None and conn in self.registry.conns
        )

    def _session_conns(self, name: str, wid: int | None) -> list[Connection]:
        """The open connections with worker ``name`` as the process of cluster id
        ``wid``, but the membership's (see _stale_end)."""
        return [
            c
            for c in self._conns
            if c.peer_name == name
            and c.peer_id == wid
            and not c.closed
            and not self._is_membership(c)
        ]

    def _unreachable(
        self, dest: str, entry: Any, exc: WorkerLost | AuthError, waited: float
    ) -> WorkerLost:
        """The error of a failed connection to worker ``dest`` (member ``entry``), each
        step of which had ``waited`` seconds."""
        if isinstance(exc, transport.Unanswered):
            # (named by its address in the cluster, not the local socket's internal name;
            # with the time it had: longer for a peer that said it may be silent)
            return WorkerLost(
                f"worker {dest!r} ({entry[1]}) accepted the connection but did not answer "
                f"within {round(waited, 1):g} s: hung or overloaded"
            )
        # (a plain WorkerLost: it may travel as a RemoteError)
        if self.registry_lost.is_set():
            # (the cause, most likely: the workers leave when the head goes; and no
            # head will say it is back, or gone: it is lost for good)
            self._peer_lost(dest, cause=head_lost(self.registry_lost_why), pid=entry[0])
            exc = WorkerLost(f"{exc}; {head_lost(self.registry_lost_why)}")
        return WorkerLost(f"worker {dest!r}: {exc}")

    async def _refresh_members(self, gap: bool = False) -> ActorgradError | None:
        """Fetch the whole member list from the head. ``gap``: the fetch a change after
        a gap asked for, which owns the changes buffered meanwhile (a fetch for an
        unknown name that failed cleared them under a fetch still on its way). Returns
        the error of a fetch that failed, or of a head lost (None: fetched, or a worker
        in no cluster)."""
        got = False
        try:
            if self.registry is not None:
                self._apply_members(*self.registry.snapshot())
                got = True
            elif self.registry_conn is not None and not self.registry_conn.closed:
                snap = await self.call_on(
                    self.registry_conn, "actorgrad.runtime.registry:_snapshot", timeout=10
                )
                self._apply_members(*snap)
                got = True
            elif self.registry_conn is not None:
                # (a member that lost the head: none to ask. Not "no head": a worker that
                # had joined, its news unread as the connection went, was called
                # "unknown", a wrong name's ValueError, where this worker's other errors
                # say it lost the head)
                return WorkerLost(head_lost(self.registry_lost_why or HEAD_CONN_CLOSED))
        except ActorgradError as exc:  # (the next change of the membership asks again)
            log.debug("worker %s: member list not refreshed: %s", self.name, exc)
            return exc
        finally:
            if gap:
                self._members_refreshing = False
                if got:
                    self._apply_early_changes()
                elif self._members_version >= 0:  # (joined; the next change shows the
                    self._early_changes.clear()  # gap again, and asks again)
        return None

    def _apply_early_changes(self) -> None:
        """The changes that came while a whole list was on its way (the join's answer,
        a refresh) or waited for its coroutine: those after the list's version apply
        now (a worker that joined right after this one was missing here for good)."""
        early, self._early_changes = self._early_changes, []
        for change in sorted(early, key=lambda c: c[0]):
            self._apply_member(*change)

    def _apply_members(self, version: int, members: dict[str, Any]) -> None:
        """The head's whole member list at ``version`` (the join's answer, a refresh)."""
        if version <= self._members_version:
            return
        self._members_version = version
        old = self.members
        self.members = {n: _member_entry(v) for n, v in members.items()}
        for n, entry in old.items():
            now = self.members.get(n)
            if now is None or now[0] != entry[0]:
                # (Also under a name still there with another cluster id: a snapshot
                # can skip the version it left in, when a refresh got a newer one.)
                self._member_gone(n, entry[0])
        for n, entry in self.members.items():
            was = old.get(n)
            if was is None or was[0] != entry[0]:
                self._member_new(n, entry[0])
        self._members_now_changed()

    def _apply_member(self, version: int, name: str, entry: Any) -> None:
        """One change the head pushed after the member list this worker holds: ``name``
        joined with ``entry`` ([id, address, local socket]) or left (None). Each member
        gets only the change, not the whole list: with whole lists, N workers joining
        moved O(N^3) entries (400 took 51 s to start). A change that came before the
        join's list waits for it (see join), one the list held here has is skipped, and
        after a gap (not seen: changes come in order on one connection) the whole list
        is fetched."""
        held = self._members_version
        if held < 0 or self._members_refreshing:
            # (a whole list is on its way, or came and its coroutine has not run yet:
            # the join's answer, a refresh; the changes after it wait for it)
            self._early_changes.append((version, name, entry))
            return
        if version <= held:
            return
        if version != held + 1:
            self._members_refreshing = True
            self._early_changes.append((version, name, entry))
            self.spawn(self._refresh_members(gap=True), name=f"actorgrad-members-{self.name}")
            return
        self._members_version = version
        # (changed in place: a copy at each change cost O(N) a member, O(N^3) for N
        # workers joining, 16 us of the 60 a change took at N = 400; code that may run
        # in the pool's threads iterates over a snapshot, see worker_names)
        members = self.members
        was = members.pop(name, None)
        now = None if entry is None else _member_entry(entry)
        if now is not None:
            members[name] = now
        if was is not None and (now is None or now[0] != was[0]):
            self._member_gone(name, was[0])
        if now is not None and (was is None or was[0] != now[0]):
            self._member_new(name, now[0])
        self._members_now_changed()

    def _member_gone(self, name: str, wid: int) -> None:
        # it left the cluster (the registry saw it go): its RRef counts go too
        rref.peer_lost(self, name, wid)
        self._peer_lost(name, cause="it left the cluster", pid=wid)
        self._drops.pop(name, None)  # (a process joining under the name starts anew)
        self._seen_drops.pop(name, None)
        # (_left stays, with the name in _lost: a connection that process opened to us,
        # its goodbye unread yet, is no way to reach it; see _opened_by)

    def _member_new(self, name: str, wid: int) -> None:
        self._rref_departed.pop((name, wid), None)  # (its cluster id reused: see rref)
        self._lost.pop(name, None)  # (re)joined: a later loss is reported
        self._left.pop(name, None)
        self._drop_replaced(name, wid)

    def _members_now_changed(self) -> None:
        self._members_changed.set()
        self._members_changed = asyncio.Event()

    def _drop_replaced(self, name: str, wid: int) -> None:
        """Close the connections with a process another one (cluster id ``wid``)
        replaced as worker ``name``: a hung one's could outlive its membership, and
        calls to the name went on to it (and what it still sent was taken for the new
        one's: a late release of an RRef freed the new one's value). Not those of a
        process that joined after it: a join read late (this worker's view behind, the
        process gone already) closed the live newer one's, calls in flight on them."""
        for conn in list(self._conns):
            if (
                conn.peer_name == name
                and conn.peer_id is not None
                and issued_before(conn.peer_id, wid)
            ):
                conn.abort(WorkerLost(f"worker {name!r} was replaced by another process"))

    def _on_lost(self, conn: Connection, exc: BaseException | None) -> None:
        self._conns.discard(conn)
        self._handshake_over(conn)  # (counted no more, now: see MAX_HANDSHAKING)
        self._paused.discard(conn)
        hello = getattr(conn, "hello", None)
        if hello is not None and not hello.done():
            # (closed before its hello came: it refused ours, a malformed one, or went
            # away; we waited out the deadline, then said it did not answer)
            hello.set_exception(
                # (its own type: refused for what we sent, not gone, `actorgrad worker
                # --wait` does not try again until its deadline)
                transport.HelloRefused(
                    f"{conn.peer_addr} closed the connection before its hello, refusing "
                    f"ours: {conn.refused_why}"
                )
                if conn.refused_why
                else WorkerLost(
                    # (this end refused what came, a malformed hello say: it said "it
                    # refused ours", the other way round, and the reason was in the log
                    # only)
                    f"worker {self.name!r} refused what {conn.peer_addr} sent before "
                    f"its hello, and closed the connection: {exc}"
                    if isinstance(exc, ProtocolError)
                    else f"{conn.peer_addr} closed the connection before its hello (it "
                    f"refused ours, worker name {self.name!r:.80}: see its log, or it went "
                    "away)"
                )
            )
            hello.exception()  # (read: whoever gave up waiting for it need not)
        name = conn.peer_name
        if name is not None and self._out.get(name) is conn:
            del self._out[name]
        if isinstance(exc, WorkerLost):
            err = exc
        elif conn.goodbye:
            err = WorkerLost(f"worker {name!r} has left the cluster")
        elif conn.refused_why:
            err = WorkerLost(
                f"worker {name!r} closed the connection on a message from this worker: "
                f"{conn.refused_why}"
            )
        elif conn.dropped_why:
            # (said: a driver back from a long stop read "connection to worker 'w1'
            # lost", no reason, for a peer that lived on and had dropped it)
            err = WorkerLost(
                f"worker {name!r} closed its connection with this worker: {conn.dropped_why}"
            )
        else:
            err = WorkerLost(f"connection to worker {name!r} lost{f': {exc}' if exc else ''}")
        conn.lost_error = err
        if name is not None and not conn.goodbye and self._rref_releases and not self._closing:
            # (what went on it may be lost: the RRef releases the owner did not
            # acknowledge go again, see rref.conn_lost. Not at the peer's goodbye: it
            # read them all, or it left, its counts with it)
            rref.conn_lost(self, name, conn.peer_id)
        if (
            name is not None
            and conn.pair_id
            and not conn.bye_read
            and not self._closing
            and (conn.pending or conn.abandoned or conn.gave_up or conn.told)
        ):
            # The replies to these calls never came (this end reads nothing more), nor
            # did a goodbye of the peer's, after which they could not come: some may
            # have been sent and lost in the connection's socket buffers (a reset), and
            # the RRef counts they made for this worker stayed with the peer until this
            # worker left the cluster. Told which, the peer takes those back (those
            # read are not named: their RRefs are ours to release). So may requests
            # that counted RRefs for the peer and never reached it: see
            # rref.keep_lost_sent. And one-way RRef messages: see rref._told_on.
            rref.tell_unread(self, name, conn, _given_up(conn))
        if conn.pending:
            pending, conn.pending = conn.pending, {}
            for fut, hooks in pending.values():
                if not conn.goodbye:  # (a peer that said goodbye sent all it will)
                    hooks.lost()
                if not fut.done():
                    fut.set_exception(one_each(err))  # (a note added to one: its own)
                    if self._stopping:
                        # failed by our own shutdown: a call_nowait future nobody
                        # reads any more must not log "exception was never retrieved"
                        fut.exception()
        # (no goodbye naming calls given up can come now, nor a late reply: see
        # _keep_given; a parting connection lingers up to IDLE_TIMEOUT. Closed without
        # the goodbye of a peer that leaves, it may not have read the latest replies
        # (one that refused a message of ours reads nothing after it): kept a while for
        # its word of which, see rref.keep_lost_given)
        # (and, asked, how many of its frames came here: see rref._unread)
        if (
            (conn.given or conn.frames_in)
            and conn.pair_id
            and not conn.goodbye
            and not self._closing
            and name
        ):
            rref.keep_lost_given(self, conn)
        conn.given = conn.given_order = conn.gave_up = conn.unread = conn.told = None
        if conn.abandoned:  # (no late reply can come now)
            abandoned, conn.abandoned = conn.abandoned, {}
            for kept in abandoned.values():
                if conn.goodbye:
                    kept.answered()
                else:
                    kept.lost()
        # The peer's requests still running or waiting here: no reply can reach it now,
        # so they stop as if it had cancelled them (a caller that sent 10,000 calls and
        # went away held every in-flight slot until they ended: other callers waited).
        for cid in list(conn.running):
            self._cancel_request(conn, cid)
        for cid in conn.queued:
            conn.queued[cid] = True
        if conn is self.registry_conn:
            if conn.goodbye:
                self.registry_lost_why = HEAD_SHUT_DOWN
            elif conn.dropped_why:
                self.registry_lost_why = _DROPPED + conn.dropped_why
            elif conn.refused_why:
                self.registry_lost_why = str(err)
            else:
                self.registry_lost_why = str(exc) if exc is not None else HEAD_CONN_CLOSED
            self.registry_lost.set()
        if self.registry is not None:
            self.registry.conn_lost(conn)
        # (a close this worker did not make for the peer's silence, nor the peer with a
        # goodbye: the peer may live on over its other connections, whose frames read
        # after may also be a dead peer's last, see _probe. Not when this worker drops
        # it for its silence: it closes every connection with it but the membership,
        # where a probe, read between two of the drop's goodbyes (connections keep no
        # order), was news that it lives, and the second goodbye a second drop)
        probe = not conn.goodbye and name != self._dropping
        if (
            conn.reached_lost
            and name is not None
            and self._lost.get(name) is conn.reached_lost
            and not self._closing
            and ((member := self.members.get(name)) is None or member[0] == conn.peer_id)
        ):
            # (taken to reach it once it was reported lost: see _reach_lost. Not if
            # heard from since, even if lost again, nor once another process joined
            # under its name. A goodbye read was noted as it was read, a member's or,
            # once its loss was reported, one that left: see the K_BYE read)
            if conn.goodbye and conn.peer_id is not None:
                self._left[name] = conn.peer_id
            self._peer_lost(
                name, conn.dropped_why or None, str(err), again=True, probe=probe, pid=conn.peer_id
            )
            return
        if (
            conn.after_leave
            and name is not None
            and name not in self.members
            and name not in self._lost
            and not self._closing
            and not any(c.peer_name == name and not c.closed for c in self._conns)
        ):
            # (a process seen to leave the cluster whose hello came later, on this, its
            # last connection: killed as it connected, or dropped by the head and going
            # on. No member's close reports a loss, and its loss stayed forgotten: a call
            # to the name raised ValueError "unknown worker" instead of WorkerLost)
            self._peer_lost(name, conn.dropped_why or None, str(err), probe=probe, pid=conn.peer_id)
            return
        if name is not None and name in self.members and not self._closing:
            if conn.peer_id != self.members[name][0]:
                # a connection of a process another one replaced under its name (our
                # view is past it), or of one that never said it was that member (a
                # hello with no cluster id: a process not joined yet, or anyone holding
                # the token saying the name): its end is no news of the live one (it
                # dropped the live one's contexts, its lease). (Were the view behind
                # instead, its catching up reports the old one lost.)
                return
            if self._stale_end(conn, name):
                return
            self._peer_lost(name, conn.dropped_why or None, str(err), probe=probe, pid=conn.peer_id)
            if conn.dropped_why and not any(
                c.peer_name == name and not c.closed for c in self._conns
            ):
                # It took this worker for lost, and refuses calls in its new contexts
                # until a frame comes from here (see is_lost): a driver stopped for a
                # while whose pipeline reaches that worker only through another one
                # never sent it one. (With a connection left, its pings do.)
                self.spawn(self._greet_again(name), name=f"greet-{name}")

    async def _greet_again(self, name: str) -> None:
        """Connect to ``name`` again, which closed its connections with this worker for
        its silence: its hello tells it this worker lives."""
        try:
            await self._conn_to(name)
        except Exception as exc:  # (gone meanwhile: its loss is reported as any other)
            log.info(
                "worker %s: could not reach %s again after it dropped us: %s", self.name, name, exc
            )

    def _new_session(self, name: str, wid: int, drops: int) -> None:
        """A hello from member ``name`` (process ``wid``) that sent this worker
        ``drops`` goodbyes for its silence: if this worker has not taken in the latest,
        the peer dropped it and the goodbye has not come, held up by a network that
        failed (a host cut off for seconds: TCP delivers it once the link is back,
        maybe after this hello). What the peer dropped goes now, before anything of
        the new session comes (see _stale_end)."""
        seen = self._seen_drops.get(name)
        if seen is None or seen[0] != wid:
            self._seen_drops[name] = (wid, drops)  # (the first hello of that process)
        elif drops > seen[1]:
            self._seen_drops[name] = (wid, drops)
            self._peer_lost(name, DROPPED_UNSAID, "it took this worker for lost", pid=wid)
        for c in [c for c in self._session_conns(name, wid) if c.peer_drops < drops]:
            # (older than that drop: the peer closed them then, and reads nothing more
            # on them; what this worker sent on them was lost, the one-way messages of
            # a backward pass too, and the pass waited for good. Their ends are old
            # news: see _stale_end. Not the membership: the peer keeps that one)
            c.abort(
                WorkerLost(
                    f"worker {name!r} closed this connection when it took this worker for lost"
                )
            )

    def _stale_end(self, conn: Connection, name: str) -> bool:
        """Whether the end of ``conn`` (with member ``name``) is old news: the peer
        process said hello on another connection, open, after it had dropped this
        worker on that one (see _new_session), which ended its session then. The
        goodbye, or the reset, of the old one, held up by a network that failed, can
        come after the new session's first calls: taken as a loss then, it took that
        session's contexts and RRef counts with it. If not, takes in the number of
        ``conn``'s goodbye, if any."""
        for c in self._conns:
            if (
                c.peer_name == name
                and c.peer_id == conn.peer_id
                and c.peer_drops > conn.peer_drops
                and not c.closed
            ):
                return True
        if conn.drop_number:
            wid, seen = self._seen_drops.get(name, (conn.peer_id, 0))
            if wid == conn.peer_id:
                self._seen_drops[name] = (wid, max(seen, conn.drop_number))
        return False

    def _old_news(self, conn: Connection, header: list[Any]) -> bool:
        """Whether the frame of ``header`` on ``conn``, from a peer reported lost, may
        have been sent before what reported it, read on another connection first
        (connections keep no order between them): no news that it lives. Taken for it,
        a frame of it made the next report of that loss (the goodbye or close of
        ``conn`` itself, read next; the registry's news that it left) a second one: the
        peer-lost callbacks ran twice. Either the peer process said goodbye (it shuts
        down: whatever it sends comes before, on any connection, the membership too);
        or a connection of it closed without a goodbye (it died, or that connection
        failed): only the echo of a probe sent since is news (see _probe; a dead
        peer's last frames, read after, took it for alive, and the close of the
        connection they came on for a second death); or it dropped this worker (the
        loss reported for it: see dropped_by) and the connection's session began before
        the peer's latest goodbye for our silence: not news that it heard from us
        since."""
        name = conn.peer_name
        if name is None:
            return False
        if conn.peer_id is not None and self.said_goodbye(name, conn.peer_id):
            return True  # (that process left)
        dropped_why, _cause, probe = self._lost[name]
        if dropped_why is None:  # (news it lives: the answer to a question since)
            return bool(probe) and not (
                header[0] == K_ECHO
                and len(header) == 2
                and _probe_number(header[1])
                and header[1] >= probe
            )
        if self._is_membership(conn):
            # (the drop never closes the membership, whose hello's count stays below
            # it for good: what comes there after the drop is news too, and the only
            # news of a peer this worker did not connect to again, see _on_lost)
            return False
        seen = self._seen_drops.get(name)
        return seen is not None and seen[0] == conn.peer_id and conn.peer_drops < seen[1]

    def _peer_lost(
        self,
        name: str,
        dropped_why: str | None = None,
        cause: str = "",
        again: bool = False,
        probe: bool = False,
        pid: int | None = None,
    ) -> None:
        """Report ``name`` lost to the callbacks, once per loss; ``dropped_why``: it
        closed its connection with this worker saying why (it heard nothing from us: it
        lives on, and took this worker for lost; see dropped_by); ``cause``: how the
        loss showed here, in words (see lost_cause); ``again``: reported even if it was
        already (a connection that reached it after its loss closed: see _reach_lost);
        ``probe``: a connection of it closed without a goodbye, and only its answer to a
        probe sent now on the others ends a loss reported now (see _probe); ``pid``: the
        cluster id of the process lost (None: not known), for the callbacks that take it
        (see add_process_lost_callback)."""
        if name == self.name or self.closed:
            return
        if again:
            self._lost.pop(name, None)
        elif name in self._lost:
            # Reported already, until it is heard from again. Only a real loss after it
            # dropped us is news (it died since, or left): the callbacks run again
            # for what they kept because it lived on (its contexts here).
            if self._lost[name][0] is None or dropped_why is not None:
                return
            del self._lost[name]  # (to the end: the order is the order of losses)
        number = next(self._probes) if probe and dropped_why is None else 0
        self._lost[name] = (dropped_why, cause, number)
        if len(self._lost) > LOST_MEMORY:
            # (workers that come and go under new names: each left its name here for
            # good, on every member. The names gone longest go, not those of members)
            gone = [n for n in self._lost if n not in self.members]
            for n in gone[: len(self._lost) - LOST_MEMORY]:
                del self._lost[n]
                self._left.pop(n, None)
        if number:
            self._probe(name, number)
        for cb, with_pid in list(self._peer_lost_cbs):
            try:
                if with_pid:
                    cb(name, pid)
                else:
                    cb(name)
            except Exception:
                log.exception("peer-lost callback %r failed", cb)

    def _probe(self, name: str, n: int) -> None:
        """Ask member ``name``, just reported lost (not dropped), for a sign of life on
        each connection with its process still open (``[K_ASK, n]``, probe number
        ``n``): only its echo (``[K_ECHO, n]``) ends the loss, see _old_news. A
        connection that closed without a goodbye reported the loss; the peer may live
        on over its others (a fault of that one connection), or be dead, its last
        frames still unread on them (connections keep no order between them)."""
        member = self.members.get(name)
        if member is None:  # (no member: nothing of it ends the loss but a hello)
            return
        for c in self._conns:
            if (
                c.peer_name == name
                and c.peer_id == member[0]
                and not (c.closed or c.bye_read or c._handshaking)
            ):
                try:
                    c.send_nowait(wire.encode_frame([K_ASK, n], None))
                except ActorgradError:
                    pass  # (closing: its end reports nothing new)

    # ------------------------------------------------------------------ frames in
    def _on_frame(self, conn: Connection, buf: bytearray | memoryview) -> None:
        try:
            frame = wire.decode_frame(buf)
            header = frame.header  # (a list: decode_frame checked)
            kind = header[0] if header else None
            if type(kind) is not int:  # (0.0 and False compare equal to 0: not kinds)
                raise ProtocolError(f"unknown message kind {_cut_repr(kind, 80)}")
            if self._lost and conn.peer_name in self._lost and kind != K_BYE:
                member = self.members.get(conn.peer_name)
                if (
                    member is not None
                    and conn.peer_id == member[0]
                    and not self._old_news(conn, header)
                ):
                    # Alive after all: one of its connections had closed (a malformed
                    # frame, a network fault, our heartbeat while its loop was blocked)
                    # but it goes on over this one (it answered our probe here: what
                    # came before may be a dead one's last frames, see _old_news).
                    # A later loss must be reported again, and contexts it starts taken
                    # in (those it held here went at its loss). (Not a worker that left
                    # the cluster: its last frames. Nor another process of its name, one
                    # that joined since while our view lags: the lost one's leave, read
                    # next, reported its loss again.)
                    self._lost.pop(conn.peer_name, None)
            if kind == K_REQ:
                if conn.peer_name is None:
                    raise ProtocolError("request before hello")
                cid = header[1] if len(header) == 5 else None
                if type(cid) is not int:
                    # (here, not only when it starts: the mailbox keys a request by its id,
                    # and there a header of one item was refused as "malformed message:
                    # IndexError('list index out of range')", an id that is a list as
                    # "unhashable type: 'list'", and a short header only once its turn
                    # came)
                    raise ProtocolError(f"malformed request header {short_repr(header, 200)}")
                if cid and (cid in conn.running or cid in conn.queued):
                    # (a call's id is its caller's count on this connection: a second one
                    # took over the first's bookkeeping, and a cancel of the first leaked
                    # an in-flight slot and a pool thread for good)
                    raise ProtocolError(f"request {cid} reuses the id of a call still running")
                mb = self._mailbox
                w = self._mb_waiter
                if (
                    not mb
                    and w is not None
                    and not w.done()
                    and self._inflight < self._max_in_flight
                ):
                    # the actor is idle and nothing is queued: start the request right
                    # here (same order, one loop iteration less); its reply is flushed
                    # when this read has been processed
                    self._dctx.run(self._start_guarded, conn, frame)
                    return
                self._enqueue(conn, frame)
            elif kind == K_CAST:
                if conn.peer_name is None:
                    raise ProtocolError("one-way message before hello")
                if conn.in_mailbox:
                    # behind the requests of its connection waiting there (one order
                    # per connection), not behind those of others: the calls holding
                    # the slots may wait for it (10,000 calls into w1 each running a
                    # backward through w2 wedged w1 for good)
                    self._enqueue(conn, frame)
                else:
                    self._dctx.run(self._cast_in, conn, frame)
            elif kind == K_OK or kind == K_ERR:
                if not (len(header) == 2 or (len(header) == 3 and kind == K_ERR)) or (
                    type(header[1]) is not int
                ):
                    raise ProtocolError(f"malformed reply header {short_repr(header, 200)}")
                call = conn.pending.pop(header[1], None)
                if call is None or call[0].done():
                    # late reply of a timed-out/cancelled call: dropped quietly, decoded
                    # only so that RRefs in it are released again, and tensors in a
                    # context get their recv nodes: with the call's own hooks when it was
                    # cancelled in this very loop turn (its finally has not run: it finds
                    # the call answered), else with those _abandon kept
                    kept = None
                    if call is None and conn.abandoned:
                        kept = conn.abandoned.pop(header[1], None)
                    if conn.gave_up:  # (it came: a goodbye need not name it)
                        conn.gave_up.pop(header[1], None)
                    late = call[1] if call is not None else kept
                    if kind == K_OK:
                        try:
                            self._body(frame, late or rref.Hooks(self, conn.peer_name or "?", conn))
                        except ProtocolError as exc:
                            if late is not None:
                                late.unreadable(exc, True)
                        except Exception:  # (a late reply nobody waits for: only logged)
                            log.debug("worker %s: late reply unreadable", self.name, exc_info=True)
                    elif len(header) == 3 and late is not None:
                        late.refused()  # (refused before it ran: e.g. in the mailbox)
                    if kept is not None:
                        kept.answered()
                    return
                fut, hooks = call
                try:
                    value = self._body(frame, hooks)
                except ProtocolError as exc:
                    if kind == K_OK:  # (an error reply carries no tensors)
                        hooks.unreadable(exc, True)
                    fut.set_exception(exc)
                    # (the error's traceback holds this frame, which held the future
                    # holding the error: a cycle at each reply that could not be read,
                    # with the frame's buffer, which the transport reuses once nothing
                    # holds it, until a gc run)
                    fut = call = None
                    return
                if kind == K_OK:
                    fut.set_result(value)
                elif isinstance(value, BaseException):
                    if len(header) == 3 and isinstance(value, RemoteError):
                        value = _refusal(value)
                        hooks.refused()
                    fut.set_exception(value)
                else:
                    # (by its type, not its repr: a list nested 990 deep failed to repr,
                    # the RecursionError escaped with this call taken off the connection,
                    # and it waited for good; a long one's repr, megabytes, was the
                    # message)
                    fut.set_exception(
                        ProtocolError(
                            "malformed error reply: an exception was expected, not a "
                            f"{type_name(type(value))}"
                        )
                    )
            elif kind == K_PING:
                if len(header) != 1:  # the peer's "I may be silent for so long" (0: no more)
                    silent: Any = header[1] if len(header) == 2 else None
                    if type(silent) not in (int, float) or not 0 <= silent <= MAX_QUIET:
                        raise ProtocolError(f"malformed ping header {short_repr(header)}")
                    conn.quiet_until = time.monotonic() + silent if silent else 0.0
            elif kind == K_ASK:
                if len(header) != 1 and not (len(header) == 2 and _probe_number(header[1])):
                    raise ProtocolError(f"malformed ping header {short_repr(header)}")
                now = time.monotonic()
                conn.peer_waits_until = now + ASK_WINDOW
                if len(header) == 2:
                    # (the peer took this worker for lost, and asks whether it lives:
                    # the echo, a frame sent after the question, tells; see _probe)
                    conn.send_nowait(wire.encode_frame([K_ECHO, header[1]], None))
                elif now - conn.last_sent >= HEARTBEAT_INTERVAL:  # (at once: it may be new)
                    conn.send_heartbeat()
            elif kind == K_ECHO:
                # (its news, if any, was taken above: see _old_news)
                if len(header) != 2 or not _probe_number(header[1]):
                    raise ProtocolError(f"malformed echo header {short_repr(header)}")
            elif kind == K_CANCEL:
                if len(header) != 2 or type(header[1]) is not int:
                    raise ProtocolError(f"malformed cancel header {short_repr(header, 200)}")
                self._cancel_request(conn, header[1])
            elif kind == K_HELLO:
                _, name, wid, address, most, drops, key, head = header
                if not (valid_name(name) and type(wid) is int and 0 <= wid < MAX_ID) or (
                    not isinstance(address, str)
                    or type(most) is not int
                    # (less than any worker takes, see transport.check_frame_size: its
                    # peers could send it nothing, each call failed at the send)
                    or most < transport.FRAME_SIZE_RANGE[0]
                    or type(drops) is not int
                    or drops < 0
                    or type(key) is not int
                    or not 0 <= key < CLUSTER_KEYS
                    # (the head's address goes into the refusal below, and the log)
                    or not valid_address(head, blank=True)
                    or (key == 0) != (head == "")
                ):
                    raise ProtocolError(
                        f"malformed hello: name {_cut_repr(name, 80)}, id {_cut_repr(wid, 20)}, "
                        f"address {_cut_repr(address, 80)}, largest frame "
                        f"{_cut_repr(most, 20)}, goodbyes {_cut_repr(drops, 20)}, cluster "
                        f"{_cut_repr(key, 30)} (head {_cut_repr(head, 80)})"
                    )
                if key and self.cluster[0] and key != self.cluster[0]:
                    # (a worker of another cluster given the same token, reached at an
                    # address of ours that is stale (its port taken again): alike in name
                    # and cluster id, it was called as ours and the call ran there. Not
                    # said where either end is in no cluster yet, a joiner: its join
                    # hands it the head's identity. Refused here, on the accepting end,
                    # the opener reads why in the goodbye: its call fails with it)
                    raise ProtocolError(
                        f"worker {name!r} (cluster id {wid}) belongs to another cluster "
                        f"(head {head}) than worker {self.name!r} (head {self.cluster[1]}), "
                        "and the two share one token: give each cluster its own token "
                        "(ACTORGRAD_TOKEN)"
                    )
                if conn.peer_name is not None:
                    # (one hello each way: a second one renamed the peer of the
                    # connection, whose calls and losses then went to another name)
                    raise ProtocolError(
                        f"a second hello ({name!r:.80}) on the connection with {conn.peer_name!r}"
                    )
                member = self.members.get(name)
                if member is not None and 0 < wid and issued_before(wid, member[0]):
                    # (ids grow with each join, wrapping around: an older one is a
                    # process another replaced under that name, hung meanwhile; what it
                    # sends now, a late RRef release say, would be taken for the new
                    # one's. A newer one is a process joined since, our view behind)
                    raise ProtocolError(
                        f"hello from a process that worker {name!r} was before it "
                        f"was replaced (cluster id {wid}, now {member[0]})"
                    )
                conn.peer_name = name
                conn.max_frame_size = self.max_frame_size
                conn.send_limit = min(self.max_frame_size, most)
                conn.peer_id = wid or None  # (0: not joined yet; its join tells the head)
                conn.peer_drops = drops
                if member is not None and wid == member[0]:
                    self._new_session(name, wid, drops)
                if not self.said_goodbye(name, wid) and (member is None or wid == member[0]):
                    # (alive after all, as above; not a process that left, see _old_news,
                    # nor another one under its name: one not joined yet, or joined
                    # since while our view lags. Also one the head dropped that goes on,
                    # no member: its contexts are taken in; its loss is reported again
                    # when its last connection closes, see _on_lost)
                    if self._lost.pop(name, None) is not None and member is None:
                        conn.after_leave = True
                conn.peer_address = address  # type: ignore[attr-defined]
                h = getattr(conn, "hello", None)
                if h is not None and not h.done():
                    h.set_result(None)
                if not conn.outgoing:
                    conn.send_nowait(wire.encode_frame(self._hello_header(name), None))
            elif kind == K_BYE:
                conn.bye_read = True  # (what we send on it now is lost: see _opened_by)
                if len(header) == 1:
                    conn.goodbye = True
                    name = conn.peer_name
                    member = self.members.get(name) if name is not None else None
                    if name is not None and (
                        (member is not None and member[0] == conn.peer_id)
                        # (or the head's word that it left came first: its other
                        # connections to us, their goodbyes unread yet, are no way to it
                        # either; taken, a one-way message on one was lost unsaid, its
                        # loss reported already. Socket fuzz seed 90.)
                        or (member is None and name in self._lost and conn.peer_id)
                    ):
                        # (that process shuts down: known from this read, not from the
                        # connection's close, a read later or more: a call meanwhile
                        # tried its closed listener; see said_goodbye)
                        self._left[name] = conn.peer_id
                elif (
                    len(header) == 4
                    and type(header[1]) is str
                    and type(header[2]) is int
                    and header[2] > 0
                    and type(header[3]) is list
                    and all(type(cid) is int for cid in header[3])
                ):
                    # (the peer closes on us, saying why: it heard nothing from us; its
                    # how-manieth such goodbye to us, see _stale_end; and the calls it
                    # gave up, whose replies it does not read)
                    conn.dropped_why = _printable(header[1][:500])
                    conn.drop_number = header[2]
                    if conn.given:
                        self._take_back_given(conn, header[3])
                elif len(header) == 3 and type(header[1]) is str and header[2] == "refused":
                    # (the peer closes on us over something we sent: a bug, or two
                    # versions of the code; nothing pending may tell, so the log does)
                    conn.refused_why = _printable(header[1][:500])
                    log.warning(
                        "worker %s: %s closed the connection on a message from this worker: %s",
                        self.name,
                        # (before its hello, a refused one of ours: "worker None" said
                        # nothing of which peer it was)
                        f"worker {conn.peer_name!r}"
                        if conn.peer_name is not None
                        else f"the peer at {conn.peer_addr}",
                        conn.refused_why,
                    )
                else:
                    raise ProtocolError(f"malformed goodbye header {short_repr(header)}")
            else:
                raise ProtocolError(f"unknown message kind {kind!r:.80}")
        except (ProtocolError, ValueError, TypeError, IndexError, KeyError) as exc:
            err = (
                exc
                if isinstance(exc, ProtocolError)
                else ProtocolError(f"malformed message: {exc!r}")
            )
            conn.refuse(err)

    def _cancel_request(self, conn: Connection, cid: int) -> None:
        """The caller of request ``cid`` on ``conn`` stopped waiting for it (timeout,
        cancellation; the cancel follows the request on the connection). A coroutine
        running it is cancelled (its nested calls then send cancels on in turn), a
        request still in the mailbox is refused when its turn comes: an abandoned call
        no longer holds an in-flight slot until it ends. Nothing else is running for
        it: already answered. A plain function in the thread pool cannot be stopped:
        it runs to its end, then what it returned is dropped (a coroutine closed
        unstarted) and the caller is answered as for a cancelled coroutine."""
        task = conn.running.get(cid)
        if task is _IN_POOL:
            conn.running[cid] = None  # (what the function returns is dropped)
            if self._pool is not None:  # (its thread is lent to it until it ends)
                self._pool.lend()
            self._given_up += 1
            self._check_drained()
        elif task is not None:
            conn.running[cid] = None  # (marks it cancelled by its caller, see _answer_failure)
            # (a turn later: its first step is scheduled before this, so it is in its
            # try when cancelled; a task cancelled before its first step never runs a
            # line of it, and its reply and the release of its slot never came)
            self.loop.call_soon(_cancel_if_running, conn, cid, task)
        elif cid in conn.queued:
            conn.queued[cid] = True  # (refused when its turn comes, see _start)

    def _answer_failure(self, conn: Connection, cid: int, exc: BaseException, hooks: Any) -> bool:
        """Answer call ``cid`` with ``exc``, caught around its code: the code's own error
        (any exception: SystemExit, GeneratorExit, a BaseException subclass, a
        CancelledError it raised, or one of its task's cancellation by user code: a
        watchdog) comes back as a RemoteError; the cancellation its caller asked for as
        the caller-gone error it drops. False for the worker's own cancellation at
        shutdown (re-raised). (Errors escaped before: the caller waited for good, and
        SystemExit stopped the loop of every in-process worker; so did a call whose task
        its own code cancelled.)"""
        if isinstance(exc, asyncio.CancelledError):
            if self._closing:
                return False
            if cid in conn.running and conn.running[cid] is None:
                self._answer_caller_gone(conn, cid, hooks)
                return True
            if not exc.args:
                exc = asyncio.CancelledError(
                    "the call's task was cancelled on the worker (not by its caller)"
                )
        self._reply_exc(conn, cid, exc, hooks)
        return True

    def _answer_caller_gone(self, conn: Connection, cid: int, hooks: Any) -> None:
        """Answer call ``cid``, cancelled by its caller, with an error (which the caller
        drops: it tells a context the call is over), unless this worker is closing."""
        if not self._closing:
            self._reply_exc(conn, cid, _caller_gone(), hooks)

    def _enqueue(self, conn: Connection, frame: Any) -> None:
        """Queue a request or cast in the mailbox; a full mailbox stops reading from the
        connection that filled it (both kinds count: a flood of casts queued behind
        waiting requests is held back like a flood of requests)."""
        mb = self._mailbox
        mb.append((conn, frame))
        conn.in_mailbox += 1
        if frame.header[0] == K_REQ and frame.header[1]:
            conn.queued[frame.header[1]] = False  # (True once its caller cancels it)
        if len(mb) >= self._mailbox_size:
            conn.pause_reading()
            self._paused.add(conn)
        w = self._mb_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ------------------------------------------------------------------ running
    async def _running(self) -> None:
        """The actor loop: start the requests of the mailbox, one at a time."""
        _current.set(self)
        mb = self._mailbox
        while True:
            while not mb or self._inflight >= self._max_in_flight:
                self._mb_waiter = self.loop.create_future()
                await self._mb_waiter
                self._mb_waiter = None
            n = 0
            touched: set[Connection] = set()
            while mb and n < 256 and self._inflight < self._max_in_flight:
                conn, frame = mb.popleft()
                conn.in_mailbox -= 1
                touched.add(conn)
                n += 1
                self._start_guarded(conn, frame)
            for c in touched:  # send the replies of inline calls now, not a tick later
                c.flush()
            if self._paused and len(mb) <= self._mailbox_size // 2:
                paused, self._paused = self._paused, set()
                for c in paused:
                    c.resume_reading()
            if mb:
                await asyncio.sleep(0)

    def _start_guarded(self, conn: Connection, frame: Any) -> None:
        try:
            if frame.header[0] == K_CAST:
                self._cast_in(conn, frame)
            else:
                self._start(conn, frame)
        except (ProtocolError, ValueError, TypeError) as exc:
            # (refused, as a message refused on arrival: the peer hears why)
            conn.refuse(
                exc
                if isinstance(exc, ProtocolError)
                else ProtocolError(f"malformed request: {exc}")
            )
        except Exception:
            log.exception("worker %s: failed to start a request", self.name)

    def _cast_in(self, conn: Connection, frame: Any) -> None:
        """Run the handler of an arrived cast (ProtocolError: a malformed one)."""
        header = frame.header
        if len(header) != 2:
            raise ProtocolError(f"malformed one-way message header {short_repr(header, 200)}")
        # (a topic of another type was looked up as it came: "unhashable type: 'list'")
        entry = _cast_handlers.get(header[1]) if type(header[1]) is str else None
        if entry is None:
            raise ProtocolError(f"one-way message for unknown topic {short_repr(header[1], 80)}")
        fn, nargs = entry
        args = frame.body(None)
        if type(args) is not list or len(args) != nargs:
            raise ProtocolError(
                f"one-way message {short_repr(header[1], 80)} needs a list of {nargs} arguments, got "
                + (f"{len(args)}" if type(args) is list else f"a {type(args).__name__}")
            )
        if self._closing:
            log.debug("worker %s: one-way %r dropped: shutting down", self.name, header[1])
            return
        try:
            fn(self, *args)
        except (ProtocolError, KeyboardInterrupt, SystemExit):
            raise  # (a malformed message: its connection is closed)
        except BaseException:  # (any other: one escaping closed the connection, its calls lost)
            log.exception("worker %s: handler of one-way %r failed", self.name, header[1])

    def _hooks(self, conn: Connection, peer: str, meta: Any) -> rref.Hooks:
        ic = _interceptor
        if meta is not None and ic is not None:
            th = ic.wire_hooks(self, meta, peer, conn.peer_id)
            if th is not None:
                return rref.TensorHooks(self, peer, conn, th)
        return rref.Hooks(self, peer, conn)

    def _start(self, conn: Connection, frame: Any) -> None:
        header = frame.header
        if len(header) != 5:
            raise ProtocolError(f"malformed request header {short_repr(header, 200)}")
        _, cid, target, mode, meta = header
        if type(cid) is not int or type(mode) is not int:  # (True is no call id)
            raise ProtocolError(f"malformed request header {short_repr(header, 200)}")
        peer = conn.peer_name or "?"
        if conn.queued and conn.queued.pop(cid, False):
            self._refuse(conn, cid, frame, _caller_gone())
            return
        if self._stopping and not (type(target) is str and target in _MEMBERSHIP_CALLS):
            lost = WorkerLost(f"worker {self.name!r} is shutting down")
            self._reply_exc(conn, cid, lost, None, refused=True)
            return
        if meta is None:
            hooks = rref.Hooks(self, peer, conn)
        else:
            try:
                hooks = self._hooks(conn, peer, meta)
            except ActorgradError as exc:  # the interceptor refuses the call
                self._refuse(conn, cid, frame, exc)
                return
        try:
            hooks.in_request = True
            try:
                body = self._body(frame, hooks)
                if hooks.gone is not None:  # (an RRef sent to this owner, gone: see ref_in)
                    # Refused as the value's absence, a LookupError, which the caller
                    # gets as RemoteError, as from to_here, a method call or a fork of
                    # that RRef: refused as a ProtocolError (an unreadable message), the
                    # dead owner's RRef passed to the process that joined under its name
                    # (a parameter server's rpc(owner, fn, (rref,)) after a restart) said
                    # "ref_in hook rejected ['w1', <id>, 0]", not what the docs say. (Its
                    # RRefs released, as those of a stopped decoding; the error not kept
                    # by hooks.)
                    body, gone, hooks.gone = None, hooks.gone, None
                    hooks.unreadable(gone, False)
                    if cid == 0:  # (none goes one-way: a made-up message)
                        raise ProtocolError(f"a one-way call holds an RRef that is gone: {gone}")
                    gone = LookupError(
                        f"{gone}; it was among the arguments of the call of "
                        f"{calls.describe(target)}, which did not run"
                    )
                    self._reply_exc(conn, cid, gone, hooks, refused=True)
                    return
            except ProtocolError as exc:
                # (stopped part way: what its decoding recorded goes, and the caller,
                # told the call was refused, takes back what its encoding recorded)
                hooks.unreadable(exc, False)
                if cid != 0:
                    refused = ProtocolError(
                        f"worker {self.name!r} cannot take in the arguments of the call "
                        f"of {calls.describe(target)}: {exc}"
                    )
                    self._reply_exc(conn, cid, refused, hooks, refused=True)
                    return
                raise
            if not (isinstance(body, (list, tuple)) and len(body) == 2):
                raise ProtocolError("malformed request body")
            args, kwargs = body
            if not isinstance(args, (list, tuple)) or not (
                kwargs is None or isinstance(kwargs, dict)
            ):
                raise ProtocolError("malformed request arguments")
            key: Any
            if mode == MODE_RPC or mode == MODE_REMOTE:
                if type(target) is str:
                    fn = calls._resolve_cache.get(target) or calls.resolve(target)
                    key = target
                else:
                    fn = calls.resolve(target)
                    key = (target[0], target[1])  # (not its session: one entry for all)
                what = fn
            elif mode == MODE_RREF_RPC or mode == MODE_RREF_REMOTE:
                if not (
                    type(target) is list
                    and len(target) == 2
                    and type(target[0]) is int
                    and type(target[1]) is str
                ):
                    raise ProtocolError(
                        f"malformed RRef call target {short_repr(target)}: an [RRef id, "
                        "method name] pair is expected"
                    )
                rid, method = target
                value = rref.owned_value(self, rid)
                fn = getattr(value, method)
                if not callable(fn):  # (~13 ns; it failed as "'int' object is not callable")
                    raise TypeError(
                        f"rref.rpc().{method}() and rref.remote().{method}() call a method, "
                        f"but {method!r} of the {type(value).__name__} the RRef holds is "
                        f"{short_repr(fn)}, of type {type(fn).__name__}: call a method that "
                        "returns it (or fetch the whole value: `await rref.to_here()`)"
                    )
                # (how it runs too: an attribute set on the instance can be async, or
                # marked inline, on one value and not on another of the type)
                # (keyed by the type's name, not the type: a key holding the class kept
                # each version of an edited driver's class, and with it its old module,
                # for good; a new version starts anew, as a function's does)
                kind = type(value)
                key = (
                    getattr(kind, "__module__", None),
                    getattr(kind, "__qualname__", None),
                    method,
                    inspect.iscoroutinefunction(fn),
                    getattr(fn, "__actorgrad_inline__", False) is True,
                )
                what = kind
            else:
                raise ProtocolError(f"unknown request mode {mode!r:.80}")
        except Exception as exc:
            if cid == 0:
                # a one-way call that cannot even start: its sender has no reply to learn
                # it from, only the connection's loss (and it may be waiting on it)
                hooks.undo()
                conn.refuse(
                    ProtocolError(f"one-way call {calls.describe(target)} cannot start: {exc}")
                )
                return
            self._reply_exc(conn, cid, exc, hooks)
            return
        stats = self._stats.get(key)
        if stats is None or stats.what is not what:
            if stats is None and len(self._stats) >= calls._NAMES_KEPT:
                # (a peer's calls name what they like: each distinct name was kept for
                # good, with what it resolved to; those in use learn again how they run)
                self._stats.clear()
            stats = self._stats[key] = _FnStats(fn, what)
        # the dispatcher's context already has _current = self; the copy isolates the
        # call's contextvars (the connection is set inside it)
        ctx = contextvars.copy_context()
        self._inflight += 1
        if stats.is_async:
            t = self.spawn(
                self._run_task(conn, cid, mode, fn, args, kwargs, meta, hooks), context=ctx
            )
            if cid:  # (a cancel from its caller stops it)
                conn.running[cid] = t
            return
        if not stats.inline and stats.fast < INLINE_AFTER:
            # in the thread pool, until it proves fast; it reports back by itself (see
            # _pool_call)
            assert self._pool is not None, "a call dispatched before the worker started"
            try:
                self._pool.run_soon(
                    ctx.run, self._pool_call, conn, cid, mode, fn, args, kwargs, meta, hooks, stats
                )
            except RuntimeError as exc:  # (no thread could start: the process at its limit)
                self._done()
                self._reply_exc(conn, cid, exc, hooks)
                return
            if cid:  # (a cancel from its caller is remembered: see _cancel_request)
                conn.running[cid] = _IN_POOL
            return
        # marked inline, or proven fast: run inline on the loop
        t0 = time.perf_counter()
        try:
            result = ctx.run(
                self._invoke if stats.inline else self._invoke_off_loop,
                fn,
                args,
                kwargs,
                meta,
                conn,
            )
        except BaseException as exc:  # (user code: SystemExit, GeneratorExit... are its errors)
            self._done()
            self._reply_exc(conn, cid, exc, hooks)
            return
        finally:
            if not stats.inline and time.perf_counter() - t0 > FAST_CALL:
                stats.fast = 0
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            self._finish_later(conn, cid, mode, result, meta, hooks, ctx)
            return
        self._done()
        self._reply(conn, cid, mode, result, hooks)

    def _finish_later(
        self,
        conn: Connection,
        cid: int,
        mode: int,
        aw: Awaitable[Any],
        meta: Any,
        hooks: rref.Hooks,
        context: Any = None,
    ) -> None:
        """What a plain function returned is awaitable (a sync-decorated async def's
        coroutine, a future): awaited in a task of its own, on the loop, where a cancel
        from its caller can stop it; the task takes the call's in-flight slot over."""
        t = self.spawn(self._finish_awaitable(conn, cid, mode, aw, meta, hooks), context=context)
        if inspect.iscoroutine(aw):
            # (a task cancelled before its first step, by the worker's shutdown, never
            # awaits it: "coroutine ... was never awaited" on stderr)
            t.add_done_callback(functools.partial(_close_coroutine, aw))
        if cid:
            conn.running[cid] = t

    def _refuse(self, conn: Connection, cid: int, frame: Any, exc: ActorgradError) -> None:
        """A request the interceptor refused (e.g. a late call in a released distributed
        autograd context): the caller gets ``exc``; a one-way call is dropped (logged).
        Not a malformed frame: the connection stays."""
        hooks = rref.Hooks(self, conn.peer_name or "?", conn)
        hooks.in_request = True  # (all of it: see rref's Hooks.ref_in)
        try:  # (decoded only so that RRefs in it are released again)
            frame.body(hooks)
        except Exception:
            pass
        if cid == 0:
            log.debug("worker %s: one-way call refused: %s", self.name, exc)
            hooks.undo()
            return
        self._reply_exc(conn, cid, exc, hooks, refused=True)

    def _invoke(self, fn: Any, args: Any, kwargs: Any, meta: Any, conn: Any = None) -> Any:
        if conn is not None:
            _current_conn.set(conn)
        ic = _interceptor
        if meta is not None and ic is not None:
            with ic.enter(self, meta):
                return fn(*args, **kwargs) if kwargs else fn(*args)
        return fn(*args, **kwargs) if kwargs else fn(*args)

    def _invoke_off_loop(self, fn: Any, args: Any, kwargs: Any, meta: Any, conn: Any) -> Any:
        """``_invoke`` of a plain function that proved fast in the thread pool, run
        inline: with no event loop running as far as it can tell, as in the pool where
        it proved itself. (It saw the worker's loop running: its asyncio.run() was
        refused there, "cannot be called from a running event loop", every fourth
        call.)"""
        asyncio_events._set_running_loop(None)
        try:
            return self._invoke(fn, args, kwargs, meta, conn)
        finally:
            asyncio_events._set_running_loop(self.loop)

    def _invoke_timed(self, fn: Any, args: Any, kwargs: Any, meta: Any) -> tuple[Any, bool]:
        """In the thread pool: the call's result, and whether it proved fast (see
        FAST_CALL) without waiting for most of its time."""
        t0, cpu0, waits0 = time.perf_counter(), time.thread_time(), _waits()
        r = self._invoke(fn, args, kwargs, meta)
        took, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        # A call that waited (on a lock, a threading.Condition, a socket, a coroutine it
        # handed to this worker's loop with run_coroutine_threadsafe) is not fast,
        # however short: inline, it would block the loop on what it waits for, and for
        # good when that needs the loop (a synchronous parameter server's barrier, whose
        # other party often came within 1 ms). Its thread slept (a voluntary context
        # switch, counted on Linux) or, where that is not counted, was off the CPU for
        # most of the call.
        return r, took < FAST_CALL and cpu >= took / 2 and _waits() == waits0

    async def _run_task(
        self,
        conn: Connection,
        cid: int,
        mode: int,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        meta: Any,
        hooks: rref.Hooks,
    ) -> None:
        """A call of an ``async def``: its coroutine awaited in a task of its own."""
        _current_conn.set(conn)
        try:
            # (the coroutine's body runs only when awaited: in the call's context)
            result = await self._await_in(meta, fn(*args, **(kwargs or {})))
        except BaseException as exc:
            if not self._answer_failure(conn, cid, exc, hooks):
                raise
        else:
            conn.running.pop(cid, None)  # (its reply goes out whole: a cancel is too late)
            await self._reply_async(conn, cid, mode, result, hooks)
        finally:
            conn.running.pop(cid, None)
            self._done()

    def _pool_call(
        self,
        conn: Connection,
        cid: int,
        mode: int,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        meta: Any,
        hooks: rref.Hooks,
        stats: Any,
    ) -> None:
        """In a thread of the pool, in the call's contextvars: a plain function's call,
        whose outcome goes back to the loop in one callback (_pool_call_done). (Through
        run_in_executor, with a concurrent future, an asyncio future and a task per
        call, a pooled round trip between processes took 83 us against 57, and 64
        calls in flight went half as fast: 25,000 calls/s against 47,000.)"""
        _current_conn.set(conn)
        try:
            result, fast = self._invoke_timed(fn, args, kwargs, meta)
        except BaseException as exc:  # (user code: any exception is its outcome)
            result, fast = _Raised(exc), None
        try:
            self.loop.call_soon_threadsafe(
                self._pool_call_done, conn, cid, mode, result, fast, meta, hooks, stats
            )
        except RuntimeError:  # (the loop closed: the worker is long gone)
            if inspect.iscoroutine(result):
                result.close()
        finally:
            # (an exception's traceback holds this frame: with the _Raised still in it,
            # each failed call left a reference cycle to the garbage collector)
            del result

    def _pool_call_done(
        self,
        conn: Connection,
        cid: int,
        mode: int,
        result: Any,
        fast: bool | None,
        meta: Any,
        hooks: rref.Hooks,
        stats: Any,
    ) -> None:
        """On the loop: the outcome of a call _pool_call ran. ``fast``: whether it proved
        fast, None when it raised (which proves nothing either way). Its in-flight slot
        is released here, whatever happens in it, unless a task took it over."""
        kept = False
        try:
            kept = self._pool_call_end(conn, cid, mode, result, fast, meta, hooks, stats)
        finally:
            if not kept:
                self._done()

    def _pool_call_end(
        self,
        conn: Connection,
        cid: int,
        mode: int,
        result: Any,
        fast: bool | None,
        meta: Any,
        hooks: rref.Hooks,
        stats: Any,
    ) -> bool:
        """_pool_call_done's work; True when a task took the call's slot over."""
        gone = cid and conn.running.get(cid, _IN_POOL) is None  # (its caller)
        if gone:
            self._given_up -= 1
            if self._pool is not None:
                self._pool.unlend()
        if fast is not None:
            stats.fast = stats.fast + 1 if fast else 0
        if gone or self._closing:
            # (closing: its connection is closed or about to be; as a cancelled task)
            if inspect.iscoroutine(result):
                result.close()
            conn.running.pop(cid, None)
            if gone:
                self._answer_caller_gone(conn, cid, hooks)
            return False
        if type(result) is _Raised:
            conn.running.pop(cid, None)
            self._reply_exc(conn, cid, result.exc, hooks)
            return False
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            self._finish_later(conn, cid, mode, result, meta, hooks)
            return True
        conn.running.pop(cid, None)
        return self._reply(conn, cid, mode, result, hooks, hold=True)

    async def _send_then_done(
        self, conn: Connection, cid: int, chunks: list[Any] | None, hooks: rref.Hooks
    ) -> None:
        """The end of a held reply (see _reply): the result's RRefs registered, then the
        reply sent (``chunks``), or, with None, the reply already queued written out;
        then the call's in-flight slot released."""
        try:
            if chunks is not None:
                await self._send_after_forks(conn, cid, chunks, hooks)
            else:
                await conn.drain()
        except ActorgradError:
            pass  # (the connection closed)
        finally:
            self._done()

    async def _await_in(self, meta: Any, aw: Any) -> Any:
        """``aw`` awaited in the call's interceptor context: the coroutine of an ``async
        def``, or what a plain function returned (a sync-decorated ``async def``'s
        coroutine, a future), whose body runs only now (awaited outside it, it made its
        calls outside the distributed autograd context, and the gradients of what they
        fetched were lost)."""
        ic = _interceptor
        if meta is not None and ic is not None:
            with ic.enter(self, meta):
                return await aw
        return await aw

    async def _finish_awaitable(
        self,
        conn: Connection,
        cid: int,
        mode: int,
        aw: Awaitable[Any],
        meta: Any,
        hooks: rref.Hooks,
    ) -> None:
        try:
            result = await self._await_in(meta, aw)
        except BaseException as exc:
            if not self._answer_failure(conn, cid, exc, hooks):
                raise
        else:
            conn.running.pop(cid, None)  # (its reply goes out whole: a cancel is too late)
            await self._reply_async(conn, cid, mode, result, hooks)
        finally:
            conn.running.pop(cid, None)
            self._done()

    def _done(self) -> None:
        self._inflight -= 1
        if self._idle_waiter is not None:  # (a graceful shutdown waits for the calls)
            self._check_drained()
        if self._mailbox:  # a slot is free: let the dispatcher start what waits
            w = self._mb_waiter
            if w is not None and not w.done():
                w.set_result(None)

    # ------------------------------------------------------------------ replies
    def _encode_reply(
        self, conn: Connection, cid: int, mode: int, result: Any, hooks: rref.Hooks
    ) -> list[Any]:
        if mode == MODE_REMOTE or mode == MODE_RREF_REMOTE:
            result = rref.new_owned(self, result)
        try:
            chunks = wire.encode_frame([K_OK, cid], result, hooks, "result")
            if len(chunks) != 1 or len(chunks[0]) > conn.send_limit:  # (else: small)
                conn.check_size(chunks)
            return chunks
        except Exception as exc:
            hooks.undo()
            log.debug("reply of call %s cannot be encoded: %r", cid, exc)
            if (
                mode == MODE_RREF_RPC
                and isinstance(exc, TypeError)
                and " (at result)" in str(exc)
                and type(result).__module__ != "builtins"
            ):
                # (a method's result itself, an object of a class: `await
                # model.rpc().eval()`, whose Module comes back in torch, pickled. eval()
                # ran, and the error, of the object only, read as if it had not. A set or
                # a generator is no such object: the method returns something else)
                exc = TypeError(
                    f"{exc}; the call ran on worker {self.name!r}, only its result could "
                    "not come back: `await rref.remote().method(...)` keeps the result "
                    "there and gives an RRef to it"
                )
            return self._encode_error(conn, cid, exc)

    def _encode_error(
        self, conn: Connection, cid: int, exc: BaseException, refused: bool = False
    ) -> list[Any]:
        """The error reply to call ``cid`` on ``conn`` (``refused``: see _reply_exc).
        It always goes out: a plain one when ``exc``'s own fails to encode (a process
        out of open files failed so), cut to size when its message does not fit in a
        frame (either way nothing was sent, and the caller waited for good)."""
        header = [K_ERR, cid, 1] if refused else [K_ERR, cid]
        try:
            err = RemoteError.from_exception(self.name, exc)
            msg = err.remote_message
            if err.remote_type == "RuntimeError" and (
                msg == NO_LOOP or msg.startswith(NO_CURRENT_LOOP)
            ):
                err = RemoteError(
                    err.worker, err.remote_type, msg + NO_LOOP_HINT, err.remote_traceback
                )
            chunks = wire.encode_frame(header, err, None)
        except Exception as exc2:
            log.warning(
                "worker %s: error reply of call %s cannot be encoded: %r", self.name, cid, exc2
            )
            plain = RemoteError(
                self.name,
                type_name(type(exc)),
                f"the reply could not be encoded ({type(exc2).__name__}: {exc2})",
                "",
            )
            return wire.encode_frame(header, plain, None)
        try:
            conn.check_size(chunks)
        except ProtocolError as too_big:
            cut = RemoteError(
                err.worker,
                err.remote_type,
                f"{clip_text(err.remote_message, 2048)} [the error was cut: {too_big}]",
                clip_text(err.remote_traceback, 2048),
            )
            chunks = wire.encode_frame(header, cut, None)
        return chunks

    def _reply(
        self,
        conn: Connection,
        cid: int,
        mode: int,
        result: Any,
        hooks: rref.Hooks,
        hold: bool = False,
    ) -> bool:
        """Reply ``result`` to call ``cid``. ``hold``: the call's in-flight slot is held
        until the reply is out (the result's RRefs registered, a full buffer drained),
        as for an async def, by a task that then releases it: True when one does (a
        caller that does not read holds back this worker's calls, not its memory)."""
        if cid == 0 or conn.closed or conn.bye_read:
            # (after the peer's goodbye: it reads no reply, and the RRef counts one
            # made for it stayed, the peer alive when it dropped this worker)
            return False
        chunks = self._encode_reply(conn, cid, mode, result, hooks)
        if hooks.forks:
            self.spawn(
                self._send_then_done(conn, cid, chunks, hooks)
                if hold
                else self._send_after_forks(conn, cid, chunks, hooks)
            )
            return hold
        if hooks.added and not self._keep_given(conn, cid, hooks):
            return False
        conn.send_nowait(chunks)
        if hold and conn.write_paused:
            self.spawn(self._send_then_done(conn, cid, None, hooks))
            return True
        return False

    async def _reply_async(
        self, conn: Connection, cid: int, mode: int, result: Any, hooks: rref.Hooks
    ) -> None:
        if cid == 0 or conn.closed or conn.bye_read:  # (see _reply)
            return
        chunks = self._encode_reply(conn, cid, mode, result, hooks)
        await self._send_after_forks(conn, cid, chunks, hooks)

    async def _send_after_forks(
        self, conn: Connection, cid: int, chunks: list[Any], hooks: rref.Hooks
    ) -> None:
        try:
            if hooks.forks:
                await rref.register_forks(self, hooks)
            if conn.closed or conn.bye_read:  # (see _reply)
                hooks.undo()
                return
        except Exception as exc:
            # An owner could not register the RRefs of the result for the caller (it
            # died, say): the caller gets that as the call's error (the reply was
            # dropped, and a call without a timeout waited for good).
            if isinstance(exc, WorkerLost):
                exc = WorkerLost(
                    "the result holds an RRef whose owner could not register it for "
                    f"worker {conn.peer_name!r}: {exc}",
                    peer=exc.peer,
                )
            self._reply_exc(conn, cid, exc, hooks)
            return
        except BaseException:
            hooks.undo()
            raise
        if (hooks.added or hooks.registered) and not self._keep_given(conn, cid, hooks):
            return
        try:
            await conn.send(chunks)
        except ActorgradError as exc:  # (the connection closed while sending)
            log.debug("reply to %r not sent: %s", conn, exc)

    def _keep_given(self, conn: Connection, cid: int, hooks: rref.Hooks) -> bool:
        """Remember what the reply to call ``cid`` (going out on ``conn`` now) counted
        for the caller, among the latest MAX_GIVEN replies on ``conn``: a caller that
        dropped this worker for its silence (its process stopped past the heartbeat
        timeout) names in its goodbye the calls it gave up, and this worker, running
        again, may have replied to one before reading it. The reply was lost with the
        connection, and the values it counted for the caller stayed until the caller
        left the cluster (2-5 per 5-minute chaos soak). So does a caller whose end of the
        connection broke without a goodbye (a reset), on another connection (see
        rref._unread), and its word may come before this end sees the break: False when
        it said it will never read this reply (its counts taken back, it is not sent)."""
        kept = rref.given(hooks)
        if kept is None:
            return True
        unread = conn.unread
        if unread is not None and cid in unread:
            unread.discard(cid)
            hooks.undo()
            return False
        given, order = conn.given, conn.given_order
        if given is None or order is None:
            given = conn.given = {}
            order = conn.given_order = collections.deque()
        given[cid] = kept
        order.append(cid)
        if len(order) > MAX_GIVEN:
            given.pop(order.popleft(), None)
        return True

    def replies_unread(
        self, key: tuple[str, int], pair: int, cids: list[int], close: bool = False
    ) -> bool:
        """Process ``key`` (worker name, cluster id) will never read the replies to calls
        ``cids`` on the connection of id ``pair`` (see rref._unread): if that connection
        is open here still (this end has not seen it break), what those sent counted
        goes back, and those not made yet will count nothing; ``close``: it is closed
        then (its peer's end is: nothing more of it is to be read there). False: it is
        not open."""
        for conn in self._conns:
            if conn.pair_id == pair and not conn.closed:
                if conn.peer_name is None or rref.peer_key(self, conn.peer_name, conn) != key:
                    return True  # (not that peer's: nothing of it to take back)
                given = conn.given
                unread = conn.unread
                for cid in cids:
                    kept = given.pop(cid, None) if given else None
                    if kept is not None:
                        rref.take_back_given(self, conn.peer_name, conn, kept)
                    else:  # (not sent yet, or one that counted nothing)
                        if unread is None:
                            unread = conn.unread = set()
                        if len(unread) < MAX_GIVEN:
                            unread.add(cid)
                if close:
                    conn.abort(
                        WorkerLost(
                            f"worker {conn.peer_name!r} said its end of this connection closed"
                        )
                    )
                return True
        return False

    def _take_back_given(self, conn: Connection, cids: list[int]) -> None:
        """The peer gave up calls ``cids`` on ``conn`` (its goodbye for our silence says
        so): the RRef counts the replies to them made, sent before the goodbye was
        read, go back. (A reply not made yet makes none: see _reply.)"""
        given = conn.given
        peer = conn.peer_name or "?"
        for cid in cids:
            kept = given.pop(cid, None) if given else None
            if kept is not None:
                rref.take_back_given(self, peer, conn, kept)

    def _reply_exc(
        self,
        conn: Connection,
        cid: int,
        exc: BaseException,
        hooks: rref.Hooks | None,
        refused: bool = False,
    ) -> None:
        """Reply ``exc`` to call ``cid``. ``refused``: the runtime (not the user's code)
        refused the call with this ActorgradError before running it (its arguments were
        not taken in: the caller takes back what their encoding recorded, see
        ``Hooks.refused``); the caller raises it as its own type (WorkerLost,
        ContextError), not as a RemoteError ("user code raised")."""
        if hooks is not None:
            hooks.undo()
        if cid == 0:
            # (refused while this worker shuts down: expected, e.g. an RRef's release
            # from a peer that leaves at the same time; not worth a warning)
            level = logging.DEBUG if refused and self._stopping else logging.WARNING
            # (the error's repr, said safely: raised by the user's code, its __repr__
            # can raise too, and logging catches an Exception from it, not the
            # KeyboardInterrupt that took the worker down)
            log.log(
                level,
                "worker %s: one-way call from %r failed: %s",
                self.name,
                conn.peer_name,
                short_repr(exc, 2000),
            )
            return
        if conn.closed:
            return
        conn.send_nowait(self._encode_error(conn, cid, exc, refused))

    # ------------------------------------------------------------------ calls out
    async def call(
        self,
        dest: str,
        fn: Any,
        args: Any = (),
        kwargs: dict[Any, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (timeout is API)
        mode: int = MODE_RPC,
        _conn: Connection | None = None,
    ) -> Any:
        """Call ``fn(*args, **kwargs)`` on worker ``dest`` and return the result
        (``mode`` MODE_REMOTE: an RRef to it). ``fn`` may be a callable, a
        "module:qualname" string, or ``[rref_id, method]`` for the RRef modes.

        Raises RemoteError (the function raised), RpcTimeout, WorkerLost (the peer died,
        left or the connection broke), TypeError (``fn`` or an argument cannot travel),
        ValueError (unknown worker)."""
        if asyncio.get_running_loop() is not self.loop:
            raise wrong_loop(self)
        if _conn is None and type(dest) is not str:
            # (first: ag.rpc(fn, "w1") was told that function name 'w1' is malformed)
            dest = _worker_name(dest)
        target = fn if mode >= MODE_RREF_RPC else calls.fn_spec(fn)
        if type(target) is list and target[1].startswith(calls.INTERACTIVE):
            # (at once, not from the worker process: it cannot import such a function)
            if not any(w.name == dest and not w.closed for w in _here):
                calls.interactive_fn(target[0], target[1], "", dest)
        _check_call_args(args, kwargs)
        check_timeout(timeout, "for no timeout", " (PyTorch's 0 for no timeout is None here)")
        # (the timeout bounds the whole call: connecting to a peer that accepts but never
        # answers the handshake too, not only the wait for the reply)
        deadline = None if timeout is None else self.loop.time() + timeout
        conn = _conn
        if conn is None:  # (dest is a plain str: checked above)
            conn = self._out.get(dest)
            if conn is None or conn.closed or conn.bye_read:  # (see _opened_by)
                conn = await _by_deadline(
                    self._conn_to(dest),
                    deadline,
                    target,
                    dest,
                    timeout,
                    " (still connecting to it)",
                )
        if conn._write_paused:
            # Wait for room before adding a frame, not only after: each call that timed
            # out in the wait after sending left its whole frame in the write buffer,
            # and a caller retrying on a peer that reads slowly grew it without bound.
            await _by_deadline(_drained(conn), deadline, target, dest, timeout, _NOT_READING)
        ic = _interceptor
        meta = ic.outgoing(self, dest, conn.peer_id) if ic is not None else None
        # (from here on, the call is in flight for the interceptor until it returns)
        try:
            hooks = rref.Hooks(self, dest, conn) if meta is None else self._hooks(conn, dest, meta)
            # (RRefs owned by dest go at once, unregistered; hooks keeps them alive until
            # the call is over: see rref's module doc)
            hooks.direct = []
            cid = next(conn._call_ids)
            try:
                chunks = wire.encode_frame(
                    [K_REQ, cid, target, mode, meta], [list(args), kwargs or None], hooks, _CALL
                )
                if len(chunks) != 1 or len(chunks[0]) > conn.send_limit:  # (else: small)
                    conn.check_size(chunks)
                if hooks.forks:
                    try:
                        await _by_deadline(
                            rref.register_forks(self, hooks),
                            deadline,
                            target,
                            dest,
                            timeout,
                            " (registering the RRefs it passes with their owners)",
                        )
                    except WorkerLost as exc:
                        if exc.peer is None:  # (this worker shuts down)
                            raise
                        raise _not_registered(exc, target, dest) from None
                if conn.closed:
                    raise WorkerLost(f"connection to worker {dest!r} is closed")
            except BaseException:
                # (failed or cancelled before the request left: what the encoding recorded
                # for it, RRef counts and forks, tensors sent in a context, is taken back)
                hooks.undo()
                raise
            fut = self.loop.create_future()
            pending = conn.pending
            pending[cid] = (fut, hooks)
            try:
                try:
                    conn.send_nowait(chunks)
                    if hooks.added or hooks.registered:
                        rref.sent_on(conn, hooks)
                except BaseException:
                    if fut.done() and not fut.cancelled():
                        # (a frame that failed part way out closed the connection, which
                        # failed this call too: the error raised is the send's, this one
                        # must not log "never retrieved")
                        fut.exception()
                    raise
                if len(chunks[0]) > SLOW_DECODE_RATE:
                    _expect_decoding(conn, chunks)
                del chunks
                if conn._write_paused:
                    try:
                        await _by_deadline(
                            _drained(conn),
                            deadline,
                            target,
                            dest,
                            timeout,
                            _NOT_READING,
                        )
                    except BaseException:
                        if fut.done() and not fut.cancelled():
                            # (failed by the lost connection too: the error raised is the
                            # drain's, this one must not log "never retrieved")
                            fut.exception()
                        raise
                if timeout is None:
                    return await fut
                return await _by_deadline(fut, deadline, target, dest, timeout, "")
            finally:
                # still pending: no reply came (timed out, cancelled, or failed to send)
                if pending.pop(cid, None) is not None and not conn.closed:
                    if meta is not None:
                        _abandon(conn, cid, hooks)
                    else:
                        _gave_up(conn, cid)
                    _send_cancel(conn, cid)
                # a failed call's error holds this frame (its traceback) and the future
                # holds the error: without this, each failure leaves a reference cycle.
                # Nor the connection's pending calls: a failed call's error kept every
                # call pending beside it when the connection was lost, their errors and
                # through those their arguments (an RRef's count on its owner)
                fut = pending = None  # type: ignore[assignment]
        finally:
            if meta is not None:
                ic.returned(self, meta)

    async def call_on(
        self,
        conn: Connection,
        target: Any,
        args: Any = (),
        kwargs: dict[Any, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (timeout is API)
        mode: int = MODE_RPC,
    ) -> Any:
        """Like :meth:`call`, on a given connection (e.g. to a registry before joining)."""
        dest = conn.peer_name or "?"
        return await self.call(dest, target, args, kwargs, timeout=timeout, mode=mode, _conn=conn)

    def call_nowait(
        self, dest: str, fn: Any, args: Any = (), kwargs: dict[Any, Any] | None = None
    ) -> asyncio.Future[Any]:
        """Start ``fn(*args, **kwargs)`` on worker ``dest`` and return the future of its
        result, without a coroutine or task per call (for protocol code, usable from
        any loop callback). The request is encoded and queued at once when a connection
        to ``dest`` exists; else an owned task connects first.

        Every failure arrives through the future, with :meth:`call`'s semantics
        (RemoteError, WorkerLost, TypeError for an argument that cannot travel,
        ValueError for an unknown worker); only malformed ``args``/``kwargs``, and an ``fn``
        that cannot be named on another worker (see :func:`calls.fn_spec`), raise here.
        Unlike :meth:`call` it bypasses the interceptor: the request carries no meta.
        Reading a failed future's exception is the caller's job (e.g. in a done
        callback), except for calls failed by this worker's shutdown, which never
        warn. Cancelling the future does not cancel the remote call."""
        target = calls.fn_spec(fn)  # (a name too: a malformed one is refused here)
        _check_call_args(args, kwargs)
        fut: asyncio.Future[Any] = self.loop.create_future()
        conn = self._out.get(dest) if type(dest) is str else None
        if conn is not None and not conn.closed and not conn.bye_read:  # (see _opened_by)
            self._request_nowait(conn, dest, target, args, kwargs, fut)
        elif self._closing:
            fut.set_exception(WorkerLost(f"worker {self.name!r} is shutting down"))
            fut.exception()  # failed by our shutdown: never "exception was never retrieved"
        else:
            self.spawn(self._connect_and_request(dest, target, args, kwargs, fut))
        return fut

    def _request_nowait(
        self,
        conn: Connection,
        dest: str,
        target: Any,
        args: Any,
        kwargs: dict[Any, Any] | None,
        fut: asyncio.Future[Any],
    ) -> None:
        """Encode and queue a request whose reply resolves ``fut`` (see call_nowait)."""
        hooks = rref.Hooks(self, dest, conn)
        cid = next(conn._call_ids)
        try:
            chunks = wire.encode_frame(
                [K_REQ, cid, target, MODE_RPC, None], [list(args), kwargs or None], hooks, _CALL
            )
        except Exception as exc:
            hooks.undo()
            # (its traceback holds this frame, and through f_back call_nowait's, which
            # hold the future: a cycle at each failure, with the arguments, big arrays
            # maybe, kept until a gc run. Where it failed in the codec, the message says)
            fut.set_exception(exc.with_traceback(None))
            return
        conn.pending[cid] = (fut, hooks)
        if hooks.forks:  # RRefs among the arguments: registered before the request goes
            self.spawn(self._request_after_forks(conn, dest, target, cid, chunks, hooks, fut))
            return
        try:
            conn.send_nowait(chunks)
            if hooks.added:  # (no forks here: see above)
                rref.sent_on(conn, hooks)
        except Exception as exc:
            # (any error, not only ours: a MemoryError as the frame is written, which
            # aborts the connection and fails the future first, came out of here, and
            # the caller's fan-out, a release to every peer, stopped there)
            _take_back_unsent(conn, cid, hooks)
            if not fut.done():
                fut.set_exception(exc.with_traceback(None))  # (a cycle: see above)
            return
        if len(chunks[0]) > SLOW_DECODE_RATE:
            _expect_decoding(conn, chunks)

    async def _request_after_forks(
        self,
        conn: Connection,
        dest: str,
        target: Any,
        cid: int,
        chunks: list[Any],
        hooks: rref.Hooks,
        fut: asyncio.Future[Any],
    ) -> None:
        try:
            try:
                await rref.register_forks(self, hooks)
            except WorkerLost as lost:
                if lost.peer is None:  # (this worker shuts down)
                    raise
                raise _not_registered(lost, target, dest) from None
            if conn.closed:
                raise WorkerLost(f"connection to worker {conn.peer_name!r} is closed")
        except BaseException as exc:
            # (the request never left: what its encoding recorded is taken back, as call
            # does; a cancellation, our shutdown, leaves the future to it as before)
            hooks.undo()
            if not isinstance(exc, Exception):
                raise
            conn.pending.pop(cid, None)
            if not fut.done():
                fut.set_exception(exc)
            # (the error's traceback holds this frame, which holds the future holding
            # the error: a cycle at each failure, with the request's frame and hooks)
            fut = None  # type: ignore[assignment]
            return
        try:
            conn.send_nowait(chunks)
            rref.sent_on(conn, hooks)  # (numbered as it is queued: see rref.sent_on)
            if conn._write_paused:
                await conn.drain()
        except Exception as exc:
            _take_back_unsent(conn, cid, hooks)
            if not fut.done():
                fut.set_exception(exc)
            fut = None  # type: ignore[assignment]

    async def _connect_and_request(
        self,
        dest: Any,
        target: Any,
        args: Any,
        kwargs: dict[Any, Any] | None,
        fut: asyncio.Future[Any],
    ) -> None:
        try:
            if type(dest) is not str:
                dest = _worker_name(dest)
            conn = await self._conn_to(dest)
        except asyncio.CancelledError:  # our teardown
            if not fut.done():
                fut.set_exception(WorkerLost(f"worker {self.name!r} shut down"))
                fut.exception()  # failed by our shutdown: no "never retrieved" warning
            raise
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            fut = None  # type: ignore[assignment]  # (a cycle: see _request_after_forks)
            return
        if not fut.done():
            self._request_nowait(conn, dest, target, args, kwargs, fut)

    def notify(
        self,
        dest: str,
        fn: Any,
        args: tuple[Any, ...] = (),
        on_error: Callable[[BaseException], None] | None = None,
        sent: Callable[[Connection], None] | None = None,
    ) -> None:
        """A one-way call of ``fn(*args)`` on ``dest``: no reply, no task, no interceptor
        meta; usable from any loop callback. Messages to one peer go out in order (also
        those queued while the connection is being made). ``sent(conn)`` is called once
        it is queued on connection ``conn`` (its frame numbered there).

        When it cannot be handed to a connection (unknown or lost worker, an argument
        that cannot travel, this worker shutting down), ``on_error(exc)`` is called, at
        once or from a later loop callback; without ``on_error`` it is dropped (logged
        at debug level). On the receiver, a one-way call that cannot start (undecodable,
        unknown function) closes the connection, so a sender watching that peer
        (:meth:`watch`) learns it as a loss; an exception raised by ``fn`` is only
        logged there."""
        try:
            # (a name too: a malformed one would close the connection on the receiver,
            # and every call pending on it with it)
            target = calls.fn_spec(fn)
            if self._closing:
                raise WorkerLost(f"worker {self.name!r} is shutting down")
            chunks = _oneway_frame(target, args)
        except Exception as exc:
            self._notify_failed(dest, fn, exc, on_error)
            return
        self._send_oneway(dest, chunks, target, on_error, sent)

    def notify_on(self, conn: Connection, fn: Any, args: tuple[Any, ...] = ()) -> None:
        """A one-way call of ``fn(*args)`` over ``conn`` itself (an answer to something
        that came on it, e.g. an acknowledgement: no new connection is made for it).
        Dropped (logged at debug level) when it cannot go: ``conn`` closed, say."""
        try:
            if conn.closed or self._closing:
                raise WorkerLost(f"connection to {conn.peer_name!r} is closed")
            conn.send_nowait(_oneway_frame(calls.fn_spec(fn), args))
        except Exception as exc:
            self._notify_failed(conn.peer_name or "?", fn, exc, None)

    def cast(
        self,
        dest: str,
        topic: str,
        args: tuple[Any, ...] = (),
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Send the one-way protocol message ``topic`` with ``args`` (plain values and
        arrays: no tensors, no RRefs) to ``dest``, whose handler registered with
        :func:`on_cast` runs it. Ordering and failure reporting as :meth:`notify`,
        with less work per message on both sides.

        Example::

            worker.cast("w2", "myproto.ping", (1,), on_error=log.warning)
        """
        try:
            if self._closing:
                raise WorkerLost(f"worker {self.name!r} is shutting down")
            chunks = wire.encode_frame([K_CAST, topic], list(args), None, "args")
        except Exception as exc:
            self._notify_failed(dest, topic, exc, on_error)
            return
        self._send_oneway(dest, chunks, topic, on_error)

    def _send_oneway(
        self,
        dest: str,
        chunks: list[Any],
        what: Any,
        on_error: Callable[[BaseException], None] | None,
        sent: Callable[[Connection], None] | None = None,
    ) -> None:
        """Hand an encoded one-way message to the connection to ``dest``, or queue it
        while that connection is being made (messages to one peer keep their order).
        ``what`` (a function, its wire name or a cast topic) names it in failures."""
        try:
            queue = self._notify_queues.get(dest)
            if queue is not None:  # connecting: behind the ones waiting (order)
                queue.append((chunks, what, on_error, sent))
                return
            conn = self._out.get(dest)
            # (not one the peer said goodbye on: see _opened_by. Nor one that broke and
            # closes on the next loop turn: it dropped what it was given unsaid, an RRef
            # release among them, and the owner kept the value for the holder's life;
            # the connecting below runs after that close, and connects anew)
            if conn is None or conn.closed or conn.bye_read or conn.breaking:
                self._notify_queues[dest] = [(chunks, what, on_error, sent)]
                self._notifying[dest] = self.spawn(self._notify_connect(dest))
                return
            if self._lost:
                self._reach_lost(dest, conn)
            conn.send_nowait(chunks)
            if sent is not None:
                sent(conn)
        except Exception as exc:
            self._notify_failed(dest, what, exc, on_error)

    async def _notify_connect(self, dest: str) -> None:
        """Connect to ``dest``, then send the one-way calls queued meanwhile, in order."""
        err: BaseException | None = None
        conn: Connection | None = None
        try:
            conn = self._reach_lost(dest, await self._conn_to(dest))
        except asyncio.CancelledError:  # our teardown
            err = WorkerLost(f"worker {self.name!r} shut down")
            raise
        except Exception as exc:
            err = exc
        finally:
            self._notifying.pop(dest, None)
            for chunks, what, on_error, sent in self._notify_queues.pop(dest, []):
                if err is None and conn is not None:
                    try:
                        conn.send_nowait(chunks)
                        if sent is not None:
                            sent(conn)
                    except Exception as exc:
                        # (this message's failure alone: one over the largest frame
                        # failed every message queued after it, on a good connection)
                        self._notify_failed(dest, what, exc, on_error)
                    continue
                self._notify_failed(
                    dest, what, err or WorkerLost(f"no connection to {dest!r}"), on_error
                )
            # (the error's traceback reaches this frame, through the connecting frames'
            # f_back: kept in its locals, a cycle at each failure, on Python 3.13 with
            # the RRef registration's error too)
            err = None

    def _notify_failed(
        self,
        dest: str,
        what: Any,
        exc: BaseException,
        on_error: Callable[[BaseException], None] | None,
    ) -> None:
        # (its traceback's frames hold the message: a backward's gradients over the
        # largest frame, 2 GB, stayed until a garbage collection found the cycle)
        exc.__traceback__ = None
        if on_error is None:
            log.debug("one-way %s to %s dropped: %r", calls.describe(what), dest, exc)
            return
        try:
            on_error(exc)
        except Exception:
            log.exception("on_error callback of a one-way call to %s failed", dest)

    def dropped_by(self, peer: str) -> str | None:
        """Why ``peer`` closed its connection with this worker, if it said so and has
        not been heard from since (it heard nothing from this worker for too long,
        whose process was stopped, say: the peer lives on and takes this worker for
        lost); None for a peer that closed, died or left without a word, or was never
        reported lost."""
        entry = self._lost.get(peer)
        return entry[0] if entry is not None else None

    def said_goodbye(self, peer: str, wid: int) -> bool:
        """Whether process ``wid`` (a cluster id) of member ``peer`` said goodbye here: it
        shuts down, and leaves the cluster once the head reads its leave, which comes on
        another connection (maybe after a call to it failed on the goodbye)."""
        return self._left.get(peer) == wid

    def lost_cause(self, peer: str) -> str:
        """How ``peer``'s loss showed here ("worker 'w1' sent nothing for 3 s ...",
        "connection to worker 'w1' lost: ...", "it left the cluster"), while it is
        reported lost or dropped this worker (see is_lost, dropped_by); "" otherwise."""
        entry = self._lost.get(peer)
        return entry[1] if entry is not None else ""

    def is_lost(self, peer: str) -> bool:
        """Whether ``peer`` was reported lost (its connection died, or it went silent
        while watched) and has not been heard from since (it connected again, or
        answered the probe sent on its other connections, see _probe: what it sent
        before may be read after its death). Not a peer that dropped this
        worker (see dropped_by): it lives on, and calls in its new contexts are taken
        in here (this worker connects to it again, which ends its view of this worker
        as lost)."""
        entry = self._lost.get(peer)
        return entry is not None and entry[0] is None

    def peer_id(self, peer: str) -> int | None:
        """The cluster id of the process a message to ``peer`` reaches now, as best
        known here: the one it announced on the live connection to it (the membership
        view may still name a dead process it replaced), else that of a later process
        of the name that opened one to this worker, else the membership's; None for a
        name that is not a member."""
        # (Not a connection the peer opened: one of a dead process that another
        # replaced under its name can linger until its idle timeout, while every
        # message to the name goes to the new one.)
        conn = self._out.get(peer)
        if conn is not None and not conn.closed and conn.peer_id is not None:
            return conn.peer_id
        member = self.members.get(peer)
        if member is None:
            return None
        # (a process that joined under the name since, and reached this worker before
        # the head's word of it came: messages to the name go to it, see _connect_peer)
        later = self._opened_by(peer, later_than=member[0])
        return member[0] if later is None else later.peer_id

    def heard_from(self, peer: str) -> float | None:
        """When a frame from ``peer`` last came (``time.monotonic()``) on an open
        connection with it, or this worker began to ask it for pings if that is later
        (see :meth:`expect_heartbeats`), or, while the peer said it may be silent (see
        :meth:`going_quiet`), now: then until the end it gave; None without a
        connection."""
        last = None
        for conn in self._conns:
            if conn.peer_name == peer and not conn.closed:
                t = max(conn.last_recv, conn.asking_since)
                if conn.quiet_until > t:
                    # (its loop is busy for that long, decoding a big request or
                    # importing a script, and said so: its silence counts from the end
                    # it gave, as for the calls waiting on it (_silent_too_long). A
                    # backward's part watching it failed the pass on it meanwhile.)
                    t = min(conn.quiet_until, time.monotonic())
                if last is None or t > last:
                    last = t
        return last

    def expect_heartbeats(self, peer: str) -> None:
        """Ask ``peer`` to ping this worker every ``HEARTBEAT_INTERVAL`` (at once, then
        for the next ``HEARTBEAT_TIMEOUT``; call again to go on asking), so that
        :meth:`heard_from` tells whether it lives: a peer nobody waits on pings only
        every ``IDLE_TIMEOUT / 6``. Its silence counts from the first ask."""
        now = time.monotonic()
        until = self._expecting.get(peer)
        self._expecting[peer] = now + HEARTBEAT_TIMEOUT
        if until is None or until <= now:
            # (else asked already: while it is expected, the heartbeat asks each of its
            # connections every interval, one opened meanwhile too; every connection
            # was scanned at each call, each backward pass's watch of its peers)
            self._ask_all(peer, now)

    def _ask_all(self, peer: str, now: float) -> None:
        for conn in self._conns:
            if conn.peer_name == peer and not (conn.closed or conn._handshaking):
                self._ask(conn, now)

    def _ask(self, conn: Connection, now: float) -> None:
        """Ask ``conn``'s peer for pings (``[K_ASK]``) unless this end did lately."""
        if now - conn.last_ask > ASK_WINDOW:
            # (a new stretch: the peer pinged seldom until it hears this ask)
            conn.asking_since = now
        if now - conn.last_ask >= HEARTBEAT_INTERVAL * 0.9:
            conn.last_ask = now
            try:
                conn.send_heartbeat(1)
            except ActorgradError:
                pass

    def watch(self, peer: str) -> None:
        """Expect ``peer`` to stay alive (as if a call to it were pending): its
        connections are closed, and the peer reported lost, once it has been silent
        for ``HEARTBEAT_TIMEOUT`` (instead of ``IDLE_TIMEOUT``). Counted: one
        :meth:`unwatch` per ``watch``. For protocols of one-way messages."""
        self._watched[peer] = self._watched.get(peer, 0) + 1
        self.expect_heartbeats(peer)

    def unwatch(self, peer: str) -> None:
        n = self._watched.get(peer, 0) - 1
        if n > 0:
            self._watched[peer] = n
        else:
            self._watched.pop(peer, None)

    # ------------------------------------------------------------------ heartbeats
    async def _heartbeat(self) -> None:
        interval = HEARTBEAT_INTERVAL
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            lagged = now - last > interval + 1.0  # our own loop was blocked: be lenient
            last = now
            transport.trim_idle_buffers(now)
            expecting = self._expecting
            for peer in [p for p, until in expecting.items() if until <= now]:
                del expecting[peer]
            # (a connection nobody waits on is pinged only often enough for IDLE_TIMEOUT:
            # every 0.5 s, 32 idle worker processes that had all called each other took
            # a quarter of a core pinging)
            seldom = max(interval, IDLE_TIMEOUT / 6) * 0.9
            for conn in self._talking():
                if conn.closed:  # (closed with another one of its peer's this round)
                    continue
                if lagged or conn.paused_reading or conn._out_full:
                    # (silence we caused: our loop was blocked, or we stopped reading
                    # the connection, its requests filling the mailbox or its replies
                    # waiting unsent; the pings below
                    # still tell the peer that we live: a loop late in every round, e.g.
                    # blocked 1.6 s of every 1.8, must still ping in each)
                    conn.last_recv = max(conn.last_recv, now - interval)
                name = conn.peer_name
                if conn.pending or name in self._watched or name in expecting:
                    self._ask(conn, now)
                if not lagged and self._silent_too_long(conn, now):
                    continue
                # (asked, or a frame coming: its sender may wait, its asks queued
                # behind what it sends, a large request on a slow link; or not read
                # at all, its requests filling the mailbox: its asks wait unread)
                waits = max(conn.peer_waits_until, conn.last_data + ASK_WINDOW)
                every = interval * 0.9 if now < waits or conn.paused_reading else seldom
                if now - conn.last_sent >= every:
                    try:
                        conn.send_heartbeat()
                    except ActorgradError:
                        pass

    def _talking(self) -> list[Connection]:
        """The connections open and past their hello (those heartbeats go on)."""
        return [c for c in self._conns if not (c.closed or c._handshaking or c.peer_name is None)]

    @staticmethod
    def _say_now(conn: Connection, header: list[Any]) -> None:
        """Send the frame of ``header`` on ``conn`` at once, not at the next loop turn
        (the loop is about to be busy, or the connection to close); lost if it cannot
        (closed, or a reason that cannot be encoded: text of the peer's in it)."""
        try:
            conn.send_nowait([b"".join(wire.encode_frame(header, None))])
            conn.flush()
        except (ActorgradError, ValueError, TypeError):
            pass

    def _body(self, frame: Any, hooks: Any) -> Any:
        """``frame.body(hooks)``, a request's or a reply's. A body of many Python objects
        takes the loop seconds to decode, heartbeats included: every peer is told for
        how long first (see going_quiet), and that it is back once decoded. (The caller
        of a request used its own allowance, counted from the send, on a slow link: a
        12 MB request at 256 KiB/s arrived 46 s after it left, 22 s past it, and the
        caller took the live worker for lost 3 s into the decode; another worker
        waiting on a call here did too; and those waiting on a worker decoding a result,
        a driver on one whose own call brought it 8 MB of empty lists.)"""
        n = frame.body_nbytes
        if n <= SLOW_DECODE_RATE:
            return frame.body(hooks)
        self.going_quiet(min(MAX_QUIET, n / SLOW_DECODE_RATE))
        try:
            return frame.body(hooks)
        finally:
            self.going_quiet(0)  # (decoded: its silence counts again)

    def going_quiet(self, seconds: float) -> None:
        """Tell every peer that this worker's loop may send nothing for up to
        ``seconds`` (0: it is back), so that none takes its silence for a hang meanwhile.
        Written at once: the loop is about to be busy."""
        for conn in self._talking():
            self._say_now(conn, [K_PING, seconds])

    def _silent_too_long(self, conn: Connection, now: float) -> bool:
        """Close ``conn`` (its peer lost) if it was silent for longer than its limit;
        whether it did."""
        peer = conn.peer_name or "?"  # (named: one of _talking's)
        silent = now - max(conn.last_recv, conn.asking_since)
        # Only a side that waits on the peer declares it dead: a caller with calls
        # pending on the connection or watching the peer (HEARTBEAT_TIMEOUT), or a
        # member about its registry (IDLE_TIMEOUT). A quiet caller (e.g. a driver busy
        # with a long local computation) is not dropped by the workers it called.
        # (Not its membership: closing that one is leaving the cluster, for good; a
        # peer that hung for seconds is lost to the protocol that watched it, or to the
        # calls waiting on it, not to the cluster, until IDLE_TIMEOUT.)
        membership = self._is_membership(conn)
        watched = not membership and (conn.pending or peer in self._watched)
        limit = HEARTBEAT_TIMEOUT if watched else IDLE_TIMEOUT
        awake = now >= conn.decoding_until and now >= conn.quiet_until
        if conn is self.joining_conn and self._join_patient:
            # (a join told to wait for a head that does not answer: the join's own
            # timeout bounds that wait, see join)
            awake = False
        if membership and conn.pending and silent > HEARTBEAT_TIMEOUT and awake:
            # The calls waiting on the membership (a member's fetch of the member list,
            # the head's calls to a member over the connection it opened) fail as on a
            # lost peer; the membership stays. (A head whose loop was blocked for 3 s
            # while a member fetched the list, a call of it naming an unknown worker:
            # the member closed its membership and left the cluster, its process exited.)
            lost = _silent_for(peer, HEARTBEAT_TIMEOUT)
            for fut, _hooks in list(conn.pending.values()):
                if not fut.done():  # (its caller takes it back, as a timed-out call)
                    fut.set_exception(one_each(lost))
        if silent > limit and awake:
            # (said first: a peer that was stopped, not dead, reads it once it runs again)
            why = f"it heard nothing from this worker for {limit:g} s: was its process stopped?"
            drops = self._drops[peer] = self._drops.get(peer, 0) + 1
            err = _silent_for(peer, limit)
            # Every connection with that process ends with this one (not this worker's
            # membership: that is leaving the cluster): one kept, an idle one the peer
            # opened, carried the next calls to it while its goodbye was still on the
            # way, and the goodbye, late, ended that session (see _stale_end).
            others = [c for c in self._session_conns(peer, conn.peer_id) if c is not conn]
            self._dropping = peer  # (no probe: see _on_lost)
            try:
                for c in [conn, *others]:
                    # (with the calls it gave up on there: see _given_up)
                    self._say_now(c, [K_BYE, why, drops, _given_up(c)])
                    self._part(c, err)
            finally:
                self._dropping = None
            return True
        return False

    def _refused(self, conn: Connection, err: ProtocolError) -> None:
        """Close ``conn`` on what its peer sent (``Connection.refuse``), telling the
        peer why first: its calls failed with "connection lost" and nothing else, and
        a one-way call's sender heard nothing at all."""
        self._say_now(conn, [K_BYE, str(err)[:500], "refused"])
        self._part(conn, err)

    def _part(self, conn: Connection, err: BaseException) -> None:
        """Close ``conn`` after the goodbye just queued on it (``Connection.part``)."""
        if conn.part(err, IDLE_TIMEOUT) is not None:  # (a peer stopped longer has left by then)
            self._parting.add(conn)

    # ------------------------------------------------------------------ teardown
    async def shutdown(self, graceful: bool = True, timeout: float | None = None) -> None:  # noqa: ASYNC109 (timeout is API)
        """Teardown phase; idempotent. Graceful: stop taking new calls, let the ones in
        flight finish (at most ``timeout`` s), then leave the cluster and close. A call of
        this worker that asks for it (``await ag.shutdown()`` in an ``async def`` called
        here) is not waited for: it waits for the shutdown (it waited out ``timeout``
        for itself, and its caller heard nothing until then)."""
        me = asyncio.current_task()
        asking = me is not None and self._runs_call(me)
        if asking:
            self._asking += 1
            self._check_drained()  # (a shutdown under way may now wait for none)
        try:
            if self._shutdown_task is None:
                self._shutdown_task = self.loop.create_task(self._teardown(graceful, timeout))
            elif not graceful:
                self.cut_drain()
            await asyncio.shield(self._shutdown_task)
        finally:
            if asking:
                self._asking -= 1

    def _runs_call(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` runs a call made to this worker (an ``async def``'s)."""
        return any(
            t is task for conn in list(self._every_conn) for t in list(conn.running.values())
        )

    def _check_drained(self) -> None:
        """Wake a graceful shutdown once the calls still running are only those of the
        thread pool whose callers gave up: nobody waits for them, and a shutdown that
        waited for them took its whole grace (``timeout``) for calls that may never end."""
        if self._inflight <= self._given_up + self._asking:
            w = self._idle_waiter
            if w is not None and not w.done():
                w.set_result(None)

    def cut_drain(self) -> None:
        """A graceful shutdown (under way or to come) stops waiting for the running
        calls: a forced stop (a second Ctrl-C)."""
        self._drain_cut = True
        w = self._idle_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _teardown(self, graceful: bool, timeout: float | None) -> None:  # noqa: ASYNC109 (timeout is API)
        self._stopping = True
        if timeout is None:
            timeout = SHUTDOWN_TIMEOUT
        end = self.loop.time() + timeout
        if graceful and self._inflight > self._given_up + self._asking and not self._drain_cut:
            try:
                async with asyncio.timeout(timeout):
                    self._idle_waiter = self.loop.create_future()
                    await self._idle_waiter
            except TimeoutError:
                pass
        while graceful and self._notifying and not self._drain_cut:
            # One-way messages of the calls it let finish, to peers still being connected
            # to (a call's caller: the call came on the caller's connection), go out
            # before the goodbyes: the close cancelled their connecting, and a backward
            # part's report was lost, its pass waiting for the heartbeat. (Within the
            # grace, each connecting bounded by its own deadline too; a forced shutdown,
            # cut_drain, ends the wait through _idle_waiter.)
            left = end - self.loop.time()
            if left <= 0:
                break
            self._idle_waiter = self.loop.create_future()
            await asyncio.wait(
                [self._idle_waiter, *self._notifying.values()],
                timeout=left,
                return_when=asyncio.FIRST_COMPLETED,
            )
        if self._inflight > self._asking:
            n = self._inflight - self._asking
            log.warning(
                "worker %s: %d call%s still running at shutdown%s",
                self.name,
                n,
                "" if n == 1 else "s",
                f" ({self._given_up} given up by their callers)" if self._given_up else "",
            )
        self._closing = True
        for cb in self._closing_cbs:
            try:
                cb()
            except Exception:
                log.exception("closing callback %r failed", cb)
        # leave the registry
        if (
            self.registry is None
            and self.registry_conn is not None
            and not self.registry_conn.closed
        ):
            try:
                self.registry_conn.send_nowait(
                    wire.encode_frame(
                        [K_REQ, 0, "actorgrad.runtime.registry:_leave", MODE_RPC, None],
                        [[self.name], None],
                    )
                )
            except ActorgradError:
                pass
        if self.registry is not None:
            self.registry.close()
        bye = wire.encode_frame([K_BYE], None)
        for conn in list(self._conns):
            if not conn._handshaking and not conn.closed:
                try:
                    conn.send_nowait(bye)
                except ActorgradError:
                    pass
            conn.close(WorkerLost(f"worker {self.name!r} shut down"))
        for conn in list(self._parting):
            conn.end_linger()
        self._parting.clear()
        # connections accepted before the close still become connections (our protocol
        # factory closes them: we are closing), so that their sockets are closed below
        listeners = [s for s in (self._server, self._local_server) if s is not None]
        for listener in listeners:
            listener.close()
        for listener in listeners:
            try:
                await asyncio.wait_for(listener.wait_closed(), LISTENER_CLOSE_WAIT)
            except TimeoutError:
                log.warning(
                    "worker %s: connections it accepted were still being set up %g s "
                    "after it stopped listening; shutting down without them",
                    self.name,
                    LISTENER_CLOSE_WAIT,
                )
        if self.transport_kind == "inproc" and self.address:
            transport.inproc_unlisten(self.address)
        # cancel and await every task we own (again, if cancelling spawned new ones),
        # for at most CANCEL_GRACE: a task that swallows its cancellation (user code
        # catching BaseException) is left running, not waited for without end
        end = self.loop.time() + CANCEL_GRACE
        while tasks := [t for t in self._tasks if t is not asyncio.current_task()]:
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=max(end - self.loop.time(), 0.05))
            if stuck:
                log.warning(
                    "worker %s: %d task(s) went on after being cancelled at shutdown; left "
                    "running: %s",
                    self.name,
                    len(stuck),
                    ", ".join(sorted(t.get_name() for t in stuck)[:5]),
                )
                self._tasks.difference_update(stuck)
                break
        # (no connection is rejected from here on: those of the minute not logged are
        # counted now, not by a timer once this worker is gone)
        self._count_unlogged()
        self._say_shed()
        # Every connection this worker made or accepted (those closed above too) must
        # close its socket before the loop may end: see below.
        for conn in list(self._every_conn):
            tr: Any = conn.transport
            if tr is None:
                conn.close()  # (not made yet: aborted as soon as it is)
            elif not tr.is_closing() or tr.get_write_buffer_size():
                # (a peer that does not read: a transport closes once its buffer is
                # flushed, and this one would have kept its socket until garbage
                # collection, a ResourceWarning somewhere later; and any connection
                # that left the worker's books open, whatever the path)
                tr.abort()
        # Let in-proc transports deliver their connection_lost callbacks, and a
        # connection accepted just before the listener closed (its accept task runs a
        # turn later, its connection_made one more, its socket closes in a callback
        # after that) close: if the loop ended first, its socket stayed open until
        # garbage collection (a ResourceWarning somewhere later).
        for _ in range(5):
            await asyncio.sleep(0)
        # Then up to 50 turns more for the transports still closing (a connection
        # accepted as the worker shut down takes a few: made, aborted, then its socket
        # closed). (A margin: the leak it was added for came from asyncio's servers, see
        # above.)
        for _ in range(50):
            if all(c.transport is None or c.transport_gone for c in self._every_conn):
                break
            await asyncio.sleep(0)
        for conn, _ in self._mailbox:
            conn.in_mailbox = 0
        self._mailbox.clear()
        self.owned.clear()
        if self._rref_withdrawn_timer is not None:
            self._rref_withdrawn_timer.cancel()
            self._rref_withdrawn_timer = None
        if self._rref_lost_given_timer is not None:
            self._rref_lost_given_timer.cancel()
            self._rref_lost_given_timer = None
        self._rref_lost_given.clear()
        self._rref_lost_given_n = 0
        if self._rref_lost_sent_timer is not None:
            self._rref_lost_sent_timer.cancel()
            self._rref_lost_sent_timer = None
        self._rref_lost_sent.clear()
        if self._rref_ack_timer is not None:
            self._rref_ack_timer.cancel()
            self._rref_ack_timer = None
        self.closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
