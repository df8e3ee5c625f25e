"""Byte transports for the runtime: TCP (asyncio Protocols) and in-process.

A :class:`Connection` is an ``asyncio.Protocol``. It first runs the handshake on raw,
fixed-size bytes, then carries frames: a 24-byte prefix (big-endian length, tag)
followed by a codec frame (``actorgrad.wire``). Nothing is msgpack-decoded before the handshake
succeeds.

Handshake (both sides, :func:`handshake`)::

    each side -> MAGIC (8) | version u16 | nonce (32)         the hello, sent at once
    client    -> HMAC-SHA256(token, b"C" | nonce_c | nonce_s)
    server    -> HMAC-SHA256(token, b"S" | nonce_c | nonce_s) | b"\\x01"   accepted
           or -> 33 zero bytes (_REFUSED), then it closes                  refused

The server checks the client's MAC first and, on a mismatch, refuses without sending
its own MAC, then closes the connection (it logs and keeps serving others): anyone can
connect, and a MAC over a nonce of their choice would let them test guesses of a weak
token offline. The client raises ``TokenRefused`` (an ``AuthError``) on the refusal,
``AuthError`` when the server's MAC is wrong, and ``WorkerLost`` when the connection
closes without a refusal (a peer shutting down or dead). The whole exchange has a
deadline.

Frames: each is preceded by its length (u64) and its tag, a keyed BLAKE2b of the
frame's number on the connection, its length and its front (:class:`FrameMac`), with
a key per direction made from the token and both nonces (:func:`frame_keys`). The
handshake alone proves only that the peer knew the token when it ran: a stranger
relaying a token holder's handshake to a worker could then speak on that connection.
A frame whose tag does not match closes the connection. In-process connections carry
zeros (no wire anyone else could write to).

Receiving: small frames are sliced out of a reassembly buffer (``bytearray``); a frame
of ``BIG_FRAME`` bytes or more is read straight into a preallocated writable buffer
of its declared length (a ``memoryview``; see :class:`_BufferPool`), so the arrays the
codec decodes with ``np.frombuffer`` are writable and not copied again. A declared
length above ``max_frame_size`` is a ``ProtocolError`` and closes that connection only.

Sending: a connection's first small message since the process last read something
(on any connection) or since its last flush is written at once (latency: a connection
that only writes, such as a worker's own one to the driver carrying its answers to what
came on the driver's, never reads), the following ones are coalesced (flushed with
``loop.call_soon``, or as soon as ``COALESCE_MAX`` bytes are waiting, so the peer can
start on them), and replies produced while handling one read are flushed when that
read has been handled; frames of ``BIG_FRAME`` bytes or more are written without
concatenation (with one ``writelines``, i.e. one ``writev``, when the transport does not
join its arguments).
The write-buffer high mark is 0, so :meth:`Connection.send` returns only once the
transport has handed everything to the kernel (backpressure; the caller's arrays are
no longer referenced).
Arrays travel zero-copy: do not mutate an array in place while it is being sent.

Local sockets: on Linux a TCP worker also listens on an abstract Unix socket (no file,
gone with the process) and advertises its name through the registry; a peer in the same
network namespace of the same boot connects there instead (:func:`open_local`, falling
back to TCP on any failure). Same handshake, same frames; loopback TCP runs the whole
TCP stack per write — a 64 KiB echo between two processes took 194 µs over TCP and
72 µs over a Unix socket on the 2-core VM. ``ACTORGRAD_LOCAL_SOCKETS=0`` turns it off.

The in-process transport (:func:`open_inproc`) is a pair of fake ``asyncio.Transport``
objects feeding the same protocol; bytes are copied at ``write`` time, so no object is
shared between workers and every message goes through the codec.

NOTE: this module never imports autograd/tensor code.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import hmac
import ipaddress
import itertools
import logging
import math
import mmap
import os
import secrets
import socket
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from actorgrad.errors import AuthError, ProtocolError, WorkerLost

log = logging.getLogger("actorgrad.runtime")

MAGIC = b"ACTGRAD\x00"
#: 2: the distributed backward's gradient messages carry their sender and relays
#: 3: a call's distributed metadata carries its call chain
#: 4: every gradient message of a backward pass carries the origin's exempt call chain
#: 5: a caller that stops waiting for a call sends a cancel (K_CANCEL) after it; a
#:    backward pass that fails has the ends of the pairs its finished parts freed dropped
#: 6: a worker's hello says the largest frame it takes (its peers send none larger)
#: 7: a worker that closes a connection on a message it refused says why first; every
#:    frame carries a tag (FrameMac) keyed by the connection's handshake
#: 8: a worker that waits on a peer asks it for pings (K_ASK), others ping seldom; an
#:    RRef forked by a worker that does not own it carries its registration's tag
#: 9: goodbyes and hellos numbered (a drop for silence ends every connection)
#: 10: a server that refuses the client's token says so (_REFUSED) before it closes
#: 11: a call's distributed metadata carries the latest pass of its context aborted on
#:     the caller (its callee aborts it too before it takes the call)
#: 12: the abort of a failed backward pass is a flood acknowledged by credit
#:     (dist.clean, dist.clean_unpair, dist.cleaned), not calls to the origin's peers
#: 13: backward pass ids and call tokens carry their worker's cluster id above 48 bits
#:     (32 and 40 before: a worker of 12 refuses an aborted pass of 13 in a call's
#:     metadata, and reads another origin in its ids)
#: 14: the release of a context reclaimed for its initiator's loss carries why (a
#:     fourth argument of dist.api._release, which 13 refuses)
#: 15: an RRef release (rref._decref) carries its number, and the owner acknowledges
#:     them (rref._released): 14 refuses the fourth argument; a goodbye for a peer's
#:     silence names the calls given up ([K_BYE, why, n, call ids]: 14 refuses it)
#: 16: a caller whose connection broke without a goodbye names, on another one, the
#:     calls on it whose replies it never read, and asks how many of its frames the
#:     callee read there (rref._unread, answered by rref._frames_read: 15 has neither);
#:     a worker that reports a peer lost on a connection's close asks it on the others
#:     for a sign of life ([K_ASK, n], answered [K_ECHO, n]): 15 refuses both
PROTOCOL_VERSION = 16
_HELLO = struct.Struct(">8sH32s")
_MAC_LEN = 32
#: A server's answer to a client that does not know the token, in place of its MAC and
#: ok byte: a refusal said, not a close, which a server going away makes too. (It tells
#: the client nothing the close did not: no MAC of ours, nothing of the token.)
_REFUSED = bytes(_MAC_LEN + 1)
HANDSHAKE_TIMEOUT = 5.0
#: Largest frame accepted (declared length); bigger is a ProtocolError.
MAX_FRAME_SIZE = 2 * 1024**3
#: The range a worker's own largest frame may be set in (see check_frame_size): at
#: least a hello's worth (a name of 255 and an address of 512 characters, up to 4
#: bytes each in UTF-8: about 3 KiB), at most what one buffer can hold (a frame is read
#: into one).
FRAME_SIZE_RANGE = (4096, sys.maxsize)
#: Frames at least this big are assembled in a preallocated buffer (read straight into
#: it) and written without being copied into the coalescing buffer.
BIG_FRAME = 16 * 1024
#: Coalesced small frames are written once they reach this many bytes: the peer starts
#: on the first ones while we produce the rest (a batch of 64 tiny calls went 42k ->
#: 55-70k calls/s on 2 cores), and a write still carries a dozen tiny frames.
COALESCE_MAX = 512
#: reads this process has handled (on any connection): a connection writes its first
#: small frame since the last one at once (see Connection.send_nowait)
_READS = 0
#: What precedes each frame on a connection: its length, and its tag (a MAC, see
#: FrameMac; zeros on in-process connections, which carry none).
_PREFIX = struct.Struct(">Q16s")
PREFIX_LEN = _PREFIX.size  # 24
_NO_TAG = bytes(16)
_SEQ_SIZE = struct.Struct(">QQ")


def whole_frame(first: Any, size: int) -> int:
    """The default ``frame_front`` of a connection: a MAC covers all of every frame."""
    return size


class FrameMac:
    """The tags of the frames going one way on one connection: a keyed BLAKE2b over the
    frame's number on the connection, its length and its front: all of a frame under
    ``BIG_FRAME`` bytes, else its first ``front(first chunk, length)`` bytes (the
    codec's header and msgpack body, what decoding reads; the raw bytes of out-of-band
    arrays after them are not covered, as hashing them would cost a 16 MiB message more
    than sending it). The key comes from the handshake: the handshake alone proved only
    that someone on the other end knew the token, and a peer that relayed a token
    holder's handshake to a worker could then send its own frames on the connection it
    got (a call of ``os:system``, say)."""

    __slots__ = ("_proto", "front", "seq")

    def __init__(self, key: bytes, front: Callable[[Any, int], int] = whole_frame) -> None:
        self._proto = hashlib.blake2b(key=key, digest_size=16)
        self.front = front
        self.seq = 0

    def tag(self, chunks: list[Any], size: int) -> bytes:
        """The tag of the next frame out, made of ``chunks`` (``size`` bytes in all)."""
        h = self._proto.copy()
        h.update(_SEQ_SIZE.pack(self.seq, size))
        if size < BIG_FRAME:  # (the hot path: one small chunk, all of it)
            for c in chunks:
                h.update(c)
        else:
            left = self.front(chunks[0], size)
            for c in chunks:
                n = _nbytes(c)
                if n >= left:
                    h.update(c if n == left else memoryview(c)[:left])
                    break
                h.update(c)
                left -= n
        # (counted once hashed: a chunk that failed to hash left no frame sent, and the
        # peer's count in step)
        self.seq += 1
        return h.digest()

    def check(self, frame: Any, tag: bytes) -> bool:
        """Whether ``tag`` is that of ``frame``, the next frame in."""
        h = self._proto.copy()
        size = len(frame)
        h.update(_SEQ_SIZE.pack(self.seq, size))
        self.seq += 1
        if size < BIG_FRAME:
            h.update(frame)
        else:
            front = self.front(frame, size)
            h.update(frame if front >= size else memoryview(frame)[:front])
        return hmac.compare_digest(h.digest(), tag)


#: Longest polling window ``ACTORGRAD_SPIN_US`` may set: a process polls that long after
#: each message, and one of 0.5 s or more (the heartbeat's interval) kept idle workers
#: spinning for good while pings counted as traffic (see set_heartbeat_frames).
MAX_SPIN_US = 100_000


def _spin_seconds(default_us: float = 5000.0) -> float:
    """``ACTORGRAD_SPIN_US`` in seconds (the default when unset or malformed)."""
    raw = os.environ.get("ACTORGRAD_SPIN_US", "")
    if not raw:
        return default_us / 1e6
    try:
        us = float(raw)
    except ValueError:
        us = math.nan
    if not 0 <= us <= MAX_SPIN_US:  # (nan too)
        # (a tuning knob: a bad value must not stop `import actorgrad` and every command)
        if us > MAX_SPIN_US:
            why, us = f"more than {MAX_SPIN_US} (0.1 s)", MAX_SPIN_US
        else:
            why, us = "not a number of microseconds >= 0", default_us
        # (logged, not warnings.warn: that printed this file's path and source line
        # at every command, around the message)
        log.warning("ACTORGRAD_SPIN_US=%r is %s; using %g", raw, why, us)
        # (our worker and driver processes inherit the value used, so one command warns
        # once: `actorgrad run -n 2` warned 4 times)
        os.environ["ACTORGRAD_SPIN_US"] = f"{us:g}"
    return us / 1e6


def env_switch(name: str) -> bool:
    """Whether the on/off setting in environment variable ``name`` is on (unset or
    empty: on). Off: 0, false, no, off; on: 1, true, yes, on (any case, blanks around
    ignored); anything else warns, naming it, and counts as on. (Only "0" was off:
    "false" or " 0" left it on, silently.)"""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("", "1", "true", "yes", "on"):
        log.warning(
            "%s=%r is not 0 or 1 (nor off or on, false or true, no or yes); taking it as 1",
            name,
            raw,
        )
        os.environ[name] = "1"  # (inherited: one command warns once)
    return True


# After a frame goes out or comes in, the loop polls its sockets, yielding the CPU at
# every poll, for this long before it may sleep in epoll (see _Spinner). 0 disables it.
# (ACTORGRAD_SPIN_US, read by read_settings: nan until then)
SPIN_SECONDS = math.nan
# ...but only while at least this share of recent frames arrived within the window.
SPIN_HIT_RATE = 0.75
_sched_yield = getattr(os, "sched_yield", None)
_MAX_HANDSHAKE_BUFFER = 4096
#: Co-located TCP workers talk over abstract Unix sockets (Linux only; None: not read yet).
LOCAL_SOCKETS: bool | None = None


def read_settings() -> None:
    """Read the transport's tuning variables (``ACTORGRAD_SPIN_US``,
    ``ACTORGRAD_LOCAL_SOCKETS``) unless read already: at the first connection or
    worker, or when a process of ours has set up its logging. (Read at import, a bad
    value's warning came out before the ``actorgrad`` command had set up its logging:
    a bare line, without the time, level and logger of its other messages.)"""
    global SPIN_SECONDS, LOCAL_SOCKETS
    if math.isnan(SPIN_SECONDS):
        SPIN_SECONDS = _spin_seconds()
    if LOCAL_SOCKETS is None:
        LOCAL_SOCKETS = sys.platform == "linux" and env_switch("ACTORGRAD_LOCAL_SOCKETS")


def local_sockets() -> bool:
    """Whether co-located TCP workers talk over abstract Unix sockets here."""
    read_settings()
    return bool(LOCAL_SOCKETS)


class _Spinner:
    """Keeps an event loop polling (not sleeping) for a while after traffic.

    A round trip between processes costs two wake-ups of a sleeping process; on a
    virtual machine each is tens of microseconds (an inter-processor interrupt and a
    hypervisor exit), more than the Python work of the call; and a process woken from
    a sleep of a few milliseconds computes slower at first (on the 2-core VM a 64x256 @
    256x256 matmul took 226 us in a loop, 291 us right after a 2 ms sleep; an
    elementwise op 9 vs 29 us). Right after a frame goes out a reply is often near, and
    right after one comes in more often follow. So for ``SPIN_SECONDS`` after the last
    frame the loop keeps a callback ready, and its selector polls with a zero timeout
    instead of sleeping. The callback calls ``sched_yield`` at every poll that found
    nothing new (not right after a frame: the work it caused is queued behind the
    callback): a process with work to do on this core gets it at once, so the
    spinning costs the busy processes little. (PyTorch's TensorPipe busy-polls all the
    time.)

    Measured on the 2-core VM: without spinning a tiny RPC took 184 us, spinning 25-35
    us. A spin that did not yield had to be kept to 200 us (longer made the 3-stage
    chain benchmark — 4 processes, each idle ~2 ms between its forward and backward —
    2x slower); yielding for 5 ms made that benchmark 20-30% faster than the 200 us
    window, and the hop 15% faster.

    Spinning only pays when the next frame does come within the window: the spinner
    watches the gap before each arriving frame and spins only while most
    (``SPIN_HIT_RATE``) recent gaps were shorter than it. A heartbeat every half
    second never qualifies.
    """

    __slots__ = ("loop", "ready", "until", "active", "last", "score", "fresh", "held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # asyncio's queue of ready callbacks (None on loops without one, uvloop's): see
        # _tick
        self.ready: Any = getattr(loop, "_ready", None)
        self.until = 0.0
        self.active = False
        self.last = 0.0  # time of the last frame in or out
        self.score = 1.0  # moving average of "the last arriving frame was within the window"
        self.fresh = False  # a frame came or went since the last tick
        # Jobs of this loop's worker running in its thread pool (Worker.offload): no
        # spinning meanwhile. Each tick takes the GIL, and a thread handing it back to
        # a spinning loop waits up to the switch interval (5 ms) to get it again: a
        # 16 MiB hop step with both parts in threads took 23.4-23.9 ms spinning,
        # 20.3-22.2 ms not (19.4-19.8 ms with both parts on the loop).
        self.held = 0

    def poke(self, arrived: bool) -> None:
        now = time.perf_counter()
        if arrived:
            hit = 1.0 if now - self.last < SPIN_SECONDS else 0.0
            self.score += 0.125 * (hit - self.score)
        self.last = now
        self.fresh = True
        if self.score < SPIN_HIT_RATE or self.held:
            return
        self.until = now + SPIN_SECONDS
        if not self.active:
            self.active = True
            self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        if time.perf_counter() < self.until and not self.held and not self.loop.is_closed():
            if self.fresh:
                # traffic since the last tick: what it caused (a task woken by a reply)
                # is queued behind this callback; yield only once the loop is idle
                self.fresh = False
            elif _sched_yield is not None and not self.ready:
                # (nor while other callbacks wait behind this one, a finished task's
                # among them: asyncio.run's main task done, a yield here left its
                # run_until_complete's stop queued for a time slice, and a Ctrl-C then,
                # raised in this callback by asyncio's handler, left that stop behind,
                # which stopped the loop's close at once: "RuntimeError: Event loop
                # stopped before Future completed", exit status 1, and the worker never
                # shut down, in 5 of 20 runs stopped 0-3 ms after their main ended)
                _sched_yield()
            self.loop.call_soon(self._tick)
        else:
            self.active = False


_spinners: dict[asyncio.AbstractEventLoop, _Spinner] = {}

#: The runtime's heartbeat frames (see set_heartbeat_frames): not traffic to the spinner.
_heartbeats: tuple[bytes, ...] = ()
_heartbeat_sizes: frozenset[int] = frozenset()


def set_heartbeat_frames(*frames: bytes) -> None:
    """Make ``frames`` (the runtime's pings, each always the same bytes) heartbeats:
    sent with :meth:`Connection.send_heartbeat`, and arriving, they are no traffic to
    the spinner. A ping counted: with every connection pinged every 0.5 s, a process
    with many peers got a frame every few ms and spun for good while idle (a driver of
    16 workers took 68% of a core with a 0.1 s window, and 512 peers would do it with
    the default)."""
    global _heartbeats, _heartbeat_sizes
    _heartbeats = frames
    _heartbeat_sizes = frozenset(len(f) for f in frames)


def _spinner(loop: asyncio.AbstractEventLoop) -> _Spinner | None:
    read_settings()
    if SPIN_SECONDS <= 0:
        return None
    sp = _spinners.get(loop)
    if sp is None:
        for old in [lp for lp in _spinners if lp.is_closed()]:
            del _spinners[old]
        sp = _spinners[loop] = _Spinner(loop)
    return sp


def _address(mv: memoryview) -> int | None:
    """Where a writable buffer's bytes start in memory (None for read-only ones)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(mv))
    except (TypeError, ValueError):
        return None


class _BufferPool:
    """Buffers for big incoming frames: placed well in memory, and recycled once nothing
    refers to them.

    Placement (frames assembled across reads): a frame starts on a 64-byte boundary (the
    codec aligns arrays to 64 bytes from the frame start, so they are 64-byte aligned in
    memory), and never just past the bytes it is first copied from modulo 4 KiB. A
    copy whose destination is 1-63 bytes past its source modulo 4096 runs into 4K
    aliasing (each load waits on a store to the "same" address): copying 256 KiB took
    190-200 us instead of 12-23 on the 2-core VM (AMD EPYC), and the scratch buffer
    and a pooled buffer met exactly so in some runs.

    Recycling: a frame's buffer is owned by whatever was decoded from it (arrays are
    views into it), so it cannot simply be reused; but once those are gone, only the
    pool holds it (its reference count says so) and the next big frame of about its
    size takes it. Without this every big frame got fresh pages from the kernel (glibc
    hands blocks of this size back when they are freed): 4096 page faults and a zeroing
    for 16 MiB, more than the copy from the socket. Each connection keeps at most
    ``MAX_BUFFERS`` buffers and ``MAX_BYTES`` bytes, and drops its free ones after
    ``IDLE_SECONDS`` without a big frame; frames under ``MIN_SIZE`` use fresh
    ``bytearray`` s.
    """

    MIN_SIZE = 256 * 1024
    #: Fresh buffers of this size or more are anonymous memory maps: their pages come
    #: as the frame's bytes do. ``bytearray(n)`` zeroes all n bytes first, on the loop:
    #: 5.5 s for 2 GiB here, so one big frame (or a mere 8-byte length prefix, the
    #: body never sent) stalled the worker past the heartbeat timeout and held that
    #: much memory. (Below it, glibc serves a ``bytearray`` from the heap the process
    #: keeps, see procs.tune_malloc: no page faults.)
    LAZY_SIZE = 32 * 1024 * 1024
    MAX_BUFFERS = 2
    MAX_BYTES = 64 * 1024 * 1024
    #: A connection that got no big frame for this long drops its free buffers (see
    #: trim_idle): kept for good, a driver that got a 60 MiB message from each of its
    #: 16 workers kept 1 GB while idle. (A cap on all pools together cost speed where
    #: it bound: 8 workers returning 40 MiB each at once, 70% slower per step.)
    IDLE_SECONDS = 10.0
    _ROUND = 64 * 1024
    #: room to move a frame's start: up to 63 bytes to a 64-byte boundary, 64 more
    #: away from its source
    SLACK = 128
    _pools: weakref.WeakSet[_BufferPool] = weakref.WeakSet()
    _pools_lock = threading.Lock()  # (a process may run loops in several threads)

    def __init__(self) -> None:
        self._bufs: list[bytearray | mmap.mmap] = []
        self._used = 0.0  # monotonic time of its last big frame
        with self._pools_lock:
            self._pools.add(self)

    def clear(self) -> None:
        """Keep nothing (the connection closed)."""
        self._bufs = []

    @classmethod
    def trim_idle(cls, now: float) -> int:
        """Drop the free buffers of the pools that got no big frame for IDLE_SECONDS
        before ``now`` (``time.monotonic()``); the bytes dropped."""
        with cls._pools_lock:
            pools = [p for p in cls._pools if p._bufs and now - p._used > cls.IDLE_SECONDS]
        dropped = 0
        for pool in pools:
            bufs = pool._bufs
            free = [b for b in bufs if sys.getrefcount(b) == 3]  # (list, b, argument)
            if free:
                pool._bufs = [b for b in bufs if all(b is not f for f in free)]
                dropped += sum(map(len, free))
        return dropped

    @staticmethod
    def _place(buf: bytearray | mmap.mmap, n: int, near: int | None) -> memoryview:
        mv = memoryview(buf)
        base = _address(mv)
        if base is None:  # pragma: no cover - a bytearray is always writable
            return mv[:n]
        off = -base % 64
        if near is not None and 0 < (base + off - near) % 4096 < 64:
            off += 64
        return mv[off : off + n]

    def get(self, n: int, near: int | None = None) -> memoryview:
        """A writable buffer of exactly ``n`` bytes (contents undefined), 64-byte
        aligned; ``near``: the address of the bytes to be copied into it first."""
        if n < self.MIN_SIZE:
            return self._place(bytearray(n + self.SLACK), n, near)
        self._used = time.monotonic()
        bufs = self._bufs
        for buf in bufs:
            # 3 references: the pool's list, this loop's variable, getrefcount's argument
            if (
                n + self.SLACK <= len(buf) <= n + (n >> 2) + self.SLACK
                and sys.getrefcount(buf) == 3
            ):
                return self._place(buf, n, near)
        size = -(-(n + self.SLACK) // self._ROUND) * self._ROUND
        if size > sys.maxsize:
            # (a length within 64 KiB of sys.maxsize, which a worker may take: rounded
            # up, mmap's OverflowError escaped the read, asyncio's "Fatal error" and
            # traceback in the log, the connection closed unsaid. Said as the memory
            # it is: see Connection._feed)
            raise MemoryError("more than a buffer can hold")
        # (private: a worker function that forks must give its child a copy, not the
        # frames' memory shared)
        buf = (
            mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
            if size >= self.LAZY_SIZE
            else bytearray(size)
        )
        if len(buf) <= self.MAX_BYTES:
            # forget free buffers first, then the oldest, to stay within the limits
            while bufs and (
                len(bufs) >= self.MAX_BUFFERS or sum(map(len, bufs)) + len(buf) > self.MAX_BYTES
            ):
                free = [b for b in bufs if sys.getrefcount(b) == 3]
                bufs.remove(free[0] if free else bufs[0])
                del free
            bufs.append(buf)
        return self._place(buf, n, near)


_trimmed = [0.0]  # (monotonic time of the last trim_idle_buffers that looked)


def trim_idle_buffers(now: float) -> int:
    """Drop the kept buffers of connections that got no big frame for a while (see
    ``_BufferPool.IDLE_SECONDS``); looks at most once a second, whoever calls (each
    worker's heartbeat does). The bytes dropped."""
    if now - _trimmed[0] < 1.0:
        return 0
    _trimmed[0] = now
    return _BufferPool.trim_idle(now)


def _nbytes(chunk: Any) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


def _drop_tracebacks(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of the exceptions it was raised from."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


class Connection(asyncio.BaseProtocol):
    """One end of a connection: handshake, then length-prefixed frames.

    A streaming protocol (``data_received``), used as is by the in-process transport;
    TCP and Unix sockets use :class:`StreamConnection`. (Deliberately not an
    ``asyncio.Protocol`` subclass: uvloop only uses a protocol's ``get_buffer`` when it
    is not one.)

    ``on_frame(conn, frame_bytes)`` is called for every complete frame, ``on_lost(conn,
    exc)`` once when the connection is gone. ``ext`` is free for the owner (the worker
    stores the peer's name, pending calls...).
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        *,
        kind: str,
        on_frame: Callable[[Connection, bytearray | memoryview], None] | None = None,
        on_lost: Callable[[Connection, BaseException | None], None] | None = None,
        on_refuse: Callable[[Connection, ProtocolError], None] | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
        owner: str = "",
        frame_front: Callable[[Any, int], int] = whole_frame,
    ) -> None:
        self.id = next(self._ids)
        self.owner = owner  # (the name of the worker it belongs to, for log lines)
        self.kind = kind  # "tcp" / "unix" / "inproc"
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.on_refuse = on_refuse
        self.max_frame_size = max_frame_size
        # how much of a frame its tag covers (see FrameMac), and the tags each way, once
        # the handshake made their keys (None: frames carry no tag, in-process)
        self.frame_front = frame_front
        self._mac_out: FrameMac | None = None
        self._mac_in: FrameMac | None = None
        # The largest frame this side sends: the smaller of its own maximum and the
        # peer's, once its hello said it (a frame over the peer's maximum, a worker
        # given a smaller one, made the peer close the connection, and the sender got
        # "connection ... lost", no reason given).
        self.send_limit = max_frame_size
        self.transport: asyncio.Transport | None = None
        self.transport_gone = False  # (its transport closed its socket: connection_lost)
        # the abort that ends a parting connection's linger (see part), until it did or
        # the peer closed its end first
        self._linger: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        # busy-poll briefly after traffic (sockets only: in-process peers share our loop)
        self._spin = _spinner(self.loop) if kind != "inproc" else None
        self.peer_name: str | None = None
        # the cluster id the peer announced in its hello: which process it is (a new one
        # joining under a dead one's name has another; the membership view may lag)
        self.peer_id: int | None = None
        # how many goodbyes for our silence the peer had sent us at its hello, and the
        # number of the one it closes this connection with, if so (Worker._stale_end)
        self.peer_drops = 0
        self.drop_number = 0
        self.peer_addr: Any = None
        self.outgoing = False
        self.closed = False
        self.close_reason: BaseException | None = None
        self.goodbye = False
        # the peer said goodbye in any form (the three below): it reads nothing more here
        self.bye_read = False
        # taken to reach a peer its worker had reported lost: that loss's record
        # (Worker._reach_lost)
        self.reached_lost: tuple[Any, ...] | None = None
        # its hello made a peer its worker had seen leave the cluster alive after all
        # (Worker._on_lost reports it lost again when the last such connection closes)
        self.after_leave = False
        # why the peer closed on us, when it said (``[K_BYE, why]``)
        self.dropped_why = ""
        # what the peer refused of ours, closing the connection, when it said
        self.refused_why = ""
        self.last_recv = self.last_sent = time.monotonic()
        self.paused_reading = False
        # Most bytes this end may have written and not yet handed to the kernel before
        # it stops reading the connection until they are (None: no limit). Set on the
        # ends that answer (a worker's accepted connections carry replies out, and from
        # the registry's head membership updates): a peer that sent requests and read
        # none of their replies grew this buffer without bound. The other end never
        # stops reading for this (only for a full mailbox, which membership updates
        # alone do not fill), so two ends do not wait for each other to read.
        self.max_unsent: int | None = None
        self._out_full = False
        # handshake phase
        self._handshaking = True
        self._hs_buf = bytearray()
        self._hs_waiter: asyncio.Future[None] | None = None
        self.made = self.loop.create_future()
        # done once the connection is closed, for those that wait on its end (see
        # when_closed; made on the first ask: nobody waits on most connections)
        self._closed_fut: asyncio.Future[None] | None = None
        # frame phase
        self._rbuf = bytearray()
        self._big: memoryview | None = None
        self._big_tag = _NO_TAG
        self._buffers = _BufferPool()
        self._big_pos = 0
        self._wbuf = bytearray()
        self._flush_scheduled = False
        # the value of _READS when a frame was last written at once (-1: none since the
        # last flush): until this process handles another read, the next frames are
        # coalesced (see send_nowait)
        self._at_once = -1
        self._write_paused = False
        self._writev = False
        # (a dict: a waiter that gave up goes in O(1); 20,000 cancelled at a shutdown
        # took seconds out of a list)
        self._drain_waiters: dict[asyncio.Future[None], None] = {}
        # owner data
        self.pending: dict[int, Any] = {}
        # What the owner made of the connection's loss (the peer silent, gone, or
        # dropping this end: Worker._on_lost), for those that waited to send on it
        # (see Worker.call): the transport knows only that it closed.
        self.lost_error: BaseException | None = None
        # Until then the peer may stay silent with calls pending: it decodes a request
        # of many Python objects we sent it, on its loop (see Worker._expect_decoding)
        self.decoding_until = 0.0
        # Until then the peer may stay silent: it said so (``[K_PING, seconds]``: its
        # loop runs something long, a driver script's top level; see Worker.going_quiet)
        self.quiet_until = 0.0
        # Until then the peer waits on this end (it asked, ``[K_ASK]``): ping it every
        # heartbeat interval (see Worker._heartbeat)
        self.peer_waits_until = 0.0
        # When bytes of a frame other than a heartbeat last came: its sender may wait on
        # this end (a call, a watched one-way message) and its asks queue behind what it
        # sends, a large request on a slow link taking seconds; pinged as if it asked
        # (see Worker._heartbeat)
        self.last_data = 0.0
        # When this end began to ask the peer for pings (this stretch of asking: its
        # silence counts from then, not from its last frame, as an idle peer pings
        # seldom), and when it last asked (Worker._ask)
        self.asking_since = 0.0
        self.last_ask = 0.0
        # calls whose caller stopped waiting (timeout, cancellation) after the request
        # left: call id -> the codec hooks their late reply is decoded with (Worker.call)
        self.abandoned: dict[int, Any] = {}
        # (caller) calls without an interceptor's meta given up likewise, whose late
        # reply has not come: call id -> None (Worker.call); None: none yet
        self.gave_up: dict[int, None] | None = None
        # (callee) what the latest replies on it counted for the peer (RRefs), by call
        # id, oldest first in ``given_order`` (Worker._keep_given); None: none yet
        self.given: dict[int, Any] | None = None
        self.given_order: deque[int] | None = None
        # An id both ends share (drawn from the handshake's nonces; 0: none): a caller
        # whose connection broke names it, on another connection, with the calls it
        # never read the replies to (rref._unread), and the callee finds the RRef
        # counts those replies made by it, on this connection or after it closed.
        self.pair_id = 0
        # (callee) calls whose replies the peer said it will never read (its end of
        # this connection broke; ours has not seen it yet): a reply to one counts
        # nothing (Worker._keep_given); None: none
        self.unread: set[int] | None = None
        # One-way RRef messages queued here (rref._tell, releases aside), each with its
        # frame's number, oldest first (the latest rref.MAX_TOLD): should this break
        # without a goodbye, those the peer never read go again (rref._told_on); None:
        # none yet
        self.told: deque[tuple[int, Any, tuple[Any, ...]]] | None = None
        # requests from the peer running as tasks that its cancel can stop: call id ->
        # task, or None once the peer cancelled it (Worker._cancel_request)
        self.running: dict[int, Any] = {}
        # requests from the peer waiting in the worker's mailbox: call id -> whether the
        # peer cancelled it meanwhile
        self.queued: dict[int, bool] = {}
        # frames from the peer (requests, one-way messages) in the worker's mailbox
        self.in_mailbox = 0
        self._call_ids = itertools.count(1)

    @property
    def frames_in(self) -> int | None:
        """How many frames of the peer's came in on this connection (those that passed
        their tag check, in order), None where frames carry no tag (in-process)."""
        return None if self._mac_in is None else self._mac_in.seq

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("handshake" if self._handshaking else "open")
        direction = "->" if self.outgoing else "<-"
        return (
            f"<Connection #{self.id} {self.kind} {direction} {self.peer_name or '?'}"
            f" {self.peer_addr} {state} pending={len(self.pending)}"
            f"{' paused' if self.paused_reading else ''}"
            f"{' unsent-full' if self._out_full else ''}>"
        )

    def describe(self) -> str:
        """The connection as a log line for users names it: "its connection from 'w2'
        (127.0.0.1:41000)" (its repr is for debugging)."""
        who = repr(self.peer_name) if self.peer_name else "a peer not named yet"
        return f"its connection {'to' if self.outgoing else 'from'} {who} ({self.peer_addr})"

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (a stream's transport: BaseTransport is asyncio's type for every kind, datagram
        # and subprocess ones too, and has no write nor pause_reading)
        self.transport = cast(asyncio.Transport, transport)
        if self.closed:
            # Closed while being made (its worker shut down between the accept and
            # this): nobody would close the socket after this; it leaked until GC.
            transport.abort() if hasattr(transport, "abort") else transport.close()
            return
        # asyncio's default writelines joins its arguments (a copy of the whole frame);
        # uvloop's and the in-process one's write the pieces as they are
        writelines = getattr(type(transport), "writelines", None)
        self._writev = writelines not in (None, asyncio.WriteTransport.writelines)
        peer = transport.get_extra_info("peername")
        if peer is not None or self.peer_addr is None:
            # (a connection reset before it was accepted has no peer name any more:
            # then the address accept() gave, set by the Listener, stays)
            self.peer_addr = host_port(peer)
        if isinstance(transport, asyncio.WriteTransport):
            # high=0: "paused" as soon as anything stays buffered in user space, and
            # resumed when the buffer is empty, so send() returns only once the bytes
            # (and the caller's arrays) have reached the kernel.
            try:
                transport.set_write_buffer_limits(high=0)
            except (NotImplementedError, AttributeError):
                pass
        if not self.made.done():
            self.made.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport_gone = True
        if self._linger is not None:
            # (the socket closed: nothing left to abort. The pending timer held the
            # transport, and so this connection, until the linger's end)
            self._linger.cancel()
            self._linger = None
        self._mark_closed(exc)

    @property
    def breaking(self) -> bool:
        """Whether the connection broke (a write or read failed) and its close is on its
        way (the transport's connection_lost, a loop turn later): a frame handed to it
        meanwhile is dropped, unsaid (see send_nowait)."""
        t: Any = self.transport
        return not self.closed and t is not None and t.is_closing()

    @property
    def write_paused(self) -> bool:
        """Whether the transport's buffer is over its high-water mark (see drain)."""
        return self._write_paused

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()
        if self._out_full:
            self._out_full = False
            if not self.closed and self.transport is not None:
                if not self.paused_reading:
                    self.transport.resume_reading()
                if self._rbuf:
                    self.loop.call_soon(self._feed_rest)

    def _feed_rest(self) -> None:
        """Handle the frames read before the connection stopped for its unsent bytes."""
        if self._rbuf and not self._out_full and not self.closed:
            self.data_received(b"")

    def _check_unsent(self) -> None:
        t: Any = self.transport
        if t.get_write_buffer_size() + len(self._wbuf) > self.max_unsent:
            self._out_full = True
            if not self.paused_reading:
                t.pause_reading()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, {}
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            # (a connection closed while its socket lingers, see part: what comes in is
            # dropped; kept, a stranger's stream grew a buffer by 1 GB in 12 s)
            self._rbuf.clear()
            self._big = None
            return
        global _READS
        self.last_recv = time.monotonic()
        _READS += 1
        if self._handshaking:
            self._hs_buf += data
            if len(self._hs_buf) > _MAX_HANDSHAKE_BUFFER:
                self.abort(ProtocolError("too much data during the handshake"))
                return
            w = self._hs_waiter
            if w is not None and not w.done():
                w.set_result(None)
            return
        try:
            self._feed(data)
        except ProtocolError as exc:
            self.refuse(exc)
            return
        if self._wbuf:  # replies produced while handling this input: one write
            self.flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # -- frames in ----------------------------------------------------------------
    def _feed(self, data: bytes | bytearray) -> None:
        if self._big is not None:
            big = self._big
            need = len(big) - self._big_pos
            n = min(need, len(data))
            big[self._big_pos : self._big_pos + n] = memoryview(data)[:n] if n < len(data) else data
            self._big_pos += n
            if self._big_pos < len(big):
                self.last_data = self.last_recv
                return
            self._big = None
            self._deliver(big, self._big_tag)
            if n == len(data):
                return
            data = data[n:]
        buf = self._rbuf
        # Parse straight from the input when nothing is left over from the last read
        # (the usual case): each frame is copied once, into memory of its own, instead
        # of into the reassembly buffer first (a 64 KiB frame was copied twice).
        src: Any
        if buf:
            buf += data
            src = buf
        else:
            src = memoryview(data)
        pos = 0
        end = len(src)
        while end - pos >= PREFIX_LEN:
            n, tag = _PREFIX.unpack_from(src, pos)
            if n > self.max_frame_size:
                raise ProtocolError(
                    f"declared frame length {n} exceeds the maximum of {self.max_frame_size} bytes"
                )
            start = pos + PREFIX_LEN
            if end - start >= n:
                # (one copy and no zero-fill: a buffer placed by the pool, zeroed when
                # allocated and then filled, cost a 64 KiB frame 16 us instead of 6)
                frame = (
                    bytearray(src[start : start + n]) if src is not buf else buf[start : start + n]
                )
                pos = start + n
                self._deliver(frame, tag)
                if self.closed or self._big is not None or self._out_full:
                    break  # (the rest waits in the reassembly buffer: see _feed_rest)
            elif n >= BIG_FRAME:
                part = src[start:end] if src is not buf else memoryview(buf)[start:end]
                try:
                    big = self._buffers.get(n, _address(part))
                except (MemoryError, OSError) as exc:
                    # (escaped, the error closed the connection unsaid: asyncio takes an
                    # OSError from a protocol for a network one, logged nowhere, and the
                    # sender's calls failed with "connection lost", no reason given)
                    del part
                    raise ProtocolError(
                        f"cannot take in a frame of {n} bytes: out of memory "
                        # (an exception is never false: a bytearray's MemoryError, with
                        # no message, showed as "()")
                        f"({str(exc) or type(exc).__name__})"
                    ) from None
                big[: end - start] = part
                del part  # an export of buf: it is resized below
                have = end - start
                self._big = big
                self._big_tag = tag
                self._big_pos = have
                self.last_data = self.last_recv
                pos = end
                break
            else:
                break
        if self.closed:  # (by a frame just delivered: nothing after it is read)
            buf.clear()
        elif src is buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += src[pos:end]

    def _deliver(self, frame: bytearray | memoryview, tag: bytes) -> None:
        mac = self._mac_in
        if mac is not None and not mac.check(frame, tag):
            self.refuse(
                ProtocolError(
                    f"frame {mac.seq - 1} failed authentication (not made by the peer that "
                    "passed the handshake: someone else writes to this connection, or its "
                    "bytes were changed on the way)"
                ),
                tell=False,  # (no goodbye, no lingering: whoever wrote it is not the peer)
            )
            return
        # (a bytearray or memoryview equals the bytes it holds: mypy's strict equality
        # takes them for types that never compare equal; a copy to bytes to please it
        # would cost every frame)
        if len(frame) not in _heartbeat_sizes or frame not in _heartbeats:  # type: ignore[comparison-overlap]
            self.last_data = self.last_recv
            if self._spin is not None:
                self._spin.poke(True)
        if self.on_frame is not None and not self.closed:
            self.on_frame(self, frame)

    # -- frames out -----------------------------------------------------------------
    def send_heartbeat(self, which: int = 0) -> None:
        """Queue heartbeat frame ``which`` (an index into those of set_heartbeat_frames):
        as :meth:`send_nowait`, but it is no traffic to the spinner."""
        spin, self._spin = self._spin, None
        try:
            self.send_nowait([_heartbeats[which]])
        finally:
            self._spin = spin

    def send_nowait(self, chunks: Iterable[Any]) -> int:
        """Queue one frame (the codec's chunks); returns its size. Small frames are
        coalesced and flushed on the next loop iteration."""
        t: Any = self.transport
        if self.closed or t is None:
            raise WorkerLost(f"connection to {self.peer_name or self.peer_addr!r} is closed")
        if t.is_closing():
            # (a write failed: its connection_lost, which fails what waits on the
            # connection, is on its way; each write meanwhile logged asyncio's
            # "socket.send() raised exception.")
            return 0
        if self._spin is not None:
            self._spin.poke(False)
        if not isinstance(chunks, list):
            chunks = list(chunks)
        if len(chunks) == 1 and type(chunks[0]) is bytes:  # (the common case, inlined)
            size = len(chunks[0])
            if size > self.send_limit:
                self.check_size(chunks)
        else:
            size = self.check_size(chunks)
        if size >= BIG_FRAME:
            # one writelines (one writev) with what is coalesced so far: no copy of the
            # frame's chunks (arrays travel from their own memory)
            head: bytes | bytearray = _PREFIX.pack(
                size, _NO_TAG if self._mac_out is None else self._mac_out.tag(chunks, size)
            )
            if self._wbuf:
                head = self._wbuf + head
                self._wbuf = bytearray()
            try:
                if self._writev:
                    t.writelines([head, *chunks])
                    if not self._write_paused and t.get_write_buffer_size():
                        # asyncio's own selector writelines (3.12.0-3.12.8, 3.13.0-3.13.1:
                        # CPython gh-127655) does not pause the protocol at the high mark;
                        # setting the limits again does (it checks the buffer)
                        t.set_write_buffer_limits(high=0)
                else:
                    t.write(head)
                    for c in chunks:
                        t.write(c)
            except Exception as exc:
                # Part of the frame may have gone, and the rest never will: nothing sent
                # after it on this connection can be read right. (asyncio's own loop
                # copies what the socket does not take at once into its buffer: where
                # that copy failed, a MemoryError, the connection stayed open, the peer
                # waited for the rest of the frame, every later call on the connection
                # waited for good, and the transport, its writer registered and its
                # buffer empty, failed at every loop turn.) The caller gets the error;
                # what waits on the connection fails with it, and the next call connects
                # anew.
                self._drop_stale_writer(t)
                self.abort(
                    WorkerLost(
                        f"connection to {self.peer_name or self.peer_addr!r} broken: a "
                        f"frame of {size} bytes failed part way out "
                        f"({type(exc).__name__}{f': {exc}' if str(exc) else ''})"
                    )
                )
                raise
        else:
            w = self._wbuf
            w += _PREFIX.pack(
                size, _NO_TAG if self._mac_out is None else self._mac_out.tag(chunks, size)
            )
            for c in chunks:
                w += c
            if self._flush_scheduled:
                if len(w) >= COALESCE_MAX and not self._write_paused:
                    self.flush()
            elif self._at_once != _READS and not self._write_paused:
                # the first frame since this process last read something (on any
                # connection) or flushed goes out at once (latency), without a callback
                # (a call_soon per frame cost ~10% of a round trip) ...
                self._at_once = _READS
                self.flush()
            else:
                # ... the ones after it are coalesced until the loop gets to this
                # callback (throughput)
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
        if self._write_paused and self.max_unsent is not None and not self._out_full:
            self._check_unsent()
        self.last_sent = time.monotonic()
        return size

    def _drop_stale_writer(self, t: Any) -> None:
        """Unregister the socket's writer that asyncio's own transport left behind when
        a write failed after registering it (its ``write`` registers the writer, then
        copies the rest into its buffer: a MemoryError there left the buffer empty, and
        its close and abort unregister the writer only when something is buffered). The
        stale registration failed at every loop turn ("Data should not be empty"), and
        outlived the socket: the next one given the same file number could not be read
        (its handshake timed out). Other transports (uvloop's, in-process ones) write
        from the frame's own memory: nothing to drop."""
        remove = getattr(self.loop, "_remove_writer", None)
        sock = t.get_extra_info("socket")
        if self._writev or remove is None or sock is None or t.get_write_buffer_size():
            return
        try:
            remove(sock.fileno())
        except Exception:  # (not registered after all, or the socket is closed)
            pass

    def check_size(self, chunks: list[Any]) -> int:
        """The size of the frame made of ``chunks``.

        Raises:
            ProtocolError: it exceeds ``send_limit`` (an oversized message, as the
                receiving side says of one). Nothing is sent and the connection stays:
                the peer would close it on reading the frame's length."""
        if len(chunks) == 1 and type(chunks[0]) is bytes:
            size = len(chunks[0])
        else:
            size = sum(_nbytes(c) for c in chunks)
        self.check_nbytes(size)
        return size

    def check_nbytes(self, size: int, part: bool = False) -> None:
        """Raise :meth:`check_size`'s ProtocolError if a frame of ``size`` bytes
        (``part``: of a part of a frame yet to be built) is larger than ``send_limit``."""
        if size > self.send_limit:
            whose = "" if self.send_limit == self.max_frame_size else " it takes"
            more = " or more" if part else ""
            raise ProtocolError(
                f"cannot send a message of {size} bytes{more} to "
                f"{self.peer_name or self.peer_addr!r}: "
                f"more than the largest frame{whose} ({self.send_limit} bytes); send large "
                "data in parts"
            )

    async def send(self, chunks: Iterable[Any]) -> None:
        """Send one frame; if the transport could not write everything at once, wait
        until its buffer has drained (backpressure; the caller's arrays are no longer
        referenced when this returns)."""
        self.send_nowait(chunks)
        if self._write_paused:
            await self.drain()

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            fut = self.loop.create_future()
            self._drain_waiters[fut] = None
            try:
                await fut
            finally:
                # (a waiter that timed out or was cancelled goes: each call timing out on
                # a peer that does not read left one here for as long as it stayed so)
                if fut.cancelled():
                    self._drain_waiters.pop(fut, None)
        if self.closed:
            raise WorkerLost(
                f"connection to {self.peer_name or self.peer_addr!r} closed while sending"
            )

    def flush(self) -> None:
        """Write the coalesced small frames now."""
        if self._wbuf and not self.closed and self.transport is not None:
            data, self._wbuf = self._wbuf, bytearray()
            self.transport.write(data)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._at_once = -1
        if self._wbuf and not self.closed and self.transport is not None:
            data, self._wbuf = self._wbuf, bytearray()
            self.transport.write(data)

    # -- flow control --------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.paused_reading and not self.closed and self.transport is not None:
            self.paused_reading = True
            if not self._out_full:
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused_reading and not self.closed and self.transport is not None:
            self.paused_reading = False
            if not self._out_full:
                self.transport.resume_reading()

    # -- handshake helpers -----------------------------------------------------------
    def _write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def _read_exact(self, n: int) -> bytes:
        while len(self._hs_buf) < n:
            if self.closed:
                raise ConnectionResetError("connection closed during the handshake")
            self._hs_waiter = self.loop.create_future()
            await self._hs_waiter
        data = bytes(self._hs_buf[:n])
        del self._hs_buf[:n]
        return data

    def start_frames(self) -> None:
        """Leave the handshake phase; bytes already received are parsed as frames."""
        self._handshaking = False
        rest, self._hs_buf = self._hs_buf, bytearray()
        if rest:
            try:
                self._feed(rest)
            except ProtocolError as exc:
                self.refuse(exc)

    # -- closing ------------------------------------------------------------------------
    def _mark_closed(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.close_reason is None:
            self.close_reason = exc
        self._buffers.clear()
        # (nor the frame it was receiving, never to be read: its buffer, allocated whole
        # when its length came, up to 2 GiB, stayed with the connection, which lingers
        # among its worker's parting ones up to IDLE_TIMEOUT (until the worker parted
        # from another, once: a peer dropped for its silence while it sent a big frame
        # left it held for good))
        self._big = None
        self._wake_drainers()
        f = self._closed_fut
        if f is not None and not f.done():
            f.set_result(None)
        w = self._hs_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if not self.made.done():
            self.made.set_exception(ConnectionResetError("connection closed"))
            # (whoever awaits it still gets the error; a connection nobody was waiting
            # on, e.g. one closed while being made, must not log "never retrieved")
            self.made.exception()
        if self.on_lost is not None:
            cb, self.on_lost = self.on_lost, None
            cb(self, self.close_reason)

    def when_closed(self) -> asyncio.Future[None]:
        """A future done once the connection is closed (at once if it is): for those
        that wait on its end, not on a frame of it."""
        f = self._closed_fut
        if f is None:
            f = self._closed_fut = self.loop.create_future()
            if self.closed:
                f.set_result(None)
        return f

    def close(self, reason: BaseException | None = None) -> None:
        """Flush what is queued and close; idempotent."""
        if self.close_reason is None:
            self.close_reason = reason
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()
        self._mark_closed(reason)

    def refuse(self, err: ProtocolError, tell: bool = True) -> None:
        """Close the connection on what the peer sent (malformed, or not to be
        handled), saying so in the log: only this connection goes. ``on_refuse``, when
        given, closes it instead (telling the peer why first), unless not to ``tell``."""
        if self.closed:
            return
        # (kept as close_reason: its traceback, and its cause's, hold the frames that
        # read what was refused, this connection and the frame's buffer among their
        # locals: a cycle that kept them, a frame of up to 2 GiB, until a gc run)
        _drop_tracebacks(err)
        log.warning("worker %s: closing %s: %s", self.owner or "?", self.describe(), err)
        if tell and self.on_refuse is not None and not self._handshaking:
            self.on_refuse(self, err)
        if not self.closed:
            self.abort(err)

    def abort(self, reason: BaseException | None = None) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        if self.transport is not None:
            t = self.transport
            if hasattr(t, "abort"):
                t.abort()
            else:
                t.close()
        self._mark_closed(reason)

    def part(self, reason: BaseException, linger: float) -> asyncio.TimerHandle | None:
        """Close after a last frame (a goodbye) was queued: done with at once (what
        waits on it fails, its loss is reported), but the socket, half-closed (the
        frame, then an end of data, go out), stays open up to ``linger`` s, what comes
        in discarded, until the peer closes its end. Aborted at once, a stopped peer's
        first write once it ran again drew a reset, and the transport it wrote with
        closed without reading the goodbye waiting in its socket (12 of 12 stops in a
        probe). Returns the timer of the final abort (None: aborted now, where there
        is no half-close)."""
        t: Any = self.transport
        try:
            if t is None or t.is_closing() or not t.can_write_eof():
                self.abort(reason)
                return None
            self._flush()
            t.write_eof()
        except Exception:  # (no half-close here, an in-process one; or the socket failed)
            self.abort(reason)
            return None
        self._mark_closed(reason)
        self._linger = self.loop.call_later(linger, t.abort)
        return self._linger

    def end_linger(self) -> None:
        """Abort a parting connection's socket now, if it still lingers (its worker
        shuts down)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        t: Any = self.transport
        if not self.transport_gone and t is not None:
            t.abort()


class StreamConnection(Connection, asyncio.BufferedProtocol):
    """A :class:`Connection` that lets the event loop read straight into its buffers:
    into the preallocated buffer of a big frame being assembled (no intermediate copy),
    else into a reused scratch buffer that is parsed like ``data_received`` input."""

    #: room for a 64 KiB activation frame and its header in one read: with 64 KiB, such
    #: a frame took two reads, a fresh zeroed buffer and an extra copy (the chain
    #: benchmark, 12 such frames per step, ran 8-16% slower in paired runs)
    SCRATCH = 256 * 1024
    #: socket buffers of local (Unix) connections: a frame up to this size is handed to
    #: the kernel in one write (the default, 208 KiB, made a 1 MiB echo 50% slower)
    LOCAL_SOCKET_BUFFER = 4 * 1024 * 1024

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._scratch_mv: memoryview | None = None
        self._into_big = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            self.kind = "unix"  # accepted on the local listener
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, self.LOCAL_SOCKET_BUFFER)
                except OSError:  # pragma: no cover - capped or refused: keep the default
                    pass
        super().connection_made(transport)
        if self.kind == "unix":  # abstract names come back as bytes with a leading NUL
            name = self.peer_addr
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            name = name.lstrip("\0") if isinstance(name, str) else ""
            if not name.isprintable():
                # (the peer's own choice, before any handshake: any local process may
                # bind its socket to a name before connecting, and a newline in it
                # wrote lines of its own into our log, escapes colored the terminal)
                name = repr(name)[1:-1]
            self.peer_addr = f"unix:@{name}" if name else f"unix:(local process{_peer_cred(sock)})"

    def connection_lost(self, exc: Exception | None) -> None:
        # (nothing is read any more: the read buffer, 256 KiB, goes now, not with the
        # connection, which a reference cycle can keep until a garbage collection: a
        # driver that joined and left 150 times in one process held 21 MB more)
        self._scratch_mv = None
        super().connection_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        big = self._big
        if big is not None and not self._handshaking and not self.closed:
            self._into_big = True
            return big[self._big_pos :]
        self._into_big = False
        mv = self._scratch_mv
        if mv is None or (len(mv) < self.SCRATCH and not self._handshaking):
            # (a few KiB until the peer proved the token: connections of strangers,
            # thousands of them maybe, cost no more than the handshake needs)
            size = _MAX_HANDSHAKE_BUFFER if self._handshaking else self.SCRATCH
            mv = self._scratch_mv = memoryview(bytearray(size))
        return mv

    def buffer_updated(self, nbytes: int) -> None:
        global _READS
        if self._into_big:
            self._into_big = False
            self.last_recv = time.monotonic()
            _READS += 1
            big = self._big
            if big is None:  # pragma: no cover - the loop calls get_buffer first
                return
            self._big_pos += nbytes
            if self._big_pos >= len(big):
                self._big = None
                self._deliver(big, self._big_tag)
            else:
                self.last_data = self.last_recv
            return
        assert self._scratch_mv is not None
        self.data_received(self._scratch_mv[:nbytes])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Listening
# ---------------------------------------------------------------------------------------

#: errnos of an accept that failed for want of open files or kernel memory: the
#: connection stays queued and the socket readable, so retrying at once fails again
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: errnos of an accept that failed for that connection alone (Linux passes on the
#: network errors of a connection that died queued: accept(2) says to retry)
_CONNECTION_FAILED = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
    }
)
#: the first and the longest pause in accepting when the process is out of files
ACCEPT_PAUSE = (0.05, 1.0)
#: connections accepted in one loop turn, at most (as asyncio's servers do)
ACCEPT_BATCH = 100


def _spare_file() -> int | None:
    """A file kept open to be closed when the process runs out of them (see Listener)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Listener:
    """Listening sockets whose connections become ``factory()``'s protocols: what
    ``loop.create_server`` gives, but with a process out of open files handled.

    The loop's own servers do not handle it well. An accept that fails with EMFILE
    leaves the connection queued and the socket readable. libuv (uvloop) then closes
    a spare file it keeps, accepts and closes what waits, and reopens the spare; once
    another thread has taken that file (a call in the thread pool opening one), every
    loop turn fails again: a worker spun a core at 100% (16,834 failed accepts a
    second, measured) and its peers waited out their deadlines. asyncio logs a
    traceback per failed accept (3.11 goes on accepting in the turn it paused). Here
    the owner first makes room when it can (``make_room``: a worker closes the oldest
    of its connections still in their handshake, and what waits is taken a loop turn
    later, their files free); else the same spare-file trick refuses what waits, a
    batch a loop turn (its peer hears that the connection closed before its
    handshake), and when no file is to be had
    the sockets are left unwatched for 50 ms, doubling up to 1 s, while a warning says
    so once a minute.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        factory: Callable[[], asyncio.BaseProtocol],
        owner: str = "",
        make_room: Callable[[int], int] | None = None,
    ) -> None:
        self.loop = loop
        self.sockets = sockets
        self.owner = owner
        self._factory = factory
        # (the owner's: closes up to n of its connections that may go for new ones,
        # the oldest still in their handshake; how many it closed)
        self._make_room = make_room
        self._spare = _spare_file()
        self._pause = 0.0
        self._resume: asyncio.TimerHandle | None = None
        self._starting: set[asyncio.Task[Any]] = set()
        self._warned = -math.inf
        self.closed = False
        self.accepted = 0
        self.refused = 0  # closed at once for want of files
        self.made_room = 0  # connections its owner closed for new ones instead
        self.pauses = 0
        for sock in sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._readable, sock)

    def __repr__(self) -> str:
        where = ", ".join(str(s.getsockname()) for s in self.sockets if s.fileno() >= 0)
        state = "closed" if self.closed else f"paused {self._pause:g} s" if self._resume else "open"
        return (
            f"<Listener {self.owner} {state} at {where or '-'}: {self.accepted} accepted, "
            f"{self.refused} refused for want of files, {self.pauses} pauses>"
        )

    def is_serving(self) -> bool:
        return not self.closed

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CONNECTION_FAILED:
                    continue
                self._cannot_accept(sock, exc)
                return
            self._pause = 0.0
            self.accepted += 1
            if self._spare is None:  # (taken back now that files are free again)
                self._spare = _spare_file()
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # (asyncio sets it only on sockets made with proto IPPROTO_TCP)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._start(conn, addr))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, conn: socket.socket, addr: Any) -> None:
        def protocol() -> asyncio.BaseProtocol:
            made = self._factory()
            if isinstance(made, Connection):
                if conn.family == socket.AF_UNIX:
                    # (said now, not at connection_made: its owner counts a TCP
                    # connection against its remote host before that)
                    made.kind = "unix"
                if addr:
                    # (where the peer was when accepted: a connection reset since has
                    # no peer name to give, and a stranger's probe was logged as from
                    # "None")
                    made.peer_addr = host_port(addr)
            return made

        try:
            await self.loop.connect_accepted_socket(protocol, conn)
        except BaseException as exc:  # (the transport never took it)
            conn.close()
            if not isinstance(exc, Exception):
                raise
            log.debug("%s: an accepted connection failed to start: %r", self.owner, exc)

    def _cannot_accept(self, sock: socket.socket, exc: OSError) -> None:
        if exc.errno in _OUT_OF_FILES:
            room = self._make_room(ACCEPT_BATCH) if self._make_room is not None else 0
            if room:
                # The owner closed that many of its connections still in their
                # handshake, the oldest (strangers', as a rule): their files are free
                # once their sockets close, the next loop turn, and the new connections,
                # still queued (the socket stays readable), are taken then. (Refused at
                # once, a token holder's went while strangers' held the files.)
                self.made_room += room
                self._warn(f"closed {room} connection(s) in their handshake for new ones", exc)
                return
            if self._spare is None:
                self._spare = _spare_file()  # (files may have been freed since)
            if self._spare is not None:
                self._close_spare()
                refused = 0
                # (at most a batch a loop turn, as _readable: connections arriving as
                # fast as they were refused held the loop, and every peer's calls, for
                # seconds; the socket stays readable: the next turn refuses the next)
                for _ in range(ACCEPT_BATCH):
                    try:
                        conn, _ = sock.accept()
                    except OSError as again:
                        if again.errno in _CONNECTION_FAILED:
                            continue
                        break  # (none left; or another thread took the file just freed)
                    conn.close()
                    refused += 1
                self._spare = _spare_file()
                self.refused += refused
                if refused:
                    self._warn(f"closed {refused} new connection(s) at once", exc)
                    return
        # no file to be had (or an error of the socket itself): stop watching for a
        # while instead of failing every loop turn
        self._pause = min(max(2 * self._pause, ACCEPT_PAUSE[0]), ACCEPT_PAUSE[1])
        self.pauses += 1
        self._warn(f"new connections wait (accepting again in {self._pause:g} s)", exc)
        for s in self.sockets:
            self.loop.remove_reader(s.fileno())
        self._resume = self.loop.call_later(self._pause, self._watch)

    def _watch(self) -> None:
        self._resume = None
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._readable, sock)

    def _warn(self, what: str, exc: OSError) -> None:
        from actorgrad.runtime.procs import open_files_limit  # (procs imports this module)

        now = self.loop.time()
        if now - self._warned >= 60.0:
            self._warned = now
            why = (exc.strerror or str(exc)).lower()
            if exc.errno in _OUT_OF_FILES:
                why = f"is out of open files or memory ({why}; ulimit -n is {open_files_limit()})"
            else:
                why = f"cannot accept connections ({why})"
            log.warning("%s %s: %s", self.owner or "a listener", why, what)

    def close(self) -> None:
        """Stop accepting and close the sockets; connections being set up go on (see
        :meth:`wait_closed`)."""
        if self.closed:
            return
        self.closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self.sockets:
            if sock.fileno() >= 0:
                if not self.loop.is_closed():  # (api._forget: the loop closed first)
                    self.loop.remove_reader(sock.fileno())
                sock.close()
        self._close_spare()

    def _close_spare(self) -> None:
        spare, self._spare = getattr(self, "_spare", None), None
        if spare is not None:
            os.close(spare)

    def __del__(self) -> None:
        # (never closed: a worker whose loop ended without its shutdown, then dropped.
        # Its sockets close when collected; the spare, a bare file number, would stay
        # open for good)
        try:
            self._close_spare()
        except Exception:  # (at interpreter exit; or already gone)
            pass

    async def wait_closed(self) -> None:
        """Wait for the connections accepted before :meth:`close` to be handed over."""
        while self._starting:
            await asyncio.wait(list(self._starting))


def _every_ipv6_interface(host: str) -> bool:
    """Whether ``host`` is IPv6's "every interface" (``::``, also written ``0::0``)."""
    try:
        return ipaddress.IPv6Address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _listen_on(sock: socket.socket, sa: Any, backlog: int, v6only: bool = True) -> socket.socket:
    """``sock`` listening at ``sa``, set up as ``loop.create_server`` sets one up:
    SO_REUSEADDR, an IPv6 one IPv6-only (unless not ``v6only``, where the system lets
    it take IPv4 too), and asyncio's words when the address is taken. Closed if not."""
    af = sock.family
    try:
        if os.name == "posix":  # (as asyncio: elsewhere it lets another take the port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if af == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            except (OSError, AttributeError):
                if v6only:
                    raise
        try:
            sock.bind(sa)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"error while attempting to bind on address {sa!r}: "
                f"{(exc.strerror or str(exc)).lower()}",
            ) from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def bind_tcp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, backlog: int = 100
) -> list[socket.socket]:
    """Listening TCP sockets for ``host`` and ``port``, one per address ``host`` names
    (``""``: every interface of each family), made as ``loop.create_server`` makes
    them (see _listen_on). For IPv6's every interface (``::``), one socket on
    both families where the system allows it (else IPv6 only): asyncio's own sets
    IPV6_V6ONLY, and a cluster at ``--host ::`` could not be joined at 127.0.0.1 or an
    IPv4 address."""
    if _every_ipv6_interface(host):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        return [_listen_on(sock, ("::", port), backlog, v6only=False)]
    # (socket.getaddrinfo, as asyncio's loop.getaddrinfo calls it: uvloop's drops an IPv6
    # address's scope, ('fe80::1', 0, 0, 0) for fe80::1%eth0, and its bind failed with
    # "invalid argument" in every process running uvloop, `actorgrad worker` among them)
    infos = await loop.run_in_executor(
        None,
        lambda: socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ),
    )
    sockets: list[socket.socket] = []
    try:
        for af, kind, proto, _, sa in dict.fromkeys(infos):
            try:
                sock = socket.socket(af, kind, proto)
            except OSError:
                continue  # (a family this system cannot make)
            sockets.append(_listen_on(sock, sa, backlog))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# ---------------------------------------------------------------------------------------
# Local (Unix) sockets
# ---------------------------------------------------------------------------------------

_UCRED = struct.Struct("3i")


def _peer_cred(sock: Any) -> str:
    """``, pid P, uid U`` of the process at the other end of a Unix socket (what the
    kernel says: the only trace of a local process that probes a worker), or ""."""
    try:
        pid, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except (OSError, AttributeError, struct.error):  # (not Linux, or a closed socket)
        return ""
    return f", pid {pid}, uid {uid}"


_machine_key_cache: list[str] = []


def machine_key() -> str:
    """Who can reach our abstract Unix sockets: this boot of this machine, this network
    namespace (abstract names are scoped to it)."""
    if not _machine_key_cache:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            netns = os.stat("/proc/self/ns/net").st_ino
            _machine_key_cache.append(f"{boot}-{netns}")
        except OSError:
            _machine_key_cache.append("")
    return _machine_key_cache[0]


def listen_local(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], Connection],
    owner: str = "",
    make_room: Callable[[int], int] | None = None,
) -> tuple[Listener, str] | None:
    """Listen on a fresh abstract Unix socket; (listener, name to advertise), or None
    where there are none. (``make_room``: see Listener.)"""
    key = machine_key()
    if not local_sockets() or not key:
        return None
    name = f"actorgrad/{key}/{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
        sock.listen(128)
    except OSError:
        sock.close()
        return None
    return Listener(loop, [sock], factory, owner, make_room), name


def local_reachable(name: str) -> bool:
    """Whether ``name`` (advertised by :func:`listen_local`) is reachable from here."""
    parts = name.split("/")
    return (
        local_sockets()
        and len(parts) == 3
        and parts[0] == "actorgrad"
        and parts[1] == machine_key()
    )


async def open_local(loop: asyncio.AbstractEventLoop, name: str, conn: Connection) -> None:
    """Connect ``conn`` to the abstract Unix socket ``name``. OSError when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, "\0" + name)
        await loop.create_unix_connection(lambda: conn, sock=sock)
    except BaseException:
        sock.close()
        raise


# ---------------------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------------------


class Unanswered(WorkerLost):
    """The peer's kernel accepted the connection, but its process did not answer in
    time: hung (or overloaded). Another way to it (TCP after the Unix socket) would wait
    as long again."""


class HelloRefused(WorkerLost):
    """The peer closed the connection before its hello, saying why: it refused what we
    sent (our hello, malformed to it: two versions of the code). Ours would be refused
    again, however long one waits (``actorgrad worker --wait`` fails at once)."""


class ClosedInHandshake(WorkerLost):
    """The peer closed the connection after the hellos without refusing our token: the
    process at that address is an actorgrad worker of a cluster that takes our token
    (it said hello, and would have refused another), shutting down (or dying) as we
    connected, or closing the oldest of too many connections in their handshake (see
    worker.MAX_HANDSHAKING); not an address that reaches something else."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, IPv6 maybe in brackets, or a name) is this
    host's loopback: reachable from this host only."""
    if host == "localhost":
        return True
    try:  # (a name, or "": not an address, ValueError)
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_port(sockaddr: Any) -> Any:
    """A TCP socket address (``(host, port, ...)``) as ``host:port``, an IPv6 host in
    brackets, as addresses are written, with its scope (``[fe80::1%eth0]:4000``: a
    link-local address without it cannot be connected to); anything else as it is."""
    if type(sockaddr) is tuple and len(sockaddr) >= 2 and isinstance(sockaddr[0], str):
        host, port = sockaddr[:2]
        if ":" not in host:
            return f"{host}:{port}"
        if len(sockaddr) >= 4 and sockaddr[3] and "%" not in host:
            try:
                host = f"{host}%{socket.if_indextoname(sockaddr[3])}"
            except OSError:  # (an interface gone since)
                host = f"{host}%{sockaddr[3]}"
        return f"[{host}]:{port}"
    return sockaddr


def split_address(address: str) -> tuple[str, str]:
    """``host:port`` as ``(host, port)``, an IPv6 host without its brackets (as sockets
    take it); ``("", address)`` when there is no colon."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


class TokenRefused(AuthError):
    """The server refused our token (it said so: see _REFUSED)."""


def closed_mid_handshake(exc: BaseException) -> bool:
    """Whether ``exc``, from :func:`handshake`, is the peer closing the connection (it
    gave up waiting, went away) or refusing our token, not a handshake the peer failed
    (an impostor, a wrong token on its side)."""
    return isinstance(exc, TokenRefused) or (
        isinstance(exc, AuthError) and isinstance(exc.__cause__, OSError)
    )


def _foreign(conn: Connection) -> bytes:
    """The first bytes a peer sent before its hello was whole, when they are not the
    start of one (an HTTP server's error reply, say); b"" otherwise."""
    start = bytes(conn._hs_buf[: len(MAGIC)])
    return b"" if MAGIC.startswith(start) else start


def check_frame_size(size: Any) -> int:
    """``size``, a worker's largest frame (None: ``MAX_FRAME_SIZE``), once checked:
    TypeError for what is not an int (a bool, a float), ValueError outside
    ``FRAME_SIZE_RANGE``, each naming the value. (Taken as it came, a 0, a 1.5 or a 100
    failed the worker's join with "cannot send a message of 48 bytes ...: more than the
    largest frame (0 bytes)", its own hello too large for it, and an int past 64 bits
    with "cannot send header value of type 'int'": far from the argument.)"""
    if size is None:
        return MAX_FRAME_SIZE
    low, high = FRAME_SIZE_RANGE
    if type(size) is not int:
        raise TypeError(
            f"max_frame_size must be an int (bytes; None: {MAX_FRAME_SIZE}), not {size!r:.80}"
        )
    if not low <= size <= high:
        raise ValueError(
            f"max_frame_size must be an int in {low}..{high} (bytes: at least a hello's "
            f"worth), not {size!r:.80}"
        )
    return size


def check_token(token: object, source: str = "the cluster token") -> str:
    """``token`` as the handshake keys with it: surrounding whitespace stripped (a token
    read from a file or a variable with its newline must match the workers', which get
    it stripped). TypeError for a non-str, ValueError for a blank one or one that is not
    valid text (a lone surrogate, as os.environ gives for bytes that are not UTF-8):
    each names ``source``, never the value (it may be a secret)."""
    if not isinstance(token, str):
        raise TypeError(f"{source} must be a str, not {type(token).__name__}")
    token = token.strip()
    if not token:
        raise ValueError(f"{source} is empty (or only whitespace)")
    try:
        token.encode()  # (the handshake's MAC key)
    except UnicodeEncodeError:
        # (a lone surrogate: what os.environ makes of bytes that are not UTF-8, or a
        # str built with one)
        raise ValueError(
            f"{source} is not valid text: it holds a lone surrogate (os.environ's "
            "for bytes that are not UTF-8)"
        ) from None
    return token


def _mac(token: str, role: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    return hmac.new(token.encode(), role + nonce_c + nonce_s, hashlib.sha256).digest()


def frame_keys(token: str, nonce_c: bytes, nonce_s: bytes, server: bool) -> tuple[bytes, bytes]:
    """The keys of the frames of a connection whose handshake used these nonces:
    ``(out, in)`` for the server or the client (``server``). One per direction, so a
    frame cannot be sent back to its sender as the peer's."""
    c2s = _mac(token, b"frames C>S", nonce_c, nonce_s)
    s2c = _mac(token, b"frames S>C", nonce_c, nonce_s)
    return (s2c, c2s) if server else (c2s, s2c)


async def handshake(
    conn: Connection,
    token: str,
    *,
    server: bool,
    timeout: float | None = None,  # noqa: ASYNC109 (the handshake deadline)
) -> None:
    """Run the handshake on ``conn`` (raw bytes). Raises AuthError (wrong token, not an
    actorgrad peer, version mismatch; on the server, a client that does not complete it
    in time) or, on the client, WorkerLost when the server does not answer in time (a
    hung process: its kernel accepted the connection) or closes the connection without
    refusing our token (shutting down, dead) — the connection is aborted then."""
    where = conn.peer_addr
    deadline = HANDSHAKE_TIMEOUT if timeout is None else timeout
    magic_ok = False  # (what came is an actorgrad peer's start)
    hello = False  # (the peer's hello came: a close after it is a refusal)
    try:
        async with asyncio.timeout(deadline):
            await conn.made
            where = conn.peer_addr
            nonce = secrets.token_bytes(32)
            conn._write_raw(_HELLO.pack(MAGIC, PROTOCOL_VERSION, nonce))
            # (the magic first: a foreign peer's few bytes are refused at once, not
            # after the deadline, waiting for a whole hello)
            magic = await conn._read_exact(len(MAGIC))
            if magic != MAGIC:
                raise AuthError(
                    f"{where}: not an actorgrad peer (bad handshake magic: it sent {magic!r}...)"
                )
            magic_ok = True
            rest = await conn._read_exact(_HELLO.size - len(MAGIC))
            _, version, peer_nonce = _HELLO.unpack(magic + rest)
            hello = True
            if peer_nonce == nonce:  # (32 random bytes: never a real peer's)
                raise AuthError(
                    f"{where}: not an actorgrad peer (it sent our own handshake back: an "
                    "echo server?)"
                )
            if version != PROTOCOL_VERSION:
                raise AuthError(
                    f"{where}: protocol version mismatch (ours {PROTOCOL_VERSION}, theirs {version})"
                )
            nc, ns = (peer_nonce, nonce) if server else (nonce, peer_nonce)
            # (both ends know both nonces, and nobody else's connection has them)
            conn.pair_id = int.from_bytes(hashlib.sha256(nc + ns).digest()[:8], "big") or 1
            mine = _mac(token, b"S" if server else b"C", nc, ns)
            if not server:
                conn._write_raw(mine)
            peer_mac = await conn._read_exact(_MAC_LEN)
            expected = _mac(token, b"C" if server else b"S", nc, ns)
            if not hmac.compare_digest(peer_mac, expected):
                if server:
                    conn._write_raw(_REFUSED)
                elif peer_mac == _REFUSED[:_MAC_LEN]:
                    raise TokenRefused(
                        f"handshake with {where} refused: wrong cluster token (the peer "
                        "does not take ours)"
                    )
                raise AuthError(
                    f"handshake with {where} failed: wrong cluster token"
                    + ("" if server else " (the server did not prove knowledge of our token)")
                )
            if server:
                # Our MAC only once the client proved it knows the token: sent first, it
                # let anyone who can connect get a MAC of the token over a nonce of their
                # choice, to test guesses of a weak token offline.
                conn._write_raw(mine + b"\x01")
            else:
                ok = await conn._read_exact(1)
                if ok != b"\x01":
                    raise AuthError(f"handshake with {where} refused")
            # (in-process: no wire anyone else could write to; told by the transport
            # itself, not by the kind the connection was made as)
            if not isinstance(conn.transport, _InprocTransport):
                out_key, in_key = frame_keys(token, nc, ns, server)
                conn._mac_out = FrameMac(out_key, conn.frame_front)
                conn._mac_in = FrameMac(in_key, conn.frame_front)
    except TimeoutError:
        conn.abort(AuthError("handshake deadline"))
        if not magic_ok and (junk := _foreign(conn)):
            raise AuthError(
                f"{where}: not an actorgrad peer (it sent {junk!r}..., then "
                f"nothing for {deadline:g} s)"
            ) from None
        if server:
            raise AuthError(f"handshake with {where} did not complete in time") from None
        raise Unanswered(
            f"{where} accepted the connection but did not answer the handshake within "
            f"{deadline:g} s (the process is hung or overloaded, or it is not an actorgrad "
            "worker)"
        ) from None
    except (ConnectionError, OSError) as exc:
        conn.abort(_untraced(exc))
        if not server and isinstance(conn.close_reason, WorkerLost):
            # (closed on our side, by this end's worker shutting down: not the peer
            # closing it, as said below; its "wrong cluster token" sent a caller whose
            # own worker shut down looking for a token problem. A server's accept takes
            # the AuthError below as a connection that went: nobody waits on it)
            raise WorkerLost(str(conn.close_reason)) from exc
        if not magic_ok and (junk := _foreign(conn)):
            raise AuthError(
                f"{where}: not an actorgrad peer (it sent {junk!r}... and closed the connection)"
            ) from exc
        if not server and not hello:
            # (closed before saying anything: a process that died, its kernel having
            # accepted the connection first, or one shutting down; not a refusal of
            # our token, which comes after the hellos)
            raise WorkerLost(
                f"{where} closed the connection before its handshake (the process died, "
                "is shutting down, or is out of open files)"
            ) from exc
        if server:
            if isinstance(conn.close_reason, AuthError):
                # (closed on our side: by its worker, to make room for newer ones)
                raise AuthError(f"handshake with {where}: {conn.close_reason}") from exc
            raise AuthError(f"handshake with {where}: the client closed the connection") from exc
        # (after the hellos, a peer that refuses our token says so: see _REFUSED)
        raise ClosedInHandshake(
            f"{where} closed the connection during its handshake, without refusing our token "
            "(the process is shutting down or died, or it made room for newer connections: "
            "too many were in their handshake, a flood of them)"
        ) from exc
    except AuthError as exc:
        conn.abort(_untraced(exc))
        raise
    conn.start_frames()


def _untraced(exc: BaseException) -> BaseException:
    """``exc`` as the close_reason of a connection whose handshake raises it on: a copy
    without its traceback. ``exc``'s own holds the handshake's frame (and _read_exact's),
    whose locals hold the connection: kept as its close_reason, it made a cycle (the
    connection, its transport and buffers) kept until a gc run, for every connection a
    stranger or a stale peer opened and failed."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:  # (a type that is not made again from its args)
        return exc
    copy.__cause__ = exc.__cause__
    copy.__suppress_context__ = exc.__suppress_context__
    return copy


# ---------------------------------------------------------------------------------------
# In-process transport
# ---------------------------------------------------------------------------------------


class _InprocTransport(asyncio.Transport):
    """One end of an in-process byte pipe, delivering on the loop.

    Small writes (bytes, or the connection's handed-over coalescing buffer) are queued
    as they are. Large out-of-band buffers (memoryviews of the sender's arrays) are
    queued without a copy: the receiver copies them once, into its frame buffer; until
    then the sender's protocol is paused for writing, so ``Connection.send`` returns
    only after delivery (the caller's arrays are not referenced afterwards).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Connection, name: str) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._name = name
        self.peer: _InprocTransport | None = None
        self._closing = False
        self._paused = False
        self._inbox: deque[tuple[Any, _InprocTransport | None, int]] = deque()
        self._scheduled = False
        self._unsent = 0  # zero-copy bytes written by us, not yet delivered
        self._writing_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("inproc", self._name)
        return default

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return self._unsent

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: Any) -> None:
        if self._closing or self.peer is None:
            return
        if isinstance(data, memoryview):
            mv = data if data.format == "B" and data.ndim == 1 else data.cast("B")
            n = mv.nbytes
            if n == 0:
                return
            self._unsent += n
            self.peer._receive(mv, self, n)
            if not self._writing_paused:
                self._writing_paused = True
                self._protocol.pause_writing()
        elif type(data) is bytes or type(data) is bytearray:
            self.peer._receive(data, None, 0)  # immutable, or handed over by its writer
        else:
            self.peer._receive(bytes(data), None, 0)

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        for data in list_of_data:
            self.write(data)

    def _delivered(self, n: int) -> None:
        self._unsent -= n
        if self._unsent <= 0 and self._writing_paused:
            self._unsent = 0
            self._writing_paused = False
            if not self._closing:
                self._protocol.resume_writing()

    def _receive(self, data: Any, sender: _InprocTransport | None, n: int) -> None:
        if self._closing:
            if sender is not None:
                sender._delivered(n)
            return
        self._inbox.append((data, sender, n))
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._paused:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        inbox = self._inbox
        while inbox and not self._paused and not self._closing:
            data, sender, n = inbox.popleft()
            try:
                self._protocol.data_received(data)
            finally:
                if sender is not None:
                    sender._delivered(n)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule()

    def is_reading(self) -> bool:
        return not self._paused

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        inbox, self._inbox = self._inbox, deque()
        for _, sender, n in inbox:
            if sender is not None:
                sender._delivered(n)
        self._loop.call_soon(self._protocol.connection_lost, None)
        peer, self.peer = self.peer, None
        if peer is not None:
            # deliver what is already on its way, then close the other end
            peer.peer = None
            self._loop.call_soon(peer._close_after_pump)

    def _close_after_pump(self) -> None:
        if not self._paused:
            self._pump()
        self.close()

    def abort(self) -> None:
        self.close()


_inproc_listeners: dict[str, Callable[[], Connection]] = {}
_inproc_ids = itertools.count(1)


def inproc_listen(factory: Callable[[], Connection]) -> str:
    """Register an in-process listener; returns its address ``inproc://N``."""
    address = f"inproc://{next(_inproc_ids)}"
    _inproc_listeners[address] = factory
    return address


def inproc_unlisten(address: str) -> None:
    _inproc_listeners.pop(address, None)


def open_inproc(address: str, client: Connection) -> None:
    """Connect ``client`` to the in-process listener at ``address``."""
    factory = _inproc_listeners.get(address)
    if factory is None:
        raise ConnectionRefusedError(f"no in-process worker listens at {address}")
    loop = asyncio.get_running_loop()
    server = factory()
    ct = _InprocTransport(loop, client, address)
    st = _InprocTransport(loop, server, "client")
    ct.peer, st.peer = st, ct
    server.connection_made(st)
    client.connection_made(ct)
