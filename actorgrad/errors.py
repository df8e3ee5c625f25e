"""The errors of actorgrad, in one place.

The tree::

    Exception
    +-- ActorgradError                 base of the runtime's own errors
    |   +-- RemoteError                user code raised on another worker
    |   +-- WorkerLost                 the peer died / the connection broke
    |   +-- RpcTimeout (TimeoutError)  a call did not answer in time
    |   +-- AuthError                  handshake failed (wrong token, not an actorgrad peer)
    |   +-- ProtocolError              malformed, oversized or unknown message
    |   +-- ContextError               distributed autograd context misuse

Low-level errors (OSError, msgpack exceptions, asyncio.IncompleteReadError) are mapped
to these once, at the transport edge, with ``raise Mapped(...) from exc``.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

E = TypeVar("E", bound=BaseException)

__all__ = [
    "ActorgradError",
    "AuthError",
    "ContextError",
    "ProtocolError",
    "RemoteError",
    "RpcTimeout",
    "WorkerLost",
]


class ActorgradError(Exception):
    """Base class of every error raised by the actorgrad runtime itself.

    Example::

        >>> try:
        ...     raise ag.WorkerLost("connection to 'w1' broke")
        ... except ag.ActorgradError as e:
        ...     print(type(e).__name__, e)
        WorkerLost connection to 'w1' broke
    """


def type_name(t: type) -> str:
    """How a type is named in errors and on the wire: ``"ValueError"`` for builtins,
    ``"module.QualName"`` otherwise (unambiguous across workers)."""
    mod = t.__module__
    if mod == "builtins":
        return t.__qualname__
    if mod == "__mp_main__":  # the driver's script imported by a worker process (calls.py)
        mod = "__main__"  # (as its in-process workers name it)
    return f"{mod}.{t.__qualname__}"


def check_bool(value: Any, what: str) -> bool:
    """``value`` if it is a bool (a numpy bool too, as a bool), else TypeError naming
    ``what``: a flag given as the string "no" or a number would be taken as true."""
    if type(value) is bool:
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{what} must be a bool (True or False), not {value!r:.80}")


def check_retain_graph(value: Any) -> bool:
    """``retain_graph`` as a bool: None (torch's default, "as create_graph") is False;
    anything but a bool is a TypeError (see check_bool).

    >>> check_retain_graph(None), check_retain_graph(True)
    (False, True)
    """
    return value is not None and check_bool(value, "backward(): retain_graph")


#: a RemoteError's message and traceback keep this many characters at each end
KEEP_OF_ERRORS = 512 * 1024


def clip_text(text: str, keep: int) -> str:
    """``text``, its middle cut when it is longer than twice ``keep`` characters.

    >>> clip_text("abcdefgh", 2)
    'ab... (4 characters cut) ...gh'
    """
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]}... ({len(text) - 2 * keep} characters cut) ...{text[-keep:]}"


def short_repr(x: Any, limit: int = 40) -> str:
    """``repr(x)`` cut to ``limit`` characters, for error messages about values that
    came from the wire (they may be huge, or fail to repr)."""
    try:
        r = repr(x)
    except BaseException as exc:  # (a KeyboardInterrupt from a __repr__ too: see from_exception)
        if from_sigint_handler(exc):
            raise
        r = f"<{type_name(type(x))}>"
    return cut_text(r, limit)


def from_sigint_handler(exc: BaseException) -> bool:
    """Whether ``exc`` is the KeyboardInterrupt of a real Ctrl-C that the process's
    SIGINT handler raised while some code ran (a ``__repr__``, say), as far as can be
    told: ``asyncio.run``'s handler (at a second Ctrl-C), the runtime's own while it
    holds one (api._hold_sigint), and any other written in Python raise it in a frame
    of their own, which its traceback holds. Python's default handler is C code, and
    leaves no frame: its KeyboardInterrupt cannot be told from one the code raised.

    >>> from_sigint_handler(KeyboardInterrupt()), from_sigint_handler(ValueError())
    (False, False)
    """
    if not isinstance(exc, KeyboardInterrupt):
        return False
    import functools  # (only on the error path)
    import signal

    try:
        handler: Any = signal.getsignal(signal.SIGINT)
        while True:  # (asyncio.run's is a functools.partial of a bound method)
            if isinstance(handler, functools.partial):
                handler = handler.func
            elif hasattr(handler, "__func__"):
                handler = handler.__func__
            else:
                break
        code = getattr(handler, "__code__", None)
    except Exception:  # (an interpreter without signals; a handler object of the user's)
        return False
    if code is None:
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def cut_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "..." where it was cut.

    >>> cut_text("abcdefgh", 6)
    'abc...'
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_each(exc: E) -> E:
    """A new exception like ``exc`` (its type, arguments and cause), for one of several
    waiters that fail for one reason: an exception raised in many tasks gathers their
    tracebacks, and a note one adds (``DistributedOptimizer.step`` names the owners
    that stepped) shows in the others' errors. ``exc`` itself when its type cannot be
    made again from its arguments (or not the same again: an ``__init__`` that
    formats its arguments).

    >>> first = WorkerLost("worker 'w1' was lost")
    >>> second = one_each(first)
    >>> second is first, str(second)
    (False, "worker 'w1' was lost")
    """
    try:
        new = type(exc)(*exc.args)
        if str(new) != str(exc):
            return exc
    except Exception:
        return exc
    new.__cause__ = exc.__cause__
    new.__suppress_context__ = exc.__suppress_context__
    return new


class RemoteTraceback(Exception):
    """The traceback of a :class:`RemoteError` as it was formatted on its worker, set as
    the error's ``__cause__`` so that a printed RemoteError shows where it was raised.

    >>> e = ag.RemoteError("w1", "ValueError", "bad", "Traceback ...\\nValueError: bad\\n")
    >>> type(e.__cause__).__name__, str(e)
    ('RemoteTraceback', "ValueError on worker 'w1': bad")
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{_without_our_first_frames(self.text).rstrip(chr(10))}\n"""'


# A frame line of a formatted traceback, in a module of actorgrad's (on any host: the
# path's end only)
_OUR_FRAME = re.compile(r'  File "[^"\n]*[/\\]actorgrad[/\\](?:[a-z_]+[/\\])?[a-z_]+\.py", ')


def _without_our_first_frames(tb: str) -> str:
    """``tb`` without the frames of actorgrad's own before the first of the user's
    (the worker's call of the function: ``_pool_call``, ``_invoke``...), which a user
    reading where their function failed has no use for; a line says how many went."""
    lines = tb.split("\n")
    if not lines or not lines[0].startswith("Traceback (most recent call last):"):
        return tb
    i, frames = 1, 0
    while i < len(lines) and _OUR_FRAME.match(lines[i]):
        frames += 1
        i += 1
        while i < len(lines) and lines[i].startswith("    "):  # (its source, its ^^^)
            i += 1
    if not frames or i >= len(lines) or not lines[i].startswith("  File "):
        return tb  # (none, or nothing but ours: an error of actorgrad's own, kept whole)
    said = f"  ({frames} frame{'s' * (frames > 1)} of actorgrad's own left out)"
    return "\n".join([lines[0], said, *lines[i:]])


class RemoteError(ActorgradError):
    """User code raised an exception on another worker.

    Attributes:
        worker: name of the worker where the exception was raised.
        remote_type: the original exception type: its name for a builtin
            (``"ValueError"``), else module-qualified (``"mypkg.errors.QuotaError"``,
            ``"actorgrad.errors.ProtocolError"``); see :func:`type_name`.
        remote_message: ``str()`` of the original exception.
        remote_traceback: the formatted traceback from the remote worker.

    Example::

        try:
            await ag.rpc("w1", int, ("x",))
        except ag.RemoteError as e:
            assert e.worker == "w1" and e.remote_type == "ValueError"
    """

    def __init__(
        self,
        worker: str,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
    ) -> None:
        self.worker = worker
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(worker, remote_type, remote_message, remote_traceback)
        if remote_traceback:
            # Printed (uncaught, logging.exception, pytest), the error showed the caller's
            # frames only, not where the worker raised it, which it carries: as its cause,
            # the way ProcessPoolExecutor shows a worker's traceback, it is printed first.
            self.__cause__ = RemoteTraceback(remote_traceback)

    @classmethod
    def from_exception(cls, worker: str, exc: BaseException) -> RemoteError:
        """``exc`` raised on ``worker``, as the caller will see it (a RemoteError is
        returned as it is, so the worker where it first happened is kept).

        >>> e = ag.RemoteError.from_exception("w1", ValueError("bad"))
        >>> e.remote_type, str(e), ag.RemoteError.from_exception("w2", e) is e
        ('ValueError', "ValueError on worker 'w1': bad", True)
        """
        if isinstance(exc, RemoteError):
            return exc
        import traceback  # only on the error path

        name = type_name(type(exc))
        # (a broken __str__ must not hide the error itself; nor may one that raises a
        # BaseException (KeyboardInterrupt, SystemExit): let through, it took the worker
        # down (a process worker died of it, an in-process one's loop and the whole
        # driver with it) and the caller got WorkerLost in place of the error reply)
        # (but a real Ctrl-C that came meanwhile goes through: see from_sigint_handler)
        try:
            message = str(exc)
        except BaseException as broken:
            if from_sigint_handler(broken):
                raise
            message = f"<unprintable {name}: its str() raised {type_name(type(broken))}>"
        try:
            # (its __notes__, a property maybe, and its chained errors' are read here)
            te = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
            _named_as_main(te)
            tb = "".join(te.format())
        except BaseException as broken:
            if from_sigint_handler(broken):
                raise
            tb = ""
        # (a message of 200 MB, the repr of a big array: encoding it, twice, held the
        # worker's loop for seconds, and its peers took it for dead)
        return cls(worker, name, clip_text(message, KEEP_OF_ERRORS), clip_text(tb, KEEP_OF_ERRORS))

    def __str__(self) -> str:
        return f"{self.remote_type} on worker {self.worker!r}: {self.remote_message}"

    def __reduce__(  # pragma: no cover - never pickled on the wire, but keep copy() working
        self,
    ) -> tuple[type[RemoteError], tuple[str, str, str, str]]:
        return (
            type(self),
            (self.worker, self.remote_type, self.remote_message, self.remote_traceback),
        )


def _named_as_main(te: Any) -> None:
    """Name the exceptions of the driver's script in traceback ``te`` (and in those
    chained to it, or grouped in it) as the driver has them: a worker process imports
    the script as ``__mp_main__`` (see runtime/calls.py), and its traceback said
    ``__mp_main__.AppError: no`` where ``remote_type`` says ``__main__.AppError`` and
    Python (an in-process worker too) prints ``AppError: no``, the script's own name.
    Only the line that names the type changes: the message is the user's."""
    todo, seen = [te], set()
    while todo:
        t = todo.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        todo += [t.__cause__, t.__context__, *(getattr(t, "exceptions", None) or ())]
        if "exc_type_module" in vars(t):  # (Python 3.13: what it prints the type by)
            if t.exc_type_module == "__mp_main__":
                t.exc_type_module = "__main__"
            continue
        cls = t.exc_type  # (3.11, 3.12: the type itself, which we cannot rename)
        if getattr(cls, "__module__", None) != "__mp_main__":
            continue
        # (the type's line: "__mp_main__.AppError: no", or "...AppError" alone without a
        # message; after the source lines for a SyntaxError's subclass)
        typed = f"__mp_main__.{cls.__qualname__}"

        def as_main(
            *args: Any, _lines: Any = t.format_exception_only, _typed: str = typed, **kw: Any
        ) -> Any:
            done = False
            for line in _lines(*args, **kw):
                if (
                    not done
                    and line.startswith(_typed)
                    and line[len(_typed) : len(_typed) + 1] in (":", "\n")
                ):
                    line, done = line[len("__mp_main__.") :], True
                yield line

        t.format_exception_only = as_main


class WorkerLost(ActorgradError):
    """The peer died, or the connection to it broke, while something depended on it.

    ``peer``: the worker taken for lost, where known (a distributed backward pass's
    failure names it).

    >>> issubclass(ag.WorkerLost, ag.ActorgradError)
    True
    """

    def __init__(self, *args: object, peer: str | None = None) -> None:
        super().__init__(*args)
        self.peer = peer


class RpcTimeout(ActorgradError, TimeoutError):
    """A call did not complete within its timeout; also a ``TimeoutError``.

    >>> isinstance(ag.RpcTimeout("no answer in 1.0 s"), TimeoutError)
    True
    """


class AuthError(ActorgradError):
    """The connection handshake failed: wrong token, or the peer is not an actorgrad worker.

    >>> issubclass(ag.AuthError, ag.ActorgradError)
    True
    """


class ProtocolError(ActorgradError):
    """A malformed, oversized or unknown message was received.

    >>> issubclass(ag.ProtocolError, ag.ActorgradError)
    True
    """


class ContextError(ActorgradError):
    """Misuse of a distributed autograd context: unknown/released id, or nesting.

    >>> issubclass(ag.ContextError, ag.ActorgradError)
    True
    """


# The errors a worker's runtime or protocol (not the user code it runs) refuses a
# message with: a peer's refusal reaches the sender as its own type, not as the
# RemoteError that carried it (a call's refusal, a backward pass's).
_REFUSALS: dict[str, type[ActorgradError]] = {
    type_name(c): c for c in (WorkerLost, ContextError, ProtocolError)
}


def refusal_type(name: Any) -> type[ActorgradError] | None:
    """The error type a peer's refusal named ``name`` (its :func:`type_name`) stands
    for: WorkerLost, ContextError or ProtocolError; None for anything else.

    >>> refusal_type("actorgrad.errors.ContextError") is ContextError
    True
    >>> refusal_type("ValueError") is None
    True
    """
    return _REFUSALS.get(name) if type(name) is str else None
