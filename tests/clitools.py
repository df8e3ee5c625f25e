"""Running the ``actorgrad`` command as real subprocesses, reading their output line
by line with a deadline (for test_cli.py and test_hosts.py)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CLI = [sys.executable, "-m", "actorgrad"]


def patched_cli(setup: str) -> list[str]:
    """The CLI as a program that runs ``setup`` (Python: a module value set to what a
    test needs, say) before it starts (for ``Running(..., program=...)``)."""
    return [
        sys.executable,
        "-c",
        f"{setup}; from actorgrad import cli; raise SystemExit(cli.entry())",
    ]


ROOT = Path(__file__).resolve().parent.parent
STARTUP = 30.0
#: a cluster's news of its workers: its time, then what happened
NEWS = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.*)")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without ACTORGRAD_ variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTORGRAD_")}
    env.update(extra)
    return env


class Running:
    """A CLI subprocess whose stdout lines are collected by a reader thread."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        ignoring: tuple[int, ...] = (),
        prefix: tuple[str, ...] = (),
        program: list[str] = CLI,
        stdin: bool = False,
    ) -> None:
        """``ignoring``: signals the process starts with ignored (as under ``nohup``);
        ``prefix``: the command that runs the program (``ip netns exec NS``, say);
        ``program``: what runs, given ``args`` (the CLI unless told); ``stdin``: a pipe
        to the process's stdin (else it reads nothing)."""
        self.proc = subprocess.Popen(
            [*prefix, *program, *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env if env is not None else clean_env(),
            start_new_session=True,
            preexec_fn=(lambda: [signal.signal(s, signal.SIG_IGN) for s in ignoring])
            if ignoring
            else None,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = STARTUP) -> str:
        """The rest of the first stdout line starting with ``prefix`` (deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line {prefix!r} within {timeout} s; saw {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"exited before {prefix!r}; saw {self.seen}; stderr {err}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def expect_news(self, prefix: str, timeout: float = STARTUP) -> str:
        """Like ``expect`` for a cluster's news of its workers, a line that starts with
        its time."""
        deadline = time.monotonic() + timeout
        while True:
            m = NEWS.fullmatch(self.expect("", max(0.0, deadline - time.monotonic())))
            if m is not None and m[1].startswith(prefix):
                return m[1][len(prefix) :].strip()

    def expect_all(self, *prefixes: str, timeout: float = STARTUP) -> dict[str, str]:
        """Like ``expect`` for each prefix, in whatever order the lines come."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(prefixes):
            line = self.expect("", max(0.0, deadline - time.monotonic()))
            for p in prefixes:
                if p not in found and line.startswith(p):
                    found[p] = line[len(p) :].strip()
                    break
        return found

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill whatever is left of the process and its group; close the pipes."""
        # (the group too: a cluster's worker processes outlived a cluster killed alone,
        # and held its stdout open, so the reader thread was still reading when the pipe
        # was closed under it: "ValueError: I/O operation on closed file" in that thread)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # (its own session: start_new_session)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is no zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
