"""The wire codec: values <-> frames. msgpack only, never pickle; no sockets, no asyncio.

NOTE: this module may import only ``actorgrad.errors``, ``actorgrad.tensor`` (the
``Tensor`` class, lazily), numpy and msgpack. It never imports asyncio or pickle.

Frame layout
============

A frame is what the transport carries after its own prefix (length and tag). All integers
are big-endian::

    offset  size          field
    0       2             magic b"AG"
    2       1             version (1)
    3       1             flags (0, reserved)
    4       4   u32       header_len   (<= MAX_HEADER_BYTES)
    8       4   u32       nbufs        (<= MAX_BUFFERS)
    12      8   u64       body_len
    20      header_len    header: msgpack, a list of plain values (no ext types)
    ...     8 * nbufs     u64 length of each out-of-band buffer
    ...     body_len      body: msgpack with the ext types below
    then, for each buffer i: zero padding up to the next multiple of ALIGN (64)
    counted from the frame start, then buffer i's raw bytes.

The frame ends exactly after the last buffer (no trailing bytes). Without buffers
the frame ends right after the body.

Ext types of the body (each payload is itself msgpack)::

    1  ndarray       [dtype.str, shape, data]  data: bin (inline) or int (buffer index)
    2  numpy scalar  [dtype.str, raw bytes]
    3  tuple         [items...]
    4  Tensor        [dtype.str, shape, data, requires_grad, link]  (data as for ndarray)
    5  RRef          payload returned by hooks.ref_out(ref)
    6  exception     [worker, type_name, message, traceback]  -> RemoteError

Arrays of at least ``OOB_THRESHOLD`` bytes travel out of band: the encoder hands the
transport a ``memoryview`` of the (C-contiguous) array itself, and the decoder returns
``np.frombuffer`` views into the frame buffer (zero copy). Such an array is writable
when the frame buffer is writable (a ``bytearray``), read-only when it is ``bytes``,
and keeps the whole frame buffer alive. Smaller arrays are inlined and always decode
to fresh, writable memory.

Threads
=======

``encode_frame`` and ``decode_frame`` may be called from any thread: each thread
encodes with its own msgpack packers (a ``threading.local``), and decoding keeps no
shared state.

Errors
======

* Encoding a value that cannot travel raises ``TypeError`` naming its type and where
  it sits (``"cannot send value of type 'set' (at body[0][1])"``); values nested too
  deeply (more than ``MAX_DEPTH`` ext levels, about 1000 list/dict levels, or a reference
  cycle) raise ``ValueError``. So does a body whose ext payloads add up to more than
  16x its size plus 1 MiB: msgpack copies each ext payload once per nesting level, and
  the decoder refuses the same amplification.
* Decoding malformed input raises ``actorgrad.errors.ProtocolError`` only; never
  another exception type (except an ``ActorgradError`` raised by a decode hook).
* Exceptions raised by encode hooks propagate unchanged; see ``WireHooks``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import re
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgpack
import numpy as np

from actorgrad.errors import ActorgradError, ProtocolError, RemoteError, short_repr, type_name

__all__ = [
    "ALIGN",
    "MAX_BUFFERS",
    "MAX_DEPTH",
    "MAX_HEADER_BYTES",
    "OOB_THRESHOLD",
    "Frame",
    "WireHooks",
    "WireRef",
    "decode_frame",
    "encode_frame",
    "body_nbytes",
    "frame_nbytes",
    "front_nbytes",
    "join_chunks",
]

#: Arrays with at least this many bytes travel out of band (zero copy).
OOB_THRESHOLD = 64 * 1024
#: Alignment of out-of-band buffers, relative to the frame start.
ALIGN = 64
#: Largest header accepted (encode and decode).
MAX_HEADER_BYTES = 64 * 1024
#: Most out-of-band buffers in one frame.
MAX_BUFFERS = 1 << 16
#: Deepest nesting of ext values (tuples, arrays, tensors, ...) inside one another.
#: Plain lists and dicts are bounded by msgpack itself (about 1000 levels). Decoding
#: takes ~42 KB of C stack per level (each nests an unpacker): 100 levels crashed a
#: thread with a 2 MiB stack, glibc's default under ``ulimit -s unlimited``.
MAX_DEPTH = 32
#: Most list and dict levels, all told, in the tuples that nest in other tuples. Each
#: tuple is packed by a packer of its own, whose limit (about 1000 levels) starts
#: afresh: 98 tuples of 200 list levels each overflowed the C stack (the process died
#: with SIGSEGV, where 1500 levels of plain lists are a ValueError).
MAX_INNER_LEVELS = 1000
#: Most dimensions of a travelling array.
MAX_NDIM = 32
#: Each dimension of a travelling array is below this (numpy takes 2**62 and more in a
#: zero-size array, whose other dimensions multiply within its limit).
DIM_LIMIT = 2**62

EXT_NDARRAY = 1
EXT_SCALAR = 2
EXT_TUPLE = 3
EXT_TENSOR = 4
EXT_REF = 5
EXT_EXCEPTION = 6

_MAGIC = b"AG"
_VERSION = 1
_TAG = _MAGIC + bytes([_VERSION, 0])  # magic, version, flags
_FIXED = struct.Struct(">4sIIQ")
PREFIX_SIZE = _FIXED.size  # 20
_ZEROS = bytes(ALIGN)
_JOIN_BODY_BELOW = 16 * 1024  # bodies smaller than this are copied into the first chunk
_PACKER_BUF_SIZE = 16 * 1024  # initial buffer of each msgpack Packer
_PACKER_KEEP_BYTES = 1 << 20  # a thread's packers are replaced after a larger body
# msgpack hands each ext payload to ext_hook as a copy, so data nested n ext levels
# deep is copied n times. Both sides cap the total size of all ext payloads of a body.
_EXT_FACTOR = 16
_EXT_SLACK = 1 << 20
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

# Every dtype that may travel, by its ``dtype.str`` (explicit byte order). longdouble is
# left out on purpose: its layout differs between platforms.
_DTYPES: dict[str, np.dtype] = {}
for _t in (
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
):
    for _dt in (np.dtype(_t).newbyteorder("<"), np.dtype(_t).newbyteorder(">")):
        _DTYPES[_dt.str] = _dt
del _t, _dt
# dtype -> dtype.str for the encoder (a dict lookup is cheaper than computing .str)
_DTYPE_STR: dict[np.dtype, str] = {dt: s for s, dt in _DTYPES.items()}

# msgpack decodes its own timestamp ext (code -1) without calling ext_hook, so decoded
# values are checked for timestamps (a walk over their containers: never a byte-pattern
# search, which was slow on inline array data). The walk is skipped for small input
# without any 0xff byte (a timestamp's type byte); large input is always walked, as
# scanning its bytes (mostly array data) would cost more than walking its few objects.
_FF_RE = re.compile(rb"\xff")
_SCAN_BELOW = 2048
_NO_BUFFERS: list[memoryview] = []  # (never modified)


def _may_hold_timestamp(buf: memoryview) -> bool:
    return buf.nbytes >= _SCAN_BELOW or _FF_RE.search(buf) is not None


class WireHooks(Protocol):
    """What the codec calls back into; every method is optional (the codec uses what exists).

    Exceptions raised by ``tensor_out``/``ref_out`` propagate out of ``encode_frame``
    unchanged. In ``Frame.body``, an ``ActorgradError`` raised by ``tensor_in``/``ref_in``
    propagates unchanged; any other exception becomes a ``ProtocolError`` (the peer sent
    something the hook cannot use) with the original as ``__cause__``.
    An optional ``worker_name: str`` attribute names the worker in encoded exceptions.
    """

    def tensor_out(self, t: Any) -> Any:
        """Link info (msgpack-able) for a tensor that requires grad, or None."""

    def tensor_in(self, array: np.ndarray, requires_grad: bool, link: Any) -> Any:
        """Build the Tensor for a received array."""

    def ref_out(self, ref: WireRef) -> list[Any]:
        """Payload (msgpack-able) for an RRef."""

    def ref_in(self, payload: list[Any]) -> Any:
        """Rebuild an RRef from its payload."""

    def check_nbytes(self, nbytes: int) -> None:
        """Raise if a frame of ``nbytes`` could not be sent (asked before a strided
        array is copied into a contiguous one: the copy may be only to be refused;
        ``nbytes`` counts every array of the frame so far, this one included)."""


class WireRef:
    """Marker base class for remote references; ``runtime.RRef`` subclasses it.

    The codec sends a ``WireRef`` as ``hooks.ref_out(ref)`` and rebuilds it with
    ``hooks.ref_in(payload)``.
    """

    __slots__ = ()


# --------------------------------------------------------------------------- helpers


_tensor_cls: type | None = None
_tensor_checked = False


def _tensor_class() -> type | None:
    """``actorgrad.tensor.Tensor``, imported on first use (None while it does not exist)."""
    global _tensor_cls, _tensor_checked
    if not _tensor_checked:
        try:
            from actorgrad.tensor import Tensor
        except ModuleNotFoundError as exc:  # the tensor layer is not there (yet)
            if exc.name != "actorgrad.tensor":
                raise
            _tensor_cls = None
        else:
            _tensor_cls = Tensor
        _tensor_checked = True
    return _tensor_cls


_type_name = type_name  # (short local name, used in many messages)

#: How body strs are encoded: a str holding lone surrogates (what ``os.fsdecode`` and
#: ``os.listdir`` give for file names that are not UTF-8) travels as it is; strict
#: UTF-8 refused it ("not valid UTF-8"), though every str is one.
STR_ERRORS = "surrogatepass"


def _clean_str(s: object) -> str:
    """A str that msgpack can encode (lone surrogates escaped)."""
    if type(s) is not str:
        try:
            s = str(s)
        except BaseException:  # (a KeyboardInterrupt from a __str__: see from_exception)
            return "<unprintable>"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


class _HookError(Exception):
    """Carries an exception raised by a hook through msgpack, to re-raise it unchanged."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc


class _Unsendable(TypeError):
    """Raised inside msgpack's ``default`` for a value that cannot travel; ``hint``
    follows the value's place in the message."""

    def __init__(self, obj: Any, reason: str, hint: str = "") -> None:
        super().__init__(reason + hint)
        self.obj = obj
        self.reason = reason
        self.hint = hint


class _TooDeep(ValueError):
    pass


#: The containers the error path walks into (those that can hold what is looked for).
_WALKED: tuple[type, ...] = (list, tuple, dict)


def _starts(root: Any, root_name: str | tuple[str, ...]) -> Iterator[tuple[Any, str]]:
    """What the walks of ``_locate`` and ``_cycle`` start from, each value with its
    name: ``root`` itself, or, when ``root_name`` names its items (a call's ``("args",
    "kwargs")``), those items."""
    if isinstance(root_name, str):
        return iter(((root, root_name),))
    return zip(root, root_name, strict=False)


def _locate(root: Any, root_name: str | tuple[str, ...], pred: Callable[[Any], bool]) -> str | None:
    """Path (like ``body[0]['x']``) of the first value in ``root`` matching ``pred``;
    ``root_name``: the root's name, or its items' (a call's ``("args", "kwargs")``:
    ``args[1]``, not ``body[0][1]``).

    Only used on the error path, to say where an unsendable value sits.
    """
    # Iterative, depth first, each container's items named as they are reached: a
    # recursive walk raised RecursionError in place of the error it was to place, for
    # a value 500 levels deep; and a nested walk function referred to itself through
    # its closure, a cycle that held pred, and with it the value looked for (a failed
    # call's argument, a big array maybe), until a gc run.
    tensor_cls = _tensor_class()
    kinds = _WALKED if tensor_cls is None else (*_WALKED, tensor_cls)
    seen: set[int] = set()
    top = 0 if isinstance(root_name, str) else 1  # (1: it starts a level down, at the items)
    todo: list[Iterator[tuple[Any, str]]] = [_starts(root, root_name)]
    while todo:
        nxt = next(todo[-1], None)
        if nxt is None:
            todo.pop()
            continue
        x, path = nxt
        if pred(x):
            return path
        if top + len(todo) > 601:  # (x is that many levels deep, less one)
            continue
        if isinstance(x, (list, tuple)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            todo.append(_items_named(x, path, kinds, pred))
        elif isinstance(x, dict):
            if id(x) in seen:
                continue
            seen.add(id(x))
            todo.append(_entries_named(x, path, kinds, pred))
        elif tensor_cls is not None and isinstance(x, tensor_cls):
            todo.append(iter(((getattr(x, "data", None), f"{path}.data"),)))
    return None


def _cycle(root: Any, root_name: str | tuple[str, ...]) -> str | None:
    """Where ``root`` holds a list, tuple or dict inside itself, as ``"body[0][1] is
    body again"`` (None: nowhere). Iterative, as ``_locate``; only on the error path."""
    # Each container on the way keeps only the step to it (``[1]``, ``['k']``), its path
    # joined once a cycle is found: with a path of its own each, as long as its depth,
    # a chain of pairs (value, next) 10,000 deep, refused as too deep at once, took
    # ~150 MB and 0.6 s to be told so (40,000: 2.4 GB, 11 s), on a worker's loop.
    on_path: dict[int, int] = {}  # (the containers being walked, by id: their depth)
    done: set[int] = set()
    todo: list[tuple[Iterator[tuple[Any, str]], int | None]] = [(_starts(root, root_name), None)]
    steps: list[str] = []  # (the step to each container being walked, the root's name first)
    while todo:
        items, key = todo[-1]
        nxt = next(items, None)
        if nxt is None:
            todo.pop()
            if key is not None:
                del on_path[key]
                done.add(key)
                steps.pop()
            continue
        x, step = nxt
        if isinstance(x, (list, tuple, dict)):
            i = id(x)
            if i in on_path:
                return f"{''.join(steps)}{step} is {''.join(steps[: on_path[i] + 1])} again"
            if i in done:  # (the same container twice, not inside itself)
                continue
            on_path[i] = len(steps)
            steps.append(step)
            if isinstance(x, dict):
                todo.append((_entries_named(x, "", _WALKED, None), i))
            else:
                todo.append((_items_named(x, "", _WALKED, None), i))
    return None


def _items_named(
    x: list[Any] | tuple[Any, ...],
    path: str,
    kinds: tuple[type, ...],
    pred: Callable[[Any], bool] | None,
) -> Iterator[tuple[Any, str]]:
    """The items of list or tuple ``x`` (those it holds, as they were packed: a
    subclass's own __iter__ may yield others, or raise, in place of the error being
    located) that are of ``kinds`` (containers to walk into) or match ``pred``, each
    with its path: only theirs formatted (a list of 2 million ints took seconds to
    name item by item, on the error path of a worker's loop)."""
    items: Callable[[Any], Iterator[Any]] = list.__iter__ if isinstance(x, list) else tuple.__iter__
    if pred is None and not any(issubclass(t, kinds) for t in set(map(type, items(x)))):
        return iter(())  # (one pass in C: no container in it)
    picked = [
        (i, v)
        for i, v in enumerate(items(x))
        if isinstance(v, kinds) or (pred is not None and pred(v))
    ]
    return ((v, f"{path}[{i}]") for i, v in picked)


def _entries_named(
    d: dict[Any, Any], path: str, kinds: tuple[type, ...], pred: Callable[[Any], bool] | None
) -> Iterator[tuple[Any, str]]:
    """As ``_items_named``, for a dict's keys and values (each key, then its value)."""
    for k, v in dict.items(d):
        if isinstance(k, kinds) or (pred is not None and pred(k)):
            yield k, f"{path}<key {short_repr(k)}>"
        if isinstance(v, kinds) or (pred is not None and pred(v)):
            yield v, f"{path}[{short_repr(k)}]"


def _root_name(where: str | tuple[str, ...]) -> str:
    """How messages name a whole body named ``where`` (see ``_locate``)."""
    return where if isinstance(where, str) else "/".join(where)


def _int_out_of_range(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and not (_INT_MIN <= x <= _INT_MAX)


def _at(path: str | None) -> str:
    return f" (at {path})" if path else ""


# --------------------------------------------------------------------------- encoding


def _dtype_str(obj: Any, dtype: np.dtype) -> str:
    dstr = _DTYPE_STR.get(dtype)
    if dstr is None:
        raise _Unsendable(
            obj,
            f"cannot send numpy data of dtype {str(dtype)!r}: only bool and numeric dtypes "
            "(int8..int64, uint8..uint64, float16/32/64, complex64/128) travel",
        )
    return dstr


class _Encoder:
    """Per-thread encoding state: one msgpack Packer per ext nesting level."""

    __slots__ = (
        "packers",
        "header_packer",
        "buffers",
        "hooks",
        "depth",
        "levels",
        "ext_bytes",
        "array_bytes",
        "busy",
        "_dispatch",
    )

    def __init__(self) -> None:
        self.packers: list[msgpack.Packer] = []
        self.header_packer = _new_header_packer()
        self.buffers: list[memoryview] = []
        self.hooks: Any = None
        self.depth = 0
        self.levels = 0  # (list/dict levels of the tuples packed below depth 1: see nested)
        self.ext_bytes = 0
        self.array_bytes = 0  # (the bytes of the arrays packed so far by _array_payload)
        self.busy = False
        self._dispatch: dict[type, Callable[[_Encoder, Any], Any]] = _DISPATCH

    def packer(self, depth: int) -> msgpack.Packer:
        packers = self.packers
        while len(packers) <= depth:
            packers.append(
                msgpack.Packer(
                    use_bin_type=True,
                    strict_types=True,
                    default=self.default,
                    buf_size=_PACKER_BUF_SIZE,
                    unicode_errors=STR_ERRORS,
                )
            )
        return packers[depth]

    def encode(
        self, header: list[Any], body: Any, hooks: Any, where: str | tuple[str, ...] = "body"
    ) -> list[bytes | memoryview]:
        if type(header) is not list and not isinstance(header, (list, tuple)):
            raise TypeError(f"frame header must be a list, not {_type_name(type(header))}")
        self.busy = True
        self.hooks = hooks
        # (buffers: the fresh list the last encode left; depth and levels: 0, as every
        # encode leaves them, but one that failed part way, which resets them)
        self.ext_bytes = 0
        self.array_bytes = 0
        hook_exc: BaseException | None = None
        ok = False
        try:
            try:
                hbytes = self.header_packer.pack(header)
            except (TypeError, OverflowError, ValueError) as exc:
                raise _packing_error(exc, header, "header") from None
            if len(hbytes) > MAX_HEADER_BYTES:
                self.header_packer = _new_header_packer()  # drop its grown buffer
                raise ValueError(
                    f"frame header is {len(hbytes)} bytes, more than MAX_HEADER_BYTES "
                    f"({MAX_HEADER_BYTES}){_bulk_of(header)}"
                )
            try:
                packers = self.packers
                bbytes = (packers[0] if packers else self.packer(0)).pack(body)
            except _HookError as h:
                hook_exc = h.exc
            except (TypeError, OverflowError, ValueError, BufferError) as exc:
                raise _packing_error(exc, body, where) from None
            buffers = self.buffers
            if hook_exc is None and self.ext_bytes and self.ext_bytes > _ext_budget(len(bbytes)):
                raise ValueError(
                    f"cannot send {_root_name(where)}: its nested tuples/arrays/tensors hold "
                    f"{self.ext_bytes} bytes of payload for a {len(bbytes)}-byte body "
                    f"(more than {_EXT_FACTOR}x); nest large data less deeply"
                )
            ok = hook_exc is None and len(bbytes) <= _PACKER_KEEP_BYTES
        finally:
            self.busy = False
            self.hooks = None
            self.buffers = []
            if not ok:
                # msgpack packers never shrink their buffer: after a large body or an
                # error (whose partial output may have been large), start afresh.
                self.packers = []
                self.header_packer = _new_header_packer()
                self.depth = self.levels = 0
        if hook_exc is not None:
            try:
                raise hook_exc
            finally:
                # (its traceback holds this frame: the local made a cycle that kept the
                # body, a call's arguments, big arrays maybe, alive until a gc run)
                hook_exc = None
        return _assemble(hbytes, bbytes, buffers)

    # msgpack calls this for every value it does not handle natively.
    def default(self, obj: Any) -> Any:
        t = type(obj)
        if t is tuple:  # the hot path (call arguments): inlined
            depth = self.depth + 1
            if depth > MAX_DEPTH:
                raise _TooDeep(f"value nested more than {MAX_DEPTH} levels deep")
            items = list(obj)
            if depth > 1:  # (a tuple in a tuple: rare, and only there can lists nest deep)
                return self.nested(EXT_TUPLE, items)
            self.depth = depth
            packers = self.packers
            data = (packers[depth] if depth < len(packers) else self.packer(depth)).pack(items)
            self.ext_bytes += len(data)
            self.depth = depth - 1  # (after an exception, encode() resets the depth)
            return _new_ext(EXT_TUPLE, data)
        if t is np.ndarray:  # the next hot path (gradients, small arrays): inlined
            dstr = _DTYPE_STR.get(obj.dtype)
            # (not a zero-size one: its shape may be past what travels, _array_payload)
            if dstr is not None and 0 < obj.nbytes < OOB_THRESHOLD and obj.ndim <= MAX_NDIM:
                if not obj.flags.c_contiguous:
                    obj = obj.copy()  # (C order) e.g. a broadcast gradient
                return self.nested(EXT_NDARRAY, [dstr, list(obj.shape), memoryview(obj)])
        handler = self._dispatch.get(t)
        if handler is None:
            handler = _resolve(t)
        return handler(self, obj)

    def nested(self, code: int, value: Any) -> msgpack.ExtType:
        depth = self.depth + 1
        if depth > MAX_DEPTH:
            raise _TooDeep(f"value nested more than {MAX_DEPTH} levels deep")
        levels = 0
        if code == EXT_TUPLE and depth > 1:
            # (the tuples of depth 1 and the body have msgpack's limit each: all told
            # the levels below them stay within MAX_INNER_LEVELS, see there)
            levels = _levels(value, MAX_INNER_LEVELS - self.levels)
            if self.levels + levels > MAX_INNER_LEVELS:
                raise _TooDeep(
                    f"value nests lists and dicts more than {MAX_INNER_LEVELS} levels deep "
                    "in tuples inside tuples"
                )
            self.levels += levels
        self.depth = depth
        packers = self.packers
        data = (packers[depth] if depth < len(packers) else self.packer(depth)).pack(value)
        self.ext_bytes += len(data)
        self.depth = depth - 1  # (after an exception, encode() resets depth and levels)
        self.levels -= levels
        return _new_ext(code, data)


def _levels(value: list[Any], limit: int) -> int:
    """How deep lists and dicts nest in ``value`` (itself a level; tuples in it not
    looked into: they count when packed), or more than ``limit`` once past it (a
    cycle too). Iterative: the value may be deeper than Python's recursion limit."""
    deepest = 1
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        seq, level = todo.pop()
        if level > deepest:
            deepest = level
            if deepest > limit:
                break
        # (the items a subclass holds, as they are packed: its own __iter__, keys() or
        # values() hid its items, and their depth overflowed the C stack, or raised)
        items = (
            (*dict.keys(seq), *dict.values(seq)) if isinstance(seq, dict) else list.__iter__(seq)
        )
        for x in items:
            if isinstance(x, (list, dict)):  # (a key too: a hashable list subclass)
                todo.append((x, level + 1))
    return deepest


def _ext_budget(body_len: int) -> int:
    """Most bytes all ext payloads of a body of ``body_len`` bytes may add up to."""
    return _EXT_FACTOR * body_len + _EXT_SLACK


def _new_ext(code: int, data: bytes) -> msgpack.ExtType:
    """``msgpack.ExtType(code, data)`` without its Python-level argument checks."""
    return tuple.__new__(msgpack.ExtType, (code, data))


def _new_header_packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, default=_header_default, buf_size=_PACKER_BUF_SIZE)


def _packing_error(exc: BaseException, root: Any, where: str | tuple[str, ...]) -> Exception:
    """Turn an exception from msgpack's pack into the codec's TypeError/ValueError."""
    # (raised from None, the error still holds exc as its __context__: exc's traceback
    # reaches, through its frames' f_back, the frames of encode_frame's callers, and a
    # caller that keeps the error in a local of such a frame (a future failed with it)
    # made a cycle, with the call's arguments, kept until a gc run)
    exc.__traceback__ = None
    name = _root_name(where)
    if isinstance(exc, _Unsendable):
        bad = exc.obj
        path = _locate(root, where, lambda x: x is bad)
        return TypeError(f"{exc.reason}{_at(path)}{exc.hint}")
    if isinstance(exc, OverflowError):
        path = _locate(root, where, _int_out_of_range)
        return TypeError(f"cannot send int: value does not fit in 64 bits{_at(path)}")
    too_deep = isinstance(exc, ValueError) and "recursion limit" in str(exc)
    if too_deep or isinstance(exc, _TooDeep):
        # (a cycle is told as one: through a tuple, it was "value nested more than 32
        # levels deep", which sent its sender looking for deep data)
        cycle = _cycle(root, where)
        if cycle is not None:
            return ValueError(f"cannot send {name}: it contains a reference cycle ({cycle})")
        if too_deep:
            return ValueError(
                f"cannot send {name}: nested too deeply (about 1000 list/dict levels)"
            )
        return ValueError(f"cannot send {name}: {exc}")
    if isinstance(exc, BufferError):  # (msgpack packs a contiguous memoryview as bytes)
        path = _locate(root, where, lambda x: isinstance(x, memoryview) and not x.c_contiguous)
        return TypeError(
            f"cannot send a memoryview that is not C-contiguous{_at(path)}: send "
            "bytes(view), or the numpy array it views"
        )
    if isinstance(exc, ValueError) and "too large" in str(exc):
        # (one bytes/str value of 4 GiB or more: msgpack's limit, far above the largest
        # frame; as for a message over that, before anything is sent)
        return ProtocolError(
            f"cannot send {name}: {exc} (one value of 4 GiB or more; a message is at most "
            "the largest frame): send large data in parts"
        )
    if isinstance(exc, UnicodeEncodeError):
        path = _locate(root, where, lambda x: isinstance(x, str) and not _utf8_ok(x))
        return ValueError(f"cannot send str that is not valid UTF-8{_at(path)}")
    if isinstance(exc, TypeError) and name == "header":
        # msgpack's own "can not serialize 'X' object"
        return TypeError(f"cannot send header value: {exc}")
    if isinstance(exc, TypeError):
        return TypeError(f"cannot send {name}: {exc}")
    return ValueError(f"cannot send {name}: {exc}")


def _bulk_of(header: list[Any]) -> str:
    """Where the bulk of a header too large sits, as ``" (at header[2]: 'mod:ff...,
    70004 bytes)"``: its largest item, and in that, while one holds more than half of
    it, that one (a few levels at most: each packs its items again). Only on the error
    path: the size alone named nothing (a call's function name 70 KB long, say)."""
    x: Any = header
    path, whole, named = "header", 0, ""
    for _ in range(8):
        # (every item, named as the walks name them; a list's as it was packed)
        if isinstance(x, dict):
            kids = list(_entries_named(x, path, (), _every))
        elif isinstance(x, (list, tuple)):
            kids = list(_items_named(x, path, (), _every))
        else:
            break
        if not kids:
            break
        sizes = [len(msgpack.packb(k, use_bin_type=True)) for k, _ in kids]
        i = max(range(len(kids)), key=sizes.__getitem__)
        if named and sizes[i] * 2 <= whole:
            break  # (no one item holds most of it: the container is named)
        (x, path), whole = kids[i], sizes[i]
        named = f" (at {path}: {short_repr(x)}, {whole} bytes)"
    return named


def _every(x: Any) -> bool:
    return True


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _header_default(obj: Any) -> Any:
    raise _Unsendable(obj, f"cannot send header value of type {_type_name(type(obj))!r}")


def _enc_tuple_subclass(enc: _Encoder, obj: tuple[Any, ...]) -> msgpack.ExtType:
    # (its items as the tuple holds them: list(obj) would call a subclass's __iter__)
    return enc.nested(EXT_TUPLE, list(tuple.__iter__(obj)))


def _shape_problem(shape: list[int], dstr: str, itemsize: int) -> str | None:
    """What keeps an array of ``shape`` (ints) and dtype ``dstr`` from travelling (None:
    nothing): the one rule of the sender (``_array_payload``) and the receiver
    (``_array_from``), so that what one sends the other takes."""
    for d in shape:
        if not 0 <= d < DIM_LIMIT:
            return (
                f"bad array dimension {d} in shape {tuple(shape)}: each must be in "
                f"0..{DIM_LIMIT - 1}"
            )
    if math.prod(d for d in shape if d) * itemsize > sys.maxsize:
        # (numpy's own "array is too big" named no shape; zero-size ones get here)
        return (
            f"array of shape {tuple(shape)} and dtype {dstr} is too big: its nonzero "
            "dimensions multiply past 2**63 bytes"
        )
    return None


def _array_payload(enc: _Encoder, arr: np.ndarray) -> list[Any]:
    """``[dtype.str, shape, data]``: data is the raw bytes (inline) or a buffer index."""
    dstr = _dtype_str(arr, arr.dtype)
    if arr.ndim > MAX_NDIM:
        # (numpy allows 64: the receiver would refuse the whole message, after the
        # tensors before this one had made their half of a distributed autograd link)
        raise _Unsendable(
            arr, f"cannot send an array of {arr.ndim} dimensions: at most {MAX_NDIM} travel"
        )
    shape = list(arr.shape)
    # (an empty array of shape (0, 2**62) was sent, and the receiver refused the whole
    # message, as above. Only a zero-size array, or one of 2**62 bytes or more, can
    # have a shape past the rule: numpy keeps the others' bytes within 2**63, so the
    # rule's 0.4 us a tensor is spent on those alone)
    if not 0 < arr.nbytes < DIM_LIMIT:
        problem = _shape_problem(shape, dstr, arr.dtype.itemsize)
        if problem is not None:
            raise _Unsendable(arr, f"cannot send an array: {problem}")
    enc.array_bytes += arr.nbytes
    if not arr.flags.c_contiguous:
        check = getattr(enc.hooks, "check_nbytes", None)
        if check is not None:
            # (a 3 GB transposed view was copied, then refused; so were two 1.5 GiB
            # broadcast views, each within the limit: the frame holds all the arrays)
            check(enc.array_bytes)
        arr = np.ascontiguousarray(arr)  # one copy: unavoidable for a strided layout
    if arr.nbytes < OOB_THRESHOLD:
        # msgpack copies it in as bin
        return [dstr, shape, memoryview(arr)]  # type: ignore[arg-type]
    bufs = enc.buffers
    if len(bufs) >= MAX_BUFFERS:
        raise ValueError(f"more than MAX_BUFFERS ({MAX_BUFFERS}) large arrays in one frame")
    # a flat byte view (format "B", len == nbytes) of the array's own memory: no copy
    bufs.append(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    return [dstr, shape, len(bufs) - 1]


def _enc_array(enc: _Encoder, arr: np.ndarray) -> msgpack.ExtType:
    return enc.nested(EXT_NDARRAY, _array_payload(enc, arr))


def _enc_array_subclass(enc: _Encoder, arr: np.ndarray) -> msgpack.ExtType:
    plain = np.asarray(arr)
    try:
        return _enc_array(enc, plain)
    except _Unsendable as exc:
        if exc.obj is plain:
            # (the value in the message is the subclass: the plain view of it is found
            # nowhere there, and the error said no place)
            exc.obj = arr
        raise


def _enc_scalar(enc: _Encoder, obj: np.generic) -> msgpack.ExtType:
    return enc.nested(EXT_SCALAR, [_dtype_str(obj, obj.dtype), obj.tobytes()])


def _enc_tensor(enc: _Encoder, t: Any) -> msgpack.ExtType:
    data = t.data
    if not isinstance(data, np.ndarray):
        raise _Unsendable(t, f"cannot send Tensor whose .data is {_type_name(type(data))!r}")
    requires_grad = bool(t.requires_grad)
    if requires_grad and data.dtype.kind != "f":
        # (its .data replaced by integers, say: the receiver refuses such a tensor)
        raise _Unsendable(
            t,
            f"cannot send a Tensor of dtype {str(data.dtype)!r} that requires grad: only "
            "floating-point tensors can require grad (was its .data replaced?)",
        )
    link = None
    hooks = enc.hooks
    if requires_grad and hooks is not None:
        tensor_out = getattr(hooks, "tensor_out", None)
        if tensor_out is not None:
            try:
                link = tensor_out(t)
            except Exception as exc:
                raise _HookError(exc) from exc
    payload = _array_payload(enc, data)
    payload.append(requires_grad)
    payload.append(link)
    return enc.nested(EXT_TENSOR, payload)


def _enc_ref(enc: _Encoder, ref: WireRef) -> msgpack.ExtType:
    ref_out = getattr(enc.hooks, "ref_out", None) if enc.hooks is not None else None
    if ref_out is None:
        raise _Unsendable(
            ref,
            f"cannot send value of type {_type_name(type(ref))!r} without a runtime "
            "(no ref_out hook)",
        )
    try:
        payload = ref_out(ref)
    except Exception as exc:
        raise _HookError(exc) from exc
    return enc.nested(EXT_REF, payload)


def _enc_exception(enc: _Encoder, e: BaseException) -> msgpack.ExtType:
    if isinstance(e, RemoteError):
        record = [e.worker, e.remote_type, e.remote_message, e.remote_traceback]
    else:
        worker = getattr(enc.hooks, "worker_name", "") if enc.hooks is not None else ""
        r = RemoteError.from_exception(worker or "", e)
        record = [r.worker, r.remote_type, r.remote_message, r.remote_traceback]
    return enc.nested(EXT_EXCEPTION, [_clean_str(s) for s in record])


def _convert(conv: Callable[[Any], Any]) -> Callable[[_Encoder, Any], Any]:
    def handler(enc: _Encoder, obj: Any) -> Any:
        return conv(obj)

    return handler


# The base value of an instance of a subclass, read from the base type's own storage.
# ``str(obj)``, ``list(obj)`` and the like call the subclass's ``__str__``/``__iter__``:
# a member of ``class Mode(str, Enum)`` arrived as "Mode.TRAIN", not as its value.
_BASE_VALUE: dict[type, Callable[[Any], Any]] = {
    int: int.__int__,
    float: float.__float__,
    str: str.__str__,
    bytes: bytes.__bytes__,
    bytearray: lambda b: bytes(memoryview(b)),
    list: list.copy,
    dict: dict.copy,
}


def _unsendable(enc: _Encoder, obj: Any) -> Any:
    raise _Unsendable(
        obj, f"cannot send value of type {_type_name(type(obj))!r}", _unsendable_hint(obj)
    )


def _unsendable_hint(obj: Any) -> str:
    """What to send instead of a function, a class or an object of a class of the
    program's own (a PyTorch program pickles them: its RPC tutorials send a method to
    run on an RRef's owner, ``_remote_method(Net.forward, rref, x)``, and modules)."""
    if isinstance(obj, (type, functools.partial)) or inspect.isroutine(obj):
        return (
            ": functions and classes do not travel as values (nothing is pickled): give "
            "the function as the call's fn (ag.rpc(worker, fn, args)), and run a method "
            "of an RRef's value on its owner with `await rref.rpc().method(...)`"
        )
    if inspect.iscoroutine(obj):  # (an `await` forgotten: the type alone did not say so)
        return (
            ": a coroutine is what calling an async function gives: await it first "
            "(`await f(...)`) and send its result"
        )
    module = type(obj).__module__
    root = module.partition(".")[0]
    if module == "builtins" or root == "numpy":
        return ""  # (a set, a generator, a masked array: the type says enough)
    if hasattr(type(obj), "__array__"):  # (a torch tensor, a pandas Series...)
        return (
            ": an array of another library does not travel as it is: send it as a numpy "
            "array (np.asarray(x); a torch tensor: x.detach().numpy())"
        )
    if isinstance(obj, enum.Enum):  # (a config's value: not an object to make remotely)
        return (
            ": an Enum member does not travel (nothing is pickled): send its value "
            f"(member.value) and look it up on the other side ({type(obj).__name__}(value)), "
            "or derive the enum from str or int (it travels as its value then)"
        )
    if dataclasses.is_dataclass(obj):  # (a config: its fields travel)
        return (
            ": a dataclass does not travel (nothing is pickled): send its fields "
            "(dataclasses.asdict(obj)) and make it again on the other side "
            f"({type(obj).__name__}(**fields))"
        )
    if root in sys.stdlib_module_names:  # (a datetime, a Path, a Decimal...)
        return (
            ": send it as plain values (a str, numbers, bytes, lists, dicts) and make it "
            "again on the other side"
        )
    return (
        ": objects of other classes do not travel (nothing is pickled): make the object "
        "on the worker that uses it (ag.remote(worker, Class, args)) and pass its RRef, "
        "or send the data it holds (a Module's state_dict())"
    )


def _unsendable_control(enc: _Encoder, obj: Any) -> Any:
    raise _Unsendable(
        obj,
        f"cannot send value of type {_type_name(type(obj))!r}: "
        "cancellation and KeyboardInterrupt do not travel",
    )


def _unsendable_dtype(enc: _Encoder, obj: Any) -> Any:
    dtype = getattr(obj, "dtype", None)
    raise _Unsendable(
        obj,
        f"cannot send value of type {_type_name(type(obj))!r} (dtype {str(dtype)!r}): "
        "only bool and numeric numpy data travel",
    )


# (no entry for tuple: _Encoder.default packs a plain tuple itself, before any lookup)
_DISPATCH_BASE: dict[type, Callable[[_Encoder, Any], Any]] = {
    np.ndarray: _enc_array,
    RemoteError: _enc_exception,  # (an error reply needs no lookup that could fail)
}
_DISPATCH = dict(_DISPATCH_BASE)
#: Most types _DISPATCH keeps; past it, it starts again from _DISPATCH_BASE. Its keys
#: hold their types alive: a namedtuple (an exception class, an enum) made in a
#: function at each step was kept for good, one class a step (5 KB each).
_DISPATCH_MAX = 1024


def _resolve(t: type) -> Callable[[_Encoder, Any], Any]:
    """Pick (and cache, per type) the encoder for a type msgpack does not handle."""
    handler: Callable[[_Encoder, Any], Any]
    cache = True
    tensor_cls = _tensor_class()
    aio = sys.modules.get("asyncio")
    # (numpy.ma only if it was imported: numpy 2 imports it lazily at ``np.ma``, which
    # opens files; a process out of them failed to encode every reply of a new type, its
    # error reply too, and the caller waited for good. No masked array exists without it)
    ma = sys.modules.get("numpy.ma")
    if ma is not None and issubclass(t, ma.MaskedArray):
        handler = _unsendable
    elif issubclass(t, np.ndarray):
        handler = _enc_array_subclass
    elif issubclass(t, np.generic) and np.dtype(t).str in _DTYPES:
        handler = _enc_scalar
    elif tensor_cls is not None and issubclass(t, tensor_cls):
        handler = _enc_tensor
    elif issubclass(t, WireRef):
        handler = _enc_ref
    elif issubclass(t, KeyboardInterrupt) or (
        aio is not None and issubclass(t, aio.CancelledError)
    ):
        handler = _unsendable_control
    elif issubclass(t, BaseException):
        handler = _enc_exception
    elif issubclass(t, tuple):
        handler = _enc_tuple_subclass  # namedtuple & co travel as plain tuples
    elif issubclass(t, np.generic) and issubclass(t, (str, bytes)):
        handler = _convert(_BASE_VALUE[str if issubclass(t, str) else bytes])
    elif issubclass(t, np.generic):
        handler = _unsendable_dtype
    elif issubclass(t, bool):
        handler = _convert(bool)
    elif base := next((b for b in _BASE_VALUE if issubclass(t, b)), None):
        handler = _convert(_BASE_VALUE[base])
    else:
        handler = _unsendable
        cache = False
    if cache:
        if len(_DISPATCH) >= _DISPATCH_MAX:
            # (in place: each thread's encoder refers to this dict; the types in use
            # come back at their next lookup)
            _DISPATCH.clear()
            _DISPATCH.update(_DISPATCH_BASE)
        _DISPATCH[t] = handler
    return handler


def _assemble(hbytes: bytes, bbytes: bytes, buffers: list[memoryview]) -> list[bytes | memoryview]:
    nbufs = len(buffers)
    fixed = _FIXED.pack(_TAG, len(hbytes), nbufs, len(bbytes))
    if not nbufs:
        return [b"".join((fixed, hbytes, bbytes))]
    sizes = [b.nbytes for b in buffers]
    lengths = struct.pack(f">{nbufs}Q", *sizes)
    pos = PREFIX_SIZE + len(hbytes) + len(lengths) + len(bbytes)
    pad = -pos % ALIGN
    chunks: list[bytes | memoryview]
    if len(bbytes) < _JOIN_BODY_BELOW:
        chunks = [b"".join((fixed, hbytes, lengths, bbytes, _ZEROS[:pad]))]
    else:
        chunks = [b"".join((fixed, hbytes, lengths)), bbytes]
        if pad:
            chunks.append(_ZEROS[:pad])
    pos += pad
    for buf, size in zip(buffers, sizes, strict=True):
        pad = -pos % ALIGN
        if pad:
            chunks.append(_ZEROS[:pad])
            pos += pad
        chunks.append(buf)
        pos += size
    return chunks


_local = threading.local()


def encode_frame(
    header: list[Any], body: Any, hooks: object | None = None, where: str | tuple[str, ...] = "body"
) -> list[bytes | memoryview]:
    """Encode one frame; returns chunks whose concatenation is the frame.

    ``header`` is a small list of plain values (ints, strs, None, lists, dicts; tuples
    become lists); ``body`` is any travelling value. Large arrays are not copied: their
    memory is referenced by ``memoryview`` chunks, so write the chunks (e.g. with
    ``transport.writelines``) before mutating those arrays.

    ``hooks`` is an object with any of the ``WireHooks`` methods (and optionally a
    ``worker_name`` attribute); see the module docstring. ``where`` names the body in
    errors: ``"result"`` says ``(at result[2])``; a tuple names the body's items, so
    a call's ``[args, kwargs]`` with ``("args", "kwargs")`` says ``(at args[1])``.

    Raises:
        TypeError: a value cannot travel (names its type and where it sits), an int
            does not fit in 64 bits, an array dtype is not bool/numeric, or an RRef is
            sent without a ``ref_out`` hook.
        ValueError: the value is nested too deeply, contains a reference cycle, nests
            large data so deeply that its ext payloads exceed 16x the body size, has
            more than ``MAX_BUFFERS`` large arrays, or the header is larger than
            ``MAX_HEADER_BYTES``.
        ProtocolError: one bytes or str value of 4 GiB or more (msgpack's limit).

    Exceptions raised by the hooks propagate unchanged.

    Example::

        >>> chunks = encode_frame([0, 17, "mod:fn", None], ((1, 2), {}))
        >>> frame = decode_frame(b"".join(chunks))
        >>> frame.header, frame.body()
        ([0, 17, 'mod:fn', None], ((1, 2), {}))
    """
    enc: _Encoder | None = getattr(_local, "encoder", None)
    if enc is None:
        enc = _local.encoder = _Encoder()
    elif enc.busy:  # re-entered from a hook: use a fresh encoder
        enc = _Encoder()
    return enc.encode(header, body, hooks, where)


def frame_nbytes(chunks: list[bytes | memoryview]) -> int:
    """Total size of the frame made of ``chunks`` (what the length prefix holds)."""
    return sum(c.nbytes if isinstance(c, memoryview) else len(c) for c in chunks)


def front_nbytes(first: bytes | bytearray | memoryview, size: int) -> int:
    """How many leading bytes of a frame of ``size`` bytes, whose first chunk (or all
    of it) is ``first``, hold its fixed prefix, header, buffer lengths and msgpack body:
    all that decoding reads but the raw bytes of out-of-band arrays. ``size`` for
    bytes that do not start as a frame.

    >>> chunks = encode_frame([0], np.zeros(1 << 16, np.uint8))
    >>> frame_nbytes(chunks) - front_nbytes(chunks[0], frame_nbytes(chunks)) >= 1 << 16
    True
    """
    if len(first) >= PREFIX_SIZE:
        tag: bytes
        hlen: int
        nbufs: int
        blen: int
        tag, hlen, nbufs, blen = _FIXED.unpack_from(first)  # (">4sIIQ")
        if tag == _TAG:
            return min(size, PREFIX_SIZE + hlen + 8 * nbufs + blen)
    return size


def body_nbytes(chunks: list[bytes | memoryview]) -> int:
    """The size of the msgpack body of the frame ``encode_frame`` made as ``chunks``
    (what decoding it walks: out-of-band arrays excluded).

    >>> body_nbytes(encode_frame([0], list(range(100)))) > 100
    True
    """
    blen: int = _FIXED.unpack_from(chunks[0])[3]  # (">4sIIQ": the Q)
    return blen


def join_chunks(chunks: list[bytes | memoryview]) -> bytearray:
    """The frame as one writable ``bytearray`` (one copy).

    Useful for in-process transports: arrays decoded from a ``bytearray`` frame are
    writable, as if the frame had come from a socket.

    Example::

        >>> decode_frame(join_chunks(encode_frame([1], None))).header
        [1]
    """
    return bytearray().join(chunks)


# --------------------------------------------------------------------------- decoding


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"ext type {code} is not allowed in a frame header")


class Frame:
    """A decoded frame: the header is parsed and validated, the body is decoded on demand.

    Attributes:
        header: the header list.
        nbytes: size of the frame in bytes.
        nbufs: number of out-of-band buffers.
        writable: whether out-of-band arrays decoded from this frame are writable.
    """

    __slots__ = ("header", "nbytes", "nbufs", "_mv", "_body", "_buffers", "_maybe_ts")

    def __init__(
        self,
        header: list[Any],
        mv: memoryview,
        body: memoryview,
        buffers: list[memoryview],
        maybe_ts: bool = True,
    ) -> None:
        self.header = header
        self.nbytes = mv.nbytes
        self.nbufs = len(buffers)
        self._mv = mv
        self._body = body
        self._buffers = buffers
        self._maybe_ts = maybe_ts  # False: the body holds no msgpack timestamp

    @property
    def writable(self) -> bool:
        return not self._mv.readonly

    @property
    def body_nbytes(self) -> int:
        """The size of the msgpack body (what :meth:`body` walks; out-of-band arrays
        excluded), as :func:`body_nbytes` tells the sender."""
        return self._body.nbytes

    def __repr__(self) -> str:
        return f"Frame(header={self.header!r}, nbytes={self.nbytes}, nbufs={self.nbufs})"

    def body(self, hooks: object | None = None) -> Any:
        """Decode the body (each call decodes it again).

        Tensors are built with ``hooks.tensor_in(array, requires_grad, link)`` when the
        hook exists, else ``Tensor(array, requires_grad=requires_grad)``; RRefs with
        ``hooks.ref_in(payload)``; exceptions come back as ``RemoteError``.

        Raises:
            ProtocolError: the body is malformed, or a hook raised something other
                than an ``ActorgradError`` (chained as ``__cause__``).
            ActorgradError: raised by a hook (``ContextError``, ``WorkerLost``, ...),
                propagated unchanged.

        Example::

            >>> import numpy as np
            >>> f = decode_frame(join_chunks(encode_frame([0], {"x": np.zeros(3)})))
            >>> f.body()["x"]
            array([0., 0., 0.])
        """
        body = self._body
        check_ts = self._maybe_ts and _may_hold_timestamp(body)
        dec = _Decoder(hooks, self._buffers, body.nbytes, check_ts)
        hook_exc: BaseException | None = None
        try:
            value = msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=False,
                use_list=True,
                ext_hook=dec.hook,
                unicode_errors=STR_ERRORS,
            )
            if dec.used != len(self._buffers):
                raise ProtocolError(
                    f"frame has {len(self._buffers)} out-of-band buffers but the body "
                    f"uses {dec.used}"
                )
            if check_ts:
                _reject_timestamps(value)
        except _HookError as h:
            hook_exc = h.exc
        except ProtocolError:
            raise
        except RecursionError:
            raise ProtocolError("malformed frame body: nested too deeply") from None
        except Exception as exc:
            raise ProtocolError(f"malformed frame body: {_describe(exc)}") from exc
        finally:
            # break the cycle decoder -> bound ext_hook -> decoder, which kept the
            # decoder (and through it the frame's buffers) alive until a gc run
            dec.hook = None
        if hook_exc is not None:
            try:
                raise hook_exc
            finally:
                # (its traceback holds this frame: the local made a cycle that kept the
                # frame, and its buffer, which the transport reuses once nothing holds
                # it, alive until a gc run)
                hook_exc = None
        return value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, msgpack.ExtraData):
        return "extra bytes after the msgpack value"
    if isinstance(exc, msgpack.exceptions.StackError):
        return "nested too deeply"
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


_CONTAINERS = frozenset({list, tuple, dict})


#: Why a sender let a msgpack.Timestamp or ExtType through: msgpack packs them itself,
#: before the codec's ``default`` could refuse them, and only a walk over every message
#: (its lists and dicts, which msgpack packs alone) would find them there: measured, it
#: costs about as much again as the encoding itself (0.8x to 1.3x, of a small call or of
#: a dict of 100 floats), on every message for a value no program means to send.
_PACKED_BY_MSGPACK = (
    " (msgpack packs its own Timestamp and ExtType values before actorgrad's codec sees them)"
)


def _reject_timestamps(value: Any) -> None:
    """Raise ProtocolError if a msgpack Timestamp (ext -1) hides anywhere in ``value``
    (decoded values: containers are exactly list, tuple or dict)."""
    ts = msgpack.Timestamp
    containers = _CONTAINERS
    stack = [value]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is dict:
            items: Any = (*x.keys(), *x.values())
        elif t is list or t is tuple:
            items = x
        elif t is ts:
            items = (x,)
        else:
            continue
        if len(items) > 16:
            types = set(map(type, items))  # one C-level pass; Python only for containers
            if ts not in types:
                if not types.isdisjoint(containers):
                    stack.extend(i for i in items if type(i) in containers)
                continue
        for item in items:
            ti = type(item)
            if ti is ts:
                raise ProtocolError(
                    f"a msgpack.Timestamp in frame (ext type -1: {item!r}): it does not "
                    f"travel, and its sender should have refused it{_PACKED_BY_MSGPACK}; "
                    "send a timestamp as a number"
                )
            if ti in containers:
                stack.append(item)


def _unpack_payload(data: bytes, what: str, length: int, ext_hook: Any = None) -> list[Any]:
    if ext_hook is None:
        value = msgpack.unpackb(data, raw=False, use_list=True)
    else:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            ext_hook=ext_hook,
            unicode_errors=STR_ERRORS,
        )
    if type(value) is not list or (length >= 0 and len(value) != length):
        items = f" of {length} items" if length >= 0 else ""
        raise ProtocolError(
            f"malformed {what} payload: expected a list{items}, got {short_repr(value)}"
        )
    return value


def _dtype_from(s: Any) -> np.dtype:
    if type(s) is not str:
        raise ProtocolError(f"array dtype must be a str, not {_type_name(type(s))}")
    dt = _DTYPES.get(s)
    if dt is None:
        raise ProtocolError(f"dtype {short_repr(s)} is not a bool or numeric dtype")
    return dt


class _Decoder:
    __slots__ = ("hooks", "buffers", "used", "taken", "depth", "hook", "budget", "check_ts")

    def __init__(
        self, hooks: Any, buffers: list[memoryview], body_len: int, check_ts: bool
    ) -> None:
        self.hook: Callable[[int, bytes], Any] | None = self.ext_hook
        self.budget = _ext_budget(body_len)
        self.hooks = hooks
        self.buffers = buffers
        self.used = 0
        self.taken: bytearray | None = None
        self.depth = 0
        # the body may hold a msgpack timestamp: values given to hooks are checked too
        # (the rest of the body is checked once decoded)
        self.check_ts = check_ts

    def ext_hook(self, code: int, data: bytes) -> Any:
        depth = self.depth + 1
        if depth > MAX_DEPTH:
            raise ProtocolError(f"frame body nested more than {MAX_DEPTH} ext levels deep")
        self.depth = depth
        # (after an exception the whole decode fails, so the depth needs no finally)
        budget = self.budget - len(data)
        if budget < 0:
            raise ProtocolError(
                f"nested ext payloads of the body exceed {_EXT_FACTOR}x its size "
                "(each nesting level copies its payload)"
            )
        self.budget = budget
        if code == EXT_TUPLE:  # the hot path: inlined
            items = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=False,
                ext_hook=self.hook,
                unicode_errors=STR_ERRORS,
            )
            if type(items) is not list:
                raise ProtocolError("malformed tuple payload: expected a list")
            self.depth = depth - 1
            return tuple(items)
        handler = _DECODERS.get(code)
        if handler is None:
            raise ProtocolError(
                f"unknown ext type {code} in frame body: a msgpack.ExtType value does not "
                f"travel, and its sender should have refused it{_PACKED_BY_MSGPACK}; send bytes"
            )
        value = handler(self, data)
        self.depth = depth - 1
        return value

    def take_buffer(self, index: Any) -> memoryview:
        bufs = self.buffers
        if type(index) is not int or not 0 <= index < len(bufs):
            raise ProtocolError(
                f"array refers to buffer {short_repr(index)}, the frame has {len(bufs)}"
            )
        if self.taken is None:
            self.taken = bytearray(len(bufs))
        if self.taken[index]:
            raise ProtocolError(f"buffer {index} is used twice")
        self.taken[index] = 1
        self.used += 1
        return bufs[index]


def _vector_from(dstr: Any, shape: Any, raw: Any) -> np.ndarray | None:
    """The common case of an array payload, checked in short: a 1-d array with its data
    inline (None: anything else, for ``_array_from``)."""
    dt = _DTYPES.get(dstr) if type(dstr) is str else None
    if (
        dt is not None
        and type(raw) is bytes
        and type(shape) is list
        and len(shape) == 1
        and type(shape[0]) is int
        and shape[0] * dt.itemsize == len(raw)
    ):
        return np.frombuffer(bytearray(raw), dt)  # its own, writable memory
    return None


def _array_from(dec: _Decoder, dstr: Any, shape: Any, raw: Any) -> np.ndarray:
    vec = _vector_from(dstr, shape, raw)
    if vec is not None:
        return vec
    dtype = _dtype_from(dstr)
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise ProtocolError(f"array shape must be a list of at most {MAX_NDIM} ints")
    for d in shape:
        if type(d) is not int:
            raise ProtocolError(f"bad array dimension {short_repr(d)} in shape {shape}")
    if type(raw) is int:
        buf: Any = dec.take_buffer(raw)
    elif type(raw) is bytes:
        buf = bytearray(raw)  # inline arrays get their own, writable memory
    else:
        raise ProtocolError("array data must be bin or a buffer index")
    expected = math.prod(shape) * dtype.itemsize
    # (the rule, a call and two passes over the shape on each array decoded, only where
    # the data does not settle it: dimensions all > 0 that multiply to the bytes that
    # came are each within it, and their product too)
    if not (0 < expected == len(buf) and min(shape, default=1) > 0):
        problem = _shape_problem(shape, dstr, dtype.itemsize)
        if problem is not None:
            raise ProtocolError(problem)
        if expected != len(buf):
            raise ProtocolError(
                f"array of shape {tuple(shape)} and dtype {dstr} needs {expected} bytes, "
                f"got {len(buf)}"
            )
    if len(shape) != 1 and type(buf) is memoryview and dtype in _CASTS and 0 not in shape:
        # Of the frame's buffer cast to the shape: an array whose base is that buffer
        # (held against resizing, as np.frombuffer's is), where a reshape of the 1-d
        # array is a view of an array, which a leaf of the distributed backward cannot
        # tell from a view of one a user holds, and copies (a 256x256 float32 gradient
        # sent back to a parameter's owner: 256 KiB copied a step). np.ndarray(shape,
        # buffer=...) would not hold the buffer. (memoryview casts to native float32,
        # float64 and int formats only, and no zero-size shapes: the rest as before.)
        return np.asarray(buf.cast(_CASTS[dtype], shape))
    arr = np.frombuffer(buf, dtype=dtype)
    return arr if len(shape) == 1 else arr.reshape(shape)


#: dtypes whose arrays _array_from makes by casting the frame's buffer: native byte
#: order, a single-character format memoryview.cast takes (Any: mypy wants a Literal).
#: Each with its dtype's own character, which numpy gives the cast array back: for
#: int64 'l' on Linux, where 'q' made a dtype equal to int64 but of type np.longlong
#: (np.issubdtype(a.dtype, np.int64) was False for a received 2-d array, True for 1-d)
_CASTS: dict[np.dtype[Any], Any] = {
    np.dtype(t): np.dtype(t).char
    for t in (
        np.float32,
        np.float64,
        np.int8,
        np.uint8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
    )
}


def _dec_array(dec: _Decoder, data: bytes) -> np.ndarray:
    dstr, shape, raw = _unpack_payload(data, "ndarray", 3)
    return _array_from(dec, dstr, shape, raw)


def _dec_scalar(dec: _Decoder, data: bytes) -> np.generic:
    dstr, raw = _unpack_payload(data, "numpy scalar", 2)
    dtype = _dtype_from(dstr)
    if type(raw) is not bytes or len(raw) != dtype.itemsize:
        raise ProtocolError(f"numpy scalar of dtype {dstr} needs {dtype.itemsize} raw bytes")
    scalar: np.generic = np.frombuffer(raw, dtype=dtype)[0]  # (an item of a 1-d array)
    return scalar


def _decode_hook_error(name: str, what: Any, exc: Exception) -> Exception:
    """A decode hook failed: actorgrad's own errors pass through unchanged; anything
    else means the peer sent something the hook cannot use: ProtocolError."""
    if isinstance(exc, ActorgradError):
        return _HookError(exc)
    return ProtocolError(f"{name} hook rejected {short_repr(what)}: {type(exc).__name__}: {exc}")


def _dec_tensor(dec: _Decoder, data: bytes) -> Any:
    dstr, shape, raw, requires_grad, link = _unpack_payload(data, "Tensor", 5, dec.hook)
    if type(requires_grad) is not bool:
        raise ProtocolError("malformed Tensor payload: requires_grad must be a bool")
    if dec.check_ts:
        _reject_timestamps(link)
    arr = _array_from(dec, dstr, shape, raw)
    tensor_in = getattr(dec.hooks, "tensor_in", None) if dec.hooks is not None else None
    if tensor_in is not None:
        try:
            return tensor_in(arr, requires_grad, link)
        except Exception as exc:
            raise _decode_hook_error("tensor_in", link, exc) from exc
    tensor_cls = _tensor_class()
    if tensor_cls is None:
        raise ProtocolError("Tensor received but actorgrad.tensor is not available")
    if requires_grad and arr.dtype.kind != "f":
        raise ProtocolError(f"Tensor of dtype {arr.dtype} cannot require grad")
    return tensor_cls(arr, requires_grad=requires_grad)


def _dec_ref(dec: _Decoder, data: bytes) -> Any:
    ref_in = getattr(dec.hooks, "ref_in", None) if dec.hooks is not None else None
    if ref_in is None:
        raise ProtocolError("RRef received without a runtime")
    payload = _unpack_payload(data, "RRef", -1, dec.hook)
    if dec.check_ts:
        _reject_timestamps(payload)
    try:
        return ref_in(payload)
    except Exception as exc:
        raise _decode_hook_error("ref_in", payload, exc) from exc


def _dec_exception(dec: _Decoder, data: bytes) -> RemoteError:
    record = _unpack_payload(data, "exception", 4)
    if not all(type(s) is str for s in record):
        raise ProtocolError("malformed exception payload: expected 4 strs")
    return RemoteError(*record)


# (no entry for EXT_TUPLE: _Decoder.ext_hook unpacks a tuple itself, before any lookup)
_DECODERS: dict[int, Callable[[_Decoder, bytes], Any]] = {
    EXT_NDARRAY: _dec_array,
    EXT_SCALAR: _dec_scalar,
    EXT_TENSOR: _dec_tensor,
    EXT_REF: _dec_ref,
    EXT_EXCEPTION: _dec_exception,
}


def decode_frame(frame: bytes | bytearray | memoryview) -> Frame:
    """Parse a frame's layout and header; the body is decoded later by ``Frame.body``.

    Nothing is copied: the ``Frame`` (and arrays decoded from it) refer to ``frame``.
    Out-of-band arrays are writable exactly when ``frame`` is writable (``bytearray``).

    Raises:
        ProtocolError: the frame is malformed (too short, bad magic/version, sizes that
            do not match the frame length, header too large or not a list, ...).

    Example::

        >>> f = decode_frame(b"".join(encode_frame([0, 17, "mod:fn", None], ((1, 2), {}))))
        >>> f.header[2], f.body()
        ('mod:fn', ((1, 2), {}))
    """
    t = type(frame)
    if t is bytearray or t is bytes:
        mv = memoryview(frame)
    elif t is memoryview and frame.format == "B" and frame.ndim == 1 and frame.contiguous:  # type: ignore[union-attr]
        mv = frame  # type: ignore[assignment]
    else:
        try:
            mv = memoryview(frame)
        except TypeError:
            raise ProtocolError(
                f"a frame must be bytes-like, not {_type_name(type(frame))}"
            ) from None
        if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
            try:
                mv = mv.cast("B")
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"a frame must be a contiguous byte buffer: {exc}") from None
    size = mv.nbytes
    if size < PREFIX_SIZE:
        raise ProtocolError(f"frame too short: {size} bytes, the fixed prefix is {PREFIX_SIZE}")
    tag, hlen, nbufs, blen = _FIXED.unpack_from(mv, 0)
    if (
        nbufs == 0
        and tag == _TAG
        and hlen <= MAX_HEADER_BYTES
        and PREFIX_SIZE + hlen + blen == size
        and size < _SCAN_BELOW
    ):
        # the common small frame: the checks below, in short
        pos = PREFIX_SIZE + hlen
        try:
            header = msgpack.unpackb(
                mv[PREFIX_SIZE:pos],
                raw=False,
                strict_map_key=False,
                use_list=True,
                ext_hook=_reject_ext,
            )
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"malformed frame header: {_describe(exc)}") from exc
        if type(header) is not list:
            raise ProtocolError(f"frame header must be a list, not {_type_name(type(header))}")
        maybe_ts = _FF_RE.search(mv, PREFIX_SIZE) is not None
        if maybe_ts:
            _reject_timestamps(header)
        return Frame(header, mv, mv[pos:], _NO_BUFFERS, maybe_ts)
    if tag != _TAG:
        if tag[:2] != _MAGIC:
            raise ProtocolError(f"not an actorgrad frame (magic {tag[:2]!r})")
        raise ProtocolError(f"unsupported frame version {tag[2]} (flags {tag[3]})")
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
    if nbufs > MAX_BUFFERS:
        raise ProtocolError(f"frame declares {nbufs} buffers, more than {MAX_BUFFERS}")
    pos = PREFIX_SIZE + hlen
    lengths_end = pos + 8 * nbufs
    if lengths_end > size:
        raise ProtocolError(
            f"frame of {size} bytes too short for its header ({hlen} bytes) and "
            f"{nbufs} buffer lengths"
        )
    header_mv = mv[PREFIX_SIZE:pos]
    lengths_start = pos
    body_end = lengths_end + blen
    if body_end > size:
        raise ProtocolError(f"frame body of {blen} bytes exceeds the frame ({size} bytes)")
    buffers: list[memoryview] = []
    if nbufs:
        pos = body_end
        for i, n in enumerate(struct.unpack_from(f">{nbufs}Q", mv, lengths_start)):
            pos += -pos % ALIGN
            end = pos + n
            if end > size:
                raise ProtocolError(
                    f"buffer {i} ({n} bytes at offset {pos}) exceeds the frame ({size} bytes)"
                )
            buffers.append(mv[pos:end])
            pos = end
        end_of_frame = pos
    else:
        end_of_frame = body_end
    if end_of_frame != size:
        raise ProtocolError(
            f"frame is {size} bytes but its layout accounts for {end_of_frame} "
            "(trailing bytes or wrong lengths)"
        )
    try:
        header = msgpack.unpackb(
            header_mv, raw=False, strict_map_key=False, use_list=True, ext_hook=_reject_ext
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed frame header: {_describe(exc)}") from exc
    if type(header) is not list:
        raise ProtocolError(f"frame header must be a list, not {_type_name(type(header))}")
    # one scan of header and body (see _may_hold_timestamp), the walks only if needed
    maybe_ts = _may_hold_timestamp(mv[PREFIX_SIZE:body_end])
    if maybe_ts:
        _reject_timestamps(header)
    return Frame(header, mv, mv[lengths_end:body_end], buffers, maybe_ts)
