"""Distributed autograd between processes: actorgrad vs PyTorch (dist autograd + RPC).

Workloads (the same shapes on both sides; driver and workers are separate processes):

- hop: the driver sends x (16 float32, requires grad) to w1, which returns x * w (w a
  tensor on w1 that requires grad); loss = sum; distributed backward; the driver reads
  its gradient of x. it/s.
- bw: the same with 4M float32 (16 MiB); MiB/s of activations and gradients moved
  (x out, y back, dL/dy out, dL/dx back: 4 x 16 MiB counted per iteration, though
  dL/dy of y.sum() travels as a 4-byte broadcast on both sides).
- chain: x (64x256) through 3 stages on w1, w2, w3, each tanh(x @ W) with W 256x256 on
  its worker, every hop returning to the driver; loss = mean(out^2). it/s.

Targets (ratio actorgrad / PyTorch): hop >= 5x, chain >= 3x, bw >= 1x. The PyTorch side
(``benchmarks.torch_ref``, when torch is installed) and ours take turns (``take_turns``,
never at the same time: TensorPipe busy-polls), and the best window of each side counts,
because the machines are shared and noisy. ``BENCH_SECONDS`` (default 2): measuring
time per metric and side; ``BENCH_THREADS`` (default 1): math threads per process on
both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np

from benchmarks import _echo_baseline, torch_ref
from benchmarks._report import Metric, Workloads, render, take_turns
from benchmarks.bench_rpc import TORCH_TCP, measure_torch

SECONDS = float(os.environ.get("BENCH_SECONDS", "2.0"))
# math threads per process on both sides (torch.set_num_threads / BLAS env of the
# actorgrad workers): 4 processes share the machine, and spinning BLAS threads of
# oversubscribed processes cost more than they bring at these sizes.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
MIB = 1024 * 1024

METRICS = [
    Metric("hop_it_s", "hop (16 floats)", "it/s", True, 5.0),
    Metric("bw_mib_s", "bw (16 MiB)", "MiB/s", True, 1.0),
    Metric("chain_it_s", "chain (3 stages)", "it/s", True, 3.0),
]

# --- functions that run on the workers (module level: resolvable by name) ---

_STATE: dict[str, Any] = {}


def setup_hop(n: int) -> None:
    """Create this worker's hop weight: n float32 of 0.5, requiring grad."""
    import actorgrad as ag

    _STATE["hop_w"] = ag.tensor(np.full(n, 0.5, dtype=np.float32), requires_grad=True)


def hop_mul(x: Any) -> Any:
    """x * w with this worker's hop weight."""
    return x * _STATE["hop_w"]


def setup_chain(dim: int, seed: int) -> None:
    """Create this worker's stage weight W (dim x dim), requiring grad."""
    import actorgrad as ag

    _STATE["chain_w"] = ag.tensor(torch_ref.chain_weight(dim, seed), requires_grad=True)


def chain_stage(x: Any) -> Any:
    """tanh(x @ W) with this worker's stage weight."""
    return (x @ _STATE["chain_w"]).tanh()


# --- the driver side ---


async def _hop_step(x: Any) -> np.ndarray:
    import actorgrad as ag

    async with ag.dist.context() as cid:
        y = await ag.rpc("w1", hop_mul, (x,))
        loss = y.sum()
        await ag.dist.backward(cid, [loss])
        return ag.dist.get_gradients(cid)[x]


async def _chain_step(x: Any) -> np.ndarray:
    import actorgrad as ag

    async with ag.dist.context() as cid:
        h = x
        for i in range(torch_ref.CHAIN_STAGES):
            h = await ag.rpc(f"w{i + 1}", chain_stage, (h,))
        loss = (h * h).mean()
        await ag.dist.backward(cid, [loss])
        return ag.dist.get_gradients(cid)[x]


class ActorgradDist(Workloads):
    """actorgrad's side: step functions against workers w1..w3 of a running cluster."""

    def __init__(self) -> None:
        super().__init__(torch_ref.WARMUP)
        self._hop_n = 0  # size of w1's hop weight right now
        self._rng = np.random.default_rng(0)

    async def _hop_weight(self, n: int) -> None:
        import actorgrad as ag

        if self._hop_n != n:
            await ag.rpc("w1", setup_hop, (n,))
            self._hop_n = n

    async def make(self, name: str) -> Callable[[], Awaitable[Any]]:
        import actorgrad as ag

        if name in ("hop_it_s", "bw_mib_s"):
            n = torch_ref.HOP_N if name == "hop_it_s" else torch_ref.BW_N
            x = ag.tensor(self._rng.random(n, dtype=np.float32), requires_grad=True)

            async def hop() -> None:
                await self._hop_weight(n)
                await _hop_step(x)

            await self._hop_weight(n)
            g = await _hop_step(x)
            np.testing.assert_allclose(g, np.full(n, 0.5, dtype=np.float32))
            return hop
        if name == "chain_it_s":
            for i in range(torch_ref.CHAIN_STAGES):
                await ag.rpc(f"w{i + 1}", setup_chain, (torch_ref.CHAIN_DIM, i))
            xc = ag.tensor(torch_ref.chain_input(), requires_grad=True)
            torch_ref.check_chain_grad(await _chain_step(xc))
            return lambda: _chain_step(xc)
        raise ValueError(f"unknown metric {name!r}")


async def hop_phases(seconds: float = 0.5) -> dict[str, float]:
    """Mean µs of each phase of the small hop (diagnostics for actorgrad's own code)."""
    import actorgrad as ag

    await ag.rpc("w1", setup_hop, (torch_ref.HOP_N,))
    x = ag.tensor(np.ones(torch_ref.HOP_N, dtype=np.float32), requires_grad=True)
    names = ["enter", "rpc", "loss", "backward", "get_gradients", "exit"]
    total = np.zeros(len(names))
    n = 0
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end:
        t = [clock()]
        async with ag.dist.context() as cid:
            t.append(clock())
            y = await ag.rpc("w1", hop_mul, (x,))
            t.append(clock())
            loss = y.sum()
            t.append(clock())
            await ag.dist.backward(cid, [loss])
            t.append(clock())
            ag.dist.get_gradients(cid)
            t.append(clock())
        t.append(clock())
        total += np.diff(t)
        n += 1
    out = dict(zip(names, (total / n * 1e6).tolist(), strict=True))
    t0 = clock()
    for _ in range(200):
        await ag.rpc("w1", hop_mul, (x.detach(),))
    out["plain rpc"] = (clock() - t0) / 200 * 1e6
    return out


@contextlib.contextmanager
def _math_threads(n: int) -> Iterator[None]:
    """BLAS/OpenMP thread counts for processes started inside (the workers)."""
    saved = {k: os.environ.get(k) for k in _BLAS_ENV}
    os.environ.update({k: str(n) for k in _BLAS_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def run(
    seconds: float = SECONDS,
) -> tuple[dict[str, dict[str, float] | None], dict[str, float]]:
    """Metrics of both sides ({"actorgrad": ..., "torch": ... or None}) and actorgrad's
    hop phases (µs)."""
    import actorgrad as ag

    names = [m.key for m in METRICS]
    stages = torch_ref.CHAIN_STAGES
    # (over TCP: one turn, a column for information)
    theirs_tcp = await measure_torch(stages, names, seconds, threads=THREADS, env=TORCH_TCP)
    async with contextlib.AsyncExitStack() as stack:
        with _math_threads(THREADS):  # the worker processes inherit it
            await stack.enter_async_context(ag.local_cluster(stages, processes=True))
        # (our idle cluster costs nothing during torch's turns)
        theirs, best = await take_turns(
            lambda s: measure_torch(stages, names, s, threads=THREADS),
            {"actorgrad": ActorgradDist().window},
            names,
            seconds,
        )
        phases = await hop_phases()
    results: dict[str, dict[str, float] | None] = {
        "actorgrad": best["actorgrad"],
        "torch": theirs,
        "torch tcp": theirs_tcp,
    }
    out = {
        side: None if res is None else {n: torch_ref.to_metric(n, per) for n, per in res.items()}
        for side, res in results.items()
    }
    return out, phases


def main() -> None:
    """Measure actorgrad and (when installed) PyTorch; print the table with ratios."""
    with asyncio.Runner(loop_factory=_echo_baseline.new_loop) as runner:
        res, phases = runner.run(run(SECONDS))
    ours = res["actorgrad"]
    assert ours is not None
    columns = [("torch", res["torch"]), ("torch tcp", res["torch tcp"])]
    print(render(METRICS, ours, columns, target_column="torch"))
    if res["torch"] is not None:
        print(torch_ref.describe(THREADS))
    print("actorgrad hop phases, us:", ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
