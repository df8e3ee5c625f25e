"""The ``actorgrad`` command (also ``python -m actorgrad``).

A thin layer: each sub-command parses its options and calls one function of the
runtime with the same options (``actorgrad.runtime.cluster``), the way uvicorn's CLI
calls ``uvicorn.run``::

    actorgrad cluster -n N [--host H] [--port P] [--token-file F]   serve_cluster(...)
    actorgrad worker --join ADDRESS --name NAME [--token-file F]    serve_worker(...)
    actorgrad run -n N SCRIPT [ARGS...]                             serve_cluster + the script
    actorgrad status [--address A] [--token-file F]                 cluster_status(...)
    actorgrad demo                                                  actorgrad.demo.main()

Tokens: ``--token-file F`` (read if it exists; ``cluster`` creates it with mode 0600
otherwise), else ``ACTORGRAD_TOKEN``; ``cluster`` generates one when neither is given
and writes it to a 0600 file in a private temporary directory. A token is never
printed, only the path of the file that holds it.

Signals: the first Ctrl-C / SIGTERM / SIGHUP drains (graceful shutdown of every
process this command started), the second forces it. ``run`` forwards them to the
script instead (once: the script has a process group of its own, made the terminal's
foreground group when ``run`` had it), the third as SIGKILL; once the script has
ended, a signal forces the cluster's stop.

Exit codes: 0 success, 1 an expected failure (one line on stderr, no traceback: wrong
token, unreachable address, a worker ``status`` lists as unreachable, ...), 2 usage
errors, ``run``: the script's status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from actorgrad._startup import quit_while_importing
from actorgrad.errors import ActorgradError, AuthError
from actorgrad.runtime import cluster, transport
from actorgrad.runtime import worker as rworker
from actorgrad.runtime.cluster import new_token, run
from actorgrad.runtime.procs import (
    ENV_ADDRESS,
    ENV_TOKEN,
    LOG_TIME,
    MAX_LOCAL_WORKERS,
    blank_env_hint,
    describe_exit,
    env_address,
    env_token,
    exit_now,
    flush_output,
    forget_env_token,
    group_left,
    log_to_stderr,
    open_files_limit,
    open_std_fds,
    pool_threads,
    proc_stat,
    tune_malloc,
)
from actorgrad.runtime.worker import head_lost

__all__ = ["main"]

PROG = "actorgrad"


class CliError(Exception):
    """An expected failure: reported as one line on stderr, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------


def write_token_file(path: Path, token: str) -> None:
    """Create ``path`` with mode 0600 holding ``token``; an existing file is an error
    (FileExistsError). The file appears whole: written under a temporary name, then
    linked to ``path`` (another process creating it at the same time read it empty
    between the create and the write)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # (mode 0600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links (vfat, some network mounts)
            pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


#: The largest token file read (a token is a line of text: ours are 43 characters).
TOKEN_FILE_MAX = 64 * 1024
#: How long a token file that is a pipe is waited for (seconds).
TOKEN_PIPE_WAIT = 10.0


def read_token_file(path: Path) -> str:
    """The token stored in ``path`` (surrounding whitespace stripped). A file that
    cannot give one is a usage error (exit status 2), as a missing token is."""
    try:
        # (at most TOKEN_FILE_MAX: a token file given as /dev/zero, or a big file by
        # mistake, filled the memory until a MemoryError's traceback; a pipe works)
        # (opened without waiting: a named pipe nobody writes to blocked the command
        # for good, in an open() that a first Ctrl-C did not end; a pipe is waited for
        # in a poll, which Ctrl-C ends, and only so long)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            f = os.fdopen(fd, "rb")
        except BaseException:  # (a directory: fdopen refuses it, leaving the fd open)
            os.close(fd)
            raise
        with f:
            # (the file opened, not what the path names later: stat'ed by its path, a
            # planted file swapped for one of our own (a symbolic link changed) after
            # the open was taken for ours, no warning below)
            st = os.fstat(fd)
            if stat.S_ISFIFO(st.st_mode):
                waiting = select.poll()
                waiting.register(fd, select.POLLIN)
                if not waiting.poll(TOKEN_PIPE_WAIT * 1000):
                    raise CliError(
                        f"token file {path} is a named pipe that nobody wrote to within "
                        f"{TOKEN_PIPE_WAIT:g} s",
                        code=2,
                    )
            os.set_blocking(fd, True)
            raw = f.read(TOKEN_FILE_MAX + 1)
        if len(raw) > TOKEN_FILE_MAX:
            raise CliError(
                f"token file {path} is not a token: it holds more than "
                f"{TOKEN_FILE_MAX // 1024} KiB",
                code=2,
            )
        # (-sig: a byte order mark, as some Windows editors write, is not the token's)
        token = raw.decode("utf-8-sig").strip()
    except FileNotFoundError:
        if path.is_symlink():  # (a dangling one: it cannot be created either)
            raise CliError(
                f"token file {path} is a symbolic link to {os.readlink(path)}, which does "
                "not exist",
                code=2,
            ) from None
        raise CliError(f"token file {path} does not exist", code=2) from None
    except UnicodeDecodeError:
        raise CliError(
            f"token file {path} is not a token: it is not text (UTF-8)", code=2
        ) from None
    except OSError as exc:
        raise CliError(f"cannot read token file {path}: {exc.strerror or exc}", code=2) from None
    if not token:
        raise CliError(f"token file {path} is empty", code=2)
    if st.st_uid not in (os.getuid(), 0):
        # (a file another user planted, in a shared directory say: its owner chose
        # the token, and can read what it protects)
        _note(
            f"warning: token file {path} belongs to another user (uid {st.st_uid}), "
            "who chose this token and can join the cluster with it; use a file of "
            "your own"
        )
    # (what others may do with it, each said: one who may write it, not read it, puts a
    # token of its choosing there, which a `cluster` then starts with; an execute bit
    # alone lets nobody do anything with a token)
    readable = st.st_mode & (stat.S_IRGRP | stat.S_IROTH)
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if readable or writable:
        can = "read and changed" if readable and writable else "read" if readable else "changed"
        risk = (
            "anyone who reads it can run code on the cluster"
            if readable
            else "anyone who writes it chooses the token of a cluster started with it"
        )
        _note(
            f"warning: token file {path} can be {can} by other users than its owner; "
            f"{risk} (chmod 600 {shlex.quote(str(path))})"
        )
    return token


def cluster_token(token_file: str | None) -> tuple[str, str, Path | None]:
    """The token of a new cluster, where it comes from, and the file holding it.

    With ``token_file``: read it if it exists, else generate a token and create the file
    (0600). Without: ``ACTORGRAD_TOKEN`` if set (no file), else generate one and write it
    to a 0600 file in a fresh private (0700) temporary directory.
    """
    if token_file:
        path = Path(token_file)
        # (os.path.exists: Path.exists raises PermissionError under a directory we may
        # not search, another user's home say, which came out as a bare "Permission
        # denied: F", exit status 1; creating it says what cannot be done with F)
        if os.path.exists(path):
            return read_token_file(path), f"read from {path}", path
        token = new_token()
        try:
            write_token_file(path, token)
        except FileExistsError:  # created concurrently: use theirs
            return read_token_file(path), f"read from {path}", path
        except OSError as exc:
            raise CliError(
                f"cannot create token file {path}: {exc.strerror or exc}", code=2
            ) from None
        return token, f"written to {path} (mode 0600)", path
    env = _env_token()
    if env:
        return env, f"from ${ENV_TOKEN}", None
    token = new_token()
    path = Path(tempfile.mkdtemp(prefix="actorgrad-")) / "token"
    write_token_file(path, token)
    return (
        token,
        f"written to {path} (mode 0600, removed when the cluster stops, unless it is killed)",
        path,
    )


def _env_token() -> str | None:
    try:
        return env_token()
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None


def client_token(token_file: str | None) -> str:
    """The token of a command that joins or queries an existing cluster."""
    if token_file:
        return read_token_file(Path(token_file))
    env = _env_token()
    if env:
        return env
    raise CliError(
        f"no token: pass --token-file F or set {ENV_TOKEN}{blank_env_hint(ENV_TOKEN)}", code=2
    )


# --------------------------------------------------------------------------------------
# event loop and signals
# --------------------------------------------------------------------------------------


#: A signal the event loop has not handled after this many seconds: it is blocked.
BLOCKED_AFTER = 1.0
#: The signals that came once a command's own handling of them had ended, while its
#: event loop closed (see _signals): the command ends with the first one's status.
_late: list[int] = []
#: The same SIGTERM or SIGHUP again within this many seconds is the first one sent
#: twice (by a tool, to the process and to its group), not a request to force the stop.
REPEAT = 0.2


@contextlib.contextmanager
def _signals(handler: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Route SIGINT, SIGTERM and SIGHUP (the terminal went away) to ``handler`` on the
    running loop while inside.

    The same signal twice in one turn of the loop (sent twice at once: to the process
    and to its group) reaches ``handler`` once. From the second signal on, one that the
    loop has not handled ``BLOCKED_AFTER`` s after it came (the loop is blocked: a
    call's ``async def`` ran ``time.sleep``) ends the process at once: the loop would
    handle it only once that code returned, maybe never. (The first one is the loop's
    to handle: it asks for a graceful stop.)"""
    import threading

    loop = asyncio.get_running_loop()
    # (one ignored when we started stays so: `nohup` ignores SIGHUP, a shell ignores
    # SIGINT for its background jobs; SIGHUP stopped a nohup'ed cluster)
    sigs = tuple(
        s
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(s) is not signal.SIG_IGN
    )
    counts = [0, 0]  # signals that came, signals the loop handled
    inside = [True]
    unsettled: set[signal.Signals] = set()  # handled in the loop turn running now

    def on_loop(sig: signal.Signals) -> None:
        counts[1] += 1
        if sig in unsettled:
            # (the same signal twice before the loop ran anything else: one signal sent
            # twice at once, as `timeout` and CI runners send theirs to the process,
            # then to its group. The kernel merges the two while we sleep; while the
            # loop runs, both come, and the second forced a busy cluster down)
            return
        unsettled.add(sig)
        loop.call_soon(unsettled.discard, sig)
        handler(sig)

    def on_arrival(signum: int, frame: Any) -> None:
        # (Python runs this in the main thread between two bytecodes, also while the
        # loop is blocked by a call's code; the loop hears of the signal after it)
        counts[0] += 1
        if counts[0] >= 2:
            t = threading.Timer(BLOCKED_AFTER, unhandled, (signum, counts[0]))
            t.daemon = True
            t.start()

    def unhandled(signum: int, n: int) -> None:
        if inside[0] and counts[1] < n:  # (a timer thread: the loop may be blocked)
            _note(
                f"{signal.Signals(signum).name}: the event loop is blocked (by a call?): "
                "exiting now"
            )
            exit_now(128 + signum)

    for sig in sigs:
        loop.add_signal_handler(sig, on_loop, sig)
        signal.signal(sig, on_arrival)  # (the loop's wake-up on a signal stays)
    try:
        yield
    finally:
        inside[0] = False
        for sig in sigs:
            loop.remove_signal_handler(sig)
            # (that put back Python's own: a Ctrl-C now, as the loop closed, raised
            # KeyboardInterrupt in whatever callback it ran, which stopped uvloop's loop
            # in the middle of a turn; its close then failed ("Event loop stopped before
            # Future completed"): a traceback, status 1. Noted instead: main ends with
            # its status, once the little left to do is done, the token's temporary
            # folder removed too)
            signal.signal(sig, _late_signal)


def _late_signal(signum: int, frame: Any) -> None:
    _late.append(signum)


def _late_signals_over() -> int | None:
    """Put Python's own handlers back in place of _late_signal's (the process may go
    on: a main() called in Python, an interactive session); the status of the first
    signal it noted, None if none came."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is _late_signal:
            signal.signal(
                sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            )
    code = 128 + _late[0] if _late else None
    _late.clear()
    return code


def _stdout_to_devnull() -> None:
    """Our stdout's reader went away (e.g. `| head`): stdout to /dev/null, so that
    what is printed later and the exit's flush stay quiet."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _flush_stdout() -> None:
    """Write out what stdout holds, here, where a BrokenPipeError (its reader went away)
    is handled. (Block-buffered, as a pipe's is unless PYTHONUNBUFFERED is set, what
    `demo` and `--help` print was written only by the interpreter's flush at exit,
    after our handlers: "Exception ignored in: <_io.TextIOWrapper name='<stdout>' ...>
    BrokenPipeError", exit status 120, for `actorgrad demo | true`.)"""
    if sys.stdout is not None:  # (None: started with no stdout at all)
        with contextlib.suppress(ValueError):  # (closed by our caller, main() in Python)
            sys.stdout.flush()


def _say(msg: str) -> None:
    try:
        try:
            print(msg, flush=True)
        except UnicodeEncodeError:
            # (a stdout that cannot encode a worker's name, "wü" in ASCII: a C locale
            # with PYTHONUTF8=0, PYTHONIOENCODING=ascii. It raised in the cluster's news
            # of a join, inside the head's registry, and ended status in a traceback:
            # the character escaped instead, as Python's stderr writes it)
            enc = sys.stdout.encoding or "ascii"
            print(msg.encode(enc, "backslashreplace").decode(enc), flush=True)
    except BrokenPipeError:  # (what we say is lost, the cluster goes on)
        _stdout_to_devnull()


def _note(msg: str, stamp: str = "") -> None:
    """``msg`` on stderr, after ``stamp`` (a time) if given."""
    # (a stderr whose reader went away must not stop what follows: a signal handler
    # notes, then stops the cluster)
    with contextlib.suppress(OSError):
        print(f"{stamp} {PROG}: {msg}" if stamp else f"{PROG}: {msg}", file=sys.stderr, flush=True)


async def _serve_until_signalled(
    serve: Callable[[asyncio.Event], Awaitable[None]], what: str, starting: str = ""
) -> int:
    """Run ``serve(stop)``; the first signal sets ``stop``, the second cancels it.
    ``starting`` is printed once the signals are ours (a Ctrl-C right after it stops
    the run: before, it was a KeyboardInterrupt, exit 130)."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(stop))
    signals = 0
    forced = signal.SIGINT
    first: tuple[signal.Signals, float] | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals, forced, first
        now = time.monotonic()
        if (
            first is not None
            and signals == 1
            and sig == first[0] != signal.SIGINT
            and now - first[1] < REPEAT
        ):
            # (one signal sent twice: `timeout` sends its SIGTERM to the command, then
            # to its whole process group; the second forced the graceful stop down, when
            # it came a loop turn after the first (_signals merges those in one). Not
            # SIGINT: a person's Ctrl-C, twice in a hurry, means it)
            return
        signals += 1
        if signals == 1:
            first = (sig, now)
            stop.set()
            _note(f"{sig.name}: stopping the {what} (again to force)")
        else:
            forced = sig  # (the exit status says which: 130 for SIGINT, 143 SIGTERM)
            task.cancel()
            _note(f"{sig.name}: forcing the {what} down")

    with _signals(on_signal):
        if starting:
            _say(starting)
        try:
            await task
        except asyncio.CancelledError:
            if signals < 2:
                raise
            return 128 + forced
    return 0


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _expected() -> Iterator[None]:
    """Around a runtime call: its ValueError / RuntimeError (a name already taken,
    workers that did not join, ...) are reported as one line, not a traceback."""
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        raise CliError(str(exc) or type(exc).__name__) from exc


def _tell_event(kind: str, text: str) -> None:
    """A cluster's news, with its time (an operator reads it hours later): joins and
    leaves on stdout, its worker processes' deaths and stuck shutdowns on stderr (where
    an operator's alerts look)."""
    now = time.strftime(LOG_TIME)
    if kind in ("exited", "stuck"):
        _note(text, now)
    else:
        _say(f"{now} {text}")


async def cmd_cluster(args: argparse.Namespace) -> int:
    """``actorgrad cluster``: the head and N workers in the foreground."""
    token, where, path = cluster_token(args.token_file)
    forget_env_token()
    n = args.n

    def on_ready(address: str) -> None:
        names = cluster.name_list([f"w{i}" for i in range(1, n + 1)])
        _say(f"actorgrad cluster ready: {_count(n, 'worker')} ({names})")
        _say(f"address: {address}")
        _say(f"token: {where}")
        _say(f"  export {ENV_ADDRESS}={shlex.quote(address)}")  # ([::1]:N is a glob)
        if path is not None:
            # (pasted into a shell from anywhere: quoted, absolute)
            q = shlex.quote(str(path.resolve()))
            _say(f"  export {ENV_TOKEN}=$(cat {q})")
            _say(
                f"  more workers: {PROG} worker --join {shlex.quote(address)} --name NAME --token-file {q}"
            )
        _say("Ctrl-C to stop")

    async def serve(stop: asyncio.Event) -> None:
        with _expected():
            await cluster.serve_cluster(
                n,
                host=args.host,
                port=args.port,
                token=token,
                on_ready=on_ready,
                stop=stop,
                on_event=_tell_event,
            )

    try:
        code = await _serve_until_signalled(serve, "cluster")
    finally:
        if path is not None and not args.token_file:  # (our private temporary one)
            shutil.rmtree(path.parent, ignore_errors=True)
    _say("cluster stopped")
    return code


async def cmd_worker(args: argparse.Namespace) -> int:
    """``actorgrad worker``: one worker joining an existing cluster."""
    token = client_token(args.token_file)
    forget_env_token()
    tune_malloc()  # (as a worker process of a cluster's: see worker_main)
    open_files_limit(raise_to_hard=True)

    async def serve(stop: asyncio.Event) -> None:
        with _expected():
            why = await cluster.serve_worker(
                args.join,
                args.name,
                token,
                stop=stop,
                on_joined=lambda w: _say(
                    f"worker {args.name} joined (cluster id {w.id})"
                    + (f", reached at {w.address}" if args.advertise else "")
                ),
                wait=args.wait or 0.0,
                host=args.host,
                port=args.port,
                advertise=args.advertise,
                # (on stdout, as its joined line: a supervisor's log shows what it waits for)
                on_waiting=lambda why: _say(
                    f"worker {args.name} waiting up to {args.wait:g} s for its name: {why}"
                ),
            )
        if why is not None:  # (not asked to stop: a supervisor should hear of it)
            raise CliError(f"worker {args.name}: {head_lost(why)}")

    code = await _serve_until_signalled(
        serve, f"worker {args.name}", f"worker {args.name} joining {args.join}"
    )
    _say(f"worker {args.name} stopped")
    return code


def _exit_status(returncode: int) -> int:
    """A child's return code as a shell exit status (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _controlling_terminal() -> int | None:
    """A descriptor of our controlling terminal, None when we have none. (Looked for
    as /dev/tty, not on our streams: they may be redirected while the terminal still
    signals our group.)"""
    try:
        return os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None


def _foreground_group(terminal: int) -> int | None:
    """The process group of ``terminal``'s foreground (a Ctrl-C typed there signals
    it), None when unknown."""
    try:
        return os.tcgetpgrp(terminal)
    except OSError:
        return None


def _own_group_ending_with_us(
    terminal: int | None = None, tell: int | None = None
) -> Callable[[], None]:
    """The child's set-up between fork and exec (uvloop takes no ``process_group``): a
    process group of its own, its pid written to ``tell`` (a guard's pipe, see
    _guard_group), the foreground group of ``terminal`` (when given), and on Linux
    SIGTERM when we die (a group of its own escapes a SIGKILL sent to ours: it would
    run on against a dead cluster). All plain system calls, looked up before the fork.

    The terminal is the child's before it runs, as a shell hands it to a job: ``run``
    gave it only once the script had started, and a script that
    read its terminal at once, on a loaded machine, read it from a background group:
    SIGTTIN stopped it, and the shell said the job stopped though no one typed Ctrl-Z."""
    prctl = None
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def setup() -> None:
        os.setpgrp()
        if tell is not None:
            os.write(tell, b"%d" % os.getpid())
            os.close(tell)
        if terminal is not None:
            _set_foreground(terminal, os.getpid())
        if prctl is not None:
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # (we died before that: no signal would come)
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


#: The guard of a script's process group (see _guard_group), run as ``python -S -c``:
#: no imports but the standard library's, so it starts in ~20 ms.
_GUARD = """
import os, select, signal, sys, time
run, grace = int(sys.argv[1]), float(sys.argv[2])
try:
    fd = os.pidfd_open(run)
except ProcessLookupError:
    fd = None
except (AttributeError, OSError):
    fd = -1
told = b""
while chunk := os.read(0, 32):
    told += chunk
if not told:
    sys.exit(0)
group = int(told)
if fd == -1:
    while os.getppid() == run:
        time.sleep(0.5)
elif fd is not None:
    select.select([fd], [], [])
def signal_group(sig):
    try:
        os.killpg(group, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
signal_group(signal.SIGTERM)
end = time.monotonic() + grace
while time.monotonic() < end and signal_group(0):
    time.sleep(0.1)
signal_group(signal.SIGKILL)
"""

#: How long the processes of a script whose ``run`` was killed get after SIGTERM.
GUARD_GRACE = 10.0


async def _guard_group() -> tuple[asyncio.subprocess.Process, int]:
    """A process that, should this one be killed (SIGKILL: no cleanup of ours runs),
    sends SIGTERM to the script's process group, then SIGKILL to what is left
    ``GUARD_GRACE`` s later. The script itself hears of our death (PDEATHSIG), but the
    processes it started did not, and ran on. In a session of its own, so that a signal
    to our group (a SIGKILL of the job) does not end it too; we kill it when the script
    is done. Returns it and the end of a pipe to its stdin for the script to write its
    pid (its group) into, between its fork and its exec (see _own_group_ending_with_us):
    started before the script, the guard knows its group whenever we die (started
    after it, a run killed in between, on a loaded machine, left the script's children
    running for good); no pid by the pipe's end, no script was started."""
    read, tell = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-S",
            "-c",
            _GUARD,
            str(os.getpid()),
            str(GUARD_GRACE),
            stdin=read,
            stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except BaseException:
        os.close(tell)
        raise
    finally:
        os.close(read)
    return proc, tell


async def _end_what_is_left(group: int, script: str) -> None:
    """The script ended: the processes it started and left running in its process group
    get SIGTERM, and SIGKILL ``GUARD_GRACE`` s later, as when ``run`` is killed (see
    _guard_group). They ran on against a stopped cluster, and one holding the script's
    stdout kept a pipeline, or the CI job reading it, waiting for good. (A process the
    script started in a session of its own, a daemon, is not in the group: left be.)"""
    left = group_left(group)
    if not left:
        return
    them = "1 process" if len(left) == 1 else f"{len(left)} processes"
    _note(f"the script {script} left {them} running ({', '.join(map(str, left))}): terminating")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGTERM)
    end = time.monotonic() + GUARD_GRACE
    # (polled, as the guard does: a process group has no handle to wait on)
    while group_left(group) and time.monotonic() < end:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    if left := group_left(group):
        _note(f"killing {', '.join(map(str, left))}: still running {GUARD_GRACE:g} s after SIGTERM")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


def _process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc ("T": stopped), "" when unknown."""
    fields = proc_stat(pid)
    return fields[0] if fields else ""


async def _follow_job_control(pid: int, terminal: int) -> None:
    """While ``run``'s script runs on a terminal: when it is stopped (Ctrl-Z, SIGTTIN),
    take the terminal back if the script has it and stop ``run``'s own group, so the
    shell sees its job stopped and gets its prompt back; when continued (``fg``,
    ``bg``), continue the script. Whenever the shell gives ``run``'s group the terminal
    (``fg``, of a job started in the background too), the script gets it. (The script
    has a process group of its own, see cmd_run: nobody else would tell the shell. A
    stop is seen by looking at /proc every 50 ms: the loop's child watcher reports
    exits only.)

    (Started in the background, ``run`` did not follow: its script, reading the
    terminal, was stopped by SIGTTIN while the shell listed the job as running, and
    ``fg`` gave the terminal to ``run``, not to the script, which stayed stopped.)"""
    while True:
        await asyncio.sleep(0.05)
        if _foreground_group(terminal) == os.getpgrp():
            # (fg of a job started in the background: the script, maybe stopped from
            # reading the terminal there, gets it and goes on)
            _set_foreground(terminal, pid)
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGCONT)
            continue
        if _process_state(pid) != "T":
            continue
        if _foreground_group(terminal) == pid:
            _set_foreground(terminal, os.getpgrp())
        os.killpg(os.getpgrp(), signal.SIGSTOP)  # (the shell: "Stopped"; we wait here)
        # continued by the shell (fg or bg): the script too
        with contextlib.suppress(OSError):
            if os.tcgetpgrp(terminal) == os.getpgrp():  # (fg: the terminal is ours)
                _set_foreground(terminal, pid)
            os.killpg(pid, signal.SIGCONT)


def _set_foreground(fd: int, pgid: int) -> None:
    """Make ``pgid`` the terminal's foreground group (SIGTTOU blocked: we may be in
    the background by then, as a shell is when it takes its terminal back)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, pgid)
    except OSError:
        pass  # (that group is gone already, or the terminal is)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _driver_env(address: str, token: str) -> dict[str, str]:
    """The script's environment: ours, the cluster's address and token, and a
    ``PYTHONPATH`` that finds this very ``actorgrad`` first (also from a source tree)."""
    env = dict(os.environ)
    env[ENV_ADDRESS] = address
    env[ENV_TOKEN] = token
    here = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    return env


async def cmd_run(args: argparse.Namespace) -> int:
    """``actorgrad run``: a local cluster, SCRIPT as its driver, the script's status."""
    # (as given, as python would see it: Path("./-x.py") is "-x.py", an option to it)
    script = args.script if not args.script.startswith("-") else os.path.join(".", args.script)
    token = _env_token() or new_token()
    forget_env_token()  # (the script gets it: _driver_env)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_ready(address: str) -> None:
        if not ready.done():
            ready.set_result(address)

    async def serve() -> None:
        with _expected():
            await cluster.serve_cluster(
                args.n,
                token=token,
                on_ready=on_ready,
                stop=stop,
                on_event=on_event,
                # (first on the script's own path: the workers import what it imports)
                path_first=[args.script_dir],
            )

    def on_event(kind: str, text: str) -> None:
        if kind in ("exited", "stuck"):  # (the script's own joining and leaving is no news)
            _note(text)

    serving = asyncio.ensure_future(serve())
    proc: asyncio.subprocess.Process | None = None
    guard: asyncio.subprocess.Process | None = None
    signals = 0
    last = signal.SIGINT

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals, last
        signals += 1
        last = sig
        if proc is None:  # still starting: give up
            serving.cancel()
            return
        # (the script leads a process group of its own: only this reaches it, and the
        # processes it started, as the group's signal from a shell or `timeout` would.
        # Only while the script is unreaped or its group has processes: they keep the
        # group's id ours; once it is empty, the id may be another group's)
        if proc.returncode is None or group_left(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig if signals < 3 else signal.SIGKILL)
        if proc.returncode is not None and not serving.done() and not serving.cancelling():
            # The script has ended and the cluster is stopping: the signal forces that
            # stop, as a cluster's second does. (Passed on to the script's group alone,
            # it went unheard: the stop went on waiting for a worker process whose loop
            # a call blocked, 3 s, then 3 s after its SIGTERM, whatever was typed.)
            _note(f"{sig.name}: forcing the cluster down")
            serving.cancel()

    # The script runs in a process group of its own, so a signal sent to our group (a
    # shell's kill of the job, `timeout`, a CI runner) reaches it once, from us, and
    # not a second time directly (Python's second SIGINT skips the script's cleanup).
    # On a terminal, the script's group becomes the foreground one: Ctrl-C reaches the
    # script alone, we wait for it to end, then take the terminal back. (In the
    # background, a job of a shell's: the script's when the shell brings run to the
    # foreground, see _follow_job_control.)
    terminal = _controlling_terminal()
    foreground = terminal is not None and _foreground_group(terminal) == os.getpgrp()
    with _signals(on_signal):
        try:
            waits: set[asyncio.Future[Any]] = {serving, ready}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:
                await serving  # raises what made it stop
                raise CliError("the local cluster stopped before it was ready")
            env = _driver_env(ready.result(), token)
            guard, tell = await _guard_group()
            setup = _own_group_ending_with_us(terminal if foreground else None, tell)
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    script,
                    *args.args,
                    env=env,
                    preexec_fn=setup,  # noqa: PLW1509
                )
            finally:
                os.close(tell)  # (the guard reads on to the pipe's end: the pid, or none)
            if signals:
                # (one came while the script was being started: on_signal, with no
                # script yet, stopped the cluster; the script, started all the same and
                # not told, failed to join it, and run exited with its status, not the
                # signal's)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, last)
            if terminal is not None:
                if foreground:  # (the child took it already: see there)
                    _set_foreground(terminal, proc.pid)
                follow = asyncio.ensure_future(_follow_job_control(proc.pid, terminal))
                try:
                    returncode = await proc.wait()
                finally:
                    follow.cancel()
            else:
                returncode = await proc.wait()
        except asyncio.CancelledError:
            if signals == 0:
                raise
            return 128 + last
        finally:
            if terminal is not None:
                # (only from the script's group, dead or alive, or a group that is
                # gone (one the script gave it to): run put in the background, Ctrl-Z
                # then `bg`, took it from the shell, and exited; the shell, no longer
                # the foreground, read an error and exited too)
                holder = _foreground_group(terminal)
                if proc is not None and holder and (holder == proc.pid or not group_left(holder)):
                    _set_foreground(terminal, os.getpgrp())
                os.close(terminal)
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            if proc is not None:
                await _end_what_is_left(proc.pid, script)
            if guard is not None:  # (its watch is over: we are alive and the script done)
                with contextlib.suppress(ProcessLookupError):
                    guard.kill()
                await guard.wait()
            stop.set()
            if not serving.done():
                try:
                    await asyncio.wait_for(asyncio.shield(serving), 30)
                except TimeoutError:
                    serving.cancel()
                except asyncio.CancelledError:
                    # (the cluster's, cancelled by on_signal while it was starting, is
                    # no cancellation of ours: the script's status is still to return)
                    if not serving.cancelled():
                        raise
            if serving.done() and not serving.cancelled():
                exc = serving.exception()
                if exc is not None and proc is not None:
                    _note(f"cluster shutdown: {type(exc).__name__}: {exc}")
            with contextlib.suppress(asyncio.CancelledError):
                await serving
    typed = terminal is not None and -returncode == signal.SIGINT  # (Ctrl-C: the user's)
    if returncode < 0 and not typed and not (signals and -returncode in (last, signal.SIGKILL)):
        # (not one we passed on, nor the user's Ctrl-C: the shell says nothing either, as
        # we exit normally; an out-of-memory kill in CI went unexplained)
        _note(f"the script {script} {describe_exit(returncode)}")
    return _exit_status(returncode)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _contexts(w: dict[str, Any]) -> Any:
    """Live dist contexts of a worker's status (flat or under "dist"); none: 0."""
    if "num_contexts" in w:
        return w["num_contexts"]
    dist = w.get("dist")
    if isinstance(dist, dict) and "num_contexts" in dist:
        return dist["num_contexts"]
    return 0  # distributed autograd never ran there


def _users(status: dict[str, Any]) -> int:
    """How many of a status's workers are the cluster's (not its head's own, "_...")."""
    return sum(not str(w.get("name", "")).startswith("_") for w in status.get("workers", []))


def format_status(status: dict[str, Any]) -> str:
    """A readable table of ``cluster_status()``'s result (unreachable workers: their error)."""
    workers = list(status.get("workers", []))
    lines = [
        f"cluster {status.get('address', '?')}: {_count(_users(status), 'worker')} and its head"
    ]
    head = ["name", "id", "address", "mailbox", "in_flight", "contexts", "rrefs"]
    rows = []
    for w in workers:
        row = [_cell(w.get(k)) for k in ("name", "id", "address", "mailbox", "in_flight")]
        row += [_cell(_contexts(w)), _cell(w.get("rrefs"))]
        if "error" in w:
            row[3:] = ["-"] * (len(head) - 3)
            row.append(f"unreachable: {w['error']}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        cells = [c.ljust(wd) for c, wd in zip(row, widths, strict=False)] + row[len(head) :]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def status_json(status: dict[str, Any]) -> str:
    """``--json``'s text: ``cluster_status()``'s result with each reachable worker's
    ``contexts`` as the table shows it (a worker reports its live contexts under
    ``dist.num_contexts``, and nothing before distributed autograd ran there: a script
    reading the table's fields would not find them)."""
    workers = [
        w if "error" in w else {**w, "contexts": _contexts(w)} for w in status.get("workers", [])
    ]
    return json.dumps({**status, "workers": workers}, indent=2)


async def cmd_status(args: argparse.Namespace) -> int:
    """``actorgrad status``: the workers of a running cluster."""
    address = args.address or env_address()
    if not address:
        raise CliError(
            f"no address: pass --address A or set {ENV_ADDRESS}{blank_env_hint(ENV_ADDRESS)}",
            code=2,
        )
    try:
        _address(address)
    except argparse.ArgumentTypeError as exc:
        raise CliError(f"{ENV_ADDRESS}: {exc}", code=2) from None
    token = client_token(args.token_file)
    with _expected():
        status = await cluster.cluster_status(address, token, timeout=args.timeout)
    # (--json: what a monitoring script reads, where the table is for people)
    _say(status_json(status) if args.json else format_status(status))
    gone = [w["name"] for w in status["workers"] if "error" in w]
    if gone:  # (a health check must tell: the table lists them, the status says so)
        # (counted as the table's first line counts them: the head's own worker apart)
        _note(f"{len(gone)} of {_count(_users(status), 'worker')} unreachable: {', '.join(gone)}")
        return 1
    return 0


def cmd_demo(argv: list[str]) -> int:
    """``actorgrad demo [ARGS...]``: ``actorgrad.demo.main(ARGS)`` (it parses its own)."""
    from actorgrad import demo

    return demo.main(argv)


# --------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _address(text: str) -> str:
    try:
        return cluster.check_address(text)
    except ValueError:
        if text.startswith("inproc://"):  # (a local_cluster's .address, by default)
            raise argparse.ArgumentTypeError(
                f"{text!r} is the address of an in-process cluster, which only its own "
                "process reaches: start it with local_cluster(..., transport='tcp')"
            ) from None
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT{cluster.address_hint(text)}, not {text!r}"
        ) from None


def _worker_name(text: str) -> str:
    try:
        return cluster.check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host(text: str) -> str:
    if not text:
        # (binding '' is every interface: a `--host "$HOST"` whose variable was unset
        # put the cluster, 127.0.0.1 by default, on every interface, and its warnings
        # said " is reachable from other hosts")
        raise argparse.ArgumentTypeError("an empty host (every interface: 0.0.0.0, or ::)")
    try:
        return cluster.check_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _advertise(text: str) -> str:
    try:
        cluster.check_advertise(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _path(text: str) -> str:
    # ('' was taken for no option at all: cluster made a temporary token instead)
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0: {text!r}")
    return value


def at_least(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """An argparse type: an int of at least ``low`` and, given ``high``, at most that
    (``why`` says why, in the error). Also for ``actorgrad demo``."""

    def parse(text: str) -> int:
        try:
            value = _ascii_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}: {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}{why}: {value}")
        return value

    return parse


_workers = at_least(1, MAX_LOCAL_WORKERS, " (each worker is a process on this machine)")


def _ascii_int(text: str) -> int:
    """``int(text)`` of ASCII digits only: Python's takes any script's digits, and
    ``-n ٣`` (Arabic-Indic three) started three workers."""
    if not text.isascii():
        raise ValueError(text)
    return int(text)


def _port(text: str) -> int:
    try:
        value = _ascii_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


#: The environment variables, for ``actorgrad --help`` (none was listed anywhere but
#: in the docs).
_ENVIRONMENT = """environment:
  ACTORGRAD_TOKEN             the cluster token, for every command that needs one
  ACTORGRAD_ADDRESS           HOST:PORT of the cluster, for status and ag.init
                              (run sets both for its script)
  ACTORGRAD_LOG               log level: debug, info, warning (default), error
  ACTORGRAD_SPIN_US           polling window after each message, in microseconds
                              (default 5000, 0: off, at most 100000)
  ACTORGRAD_HEARTBEAT_TIMEOUT seconds a peer that is waited on may send nothing
                              before it is taken for lost (default 3, 2 to 30):
                              longer tolerates blocked loops and stalled links,
                              and finds a hung peer later; set it on every host
  ACTORGRAD_LOCAL_SOCKETS     0: co-located workers talk over TCP, not Unix
                              sockets
  ACTORGRAD_MALLOC_TUNING     0: keep glibc malloc's defaults (so does a
                              MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_
                              set)
  OMP_NUM_THREADS             set: worker processes keep the math libraries'
                              thread counts; unset: OMP_, OPENBLAS_ and
                              MKL_NUM_THREADS each get cores / processes (unless
                              set)
  ACTORGRAD_PROFILE           PATH: each worker process runs under cProfile and
                              writes its stats to PATH.NAME when it exits
  ACTORGRAD_OUTPUT_PREFIX     0: the lines worker processes print do not begin
                              with their name ("[w1] ")
See README.md and docs/limits.md."""


def _build_parsers(strict: bool = True) -> tuple[_Parser, dict[str, _Parser]]:
    """The parser and its commands' parsers; not ``strict``: no option is required
    (see parse_args)."""
    from actorgrad import __version__

    p = _Parser(
        prog=PROG,
        description="actorgrad: distributed autograd on asyncio actors.",
        epilog=_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    tok = f"file holding the cluster token (default: ${ENV_TOKEN})"

    c = sub.add_parser("cluster", help="run a registry head and N workers in the foreground")
    c.add_argument("-n", type=_workers, required=strict, metavar="N", help="workers w1..wN")
    c.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1; every one: 0.0.0.0, or :: for IPv6 too)",
    )
    c.add_argument("--port", type=_port, default=0, help="registry port (default: any free)")
    c.add_argument(
        "--token-file",
        type=_path,
        metavar="F",
        help=(
            "read the token from F, or create F (mode 0600) with a new one (default: "
            f"${ENV_TOKEN}, else a new token in a private temporary file, removed when the cluster stops)"
        ),
    )

    w = sub.add_parser("worker", help="run one worker that joins a cluster")
    w.add_argument(
        "--join", required=strict, type=_address, metavar="ADDRESS", help="HOST:PORT of the cluster"
    )
    w.add_argument("--name", required=strict, type=_worker_name, help="this worker's name")
    w.add_argument("--token-file", type=_path, metavar="F", help=tok)
    w.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="keep trying to reach a cluster not up yet, or a head that does not answer "
        "(stopped, its loop blocked), or to take a name a member still holds (a process "
        "being replaced), for that long (default: fail at once)",
    )
    w.add_argument(
        "--host",
        type=_host,
        help="interface to bind (default: 127.0.0.1 for a cluster on this host's loopback, "
        "else every interface)",
    )
    w.add_argument("--port", type=_port, default=0, help="port to listen on (default: any free)")
    w.add_argument(
        "--advertise",
        type=_advertise,
        metavar="HOST[:PORT]",
        help="where the other workers connect to this one, when not where it listens: "
        "behind a NAT, a container's published port, a tunnel (default: its listening "
        "address; no PORT: the port it listens on)",
    )

    r = sub.add_parser("run", help="run SCRIPT as the driver of a local cluster of N workers")
    r.add_argument("-n", type=_workers, required=strict, metavar="N", help="workers w1..wN")
    # (optional in the lenient pass, whose only errors are unknown options: a missing
    # SCRIPT is the strict one's, which names it with -n: see parse_args)
    r.add_argument(
        "script",
        nargs=None if strict else "?",
        metavar="SCRIPT",
        help="the Python script to run (or a folder holding __main__.py, as python runs)",
    )
    # (what follows SCRIPT is split off before parsing: see parse_args)
    r.add_argument(  # (a default: argparse would call a '*' positional "required")
        "args", nargs="*", default=[], metavar="ARGS", help="its arguments, passed as given"
    )

    s = sub.add_parser("status", help="show the workers of a running cluster")
    s.add_argument(
        "--address", type=_address, metavar="A", help=f"HOST:PORT (default: ${ENV_ADDRESS})"
    )
    s.add_argument("--token-file", type=_path, metavar="F", help=tok)
    s.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait (default 5)")
    s.add_argument(
        "--json",
        action="store_true",
        help="print the status as JSON, for scripts (the same fields; the same exit status)",
    )

    sub.add_parser(
        "demo",
        help="train a model split across a local cluster (demo --help: its options)",
        add_help=False,
    )
    return p, sub.choices


_COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "cluster": cmd_cluster,
    "worker": cmd_worker,
    "run": cmd_run,
    "status": cmd_status,
}


def _describe(exc: BaseException) -> str:
    """One line for an expected runtime/OS error."""
    if isinstance(exc, AuthError):
        return f"authentication failed: {exc}"
    if isinstance(exc, ActorgradError) and str(exc):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}" if str(exc) else "timed out"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return f"{type(exc).__name__}: {exc}"


def _script_problem(script: str) -> str:
    """Why ``run`` cannot start ``script``, which is not a file we may read."""
    if not script:  # (an unset variable's "$SCRIPT": it said "no such script: ")
        return "no script: SCRIPT is empty"
    try:
        st = os.stat(script)
    except (FileNotFoundError, NotADirectoryError):
        return f"no such script: {script}"
    except OSError as exc:
        # (a directory on the way we may not search, another user's home say: that was
        # "no such script", for one that may well be there)
        return f"cannot read script {script}: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return f"not a file: {script} (nor a folder holding a __main__.py)"
    if stat.S_ISREG(st.st_mode):
        # (mode 0600 of another user: Python's own "can't open file" came from the
        # script's process, after the cluster had started)
        return f"cannot read script {script}: Permission denied"
    # (a pipe, a socket, a device: the worker processes run the script from its path,
    # which such a file cannot give them again; it said "no such script")
    return f"not a regular file: {script} (a script file or a folder holding a __main__.py)"


#: A SCRIPT that is a Python interpreter (python, python3, /usr/bin/python3.11).
_INTERPRETER = re.compile(r"python[0-9.]*(\.exe)?")


def _check_run_words(
    run_parser: argparse.ArgumentParser, known: argparse.Namespace, tail: list[str]
) -> None:
    """Usage errors of ``run`` that argparse words misleadingly, as habits of other
    launchers make them."""
    if known.n is None and any(a.startswith("-n") and not a.startswith("--") for a in tail):
        # (`run train.py -n 2`: the -n is the script's, as every word after SCRIPT, and
        # argparse said only "the following arguments are required: -n", of an -n the
        # user had given)
        run_parser.error(
            "the following arguments are required: -n (the -n after SCRIPT is the script's, "
            "as every word after it: put -n N before SCRIPT, `actorgrad run -n N SCRIPT "
            "[ARGS...]`)"
        )
    script = known.script
    if script is not None and _INTERPRETER.fullmatch(os.path.basename(script)):
        # (`run -n 2 python train.py`, as mpirun and torchrun are given it: "no such
        # script: python", or an interpreter found on the path run as the script, whose
        # bytes Python refused with a SyntaxError after the cluster had started)
        n = "N" if known.n is None else str(known.n)
        rest = shlex.join(tail) if tail else "SCRIPT"
        run_parser.error(
            f"SCRIPT is {script!r}, a Python interpreter: run takes the script itself and "
            f"runs it with its own Python: `actorgrad run -n {n} {rest}`"
        )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, parsed. What follows ``run``'s SCRIPT goes to the script as
    given: argparse's REMAINDER would drop a ``--`` there (``run -n 2 s.py -- -x``
    gave the script ``-x`` alone), so only the part up to SCRIPT is parsed."""
    argv = list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        return argparse.Namespace(command="demo")
    tail: list[str] = []
    if argv[:1] == ["run"]:
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "--":  # SCRIPT comes next, whatever it looks like
                i += 1
                break
            if not a.startswith("-") or a == "-":
                break
            i += 2 if a == "-n" else 1  # (-n N; -nN, -h and unknown options: one word)
        argv, tail = argv[: i + 1], argv[i + 1 :]
    # argparse names a missing required option before an unknown one (`run --foo s.py`
    # said "-n is required"): unknown options are looked for first, by the command's
    # parser with nothing required
    parser, commands = _build_parsers()
    lenient, lenient_commands = _build_parsers(strict=False)
    for name, sub in lenient_commands.items():  # (its errors show the real usage)
        sub.usage = commands[name].format_usage().removeprefix("usage: ").rstrip("\n")
    known, unknown = lenient.parse_known_args(argv)
    if unknown:
        hint = ""
        if known.command == "run" and "-m" in unknown:
            # (python's -m, tried here as with python: run takes the script's path)
            hint = (
                "; run takes a script's path (SCRIPT), not -m MODULE: run `python -m "
                "MODULE` with ACTORGRAD_ADDRESS/ACTORGRAD_TOKEN of an `actorgrad cluster`"
            )
        commands[known.command].error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if known.command == "run":
        _check_run_words(commands["run"], known, tail)
    args = parser.parse_args(argv)
    if args.command == "run":
        args.args = tail
    return args


def entry() -> int:
    """The ``actorgrad`` command as a process: :func:`main`; after a graceful stop
    (status 0: a first Ctrl-C lets running calls finish) it waits for calls still
    running in a worker's thread pool, until a signal; otherwise it exits past them
    (the pool's threads are daemon threads: the interpreter's exit does not wait for
    a function that never returns)."""
    code = main()
    if code == 0:
        _wait_for_calls_in_threads()
    return code


def _wait_for_calls_in_threads() -> None:
    """Wait for the threads of stopped workers' pools: a call past the stop's grace
    runs on to its end (its caller was told the worker left); a signal meanwhile ends
    the process at once. (The interpreter's own wait for them heard no signal: a second
    Ctrl-C printed a traceback and the process exited with status 0.)"""
    threads = pool_threads()
    if not threads:
        return

    def now(signum: int, frame: Any) -> None:
        _note(f"{signal.Signals(signum).name}: not waiting for the calls")
        exit_now(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, now)
    flush_output()  # (what the calls printed so far: a SIGKILL may come meanwhile)
    for t in threads:  # (idle ones end at once)
        t.join(0.2)
    busy = [t for t in threads if t.is_alive()]
    if busy:
        _note(f"waiting for {_count(len(busy), 'call')} still running (Ctrl-C: exit now)")
    for t in busy:
        t.join()  # (a signal interrupts it)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``actorgrad`` command; returns the exit status."""
    open_std_fds()  # (before any file is opened: it would take a closed one's place)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parse_args(argv)
        except SystemExit:  # (--help, --version, a usage error: printed, not written)
            try:
                _flush_stdout()
            except BrokenPipeError:
                _stdout_to_devnull()
                raise SystemExit(128 + signal.SIGPIPE) from None
            raise
    finally:
        # (a Ctrl-C while the command imported, or parses its arguments, ends it
        # quietly: see actorgrad._startup; from here on, a KeyboardInterrupt is handled
        # below. Put back on the way out of the parsing too, --help, --version and a
        # usage error: the session of python -i, or pdb's, that follows kept it)
        if signal.getsignal(signal.SIGINT) is quit_while_importing:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            log_to_stderr()
            # (ACTORGRAD_HEARTBEAT_TIMEOUT: a bad one is a usage error, said once here,
            # not by each worker process; the processes started inherit it)
            rworker.read_settings()
        except ValueError as exc:
            raise CliError(str(exc), code=2) from None
        # (now, once: a bad tuning value warns through that logging, and the processes
        # started inherit the value used instead of warning again)
        transport.read_settings()
        if args.command == "demo":
            try:
                return cmd_demo(argv[1:])
            finally:  # (also on its way out of its --help, a SystemExit)
                _flush_stdout()
        if args.command == "run":
            # (a folder holding __main__.py runs as with python, which puts the folder
            # itself first on the script's path: run refused it as "not a file")
            main_py = os.path.join(args.script, "__main__.py")
            folder = os.path.isdir(args.script) and os.path.isfile(main_py)
            target = main_py if folder else args.script
            if not (os.path.isfile(target) and os.access(target, os.R_OK)):
                raise CliError(_script_problem(target), code=2)
            # (as Python puts it first on the script's path)
            real = os.path.realpath(args.script)
            args.script_dir = real if folder else os.path.dirname(real)
        try:
            code = run(_COMMANDS[args.command](args))
        finally:
            late = _late_signals_over()
        _flush_stdout()
        return code if late is None else late
    except CliError as exc:
        _note(f"error: {exc}")
        return exc.code
    except BrokenPipeError:
        # (`actorgrad demo | head`: stop quietly, as a command killed by SIGPIPE)
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except (ActorgradError, OSError, TimeoutError) as exc:
        _note(f"error: {_describe(exc)}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # (python -m actorgrad.cli, as python -m actorgrad)
    raise SystemExit(entry())
