"""Entry point of a worker process: ``python -m actorgrad.runtime.worker_main --join
ADDR --name NAME [--host H] [--parent PID]`` (token in ``ACTORGRAD_TOKEN``). Runs until
SIGTERM/SIGINT or until the cluster's head goes away; with ``--parent``, also ends at
most ``ORPHAN_GRACE`` seconds after process PID (the one that started it) is gone.

``ACTORGRAD_PROFILE=PATH`` (a developer aid) runs the worker under cProfile and writes
the stats to ``PATH.NAME`` when it exits."""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import sys
import threading
import time
from typing import Any

from actorgrad.errors import ActorgradError

#: How long a worker whose starter died may take to exit by itself (its head's
#: connection closed: it leaves, letting its running calls end) before it is ended.
ORPHAN_GRACE = 15.0


def said_by(name: str) -> str:
    """How this worker process's own messages begin: "actorgrad worker", where each
    line it prints begins with its name already (``[w1] ``, see procs.prefix_output),
    else "actorgrad worker w1" (``ACTORGRAD_OUTPUT_PREFIX=0``). (The name in both
    made "[w1] actorgrad worker w1: ...".)"""
    from actorgrad.runtime.procs import LinePrefixed

    return (
        "actorgrad worker" if isinstance(sys.stderr, LinePrefixed) else f"actorgrad worker {name}"
    )


def leave_with(parent: int, grace: float, name: str) -> None:
    """End this process ``grace`` seconds after process ``parent`` is gone, unless it
    ended by itself meanwhile. A worker normally leaves once its cluster's head goes;
    but one whose loop is blocked (a call that proved fast, then blocks; a backward
    hook) cannot notice, and stayed for good, re-parented to init, when the process that
    started it was killed (SIGKILL, or a SIGTERM the driver did not handle). A daemon
    thread waits for ``parent``'s end (a pidfd: no polling where there are pidfds),
    so it acts while the loop is blocked.

    Example::

        leave_with(os.getppid(), ORPHAN_GRACE, "w1")
    """

    def watch() -> None:
        _wait_until_gone(parent)
        time.sleep(grace)  # (its own exit, if it comes, ends this thread too)
        print(
            f"{said_by(name)}: the process that started it ({parent}) is gone, "
            f"and it did not leave within {grace:g} s (its loop is blocked?): exiting now",
            file=sys.stderr,
        )
        from actorgrad.runtime.procs import exit_now

        exit_now(1)

    # (not named "actorgrad-...": those are the pools' threads, which the CLI waits for
    # after a graceful stop)
    threading.Thread(target=watch, name=f"watch-parent-of-{name}", daemon=True).start()


def _wait_until_gone(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # (no pidfds: poll whether it is still our parent)
        while os.getppid() == pid:
            time.sleep(1.0)
        return
    try:
        select.select([fd], [], [])  # (readable once it exited)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="actorgrad-worker")
    ap.add_argument("--join", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--host", default=None)
    # (the process that started this one, whose cluster it serves: see leave_with)
    ap.add_argument("--parent", type=int, default=None)
    from actorgrad.runtime.procs import (
        ENV_JOIN_KEY,
        ENV_TOKEN,
        env_token,
        forget_env_token,
        log_to_stderr,
        open_std_fds,
        output_prefix,
        prefix_output,
        tune_malloc,
    )

    # first: glibc fixes its count of malloc arenas at the first one a thread asks for
    # (leave_with's thread, below), so a cap set later leaves that arena beside it
    tune_malloc()
    open_std_fds()  # (before leave_with's pidfd: it took a closed stdout's place)
    args = ap.parse_args(argv)
    prefix_output(output_prefix(args.name))  # ("[w1] " before each line it prints)
    if args.parent is not None:
        leave_with(args.parent, ORPHAN_GRACE, args.name)
    # (its own, not for the processes its calls start)
    key = os.environ.pop(ENV_JOIN_KEY, "")

    try:
        log_to_stderr()
        token = env_token()
        from actorgrad.runtime.worker import read_settings

        read_settings()  # (ACTORGRAD_HEARTBEAT_TIMEOUT: a bad one is said, status 2)
    except ValueError as exc:
        print(f"{said_by(args.name)}: {exc}", file=sys.stderr)
        return 2
    if not token:
        print(f"{said_by(args.name)}: {ENV_TOKEN} is not set", file=sys.stderr)
        return 2
    forget_env_token()  # (as the join key above)
    from actorgrad.runtime.cluster import run, serve_worker
    from actorgrad.runtime.procs import flush_output, open_files_limit
    from actorgrad.runtime.worker import HEAD_SHUT_DOWN, head_lost

    open_files_limit(raise_to_hard=True)

    async def serve() -> str | None:
        """Serve until a signal or the head goes away; how the head went away (None:
        a signal)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve_worker(args.join, args.name, token, stop=stop, host=args.host, key=key)

    profile = os.environ.get("ACTORGRAD_PROFILE", "").strip()  # (blank: none)
    prof: Any = None
    if profile:  # a developer aid: cProfile the worker, stats dumped to this path at exit
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    head_gone: str | None = None
    try:
        head_gone = run(serve())
    except KeyboardInterrupt:
        return 130
    except (ActorgradError, OSError, ValueError) as exc:
        # (one line, as the CLI reports errors: e.g. stopped while it was joining, the
        # head gone; the traceback helps nobody, the cluster says which worker exited)
        print(f"{said_by(args.name)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "Event loop stopped before Future completed" not in str(exc):
            raise
        # (asyncio's words, and a traceback into its internals, said nothing of why)
        print(
            f"{said_by(args.name)}: its event loop was stopped (by loop.stop() in "
            "code it ran?); leaving",
            file=sys.stderr,
        )
        return 1
    finally:
        if prof is not None:
            prof.disable()
            try:
                prof.dump_stats(f"{profile}.{args.name}")
            except OSError as exc:  # (a missing folder: one line, not a traceback)
                print(f"{said_by(args.name)}: ACTORGRAD_PROFILE: {exc}", file=sys.stderr)
    if head_gone is not None:
        if head_gone != HEAD_SHUT_DOWN:
            # (said, so that a cluster that finds its workers gone knows why: one whose
            # process was stopped (Ctrl-Z) for longer than the idle timeout lost them
            # all; not when it shut down: the cluster is stopping them, and says so)
            print(
                f"{said_by(args.name)}: {head_lost(head_gone)}; leaving",
                file=sys.stderr,
                flush=True,
            )
    # (a call still running in the thread pool, stuck or past the stop's grace, does
    # not keep the process: the pool's threads are daemon threads. What the calls
    # printed goes out now, before anything in the exit could be slow.)
    flush_output()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
