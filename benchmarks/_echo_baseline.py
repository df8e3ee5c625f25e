"""The floor under any RPC layer: a bare uvloop + msgpack echo between two processes.

The server (``python -m benchmarks._echo_baseline``, a subprocess) is an asyncio
``BufferedProtocol`` reading 8-byte big-endian length-prefixed frames; a frame is a u32
header length, a msgpack header ``[call_id, payload]`` and a raw attachment (how arrays
travel, out of band, as actorgrad's codec does). It answers each frame with the same
payload re-encoded and the same attachment. The client measures the shapes of
``bench_rpc``: a sequential round trip, 64 calls in flight, and a 16 MiB float32 echo.
No auth, no actors, no codec beyond msgpack: what actorgrad adds on top of this is its
overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np

from benchmarks import torch_ref
from benchmarks._report import Workloads

_LEN = struct.Struct(">Q")
_HLEN = struct.Struct(">I")
MIB = 1024 * 1024


class _Framed(asyncio.BufferedProtocol):
    """Splits the byte stream into frames and hands each to ``on_frame``.

    Small frames are parsed out of a reusable scratch buffer; the body of a large frame
    is read straight into its own buffer (no re-copying as it arrives).
    """

    _SCRATCH = 256 * 1024

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(self._SCRATCH)
        self._have = 0  # bytes pending in the scratch buffer
        self._big: bytearray | None = None  # body of a large frame being filled
        self._big_pos = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_pos :]
        return memoryview(self._scratch)[self._have :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_pos += nbytes
            if self._big_pos == len(self._big):
                body, self._big = self._big, None
                self.on_frame(body)
            return
        self._have += nbytes
        buf = self._scratch
        start = 0
        while self._have - start >= 8:
            (n,) = _LEN.unpack_from(buf, start)
            avail = self._have - start - 8
            if avail >= n:
                self.on_frame(bytes(buf[start + 8 : start + 8 + n]))
                start += 8 + n
                continue
            if 8 + n > len(buf):  # large frame: give it its own buffer
                self._big = bytearray(n)
                self._big[:avail] = buf[start + 8 : self._have]
                self._big_pos = avail
                self._have = start = 0
            break
        if start:
            rest = self._have - start
            buf[:rest] = buf[start : self._have]
            self._have = rest

    def send(self, header: bytes, attachment: bytes | memoryview = b"") -> None:
        """One frame: u32 header length, msgpack header, raw attachment (out of band)."""
        assert self.transport is not None
        n = 4 + len(header) + len(attachment)
        prefix = _LEN.pack(n) + _HLEN.pack(len(header)) + header
        if len(attachment):
            self.transport.writelines((prefix, attachment))
        else:
            self.transport.write(prefix)

    def on_frame(self, frame: bytes | bytearray) -> None:
        raise NotImplementedError


def _split(frame: bytes | bytearray) -> tuple[Any, memoryview]:
    (hlen,) = _HLEN.unpack_from(frame, 0)
    view = memoryview(frame)
    return msgpack.unpackb(view[4 : 4 + hlen]), view[4 + hlen :]


class _EchoServer(_Framed):
    def on_frame(self, frame: bytes | bytearray) -> None:
        header, attachment = _split(frame)
        call_id, payload = header
        self.send(msgpack.packb([call_id, payload]), attachment)


class _Client(_Framed):
    def __init__(self) -> None:
        super().__init__()
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_frame(self, frame: bytes | bytearray) -> None:
        header, attachment = _split(frame)
        call_id, payload = header
        fut = self._waiting.pop(call_id, None)
        if fut is not None and not fut.done():
            fut.set_result((payload, attachment))

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("echo server went away"))
        if not self.lost.done():
            self.lost.set_result(None)

    def call(self, payload: Any, attachment: bytes | memoryview = b"") -> asyncio.Future[Any]:
        """Send ``payload`` (msgpack) and ``attachment`` (raw); resolves to both, echoed."""
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self.send(msgpack.packb([self._next, payload]), attachment)
        return fut


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_EchoServer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    # run until the parent closes our stdin (or kills us)
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


class EchoBaseline(Workloads):
    """The echo server subprocess and a connected client.

    ``async with EchoBaseline() as eb: await eb.window("rtt_us", 0.5)`` returns seconds
    per step of one measuring window (``benchmarks.torch_ref`` names the metrics and
    converts). Leaving closes the connection and stops the server (kill if needed).
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._transport: Any = None
        self._client: _Client | None = None
        super().__init__(torch_ref.WARMUP)

    async def __aenter__(self) -> EchoBaseline:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks._echo_baseline",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert self._proc.stdout is not None
            line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
            if not line.strip():
                raise RuntimeError(f"echo server did not start (exit {self._proc.returncode})")
            loop = asyncio.get_running_loop()
            self._transport, self._client = await loop.create_connection(
                _Client, "127.0.0.1", int(line)
            )
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
            assert self._client is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._client.lost, 5)
            self._transport = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def make(self, name: str) -> Callable[[], Awaitable[Any]]:
        client = self._client
        assert client is not None
        if name == "rtt_us":
            return lambda: client.call(1)
        if name == "pipelined_calls_s":

            async def batch() -> None:
                await asyncio.gather(*(client.call(i) for i in range(torch_ref.PIPELINE_DEPTH)))

            return batch
        if name == "echo_mib_s":
            arr = np.ones(torch_ref.ECHO_BYTES // 4, dtype=np.float32)

            async def echo() -> None:
                meta = [arr.dtype.str, list(arr.shape)]
                (dtype, shape), raw = await client.call(meta, memoryview(arr.data).cast("B"))
                np.frombuffer(raw, dtype=dtype).reshape(shape)

            return echo
        raise ValueError(f"unknown metric {name!r}")


async def measure(seconds: float = 1.5) -> dict[str, float]:
    """``rtt_us``, ``pipelined_calls_s`` and ``echo_mib_s`` of the bare echo (best of 3)."""
    async with EchoBaseline() as eb:
        out = {}
        for name in torch_ref.RPC_METRICS:
            per = min([await eb.window(name, seconds / 3) for _ in range(3)])
            out[name] = torch_ref.to_metric(name, per)
        return out


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else the default one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    """Print the baseline numbers."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        res = runner.run(measure())
    print({k: round(v, 1) for k, v in res.items()})


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_loop) as _runner:
        _runner.run(_serve())
