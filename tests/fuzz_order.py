"""Delivery-order fuzzing of the in-process transport (``ACTORGRAD_TEST_FUZZ_SEED=N``).

The in-process transport pumps each connection end's inbox with ``loop.call_soon``:
one deterministic interleaving of the messages of different connections. Real sockets
keep each connection's order but deliver different connections' messages in any
relative order. Installed, each pump runs after a random number of loop turns, delivers
a random number of chunks, and may split a chunk in two reads (a frame across reads);
a connection's close comes after its data, after a random number of turns too. Seeded
by the variable and the test's id: a failure reproduces when the test run alone with
the same seed, unless timing decides too (a backward part over ``SLICE`` going to a
thread, a timer).
"""

from __future__ import annotations

import random
import zlib
from collections import deque

from actorgrad.runtime import transport

#: Loop turns a pump waits (turns, not seconds: the same seed gives the same order)
TURNS = (0, 0, 0, 1, 2, 3, 8, 30)
_rng = random.Random(0)
_installed: list[bool] = []


def reseed(seed: int, test_id: str) -> None:
    """Seed the choices for one test (the same test and seed: the same choices)."""
    _rng.seed(seed * 1_000_003 + zlib.crc32(test_id.encode()))


def _later(loop, fn, turns: int | None = None) -> None:
    if turns is None:
        turns = _rng.choice(TURNS)
    if turns:
        loop.call_soon(_later, loop, fn, turns - 1)
    else:
        loop.call_soon(fn)


def install() -> None:
    """Patch ``_InprocTransport`` (for the rest of the process)."""
    if _installed:
        return
    _installed.append(True)
    T = transport._InprocTransport

    def _schedule(self) -> None:
        if not self._scheduled and not self._paused:
            self._scheduled = True
            # (the pump as the end has it when it runs, not now: conftest.hold_end holds
            # an end's reads by replacing it, also where a pump was already on its way)
            _later(self._loop, lambda: self._pump())

    def _pump(self) -> None:
        self._scheduled = False
        inbox = self._inbox
        budget = _rng.randint(1, 4)
        while inbox and not self._paused and not self._closing and budget:
            budget -= 1
            data, sender, n = inbox.popleft()
            size = len(data) if not isinstance(data, memoryview) else data.nbytes
            if size > 1 and _rng.random() < 0.25:  # a frame across two reads
                k = _rng.randrange(1, size)
                inbox.appendleft((memoryview(data)[k:], sender, n))
                self._protocol.data_received(bytes(memoryview(data)[:k]))
                break
            try:
                self._protocol.data_received(data)
            finally:
                if sender is not None:
                    sender._delivered(n)
        if inbox:
            self._schedule()

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox and not self._paused and not self._closing:
            data, sender, n = inbox.popleft()
            try:
                self._protocol.data_received(data)
            finally:
                if sender is not None:
                    sender._delivered(n)

    def _close_after_pump(self) -> None:
        # (the close comes after the connection's data, as a FIN after a socket's)
        if not self._paused:
            _drain(self)
        self.close()

    def close(self) -> None:
        # (as the original, but the peer's close comes after random turns)
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
            peer.peer = None
            _later(self._loop, lambda: peer._close_after_pump())

    T._schedule = _schedule
    T._pump = _pump
    T._close_after_pump = _close_after_pump
    T.close = close


# --- sockets (``ACTORGRAD_TEST_FUZZ_STREAMS=1`` too) ---------------------------------
# A socket's reads come as the kernel and the loop's selector have them: each
# connection's bytes in order, but what one connection gets relative to another, and
# where a read ends, depend on timing. Installed, what a socket connection reads waits
# in a queue of its own, delivered after random loop turns, a random number of reads at
# a time, a read maybe split in two; its end (EOF, reset) comes after its data. Reads
# wait while the connection is paused (a full mailbox, unsent replies). Its own
# generator: the in-process choices of a seed stay what they were.
_srng = random.Random(0)


def reseed_streams(seed: int, test_id: str) -> None:
    _srng.seed(seed * 1_000_033 + zlib.crc32(test_id.encode()) + 1)


def install_streams() -> None:
    """Patch ``StreamConnection`` (TCP and Unix sockets) for the rest of the process."""
    S = transport.StreamConnection
    if getattr(S, "_fuzzed", False):
        return
    S._fuzzed = True
    base_lost = S.connection_lost

    def state(self) -> dict:
        st = self.__dict__.get("_fz")
        if st is None:
            st = self._fz = {"q": deque(), "lost": None, "sched": False}
        return st

    def schedule(self, turns: int | None = None) -> None:
        st = state(self)
        if not st["sched"]:
            st["sched"] = True
            loop = self.loop
            if turns is None:
                turns = _srng.choice(TURNS)
            _later(loop, lambda: pump(self), turns)

    def pump(self) -> None:
        st = state(self)
        st["sched"] = False
        q = st["q"]
        if q and not self.closed and (self.paused_reading or self._out_full):
            # (paused: what was read waits, as the kernel's buffer would; looked at
            # again soon, not every turn)
            st["sched"] = True
            self.loop.call_later(0.005, lambda: pump(self))
            return
        budget = _srng.randint(1, 4)
        while q and budget and (self.closed or not (self.paused_reading or self._out_full)):
            budget -= 1
            data = q.popleft()
            if len(data) > 1 and _srng.random() < 0.25:
                k = _srng.randrange(1, len(data))
                q.appendleft(data[k:])
                data = data[:k]
                budget = 0
            transport.Connection.data_received(self, data)
            if self.closed:
                q.clear()
        if q:
            schedule(self)
        elif st["lost"] is not None:
            exc = st["lost"][0]
            st["lost"] = None
            base_lost(self, exc)

    # (one buffer for every connection: a read is copied out at once. One each cost
    # 256 KiB a connection, and tests bound what a connection costs)
    shared = memoryview(bytearray(256 * 1024))

    def get_buffer(self, sizehint: int) -> memoryview:
        return shared

    def buffer_updated(self, nbytes: int) -> None:
        state(self)["q"].append(bytes(shared[:nbytes]))
        schedule(self)

    def connection_lost(self, exc: Exception | None) -> None:
        st = state(self)
        if not st["q"]:
            base_lost(self, exc)
            return
        st["lost"] = (exc,)
        schedule(self)

    S.get_buffer = get_buffer
    S.buffer_updated = buffer_updated
    S.connection_lost = connection_lost
