"""Worker child processes, used by ``local_cluster(processes=True)`` and ``serve_cluster``.

Each worker is ``python -m actorgrad.runtime.worker_main --join ADDR --name NAME`` in
its own process group; the token travels in the environment (``ACTORGRAD_TOKEN``),
never in argv, and ``PYTHONPATH`` carries this process's ``sys.path`` in its order (as
multiprocessing's spawn does) so the children import what the driver imports.
Stopping: wait for a graceful exit (they leave when the head closes), then SIGTERM,
then SIGKILL — always joined, so no orphans and no zombies.

BLAS threads: N worker processes plus the driver share this machine's cores, and each
BLAS library would by default start one thread per core (a 3-worker matmul pipeline
on 2 cores ran 40x slower oversubscribed). So each child gets
``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to
``max(1, os.cpu_count() // (N + 1))``, except for a variable the user already set; and
none when the user set ``OMP_NUM_THREADS`` (OpenBLAS and MKL fall back on it when
their own is unset).

Allocator: see :func:`tune_malloc`, applied by every process that runs a worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TextIO

from actorgrad.runtime.transport import check_token, env_switch

# The environment of a driver or worker process: where the cluster is, and its token.
ENV_ADDRESS = "ACTORGRAD_ADDRESS"
ENV_TOKEN = "ACTORGRAD_TOKEN"
#: the key of the names the head keeps for the worker processes it starts
ENV_JOIN_KEY = "ACTORGRAD_JOIN_KEY"


def env_token() -> str | None:
    """The cluster token of ``ACTORGRAD_TOKEN``, surrounding whitespace stripped (as a
    token file's: a trailing space or newline made "wrong cluster token"); None when it
    is unset or blank. ValueError naming the variable when it holds bytes that are not
    UTF-8 (the handshake failed deep inside, or a worker process exited)."""
    value = os.environ.get(ENV_TOKEN, "")
    return check_token(value, ENV_TOKEN) if value.strip() else None


def forget_env_token() -> None:
    """Drop ``ACTORGRAD_TOKEN`` from this process's environment, once read: a process
    that runs calls (a worker, a head) would hand it to every process its calls start
    (a tool a data loader runs). A driver keeps it (its own code may want it)."""
    os.environ.pop(ENV_TOKEN, None)


def blank_env_hint(var: str) -> str:
    """What to add to "set ACTORGRAD_TOKEN" (or another variable ``var``) when nothing
    came from it: that it is set, but blank (it said "set ..." of a variable that was
    set); "" when unset."""
    return " (it is set, but blank)" if var in os.environ else ""


def env_address() -> str:
    """The cluster address of ``ACTORGRAD_ADDRESS``, surrounding whitespace stripped
    (as the token's: " host:port" failed as a DNS error with a hidden space); "" when
    it is unset or blank."""
    return os.environ.get(ENV_ADDRESS, "").strip()


#: the level of the log records actorgrad's own processes write (see log_to_stderr)
ENV_LOG = "ACTORGRAD_LOG"
#: how those records look: "2026-12-04 20:24:31 WARNING actorgrad.runtime.worker: ..."
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: their time (also that of an ``actorgrad cluster``'s news of its workers)
LOG_TIME = "%Y-%m-%d %H:%M:%S"


_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def log_level() -> int:
    """The level ``ACTORGRAD_LOG`` names (debug, info, warning (unset), error);
    ValueError naming the variable for one it does not know."""
    value = os.environ.get(ENV_LOG, "").strip() or "warning"
    level = _LOG_LEVELS.get(value.lower())
    if level is None:
        raise ValueError(f"{ENV_LOG}={value!r}: not a log level (debug, info, warning, error)")
    return level


#: on (unset) or off (0): each line a worker process we start prints begins "[NAME] "
ENV_OUTPUT_PREFIX = "ACTORGRAD_OUTPUT_PREFIX"

# A line: its text and its end (\r too: a progress bar's redrawn line gets the prefix).
_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


class LinePrefixed:
    """A text stream that writes to ``stream`` with ``prefix`` at the start of each
    line, and flushes it at each line's end. The worker processes of a cluster share
    the terminal of the command (or program) that started them: their lines came
    mixed, and whose each was could not be told; and a worker killed with SIGKILL lost
    what it had printed into a pipe's block buffer. Everything else (``fileno``,
    ``isatty``, ``buffer``: bytes written there get no prefix) is ``stream``'s.

    Example::

        sys.stdout = LinePrefixed(sys.stdout, "[w1] ")
        print("ready")  # [w1] ready
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> LinePrefixed:
        self = super().__new__(cls)
        # Its lock is made anew in a forked child (see below): every instance, however
        # made. (Registered in __init__, a copy.copy(), made without it, was left out,
        # its lock shared with the original's, and a copy a thread was writing on when
        # the process forked hung the child's first print on it.)
        _prefixed.add(self)
        return self

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self._stream = stream
        self._prefix = prefix
        self._fresh = "\n"  # (the next character starts a line: the last one's end, or "")
        # (calls run in the pool's threads too: one line's prefix and text stay together.
        # Reentrant: a signal handler, or a __del__ a garbage collection runs, may print
        # while its thread is inside a write here; a plain lock made that thread, the
        # worker's loop say, wait on itself for good.)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<LinePrefixed {self._prefix!r} on {self._stream!r}>"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            return self._stream.write(text)  # (its own TypeError, as print's)
        with self._lock:
            out = []
            for line in _LINES.findall(text):
                # (not before the "\n" of a "\r\n" that came in two writes: an empty
                # line of its own)
                if self._fresh and not (self._fresh == "\r" and line[0] == "\n"):
                    out.append(self._prefix)
                out.append(line)
                self._fresh = line[-1] if line[-1] in "\r\n" else ""
            self._stream.write("".join(out))
            if "\n" in text:
                self._stream.flush()
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        if name in ("_stream", "_prefix", "_fresh", "_lock"):
            # (not set yet: a copy.copy() of the stream looks for them before its
            # __dict__ is filled, and each lookup of _stream recursed for good)
            raise AttributeError(name)
        return getattr(self._stream, name)


# A call that forks (a multiprocessing Pool with the fork start method, Linux's
# default) while another thread is in the middle of a line (a pool thread printing, a
# log record) leaves the child a lock held by a thread it does not have: its first
# print waited for good. (The streams' own locks are held only inside their C code;
# this one around Python code the fork can come in the middle of.) As logging does
# for its handlers' locks.
_prefixed: weakref.WeakSet[LinePrefixed] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for stream in list(_prefixed):
        stream._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_in_child)


def output_prefix(name: str) -> str:
    """What each line worker process ``name`` prints begins with: ``"[name] "``, or
    nothing under ``ACTORGRAD_OUTPUT_PREFIX=0``."""
    return f"[{name}] " if env_switch(ENV_OUTPUT_PREFIX) else ""


def prefix_output(prefix: str) -> None:
    """Put ``prefix`` before each line this process writes on ``sys.stdout`` and
    ``sys.stderr`` (see :class:`LinePrefixed`); with an empty one, each line is only
    flushed at its end (a worker killed with SIGKILL loses no whole line either)."""
    if prefix:
        sys.stdout = LinePrefixed(sys.stdout, prefix)
        sys.stderr = LinePrefixed(sys.stderr, prefix)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # (not a TextIOWrapper; closed)
            pass


def log_to_stderr() -> None:
    """In a process of ours (the ``actorgrad`` command, a worker process): log records
    go to stderr with their time, level and logger, actorgrad's from the level of
    ``ACTORGRAD_LOG`` (:func:`log_level`). Without this, Python printed the bare
    message of warnings only: a cluster's log could not say when a peer was lost. The
    handler goes on the root logger, as an application's own set-up would: a process
    that configured logging already is left as it is, and handlers added later (a
    call's) see actorgrad's records too.

    Example::

        os.environ["ACTORGRAD_LOG"] = "info"
        log_to_stderr()  # INFO and above, stamped, on stderr
    """
    level = log_level()
    root = logging.getLogger()
    if root.handlers:
        return
    stream = _own_stderr()
    if isinstance(sys.stderr, LinePrefixed):  # (a worker process's: see prefix_output)
        stream = LinePrefixed(stream, sys.stderr._prefix)  # type: ignore[assignment]
    handler = _StderrHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_TIME))
    root.addHandler(handler)
    logging.getLogger("actorgrad").setLevel(level)


def _own_stderr() -> TextIO:
    """A file of our own on this process's stderr (its descriptor duplicated), line by
    line as sys.stderr: a call's code that closes sys.stderr does not close it (the
    worker's records went with it); sys.stderr itself where it has no descriptor."""
    try:
        fd = os.dup(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # (io.UnsupportedOperation: ValueError)
        return sys.stderr
    return open(  # noqa: SIM115 (the process's, for its life)
        fd,
        "w",
        encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="backslashreplace",
        buffering=1,
    )


class _StderrHandler(logging.StreamHandler[Any]):
    """A handler that never raises: ``logging.Handler.handleError`` reports a failed
    write on sys.stderr, and lets a ValueError through when that is closed too (by a
    call's code: "I/O operation on closed file"), out of whatever runtime code logged
    the record, which a worker process did not survive."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        try:
            super().handleError(record)
        except Exception:
            pass


#: Thread-count variables of the BLAS libraries numpy may use (see the module docstring).
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


#: glibc malloc settings of processes running a worker (see tune_malloc)
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024
MALLOC_ARENA_MAX = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt (malloc.h)
_malloc_tuned: list[bool] = []


#: worker processes starting (started, not joined yet) at once: each one's imports take
#: a core for a few hundred ms
STARTING = max(4, 2 * (os.cpu_count() or 1))

#: CPU seconds a worker process takes to exit once its head is gone (its worker's
#: shutdown, then the interpreter's: 40-50 ms measured). They all exit at once, so on 2
#: cores 128 of them took 3.3 s, and ``WorkerProcesses.stop`` called every one stuck
#: after its 3 s of grace (and SIGTERMed them): it allows this much more per process
#: and core.
EXIT_CPU = 0.05

#: How much longer than its grace ``WorkerProcesses.stop`` waits, at most, for worker
#: processes still exiting (waiting for a core, short of their ``EXIT_CPU``) when the
#: grace ends: on a machine loaded by other work, the cores are not all theirs.
EXIT_WAIT_MAX = 3.0


def open_files_limit(raise_to_hard: bool = False) -> int | None:
    """This process's limit of open files (``ulimit -n``, the soft one), after raising
    it to the hard limit when ``raise_to_hard``; None where there is none to read.

    Each connection is a file: a worker process at a distribution's default of 1,024
    serves fewer peers and strangers than its hard limit (often 500,000) allows, and
    beyond its limit a connection is closed at once (``transport.Listener``). So the worker processes actorgrad starts raise it (``worker_main``); a
    process of the user's keeps its own.

    Example::

        open_files_limit(raise_to_hard=True)  # e.g. 524288, was 1024
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_to_hard and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # (an unlimited hard limit, say, on macOS)
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def open_files_count() -> int | None:
    """How many files this process has open; None where that cannot be read."""
    for fds in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(fds))
        except OSError:
            pass
    return None  # pragma: no cover - neither Linux nor macOS


def tune_malloc() -> bool:
    """Keep freed array memory in this process instead of handing it to the kernel.

    Every message brings fresh arrays (64 KiB activations, 256 KiB weight gradients)
    that live for one step. With glibc's defaults, blocks of 128 KiB and more are
    mapped and unmapped each time and the top of the heap is trimmed, so the next
    allocation page-faults and zero-fills again: 63 page faults per step of the chain
    benchmark on each worker, a quarter of its CPU time. So a process running a worker
    (``local_cluster``, ``init``, worker processes) maps only blocks of 32 MiB and more
    and trims the heap only above 256 MiB free.

    And it uses one malloc arena (``MALLOC_ARENA_MAX=1``; glibc's default is 8 per
    core): the trim threshold holds for each arena, and each thread of the worker's
    pool (8) got one of its own, which kept the most that thread had ever had
    allocated at once (``malloc_trim`` does not give back the top of these arenas
    either). Their sum grew for minutes: in a worker process of a no-chaos RRef and
    parameter-server workload, from 99 to 130 MB between 30 s and 570 s (11 arenas, 8
    of them of 7-9 MB, nearly all free). With 2 arenas: 79 to 90 MB, by steps; with
    one: 75 MB at 30 s, 77 MB from 270 s to 480 s, at the same step rate
    (docs/limits.md, Process settings). Python code holds the GIL, so the threads
    hardly contend for the one arena. A ``MALLOC_ARENA_MAX`` of the user's is left as
    it is.

    Linux/glibc only; a no-op when ``ACTORGRAD_MALLOC_TUNING=0`` or a
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` of the user's is set.
    Returns whether it applied."""
    if _malloc_tuned:
        return _malloc_tuned[0]
    ok = False
    if (
        sys.platform.startswith("linux")
        and env_switch("ACTORGRAD_MALLOC_TUNING")
        and not os.environ.get("MALLOC_MMAP_THRESHOLD_")
        and not os.environ.get("MALLOC_TRIM_THRESHOLD_")
    ):
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
            )
            if ok and not os.environ.get("MALLOC_ARENA_MAX"):
                ok = bool(mallopt(_M_ARENA_MAX, MALLOC_ARENA_MAX))
        except (OSError, AttributeError):  # not glibc
            ok = False
    _malloc_tuned.append(ok)
    return ok


def pool_threads() -> list[threading.Thread]:
    """The threads of workers' pools still alive in this process (calls still running,
    or idle ones about to end after their pool shut down)."""
    me = threading.current_thread()
    return [t for t in threading.enumerate() if t is not me and t.name.startswith("actorgrad-")]


def open_std_fds() -> None:
    """Put /dev/null on each standard descriptor (0, 1, 2) that is closed (``cmd
    2>&-``, a supervisor that closed them), and a file on it in ``sys.stdin``,
    ``sys.stdout`` or ``sys.stderr`` where Python left None for it. Called first by
    our processes (the ``actorgrad`` command, worker processes).

    A closed one was the next file the process opened, which the processes it starts
    inherit as their stdin, stdout or stderr: under ``actorgrad run ... 2>&-`` the
    script was handed one of our files as its stderr and died at start (SIGABRT,
    exit status 134, every time); under ``>&-`` it printed into our stderr. And a
    worker process whose stdout was closed (a pidfd took its place) ended with a
    traceback, flushing a ``sys.stdout`` that was None."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)  # (the lowest free descriptor: fd)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        os.set_inheritable(fd, True)  # (the processes we start get it too)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (the process's)


def exit_now(code: int) -> NoReturn:
    """End the process now with status ``code``, its output flushed; nothing else runs
    (no cleanup, no waiting for threads)."""
    flush_output()
    os._exit(code)


def flush_output() -> None:
    """Flush stdout and stderr (a closed or broken one is left as it is)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def blas_threads(n_workers: int) -> int:
    """BLAS threads per process when ``n_workers`` workers and a driver share the cores."""
    return max(1, (os.cpu_count() or 1) // (n_workers + 1))


def describe_exit(returncode: int) -> str:
    """How a process ended, from its returncode: "exited with status 1", "was killed by
    SIGKILL"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


#: Most worker processes ``local_cluster`` and ``actorgrad run``/``cluster -n`` start
#: on this machine (each is a process of ~45 MB).
MAX_LOCAL_WORKERS = 256


def exit_code(p: subprocess.Popen[bytes]) -> int | None:
    """``p``'s return code once it has exited (as ``Popen.poll``'s), None while it runs;
    without reaping it, where the system can tell (``os.waitid``'s ``WNOWAIT``).

    A process reaped frees its pid, and the id of the process group it leads once that
    group is empty: both can be another process's the next moment (pid_max is 32768 on
    many machines), and a signal sent to them later reached that one. Unreaped (a
    zombie), it keeps them ours until ``WorkerProcesses.stop`` has signalled its group,
    which may still hold its children, and reaps it (or until ``watch_exits`` saw it
    exit and its group empty: a process reaped is signalled no more)."""
    if p.returncode is not None or not hasattr(os, "waitid"):
        return p.poll()
    try:
        info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # (reaped by other code: its status is Popen's to say)
        return p.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def proc_stat(pid: int) -> list[str]:
    """The fields of ``pid``'s Linux /proc stat line after its command name (state,
    parent, process group, ...; the name, in parentheses, may hold spaces and
    parentheses); [] when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return []


def group_left(group: int) -> list[int]:
    """The live processes (not zombies) of process group ``group``."""
    if not os.path.isdir("/proc/self"):  # (no /proc: whether any process is in it)
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [group]
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))  # (state, ppid, pgrp, ...; [] if gone meanwhile)
            if len(fields) > 2 and int(fields[2]) == group and fields[0] != "Z":
                left.append(int(entry))
    return left


def _cpu_and_state(pid: int) -> tuple[float, str] | None:
    """The CPU seconds process ``pid`` has used and its state ("R" runnable, "S"
    asleep, "T" stopped, ...), from /proc; None where it cannot be read."""
    fields = proc_stat(pid)
    try:
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK"), fields[0]
    except (IndexError, ValueError, OSError):
        return None


def _still_exiting(p: subprocess.Popen[bytes], at_stop: tuple[float, str] | None) -> bool:
    """Whether ``p`` runs yet, waiting for a core or on one (not asleep, not stopped),
    having used less than twice ``EXIT_CPU`` since ``at_stop`` (its CPU when the stop
    began): an exit slowed down by other work on the machine."""
    if at_stop is None or exit_code(p) is not None:
        return False
    now = _cpu_and_state(p.pid)
    return now is not None and now[1] in ("R", "D") and now[0] - at_stop[0] < 2 * EXIT_CPU


class WorkerProcesses:
    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # (name, argv, env) of the processes not started yet: see start
        self._waiting: list[tuple[str, list[str], dict[str, str]]] = []

    def __repr__(self) -> str:
        return f"<WorkerProcesses {[(n, p.pid, exit_code(p)) for n, p in self.procs.items()]}>"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def start(
        self,
        address: str,
        names: list[str],
        token: str,
        *,
        host: str = "127.0.0.1",
        path_first: Sequence[str] = (),
        registry: Any = None,
    ) -> None:
        """Start a worker process per name, joining the registry at ``address``: the
        first ``STARTING`` now, the others as those join (``wait_registered``).
        ``path_first``: import paths before this process's (a driver script's folder,
        first on its own path). ``registry`` (the head's, in this process): it keeps
        the names for these processes, which join with the key it was given."""
        # (a bad one named here: each process exited with status 2, the reason on its
        # stderr only)
        log_level()
        env_switch(ENV_OUTPUT_PREFIX)  # (a bad one is said here once, not by each process)
        env = dict(os.environ)
        env[ENV_TOKEN] = token
        if registry is not None:
            key = secrets.token_hex(16)
            registry.reserve(names, key)
            env[ENV_JOIN_KEY] = key
        env.pop(ENV_ADDRESS, None)
        # This process's import path in its order ("" is the current directory), so
        # the children import the very modules the driver imports (the current
        # directory first shadowed a package the driver took from elsewhere: a mixed
        # driver and workers); the current directory last for what only it holds.
        try:
            cwd = os.getcwd()
        except FileNotFoundError:
            # (the current directory was removed, under a shell still in it: nothing
            # to import from there, as python's own "" finds nothing. It failed the
            # command with a bare "No such file or directory")
            cwd = ""
        paths = [*path_first, *(cwd if p == "" else p for p in sys.path)]
        # (what exists: a folder, or a zip archive, which only folders were once: a
        # PYTHONPATH=deps.zip, an egg, was dropped, and the workers found none of its
        # modules; python311.zip and other entries that are not there go)
        paths = [p for p in dict.fromkeys(paths) if p and os.path.exists(p)]
        if cwd and cwd not in paths:
            paths.append(cwd)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if not os.environ.get("OMP_NUM_THREADS"):
            # (the user's OMP_NUM_THREADS=2 was overridden by ours of
            # OPENBLAS_NUM_THREADS, which OpenBLAS reads first: with it set, none)
            threads = str(blas_threads(len(names)))
            for var in BLAS_THREAD_VARS:
                if not os.environ.get(var):
                    env[var] = threads
        for name in names:
            argv = [
                sys.executable,
                "-P",  # (-m would put the current directory first, before PYTHONPATH)
                "-m",
                "actorgrad.runtime.worker_main",
                f"--join={address}",  # (one argument each: a name may start with '-')
                f"--name={name}",
                f"--parent={os.getpid()}",  # (it ends with us: see worker_main.leave_with)
            ]
            if host != "127.0.0.1":
                argv.append(f"--host={host}")
            self._waiting.append((name, argv, env))
        self._start_some(STARTING)

    def _start_some(self, n: int) -> None:
        """Start ``n`` more of the processes waiting to start."""
        for name, argv, env in self._waiting[:n]:
            self.procs[name] = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, process_group=0, close_fds=True
            )
        del self._waiting[:n]

    def watch_exits(
        self, on_exit: Callable[[str, int, int], None] | None = None
    ) -> Callable[[], None]:
        """Call ``on_exit(name, pid, returncode)`` (if given) on the running loop as each
        worker process exits (a pidfd per process, read by the loop: no polling; where
        pidfds are missing, nothing is reported), and reap it when nothing else is left
        in its process group. Returns the function that stops watching."""
        loop = asyncio.get_running_loop()
        fds: dict[str, int] = {}

        def exited(name: str) -> None:
            fd = fds.pop(name)
            loop.remove_reader(fd)
            os.close(fd)
            p = self.procs[name]
            rc = exit_code(p)  # (it has exited; not reaped: see exit_code)
            if on_exit is not None:
                on_exit(name, p.pid, p.wait() if rc is None else rc)
            if p.returncode is None and not group_left(p.pid):
                # Reaped now that nothing else holds its group's id (see exit_code: only
                # a child left running in the group needs it kept ours until stop
                # signals the group): a `cluster` running for days kept each dead worker
                # process a zombie, with its pid, until it stopped.
                p.wait()

        for name, p in self.procs.items():
            try:
                fds[name] = os.pidfd_open(p.pid)
            except (AttributeError, OSError):  # (no pidfds here, or reaped already)
                continue
            loop.add_reader(fds[name], exited, name)

        def stop() -> None:
            for fd in fds.values():
                loop.remove_reader(fd)
                os.close(fd)
            fds.clear()

        return stop

    def check(self) -> None:
        """Raise RuntimeError if a worker process has exited."""
        for name, p in self.procs.items():
            rc = exit_code(p)
            if rc is not None:
                raise RuntimeError(f"worker process {name!r} (pid {p.pid}) {describe_exit(rc)}")

    async def wait_registered(self, registry: Any, timeout: float = 60.0) -> None:  # noqa: ASYNC109 (timeout is API)
        """Wait until every worker process joined ``registry``, starting the ones
        waiting to start as others join, ``STARTING`` at a time (256 processes started
        at once on 2 cores starved each other's handshakes past their 5 s deadline);
        RuntimeError when one exits first, or when they do not all join within
        ``timeout`` s plus 0.5 s per process started later."""
        names = [*self.procs, *(name for name, _, _ in self._waiting)]

        def check() -> None:
            self.check()
            starting = sum(1 for n in self.procs if n not in registry.members)
            if self._waiting and starting < STARTING:
                self._start_some(STARTING - starting)

        timeout += 0.5 * len(self._waiting)
        try:
            await registry.wait_for(names, timeout=timeout, check=check)
        except TimeoutError:
            missing = [n for n in names if n not in registry.members]
            raise RuntimeError(
                f"worker processes {missing} did not join within {timeout} s"
            ) from None

    async def stop(
        self,
        grace: float = 3.0,
        term_grace: float = 2.0,
        on_stuck: Callable[[list[str], float], None] | None = None,
    ) -> None:
        """Wait up to ``grace`` s for the workers to exit, plus the CPU time they need
        to exit on this machine's cores (``EXIT_CPU`` a process), and up to
        ``EXIT_WAIT_MAX`` x that more for those still exiting then (see below), then
        SIGTERM, then SIGKILL. ``on_stuck(names, waited)`` hears of the workers still
        running after that (hung, stopped, or busy in a call that does not end), before
        they are signalled."""
        if not self.procs:
            return
        running = [p for p in self.procs.values() if exit_code(p) is None]
        grace += EXIT_CPU * len(running) / (os.cpu_count() or 1)
        started = time.monotonic()
        cpu = {p.pid: _cpu_and_state(p.pid) for p in running}
        await self._wait_all(grace)
        # The allowance above counts on this machine's cores being the workers': with
        # other work running (a load of 10 on 2 cores), processes that exit at once got
        # a fraction of that CPU and were called stuck and SIGTERMed while they still
        # exited. Those still waiting for a core (runnable) that have not used their
        # exit's CPU since the stop began get longer, up to EXIT_WAIT_MAX x the grace; one
        # asleep (hung), stopped, or past that CPU (busy in a call that does not end) is
        # stuck.
        cap = started + grace * (1 + EXIT_WAIT_MAX)
        while time.monotonic() < cap and any(  # noqa: ASYNC110 (no event for a process's CPU)
            _still_exiting(p, cpu.get(p.pid)) for p in self.procs.values()
        ):
            await asyncio.sleep(0.05)
        stuck = [n for n, p in self.procs.items() if exit_code(p) is None]
        if stuck and on_stuck is not None:
            on_stuck(stuck, max(grace, time.monotonic() - started))
        # (SIGCONT too: a stopped process, SIGSTOP or Ctrl-Z, handles the SIGTERM only
        # once continued; it waited for the SIGKILL)
        self.terminate()
        await self._wait_all(term_grace)
        self._signal(signal.SIGKILL)
        for p in self.procs.values():
            # The group may still hold grandchildren: killed too, before the process is
            # reaped (see exit_code: once reaped, the group's id may be another's).
            if p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            p.wait()

    async def stop_unjoined(self, registry: Any, grace: float = 2.0) -> None:
        """SIGTERM the worker processes that have not joined ``registry`` yet (the
        cluster is left while it starts: Ctrl-C) and wait up to ``grace`` s for them;
        those not started yet never start. Stopped before the head closes, they end
        quietly: after, each one's join failed ("cannot connect ...: Connection
        refused"), a line per worker on the terminal."""
        self._waiting.clear()
        unjoined = [p for n, p in self.procs.items() if n not in registry.members]
        if unjoined:
            self.terminate(unjoined)
            await self._wait_all(grace, unjoined)

    def kill(self) -> None:
        """SIGKILL to the workers still running (a forced stop; ``stop`` then reaps them)."""
        self._signal(signal.SIGKILL)

    def terminate(self, procs: Iterable[subprocess.Popen[bytes]] | None = None) -> None:
        """SIGTERM (then SIGCONT: a stopped one handles it) to the workers still running
        (of ``procs``: all when None)."""
        self._signal(signal.SIGTERM, procs)
        self._signal(signal.SIGCONT, procs)

    def _signal(self, sig: int, procs: Iterable[subprocess.Popen[bytes]] | None = None) -> None:
        for p in self.procs.values() if procs is None else procs:
            if exit_code(p) is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass

    async def _wait_all(
        self,
        timeout: float,  # noqa: ASYNC109 (timeout is API)
        procs: Iterable[subprocess.Popen[bytes]] | None = None,
    ) -> None:
        """Wait up to ``timeout`` s for the workers (of ``procs``: all when None) to
        exit."""
        waited = list(self.procs.values() if procs is None else procs)
        deadline = time.monotonic() + timeout
        while any(exit_code(p) is None for p in waited):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.02)
