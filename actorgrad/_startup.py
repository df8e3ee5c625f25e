"""What the ``actorgrad`` command needs before anything else is imported: imported
first by ``actorgrad/__init__.py``.

The command spends its first ~0.3 s importing the package (numpy, ...): a Ctrl-C then
printed a KeyboardInterrupt traceback through the imports, and the process died by
SIGINT. It exits with status 130 instead, quietly, until the command's own handling
takes over (``cli.main`` puts Python's back). Not in a program that imports actorgrad:
its Ctrl-C is its own.
"""

from __future__ import annotations

import os
import signal
import sys


def quit_while_importing(signum: int, frame: object) -> None:
    """SIGINT while the command imports: status 130, quietly (nothing has started yet,
    nothing is to stop)."""
    os._exit(128 + signum)


def is_the_command() -> bool:
    """Whether this process is the ``actorgrad`` command (``python -m actorgrad``, or
    the script pip installs), importing this package before its code runs."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] == ["-m"]:  # (python's argv[0] while it finds a -m module)
        return module_run(argv) in ("actorgrad", "actorgrad.cli")
    # The script's own command line, as python was given it: multiprocessing's spawn
    # and forkserver children take their parent's sys.argv before they import its main
    # module (the script: it imports actorgrad), and one of the command (a function of
    # a user's in `actorgrad worker` starting a Pool) was taken as the command, and
    # kept the handler for good: no cli.main runs there to put Python's back.
    return (
        bool(sys.argv)
        and os.path.basename(sys.argv[0]) == "actorgrad"
        and argv[len(argv) - len(sys.argv) :] == sys.argv
    )


def module_run(argv: list[str]) -> str | None:
    """The module ``python -m`` runs in the command line ``argv`` (``sys.orig_argv``),
    read as python reads its options: ``-m`` may come glued to its module
    (``-mactorgrad``) or after other one-letter options (``-Bm actorgrad``); ``-W`` and
    ``-X`` take a value, which may be spelled ``-m``. None for a script or ``-c``."""
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        if arg == "--check-hash-based-pycs":
            i += 2
            continue
        if arg.startswith("--"):  # (--help, --version, ...: python stops there)
            return None
        for j, letter in enumerate(arg[1:], 2):
            rest = arg[j:]
            if letter == "m":
                return rest or (argv[i + 1] if i + 1 < len(argv) else None)
            if letter == "c":
                return None
            if letter in "WX":
                i += 0 if rest else 1  # (its value: the rest of the word, or the next)
                break
        i += 1
    return None


if signal.getsignal(signal.SIGINT) is signal.default_int_handler and is_the_command():
    signal.signal(signal.SIGINT, quit_while_importing)
