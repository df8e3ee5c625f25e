"""Instructions per step of the distributed hop, counted by valgrind: a steady metric for
A/B comparisons of the Python-bound code paths on a noisy machine.

Wall-clock A/B runs on the shared 2-core machines need 6-8 paired runs to see a 10%
change; this count (one process, the in-process transport, ``PYTHONHASHSEED=0``) moves
by under 1% between runs. It counts work, not waiting: it cannot see wake-ups, cache
misses or contention between processes, so confirm a gain in ``make bench`` too.

Usage (valgrind installed; about a minute per count)::

    python -m benchmarks.instructions            # instructions per hop step
    python -m benchmarks.instructions --steps 1000

Each count is the difference between a run of ``20 + steps`` steps and one of 20, so
start-up and warm-up cancel out. Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys

WARMUP = 20


async def _steps(n: int) -> None:
    import numpy as np

    import actorgrad as ag
    from actorgrad.dist import backward
    from actorgrad.runtime import worker
    from benchmarks import bench_dist

    # Under valgrind everything runs ~50x slower: hop_mul would take more than
    # FAST_CALL and run in the thread pool, which it never does in a real run (and the
    # count would swing by 10% with how often it crossed the line).
    worker.FAST_CALL = 10.0
    # Nor heartbeats: their number follows the wall-clock time valgrind takes (~20 k
    # instructions a step at its usual speed), not the work of a step.
    worker.HEARTBEAT_INTERVAL = worker.HEARTBEAT_TIMEOUT = 3600.0
    # Nor a backward part past its time slice (SLICE, wall-clock time): a part of ~0.1 ms
    # takes ~5 ms under valgrind, and on a busy machine one went past the slice now and
    # then (1 step of 1,000 in a probe) and on in the thread pool, a round trip through
    # a thread that a real run never makes counted into the step.
    backward.SLICE = 3600.0
    async with ag.local_cluster(1):
        await ag.rpc("w1", bench_dist.setup_hop, (16,))
        x = ag.tensor(np.ones(16, dtype=np.float32), requires_grad=True)
        for _ in range(WARMUP + n):
            await bench_dist._hop_step(x)


def _count(steps: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--run",
        str(steps),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    ap.add_argument("--steps", type=int, default=500, help="measured steps (default 500)")
    ap.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run is not None:  # inside valgrind
        from benchmarks._echo_baseline import new_loop

        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(_steps(args.run))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    per_step = (_count(args.steps) - _count(0)) / args.steps
    print(f"hop step (in-process): {per_step:,.0f} instructions")


if __name__ == "__main__":
    main()
