"""The public runtime API: init, rpc, remote, local_cluster,
worker_name, workers, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import types
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec

from actorgrad.errors import WorkerLost, check_bool, short_repr
from actorgrad.runtime import worker as _w
from actorgrad.runtime.cluster import (
    HEAD_NAME,
    bind_for,
    check_address,
    check_advertise,
    check_bind,
    check_name,
    describe_stuck,
    finish,
    new_token,
    start_worker,
    stop_all,
)
from actorgrad.runtime.procs import (
    ENV_ADDRESS,
    MAX_LOCAL_WORKERS,
    WorkerProcesses,
    env_address,
    env_token,
    tune_malloc,
)
from actorgrad.runtime.rref import RRef
from actorgrad.runtime.transport import check_token
from actorgrad.runtime.worker import (
    MODE_REMOTE,
    MODE_RPC,
    Worker,
    check_timeout,
    current_worker,
    head_lost,
    loop_worker,
)

log = logging.getLogger("actorgrad.runtime")

__all__ = ["init", "rpc", "remote", "local_cluster", "worker_name", "workers", "shutdown", "RRef"]


class _DefaultHost(str):
    """The default ``host`` of ``init``: "127.0.0.1", told apart from the same address
    given explicitly (by identity), which binds the loopback interface as asked."""

    __slots__ = ()


_DEFAULT_HOST = _DefaultHost("127.0.0.1")


async def init(
    name: str,
    *,
    address: str | None = None,
    token: str | None = None,
    host: str = _DEFAULT_HOST,
    port: int = 0,
    advertise: str | None = None,
) -> Worker:
    """Join this process to a cluster as worker ``name`` (a new cluster, hosting its
    registry, when there is no address argument nor ``ACTORGRAD_ADDRESS``).

    ``name``: 1 to 255 printable characters without whitespace, not starting with "_".
    ``host``: the interface to bind, an IP address or a host name of this machine.
    Joining a cluster at a non-loopback address, the default binds every interface,
    as ``actorgrad worker`` does: the other workers connect to the address it
    advertises (one bound to 127.0.0.1 reached none on other hosts). An explicit
    loopback host is bound as given, with a warning.

    ``advertise``: ``HOST`` or ``HOST:PORT`` where the other workers connect to this
    one, when not at the address it listens on: behind a NAT, a container's published
    port (``--host 0.0.0.0 --port 7001`` inside, ``-p 7001:7001``), a tunnel; no port:
    the one it listens on. The default advertises its listener's address.

    Returns this process's worker: ``.address`` is where others join a cluster it
    started, ``.token`` the cluster's token (a generated one, when none was given).

    Raises:
        TypeError: a name, address, host or token that is not a str, a port that is not
            an int.
        ValueError: a malformed name, address, host or port, a blank token (also "":
            it is not "no token"), no token to join with, or a new cluster bound to a
            host that is not a loopback address without a token (anyone who can reach
            it could join: pass ``token=``), or a bad ``ACTORGRAD_HEARTBEAT_TIMEOUT``.
        RuntimeError: this process is initialized already (a worker whose event loop
            has closed does not count: it is forgotten).
        AuthError: the cluster's token is another one.
        WorkerLost: nobody answers at the address.

    Example (a driver script run by ``actorgrad run -n 2 script.py``)::

        await ag.init("driver")          # the address and token come from the env
        print(ag.workers())              # ['driver', 'w1', 'w2']
        ...
        await ag.shutdown()

    Hosting a new cluster that others join (``actorgrad worker --join ADDRESS``)::

        me = await ag.init("driver", host="0.0.0.0", token=secret)
        print(me.address)                # e.g. 10.0.0.5:41237
    """
    _check_not_initialized()
    check_name(name)
    token = None if token is None else check_token(token)
    if type(port) is not int:
        raise TypeError(f"port must be an int (0: any free port), not {port!r:.80}")
    where = None if advertise is None else check_advertise(advertise)
    _w.read_settings()  # (a bad ACTORGRAD_HEARTBEAT_TIMEOUT: ValueError, nothing started)
    with _claim(name):
        return await _init(name, address, token, host, port, where)


async def _init(
    name: str,
    address: str | None,
    token: str | None,
    host: str,
    port: int,
    advertise: tuple[str, int | None] | None = None,
) -> Worker:
    if address is not None:
        check_address(address)
    elif env_address():
        address = check_address(env_address(), ENV_ADDRESS)
    token = token or env_token()
    if token is None and address is not None:
        raise ValueError("joining a cluster needs its token: pass token=... or set ACTORGRAD_TOKEN")
    if host is _DEFAULT_HOST:
        # (joining, as `actorgrad worker` chooses: a driver on another host that joined
        # bound to its loopback could not be reached by the workers, and its backward
        # passes waited for good for what they had to send it)
        host = "127.0.0.1" if address is None else bind_for(address)
    host = check_bind(host, token)  # (before a token is made up: a public host needs one)
    if token is None:
        token = new_token()
    tune_malloc()
    w = Worker(name, token=token, host=host, port=port, advertise=advertise)
    try:
        await start_worker(w)
        if address is None:
            w.host_registry()
        else:
            await w.join(address)
    except GeneratorExit:
        # (closed unfinished, its loop gone: nothing can be awaited any more; its
        # sockets go with the garbage)
        w.closed = True
        raise
    except BaseException:
        await finish(w.shutdown(graceful=False))
        raise
    _w.set_process_worker(w)
    await _shut_with_loop(w)
    return w


async def _at_loop_end(w: Worker) -> AsyncGenerator[None, None]:
    """Shuts ``w`` down when its loop's async generators are closed: ``asyncio.run``
    and ``Runner.close`` do that after they cancelled the loop's tasks, before the loop
    closes. A script that never called ``ag.shutdown()`` (Ctrl-C, or simply returning)
    left peers to find its connections broken, and tasks that its cancelled ones had
    started (the release of a context left mid-step) were destroyed pending, with
    asyncio's "Task was destroyed but it is pending!" on stderr."""
    try:
        yield
    finally:
        # The hold first, before anything that calls (``w.closing`` too): each call may
        # run Python's handler of a Ctrl-C that just came, and its KeyboardInterrupt
        # raised here, before the hold, ended the task closing this generator ("Task
        # exception was never retrieved" beside the traceback), the worker not shut
        # down (1 of 25 runs stopped 2 ms after their main ended).
        held: list[int] = []
        try:
            release = _hold_sigint(held)
        except KeyboardInterrupt:  # (it came before the hold was in place: held too)
            held.append(signal.SIGINT)
            release = _hold_sigint(held)
        try:
            if not w.closed and not w.closing:
                # (the worker itself, not ag.shutdown(): it stays this process's worker,
                # and a later loop using it hears that its loop has closed)
                await w.shutdown(graceful=False)
        finally:
            release()


def _hold_sigint(held: list[int]) -> Callable[[], None]:
    """Hold a Ctrl-C that comes from now on (the loop-end shutdown: its waits are
    bounded) in ``held``; the function returned ends the hold and, if one came, raises
    its KeyboardInterrupt from a callback of the loop.

    ``Runner.close`` has put Python's own handler back by then: a second Ctrl-C raised
    KeyboardInterrupt in the middle of the shutdown, which the loop closed under ("Task
    was destroyed but it is pending!" for ``Worker._teardown``). Raised by the async
    generator instead, it would end the task closing it with no one left to retrieve
    it ("Task exception was never retrieved"). A handler of the user's own, and a
    thread other than the main one, are left alone, as ``Runner.run`` does. (A
    KeyboardInterrupt raised in here came before the hold was in place: the caller
    holds it and calls again.)"""
    loop = asyncio.get_running_loop()

    def hold(signum: int, frame: types.FrameType | None) -> None:
        if loop.is_running():
            held.append(signum)
            return
        # (the loop was stopped under the shutdown, by code it ran: this block never
        # ends now, and every later Ctrl-C of the process was held for good)
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.default_int_handler(signum, frame)

    swapped = False
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        with contextlib.suppress(ValueError):  # (an interpreter without signals: gh-91880)
            signal.signal(signal.SIGINT, hold)
            swapped = True

    def release() -> None:
        if swapped and signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:
            loop.call_soon(_interrupt)

    return release


def _interrupt() -> None:
    """The KeyboardInterrupt of a held Ctrl-C (Python's own handler raises it so)."""
    raise KeyboardInterrupt


async def _shut_with_loop(w: Worker) -> None:
    end = _at_loop_end(w)
    await end.asend(None)  # (the loop now knows it: its first iteration ran)
    w.ext["api.loop_end"] = end  # (the loop holds it weakly)


async def rpc(
    to: str,
    fn: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (timeout is API)
) -> Any:
    """Run ``fn(*args, **kwargs)`` on worker ``to`` and return its result.

    Raises RemoteError (``fn`` raised there), RpcTimeout, WorkerLost (the worker died or
    left), TypeError (``fn`` or an argument cannot travel), ValueError (unknown worker).

    Example::

        print(await ag.rpc("w1", operator.add, (2, 3)))            # 5
        a, b = np.array([1.0, 2.0]), np.array([3.0, 4.0])
        print(await ag.rpc("w1", np.dot, (a, b), timeout=10.0))    # 11.0
    """
    return await current_worker().call(to, fn, args, kwargs, timeout=timeout, mode=MODE_RPC)


async def remote(
    to: str,
    fn: Callable[..., Any] | str,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (timeout is API)
) -> RRef:
    """Run ``fn(*args, **kwargs)`` on worker ``to``; the result stays there: an RRef.

    Example::

        counter = await ag.remote("w1", collections.Counter)
        await counter.rpc().update("abca")
        print(await counter.to_here())     # {'a': 2, 'b': 1, 'c': 1} (it travels as a dict)
    """
    # (a remote call's reply is the RRef the runtime made of the owner's answer)
    rref: RRef = await current_worker().call(
        to, fn, args, kwargs, timeout=timeout, mode=MODE_REMOTE
    )
    return rref


def worker_name() -> str:
    """The name of the worker this code runs on (the caller's, or the one a call runs
    on).

    Example::

        assert await ag.rpc("w1", ag.worker_name) == "w1"
    """
    return current_worker().name


def workers() -> list[str]:
    """Names of the cluster's workers (this one included), sorted ("w2" before "w10").

    Example::

        async with ag.local_cluster(2):
            assert ag.workers() == ["driver", "w1", "w2"]
    """
    return current_worker().worker_names()


async def wait_for_workers(
    workers: int | list[str] | tuple[str, ...],
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (a deadline for the whole wait)
) -> list[str]:
    """Wait until the cluster has ``workers``: a count (``ag.workers()`` lists at least
    that many, this worker and the driver included, as PyTorch's ``world_size`` counts
    every rank) or names (each listed). Returns ``ag.workers()`` then. For a driver
    whose workers join on their own (``actorgrad worker --join``, a batch scheduler's
    jobs), instead of polling ``ag.workers()``.

    Raises:
        TimeoutError: ``timeout`` seconds passed first (it names those missing).
        WorkerLost: this worker lost the cluster's head meanwhile: nobody can join.
        TypeError, ValueError: a count that is not an int >= 1, names that are not a
            list of str, a timeout that is not a number > 0.

    In a driver whose ``actorgrad worker --join`` processes may still be joining (in a
    ``local_cluster(2)``, as here, they are up already).

    Example::

        names = await ag.wait_for_workers(3, timeout=60)  # the driver and 2 workers
        print(names)                                      # ['driver', 'w1', 'w2']
    """
    w = loop_worker()
    check_timeout(timeout, "to wait for good")
    want: int | list[str]
    if isinstance(workers, (list, tuple)):
        want = names = list(workers)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"workers must be a count or a non-empty list of names, not {workers!r:.80}"
            )
    elif type(workers) is int:
        if workers < 1:
            raise ValueError(f"workers must be a count >= 1, not {workers}")
        want = workers
    else:
        raise TypeError(f"workers must be a count (an int) or a list of names, not {workers!r:.80}")

    def missing(names: list[str]) -> str:
        if isinstance(want, int):
            return "" if len(names) >= want else f"{want} workers"
        gone = [n for n in want if n not in names]
        return ", ".join(repr(n) for n in gone)

    loop = asyncio.get_running_loop()
    # (woken by each change of the membership, and by the loss of the head)
    lost = None if w.registry is not None else loop.create_task(w.registry_lost.wait())
    try:
        async with asyncio.timeout(timeout):
            while missing(names := w.worker_names()):
                if lost is not None and lost.done():
                    raise WorkerLost(
                        f"waiting for {missing(names)}: {head_lost(w.registry_lost_why)}; "
                        "nobody can join"
                    )
                changed = loop.create_task(w._members_changed.wait())
                try:
                    await asyncio.wait(
                        [t for t in (changed, lost) if t is not None],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    changed.cancel()
            return names
    except TimeoutError:
        names = w.worker_names()
        raise TimeoutError(
            f"waited {timeout:g} s for {missing(names)}: ag.workers() lists {names}"
        ) from None
    finally:
        if lost is not None:
            lost.cancel()


async def shutdown(graceful: bool = True, timeout: float | None = None) -> None:  # noqa: ASYNC109 (timeout is API)
    """Shut down this process's worker (from ``init``); idempotent. ``graceful``: let
    the calls it is running finish (at most ``timeout`` seconds, a number > 0; None: 10
    s) before it goes. A worker whose event loop has closed (``init`` ran in an
    ``asyncio.run()`` that returned) is only forgotten: nothing of it can run any more.

    Raises TypeError (``graceful`` not a bool), ValueError (a bad ``timeout``),
    RuntimeError (called from another event loop than the worker's, or by code an
    in-process worker of ``local_cluster`` runs: it would shut the driver down).

    Example::

        await ag.init("driver")
        try:
            ...
        finally:
            await ag.shutdown()
    """
    check_bool(graceful, "graceful")
    _w.check_timeout(timeout, "for the default (10 s)")
    w = _w._process_worker
    if w is None:
        return
    if w.pid != os.getpid():  # (the parent's, copied by a fork: nothing of it is ours)
        _w.set_process_worker(None)
        return
    if w.loop.is_closed():
        _forget(w)
        return
    if asyncio.get_running_loop() is not w.loop:
        raise _w.wrong_loop(w)
    running = _w._current.get(None)
    if running is not None and running is not w:
        # (code of an in-process worker of local_cluster: it shut the driver down, under
        # the cluster's block, and every later call of the driver was refused)
        raise RuntimeError(
            f"ag.shutdown() in code that worker {running.name!r} runs (a call to it, or a "
            f"task one started) would shut down this process's worker, {w.name!r}: "
            f"{running.name!r} is an in-process worker of local_cluster, which stops when "
            "the `async with ag.local_cluster()` block is left"
        )
    await w.shutdown(graceful=graceful, timeout=timeout)
    if _w._process_worker is w:
        _w.set_process_worker(None)


#: The process's workers being started by init or local_cluster, and their loops
#: (their starting awaits: a second init meanwhile also passed the check, and its
#: worker was left running, unreachable through the API).
_starting: list[tuple[str, asyncio.AbstractEventLoop]] = []


@contextlib.contextmanager
def _claim(name: str) -> Iterator[None]:
    """Hold this process's worker slot for ``name`` while it starts."""
    _check_not_initialized()
    entry = (name, asyncio.get_running_loop())
    _starting.append(entry)
    try:
        yield
    finally:
        if entry in _starting:
            _starting.remove(entry)


def _check_not_initialized() -> None:
    """RuntimeError when this process has a worker already, or one is being started;
    one whose event loop has closed is forgotten instead (it can never run again)."""
    _starting[:] = [(n, loop) for n, loop in _starting if not loop.is_closed()]
    if _starting:
        raise RuntimeError(
            f"actorgrad is being initialized as worker {_starting[0][0]!r} (another task's "
            "init or local_cluster is under way)"
        )
    existing = _w._process_worker
    if existing is not None and not existing.closed:
        if not existing.loop.is_closed():
            # (a notebook's cell entering a cluster again, an earlier cell's still up,
            # was told no more than the first sentence)
            raise RuntimeError(
                f"actorgrad is already initialized as worker {existing.name!r} (a process "
                "has one: use it, or stop it first: leave the `async with "
                "ag.local_cluster()` block that made it, or `await ag.shutdown()`)"
            )
        _forget(existing)


def _forget(w: Worker) -> None:
    """Drop worker ``w``, whose event loop has closed: nothing of it can run there any
    more. Its sockets are closed here (a loop that closes leaves them open), so that
    peers see it gone at once."""
    w.closed = True
    for listener in (w._server, w._local_server):
        if listener is not None:
            listener.close()
    for conn in w._conns:
        sock = getattr(conn.transport, "_sock", None)
        if isinstance(sock, socket.socket):  # (the raw socket: closing it twice is fine)
            sock.close()
    if w._pool is not None:
        w._pool.shutdown(wait=False, cancel_futures=True)
    if w.transport_kind == "inproc" and w.address:
        from actorgrad.runtime import transport

        transport.inproc_unlisten(w.address)
    if _w._process_worker is w:
        _w.set_process_worker(None)


class LocalCluster:
    """What ``local_cluster`` yields: the workers' ``names``, the registry's
    ``address``, the ``driver`` worker, and the worker processes' ``pids``."""

    def __init__(self, names: list[str], address: str, driver: Worker) -> None:
        self.names = names
        self.address = address
        self.driver = driver
        self.workers: list[Worker] = []
        self.procs: WorkerProcesses | None = None

    def __repr__(self) -> str:
        return f"<LocalCluster {self.names} at {self.address}>"

    @property
    def pids(self) -> list[int]:
        return self.procs.pids if self.procs is not None else []


_P = ParamSpec("_P")

if TYPE_CHECKING:
    _BlockBase = contextlib._AsyncGeneratorContextManager[LocalCluster]
else:
    _BlockBase = contextlib._AsyncGeneratorContextManager


class _ClusterBlock(_BlockBase):
    """What ``ag.local_cluster()`` returns: contextlib's ``asynccontextmanager`` object,
    which also says how it is entered when a ``with`` or an ``await`` is tried. (Python's
    own words, "'_AsyncGeneratorContextManager' object does not support the context
    manager protocol", named neither the fix nor ag.local_cluster, as ag.dist.context()'s
    did not.)"""

    # (hidden from type checkers: to them a `with` or an `await` of it stays the error it
    # is at run time)
    if not TYPE_CHECKING:

        def __enter__(self) -> None:
            raise TypeError(self._entered("not `with`"))

        # (never called, __enter__ raises; but `with` looks both methods up first)
        def __exit__(self, *exc_info: object) -> None:
            return None

        def __await__(self) -> None:
            raise TypeError(self._entered("not awaited"))

        def _entered(self, not_so: str) -> str:
            given = [short_repr(a) for a in self.args]
            given += [f"{k}={short_repr(v)}" for k, v in self.kwds.items()]
            return (
                f"ag.local_cluster() is entered with `async with`, {not_so}: "
                f"`async with ag.local_cluster({', '.join(given)}) as cluster:`"
            )


def _cluster_block(
    func: Callable[_P, AsyncGenerator[LocalCluster, None]],
) -> Callable[_P, _ClusterBlock]:
    """``contextlib.asynccontextmanager``, making a :class:`_ClusterBlock`."""

    @functools.wraps(func)
    def block(*args: _P.args, **kwargs: _P.kwargs) -> _ClusterBlock:
        return _ClusterBlock(func, args, kwargs)

    return block


@_cluster_block
async def local_cluster(
    workers: int | list[str] | tuple[str, ...] = 2,
    *,
    processes: bool = False,
    driver: str = "driver",
    token: str | None = None,
    transport: str = "inproc",
) -> AsyncGenerator[LocalCluster, None]:
    """A cluster for this process: the caller becomes worker ``driver`` (hosting the
    registry) and ``workers`` (a count -> ``w1..wN``, or names) are started as actors on
    this loop (``transport`` "inproc", "tcp", or "unix": TCP listeners, peers connected
    over local Unix sockets) or, with ``processes=True``, as OS processes (TCP, local
    Unix sockets between them unless ``ACTORGRAD_LOCAL_SOCKETS=0``; ``transport`` is for
    in-process workers and does not apply). Leaving shuts
    everything down, also on error/cancellation. ValueError for a bad
    ``ACTORGRAD_HEARTBEAT_TIMEOUT`` (worker processes inherit it).

    Example::

        async with ag.local_cluster(2, processes=True) as c:
            print(c.names, c.address)      # ['w1', 'w2'] 127.0.0.1:PORT
            print(await ag.rpc("w2", os.getpid))
    """
    if transport not in ("inproc", "tcp", "unix"):
        raise ValueError(f"unknown transport {transport!r}; use 'inproc', 'tcp' or 'unix'")
    processes = check_bool(processes, "local_cluster: processes")
    if isinstance(workers, int) and not isinstance(workers, bool):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, not {workers}")
        names = [f"w{i}" for i in range(1, workers + 1)]
    elif isinstance(workers, (list, tuple)):
        names = [check_name(n) for n in workers]
    else:
        raise TypeError(f"workers must be a count (int) or a list of names, not {workers!r:.80}")
    if processes and len(names) > MAX_LOCAL_WORKERS:
        # (as `actorgrad run -n`: 5000 by a typo started processes until memory ran out)
        raise ValueError(
            f"local_cluster: at most {MAX_LOCAL_WORKERS} worker processes (each is a process "
            f"on this machine, ~45 MB), not {len(names)}"
        )
    if not isinstance(driver, str):
        raise TypeError(f"driver must be the name (a str) the caller gets, not {driver!r:.80}")
    if driver:  # ("": the head is actorgrad's own, the caller not a worker of the cluster)
        check_name(driver)
    if len(set(names) | {driver}) != len(names) + 1:
        raise ValueError(
            f"worker names must be unique and differ from the driver's: {names}, {driver!r}"
        )
    token = None if token is None else check_token(token)
    _check_not_initialized()
    # (a bad ACTORGRAD_HEARTBEAT_TIMEOUT: ValueError, nothing started; the worker
    # processes inherit the variable and read it as this process did)
    _w.read_settings()
    there = env_address()
    if there and driver:
        # (a script run by `actorgrad run` that starts a local cluster: both work, and
        # the workers `run` started sat idle, unnoticed. Not for driver="": actorgrad's
        # own head, where no user script asked for a cluster)
        log.warning(
            "%s is set (%s), but local_cluster starts a cluster of its own and does not "
            "use that one: to run on it (as under `actorgrad run`), call "
            "`await ag.init(name)` instead",
            ENV_ADDRESS,
            there,
        )
    token = token or new_token()
    tune_malloc()
    kind = "tcp" if processes or transport == "unix" else transport
    local = None if processes else transport == "unix"
    head = Worker(
        driver if driver else HEAD_NAME, token=token, transport_kind=kind, local_sockets=local
    )
    with _claim(head.name):
        await head.start()
        head.host_registry()
        old = _w.set_process_worker(head)
    cluster = LocalCluster(names, head.address, head)
    graceful = True
    unwatch = None
    try:
        if processes:
            cluster.procs = WorkerProcesses()
            cluster.procs.start(head.address, names, token, registry=head.registry)
            await cluster.procs.wait_registered(head.registry)
            # (a worker process that dies is reaped then, not kept a zombie until the
            # block is left: see WorkerProcesses.watch_exits; nothing more to tell: its
            # calls fail with WorkerLost, which says so)
            unwatch = cluster.procs.watch_exits()
        else:
            for n in names:
                w = Worker(n, token=token, transport_kind=kind, local_sockets=local)
                cluster.workers.append(w)
                await w.start()
                await w.join(head.address)
        yield cluster
    except BaseException:
        graceful = False  # (left on an error or a cancel: nobody waits for running calls)
        raise
    finally:
        if unwatch is not None:
            unwatch()
        try:
            await finish(
                stop_all(cluster.driver, cluster.workers, cluster.procs, _stuck, graceful=graceful)
            )
        finally:  # (also when a shutdown failed: this process is no worker any more)
            if _w._process_worker is head:
                # (only the cluster's own: after an ag.shutdown() of the driver in the
                # block, an ag.init() there made this process's worker anew, and putting
                # the old one back left that one running, unreachable through the API)
                _w.set_process_worker(old)


def _stuck(names: list[str], grace: float) -> None:
    log.warning("local_cluster: %s", describe_stuck(names, grace, "leaving it"))
