"""RPC between two processes: actorgrad vs a bare uvloop+msgpack echo vs PyTorch RPC.

Shapes (the same on every side):

- round trip: sequential calls of a function returning its small argument (µs/call);
- pipelined: batches of 64 calls in flight (calls/s);
- echo: a 16 MiB float32 array sent and returned (MiB/s, both directions counted).

actorgrad: the driver (this process) and one worker process (``ag.local_cluster(1,
processes=True)``). The bare echo (``benchmarks._echo_baseline``) and, when torch is
installed, PyTorch's TensorPipe RPC (``benchmarks.torch_ref``) are measured in the same
run; the table prints ratios because the machines are shared and noisy. Targets: round
trip at most 1/4 of PyTorch's, pipelined at least 8x PyTorch's.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

from benchmarks import _echo_baseline, torch_ref
from benchmarks._report import Metric, render, timed

SECONDS = float(os.environ.get("BENCH_SECONDS", "2.0"))
MIB = 1024 * 1024


def echo(x: Any) -> Any:
    """Runs on the worker: returns its argument."""
    return x


async def measure_actorgrad(seconds: float = SECONDS) -> dict[str, float]:
    """``rtt_us``, ``pipelined_calls_s``, ``echo_mib_s`` of actorgrad (driver + w1)."""
    import actorgrad as ag

    out: dict[str, float] = {}
    async with ag.local_cluster(1, processes=True):
        per = await timed(lambda: ag.rpc("w1", echo, (1,)), warmup=200, seconds=seconds)
        out["rtt_us"] = per * 1e6

        async def batch() -> None:
            calls = (ag.rpc("w1", echo, (i,)) for i in range(torch_ref.PIPELINE_DEPTH))
            await asyncio.gather(*calls)

        per = await timed(batch, warmup=5, seconds=seconds)
        out["pipelined_calls_s"] = torch_ref.PIPELINE_DEPTH / per

        arr = np.ones(torch_ref.ECHO_BYTES // 4, dtype=np.float32)

        async def big() -> None:
            back = await ag.rpc("w1", echo, (arr,))
            assert back.shape == arr.shape

        per = await timed(big, warmup=2, seconds=seconds)
        out["echo_mib_s"] = 2 * torch_ref.ECHO_BYTES / per / MIB
    return out


METRICS = [
    Metric("rtt_us", "round trip", "us/call", False, 4.0),
    Metric("pipelined_calls_s", "pipelined x64", "calls/s", True, 8.0),
    Metric("echo_mib_s", "16 MiB echo", "MiB/s", True, None),
]


def main() -> None:
    """Measure all three sides and print the table."""
    with asyncio.Runner(loop_factory=_echo_baseline.new_loop) as runner:
        bare = runner.run(_echo_baseline.measure(SECONDS))
        ours = runner.run(measure_actorgrad(SECONDS))
    torch: dict[str, float] | None = None
    if torch_ref.available():
        torch = torch_ref.measure_rpc(SECONDS, threads=1)
    else:
        print("(torch not installed: PyTorch column skipped)")
    columns = [("bare echo", bare), ("torch", torch)]
    print(render(METRICS, ours, columns, target_column="torch"), flush=True)


if __name__ == "__main__":
    main()
