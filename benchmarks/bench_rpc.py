"""RPC between two processes: actorgrad vs a bare uvloop+msgpack echo vs PyTorch RPC.

Shapes (the same on every side):

- round trip: sequential calls of a function returning its small argument (µs/call);
- pipelined: batches of 64 calls in flight (calls/s);
- echo: a 16 MiB float32 array sent and returned (MiB/s, both directions counted).

actorgrad: the driver (this process) and one worker process (``ag.local_cluster(1,
processes=True)``). The bare echo (``benchmarks._echo_baseline``) and, when torch is
installed, PyTorch's TensorPipe RPC (``benchmarks.torch_ref``) are measured in the same
run: the bare echo's windows interleaved with actorgrad's, PyTorch in turns of its own
(``take_turns``, between ours: TensorPipe busy-polls); the best window of each side counts
and the table prints ratios, because the machines are shared and noisy. Targets: round trip
at most 1/4 of PyTorch's, pipelined at least 8x PyTorch's.

``BENCH_SECONDS`` (default 2): measuring time per metric and side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np

from benchmarks import _echo_baseline, torch_ref
from benchmarks._report import Metric, Window, Workloads, interleave, render, take_turns

SECONDS = float(os.environ.get("BENCH_SECONDS", "2.0"))

METRICS = [
    Metric("rtt_us", "round trip", "us/call", False, 4.0),
    Metric("pipelined_calls_s", "pipelined x64", "calls/s", True, 8.0),
    Metric("echo_mib_s", "16 MiB echo", "MiB/s", True, None),
]


def echo(x: Any) -> Any:
    """Runs on the worker: returns its argument."""
    return x


class ActorgradRpc(Workloads):
    """actorgrad's side: step functions against worker ``w1`` of a running cluster."""

    def __init__(self) -> None:
        super().__init__(torch_ref.WARMUP)

    async def make(self, name: str) -> Callable[[], Awaitable[Any]]:
        import actorgrad as ag

        if name == "rtt_us":
            return lambda: ag.rpc("w1", echo, (1,))
        if name == "pipelined_calls_s":

            async def batch() -> None:
                calls = (ag.rpc("w1", echo, (i,)) for i in range(torch_ref.PIPELINE_DEPTH))
                await asyncio.gather(*calls)

            return batch
        if name == "echo_mib_s":
            arr = np.ones(torch_ref.ECHO_BYTES // 4, dtype=np.float32)

            async def big() -> None:
                back = await ag.rpc("w1", echo, (arr,))
                assert back.shape == arr.shape

            return big
        raise ValueError(f"unknown metric {name!r}")


def start_torch(
    stack: contextlib.ExitStack | contextlib.AsyncExitStack, workers: int, *, threads: int
) -> torch_ref.TorchWorld | None:
    """A torch world entered on ``stack``, or None (said why) when torch is unusable."""
    if not torch_ref.available():
        print("(torch not installed: PyTorch column skipped)")
        return None
    try:
        return stack.enter_context(torch_ref.TorchWorld(workers, threads=threads))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"(torch reference did not start, column skipped: {exc})")
        return None


# TensorPipe over plain TCP (its defaults pick shared memory between local processes;
# actorgrad always uses TCP): the second PyTorch column.
TORCH_TCP = {"TORCH_REF_TRANSPORTS": "uv", "TORCH_REF_CHANNELS": "basic"}


async def measure_torch(
    workers: int,
    metrics: list[str],
    seconds: float,
    *,
    threads: int,
    env: dict[str, str] | None = None,
) -> dict[str, float] | None:
    """Best seconds per step of the PyTorch side, or None when torch is unusable.

    Measured in a turn of its own: TensorPipe's processes busy-poll (about 65% of a
    core each, measured), so keeping them alive during our windows would take CPU from
    our side on a 2-core machine. Starting and stopping torch's processes blocks for
    seconds: done in a thread, so a cluster of ours stays alive meanwhile (its
    heartbeats stopped otherwise). ``env`` is set while its processes start.
    """
    stack = contextlib.ExitStack()
    with contextlib.ExitStack() as envs:
        for key, value in (env or {}).items():
            envs.enter_context(_env(key, value))
        world = await asyncio.to_thread(start_torch, stack, workers, threads=threads)
    try:
        if world is None:
            return None
        best = await interleave({"torch": torch_window(world)}, metrics, seconds, required="")
    finally:
        await asyncio.to_thread(stack.close)
    return best["torch"] or None


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def torch_window(world: torch_ref.TorchWorld) -> Window:
    """An awaitable window of the torch world (its driver blocks: run it in a thread)."""

    async def window(name: str, seconds: float) -> float:
        return await asyncio.to_thread(world.window, name, seconds)

    return window


async def run(seconds: float = SECONDS) -> dict[str, dict[str, float] | None]:
    """Metrics of every side: {"actorgrad": ..., "bare echo": ..., "torch": ... or None}."""
    import actorgrad as ag

    names = [m.key for m in METRICS]
    theirs_tcp = await measure_torch(1, names, seconds, threads=1, env=TORCH_TCP)
    async with _echo_baseline.EchoBaseline() as bare, ag.local_cluster(1, processes=True):
        sides: dict[str, Window] = {
            "actorgrad": ActorgradRpc().window,
            "bare echo": bare.window,
        }
        theirs, best = await take_turns(
            lambda s: measure_torch(1, names, s, threads=1), sides, names, seconds
        )
    best["torch"] = theirs
    best["torch tcp"] = theirs_tcp
    return {
        side: None if res is None else {n: torch_ref.to_metric(n, per) for n, per in res.items()}
        for side, res in best.items()
    }


def main() -> None:
    """Measure all sides and print the table."""
    with asyncio.Runner(loop_factory=_echo_baseline.new_loop) as runner:
        res = runner.run(run(SECONDS))
    ours = res["actorgrad"]
    assert ours is not None
    columns = [
        ("bare echo", res["bare echo"]),
        ("torch", res["torch"]),
        ("torch tcp", res["torch tcp"]),
    ]
    print(render(METRICS, ours, columns, target_column="torch"))
    if res["torch"] is not None:
        print(torch_ref.describe(1), flush=True)


if __name__ == "__main__":
    main()
