"""Clusters: the functions behind ``actorgrad cluster/worker/status`` and
``local_cluster``.

* :func:`serve_cluster` — registry head + N worker processes ``w1..wN``.
* :func:`serve_worker` — one worker joining a cluster, until stopped or the head leaves.
* :func:`cluster_status` — ask a cluster's head for every worker's status.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from actorgrad.errors import RemoteError, WorkerLost
from actorgrad.runtime import worker as _w
from actorgrad.runtime.procs import ENV_TOKEN, WorkerProcesses, blank_env_hint, describe_exit
from actorgrad.runtime.registry import MAX_NAME, NameTaken, valid_name
from actorgrad.runtime.transport import HelloRefused, is_loopback, split_address
from actorgrad.runtime.worker import Worker, nobody_listens

log = logging.getLogger("actorgrad.runtime")

HEAD_NAME = "_head"
#: Seconds a stopping worker lets its running calls go on (a first Ctrl-C).
DRAIN = 5.0

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh event loop: a uvloop loop when uvloop is
    installed, else asyncio's default. No process-global event-loop policy is set."""
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coro)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except BaseException:
        # (a Ctrl-C before the loop started it: "coroutine ... was never awaited")
        coro.close()
        raise


def bind_for(address: str) -> str:
    """The interface a worker joining the cluster at ``address`` binds when told none:
    the loopback one for a cluster on this host's loopback, every one otherwise (its
    peers, maybe on other hosts, connect to the address it advertises: one bound to
    127.0.0.1 reached none of them); of IPv6 for a cluster at an IPv6 address (bound
    to IPv4, a worker advertised the IPv6 address it reached the head from, where
    nothing listened)."""
    host = split_address(address)[0]
    v6 = ":" in host
    if is_loopback(host):
        return "::1" if v6 else "127.0.0.1"
    return "::" if v6 else "0.0.0.0"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits only (``str.isdigit`` is true of "²" too, which
    ``int()`` then refused bare, and of other scripts' digits, which it took)."""
    return text.isascii() and text.isdigit()


def check_host(host: Any) -> str:
    """``host`` in the form to bind when it can be bound: an IP address (IPv6 optionally
    in brackets, as addresses show it: returned without them, which binding needs), a
    host name (RFC 1123 labels, at most 253 characters), or "" (every interface).
    TypeError for a non-str, ValueError for a malformed one (``256.0.0.1``, spaces)."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str (a name or an IP address), not {host!r:.80}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        pass
    if bare is host and _digits(host.replace(".", "")):
        raise ValueError(f"host {host!r:.80} is not a valid IP address")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if bare is host and (
        host == "" or (len(host) <= 253 and all(_HOST_LABEL.fullmatch(x) for x in labels))
    ):
        return host
    raise ValueError(f"host must be a host name or an IP address, not {host!r:.80}")


def check_bind(host: object, token: str | None) -> str:
    """``host`` in the form to bind (see :func:`check_host`) if a worker may bind it:
    well-formed, and a loopback address unless there is a cluster ``token``."""
    host = check_host(host)
    if not is_loopback(host) and not token:
        try:
            ipaddress.ip_address(host)
            what = "not a loopback address"
        except ValueError:  # (not resolved here: a name that does not resolve said so)
            what = "a host name: only loopback addresses and localhost bind without one"
        raise ValueError(
            f"refusing to bind {host!r} ({what}) without a cluster token: "
            f"pass token=... or set {ENV_TOKEN}{blank_env_hint(ENV_TOKEN)}"
        )
    if not is_loopback(host) and token and len(token) < SHORT_TOKEN:
        # (a server answers guesses as fast as they come: ~3,000 a second measured, and
        # a 3-letter token fell in 3 s; nothing else slows a guesser down)
        log.warning(
            "the cluster token has only %d characters, and %s is reachable from other "
            "hosts: anyone who can connect can guess a short token and run code on the "
            "cluster; use a random one (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')",
            len(token),
            host,
        )
    return host


#: Tokens shorter than this draw a warning when a worker listens beyond loopback.
SHORT_TOKEN = 16


async def start_worker(w: Worker) -> None:
    """``await w.start()``; a host name that does not resolve is a ValueError naming it
    (not a bare ``socket.gaierror``)."""
    try:
        await w.start()
    except socket.gaierror as exc:
        raise ValueError(
            f"cannot bind host {w.host!r}: {exc.strerror or exc} (not a name of this machine?)"
        ) from None


def check_name(name: Any) -> str:
    """``name`` when it can name a user's worker: a str of 1 to 255 printable characters
    without whitespace, not starting with "_" (such names are actorgrad's own: the
    cluster's head, status clients; they are left out of ``ag.workers()``). TypeError
    for a non-str, else ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"a worker name must be a str, not {type(name).__name__} ({name!r:.80})")
    if not valid_name(name) or name.startswith("_"):
        raise ValueError(
            f"a worker name must be a non-empty str of at most {MAX_NAME} printable "
            f"characters without whitespace, not starting with '_', not {name!r:.80}"
        )
    return name


# HOST:PORT, an IPv6 host (maybe with its scope, fe80::1%eth0) in brackets. (Split at
# the last colon, "fd00::2" was host "fd00:", port 2, and "[fd00::2:4000" was taken;
# a space in the host: "cannot connect to  127.0.0.1:4000", the space hard to see.)
_ADDRESS = re.compile(
    r"(?:\[([0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[^\s\[\]%]+)?)\]|([^\s\[\]:]+)):([0-9]+)"
)


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def address_hint(address: Any) -> str:
    """What to add to the message refusing ``address``: how an IPv6 host is written,
    when it looks like one."""
    if isinstance(address, str) and address.count(":") > 1:
        return " (an IPv6 host in brackets: [fd00::1]:4000)"
    return ""


def check_address(address: Any, what: str = "address") -> str:
    """``address`` when it is HOST:PORT (a port in 1..65535; an IPv6 host in brackets),
    else ValueError naming ``what`` (the argument or variable it came from); TypeError
    when it is no str (as for the other arguments of ``ag.init``)."""
    if not isinstance(address, str):
        raise TypeError(f"{what} must be a str, HOST:PORT, not {address!r:.80}")
    m = _ADDRESS.fullmatch(address)
    if m and 0 < int(m[3]) <= 65535 and (m[1] is None or _ipv6(m[1].partition("%")[0])):
        return address
    raise ValueError(
        f"{what} must be HOST:PORT with a port in 1..65535{address_hint(address)}, "
        f"not {address!r:.80}"
    )


def check_advertise(advertise: Any) -> tuple[str, int | None]:
    """``advertise`` (``HOST`` or ``HOST:PORT``: where other workers reach a worker, when
    not at the address it listens on: a NAT, a container's published port, a tunnel)
    as ``(host, port)``, port None for the listening one. TypeError for a non-str,
    ValueError for a malformed one, or one that names no host to connect to (every
    interface: ``0.0.0.0``, ``::``, empty).

    Example::

        assert check_advertise("203.0.113.7:7001") == ("203.0.113.7", 7001)
        assert check_advertise("node3.example.org") == ("node3.example.org", None)
    """
    if not isinstance(advertise, str):
        raise TypeError(f"advertise must be a str (HOST or HOST:PORT), not {advertise!r:.80}")
    port: int | None = None
    host = advertise
    m = _ADDRESS.fullmatch(advertise)
    if m:
        check_address(advertise, "advertise")  # (its port in range)
        host, port = m[1] or m[2], int(m[3])
    try:
        host = check_host(host)
    except ValueError:
        raise ValueError(
            f"advertise must be HOST or HOST:PORT{address_hint(advertise)}, not {advertise!r:.80}"
        ) from None
    if host in ("", "0.0.0.0", "::"):
        raise ValueError(
            f"advertise must name an address other workers connect to, not {advertise!r:.80} "
            f"({'empty' if not host else 'which stands for every interface'})"
        )
    return host, port


def new_token() -> str:
    """A new cluster token: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


async def finish(
    coro: Awaitable[Any], hurry: Callable[[], None] | None = None, cancelled: bool = False
) -> Any:
    """Run ``coro`` to completion even if we are cancelled meanwhile; the cancellation
    is re-raised afterwards (cleanup paths must not be cut short). ``hurry()`` is called
    once if we are cancelled meanwhile or were before (``cancelled``: the cleanup runs
    in the ``finally`` a cancellation raised through): ``coro`` then ends sooner (a
    second Ctrl-C)."""
    task = asyncio.ensure_future(coro)
    if hurry is not None and cancelled:
        hurry()
        hurry = None
    cancelled_meanwhile = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled_meanwhile = True
            if hurry is not None:
                hurry()
                hurry = None
    if cancelled_meanwhile:
        raise asyncio.CancelledError
    return result


async def serve_cluster(
    n: int,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    on_event: Callable[[str, str], None] | None = None,
    path_first: Sequence[str] = (),
) -> None:
    """Registry head + ``n`` worker processes ``w1..wn``; ``on_ready(address)`` once all
    joined; runs until ``stop`` is set (or cancelled), then shuts everything down.
    ``path_first``: import paths the workers look in first (see WorkerProcesses.start).

    Once ready, ``on_event(kind, text)`` hears of each change until the shutdown
    starts: kind "joined" or "left" (a worker joined or left the registry) or "exited"
    (one of the ``n`` worker processes ended: how, and its pid); then kind "stuck" if
    worker processes outlive the shutdown's grace (they are terminated)."""
    if n < 0:
        raise ValueError(f"number of workers must be >= 0, not {n}")
    host = check_bind(host, token)
    head = Worker(HEAD_NAME, token=token, host=host, port=port)
    procs = WorkerProcesses()
    unwatch: list[Callable[[], None]] = []
    joined = cancelled = False
    try:
        await start_worker(head)
        registry = head.host_registry()
        names = [f"w{i}" for i in range(1, n + 1)]
        procs.start(head.address, names, token, host=host, path_first=path_first, registry=registry)
        if not await _unless_stopped(procs.wait_registered(registry), stop):
            return
        joined = True
        # workers of others that joined during the start-up (a `worker --wait` that was
        # waiting for it): news too, said after the ready line (they went unsaid)
        early = sorted(
            (m, e) for m, e in registry.members.items() if m not in names and m != HEAD_NAME
        )
        if on_event is not None:
            unwatch = _report_changes(registry, procs, on_event)
        if on_ready is not None:
            on_ready(head.address)
        if on_event is not None:
            for member, entry in early:
                on_event("joined", f"worker {member} joined ({entry[1]})")
        if stop is None:
            stop = asyncio.Event()
        await stop.wait()
    except asyncio.CancelledError:
        cancelled = True  # (forced: see hurry)
        raise
    finally:
        for fn in unwatch:  # (the shutdown's own leaving and exits are not news)
            fn()
        if not joined:
            # Stopped during the start-up (a Ctrl-C): the workers still joining stop
            # quietly on a SIGTERM; once the head closed, each said it could not connect.
            procs.terminate()

        def stuck(names: list[str], grace: float) -> None:
            if on_event is not None:
                on_event("stuck", describe_stuck(names, grace, "the shutdown"))

        def hurry() -> None:  # (forced: the workers are killed, the head stops waiting)
            procs.kill()
            head.cut_drain()

        await finish(stop_all(head, [], procs, on_stuck=stuck), hurry, cancelled)


def name_list(names: list[str], shown: int = 8) -> str:
    """``names`` joined with commas; of a longer list the first ``shown``, then how many
    in all (the lines of a cluster of 256 workers listed 1.7 KB of names)."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, ... ({len(names)} in all)"


def describe_stuck(names: list[str], grace: float, after: str) -> str:
    """ "worker process w1 did not exit within 3 s of ``after``: terminating it" (or
    "worker processes w1, w2 ...: terminating them")."""
    one = len(names) == 1
    return (
        f"worker process{'' if one else 'es'} {name_list(names)} did not exit within "
        f"{round(grace, 1):g} s of {after}: terminating {'it' if one else 'them'}"
    )


def _report_changes(
    registry: Any, procs: WorkerProcesses, on_event: Callable[[str, str], None]
) -> list[Callable[[], None]]:
    """Tell ``on_event`` of joins, leaves and worker process exits; returns the
    functions that stop it."""

    def member(what: str, name: str, address: str) -> None:
        on_event(what, f"worker {name} {what}" + (f" ({address})" if what == "joined" else ""))

    def exited(name: str, pid: int, returncode: int) -> None:
        on_event("exited", f"worker process {name} (pid {pid}) {describe_exit(returncode)}")

    registry.listeners.append(member)
    return [functools.partial(registry.listeners.remove, member), procs.watch_exits(exited)]


async def _unless_stopped(aw: Awaitable[Any], stop: asyncio.Event | None) -> bool:
    """Await ``aw``; True once it is done, False (it is cancelled) when ``stop`` is set
    first: a Ctrl-C during a start-up (workers joining, a join that hangs) stops it at
    once instead of after the start-up's own deadline."""
    if stop is None:
        await aw
        return True
    task = asyncio.ensure_future(aw)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.wait({task, waiter})
    if task.cancelled():
        return False
    task.result()  # (raises what it raised)
    return True


async def stop_all(
    head: Worker,
    workers: list[Worker],
    procs: WorkerProcesses | None,
    on_stuck: Callable[[list[str], float], None] | None = None,
    graceful: bool = True,
) -> None:
    """Shut a local cluster down: its in-process workers, then the head, then its worker
    processes (terminated, joined, killed; see WorkerProcesses.stop). ``graceful``: one
    worker after the other, each letting its calls finish (up to 5 s), so a call still
    running on one can go on calling the next, and the head reads their answers to its
    own calls before it goes (up to 5 s more). Not (left on an error): all at once,
    their running calls cancelled (one after the other, each busy worker waited 5 s)."""
    # (a worker whose shutdown fails leaves the others, the head and the processes to
    # stop all the same: its error is raised once they are)
    failed: list[BaseException] = []
    try:
        if procs is not None and head.registry is not None:
            await procs.stop_unjoined(head.registry)
        if graceful:
            for w in workers:
                try:
                    await w.shutdown(timeout=DRAIN)
                except Exception as exc:
                    failed.append(exc)
        else:
            done = await asyncio.gather(
                *(w.shutdown(graceful=False, timeout=DRAIN) for w in workers),
                return_exceptions=True,
            )
            failed.extend(o for o in done if isinstance(o, BaseException))
        if graceful:
            await _answers_read(head, {w.name for w in workers}, DRAIN)
        try:
            await head.shutdown(graceful, timeout=DRAIN)
        except Exception as exc:
            failed.append(exc)
    finally:
        if procs is not None:
            # (a worker process lets its running calls go on for DRAIN s once it hears
            # the head has gone, and the SIGTERM after 3 s does not cut that: gracefully,
            # it is killed only after that, not before it could flush its output as it
            # was; a stopped one, continued with the SIGTERM, ends then)
            await procs.stop(term_grace=DRAIN - 2.0 if graceful else 2.0, on_stuck=on_stuck)
    if failed:
        # (the first is raised; the others would be lost without a word)
        for other in failed[1:]:
            log.error("shutting the local cluster down also failed: %r", other, exc_info=other)
        raise failed[0]


async def _answers_read(head: Worker, names: set[str], within: float) -> None:
    """Wait (``within`` s at most) until ``head`` read what the workers ``names``, shut
    down, sent it on the connections where it waits for their answers: each such
    connection closed (its goodbye, after the answers, read) or has nothing pending.
    They answered before they went, but the head reads each connection when it comes:
    shut down at once, it failed a call whose answer was still on its way ("worker
    'driver' shut down"; delivery-order fuzzing, seed 151). None waits at all where the
    answers were read already, as they mostly are; else it wakes when an answer was read
    (its call's future is done: the reader takes the call off ``pending`` first) or a
    connection closed (a loss fails what still waits), not every 1 ms as it polled."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        waiting = [k for k in head._conns if k.pending and not k.closed and k.peer_name in names]
        left = end - loop.time()
        if not waiting or left <= 0:
            return
        # (a call whose caller gave up already, its future done, waits for its late
        # answer or the close: only the close is waited on for it)
        wakers: list[asyncio.Future[Any]] = [k.when_closed() for k in waiting]
        wakers += [f for k in waiting for f, _ in list(k.pending.values()) if not f.done()]
        await asyncio.wait(wakers, timeout=left, return_when=asyncio.FIRST_COMPLETED)


async def serve_worker(
    address: str,
    name: str,
    token: str,
    *,
    stop: asyncio.Event | None = None,
    host: str | None = None,
    port: int = 0,
    on_joined: Callable[[Worker], None] | None = None,
    key: str = "",
    wait: float = 0.0,
    advertise: str | None = None,
    on_waiting: Callable[[str], None] | None = None,
) -> str | None:
    """One worker joining the cluster at ``address``; runs until ``stop`` is set or the
    cluster's head goes away. ``on_joined(worker)`` once it joined; ``key``: the one
    its head gave a process it started (see ``Worker.join``); ``wait``: seconds to keep
    trying while nothing listens at ``address`` (a cluster not up yet), its head
    does not answer, or a member holds the name (see _join_when_up;
    ``on_waiting(why)`` is told the first time the name was taken); ``host``,
    ``port``: where it listens (see bind_for; 0: any free port); ``advertise``: where
    the others reach it, if not there (see check_advertise). Returns how the
    head went away ("it shut down", "worker '_head' sent nothing for 60 s ..."), None
    when ``stop`` ended it (or the worker's own ``shutdown``)."""
    check_name(name)
    check_address(address)
    host = check_bind(bind_for(address) if host is None else host, token)
    where = None if advertise is None else check_advertise(advertise)
    w = Worker(name, token=token, host=host, port=port, advertise=where)
    own = _w._process_worker is None or _w._process_worker.closed
    if own:
        _w.set_process_worker(w)
    cancelled = False
    try:
        await start_worker(w)
        if await _unless_stopped(_join_when_up(w, address, key, wait, on_waiting), stop):
            if on_joined is not None:
                on_joined(w)
            if await _unless_stopped(w.registry_lost.wait(), stop):
                # (the head went away; or, closing, this worker left it: its own code
                # shut it down, as a stop asked for)
                return None if w.closing else w.registry_lost_why
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        # (forced, a second Ctrl-C: it stops waiting for its running calls)
        await finish(w.shutdown(timeout=DRAIN), w.cut_drain, cancelled)
        if own and _w._process_worker is w:
            _w.set_process_worker(None)
    return None


#: Seconds between attempts to reach a cluster that is not up yet (serve_worker's wait).
RETRY_JOIN = 0.5


async def _join_when_up(
    w: Worker,
    address: str,
    key: str,
    wait: float,
    on_waiting: Callable[[str], None] | None = None,
) -> None:
    """``w.join(address)`` for ``wait`` s: tried again while nothing listens there (a
    cluster not up yet), the connection to the head breaks (a head restarted), or a
    member holds the name (the process a supervisor restarts this one for, which the
    head keeps until it leaves or, dead with its connection open, until the head's
    silence timeout: it failed at once, and the supervisor's restarts with it), and
    waiting meanwhile for a head that does not answer (its process stopped, its loop
    blocked for seconds: see ``Worker.join``'s ``until``). ``on_waiting(why)``: told
    once, at the first refusal for the name (a name given twice waits silently else)."""
    start = time.monotonic()
    deadline = start + wait
    told = False
    while True:
        try:
            await w.join(address, key=key, until=deadline if wait > 0 else None)
            return
        except (WorkerLost, NameTaken) as exc:
            # (not a head that refused the join for good: another ValueError, AuthError,
            # a protocol version not its own; nor our hello, refused for what it says,
            # HelloRefused. One that did not answer was waited for up to the deadline,
            # which is past then)
            if wait <= 0 or isinstance(exc, HelloRefused):
                raise
            left = deadline - time.monotonic()
            if left <= 0:  # (said: the retries were not seen, the last error only)
                said = f"{exc} (tried for {time.monotonic() - start:.1f} s: --wait {wait:g})"
                if isinstance(exc, NameTaken):
                    raise NameTaken(said) from None
                raise WorkerLost(said) from exc.__cause__
            if isinstance(exc, NameTaken) and not told and on_waiting is not None:
                told = True
                on_waiting(str(exc))
        # (the last attempt is at the deadline: `--wait 2` tries for 2 s, not 1.5)
        await asyncio.sleep(min(RETRY_JOIN, left))


async def cluster_status(address: str, token: str, timeout: float = 5.0) -> dict[Any, Any]:  # noqa: ASYNC109 (timeout is API)
    """``{"address": ..., "workers": [{"name", "id", "address", "mailbox", "in_flight",
    **status providers}, ...]}`` from the cluster's head.

    A worker that does not answer the head within ``timeout`` seconds (hung, or
    unreachable from the head) gets ``{"name", "id", "address", "error"}``; the others
    are listed as usual, but for those that left the cluster while asked (not listed).
    When the head itself does not answer: WorkerLost when a step of the connection
    takes over ``timeout`` (its error says which step), TimeoutError when the status
    takes ``timeout`` beyond its workers' deadline.
    """
    client = Worker(f"_status-{os.getpid()}-{secrets.token_hex(3)}", token=token)
    try:
        # (each step of the connection, connect, handshake and hello, has ``timeout``,
        # and says what hung: something that is no actorgrad worker, say)
        async with asyncio.timeout(3 * timeout + 1.0):
            try:
                conn = await client.open_connection(address, deadline=timeout)
            except WorkerLost as exc:  # (as a join there says it)
                raise nobody_listens(exc) from exc.__cause__
        async with asyncio.timeout(2 * timeout):
            status: dict[Any, Any] = await client.call_on(
                conn, "actorgrad.runtime.registry:_status", (timeout,)
            )
            return status
    except RemoteError as exc:
        if exc.remote_type == "ValueError":  # (the address of a worker, not the head)
            raise ValueError(exc.remote_message) from None
        raise
    except TimeoutError:
        raise TimeoutError(
            f"the cluster's head at {address} did not answer within {timeout:g} s"
        ) from None
    finally:
        await client.shutdown()
