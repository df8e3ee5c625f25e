"""Distributed autograd between processes: actorgrad vs PyTorch (dist autograd + RPC).

Workloads (the same shapes on both sides; driver and workers are separate processes):

- hop: the driver sends x (16 float32, requires grad) to w1, which returns x * w (w a
  tensor on w1 that requires grad); loss = sum; distributed backward; the driver reads
  its gradient of x. it/s.
- bw: the same with 4M float32 (16 MiB); MiB/s of activations and gradients moved
  (x out, y back, dL/dy out, dL/dx back: 4 x 16 MiB per iteration).
- chain: x (64x256) through 3 stages on w1, w2, w3, each tanh(x @ W) with W 256x256 on
  its worker, every hop returning to the driver; loss = mean(out^2). it/s.

Targets (ratio actorgrad / PyTorch): hop >= 5x, chain >= 3x, bw >= 1x. The PyTorch side
(``benchmarks.torch_ref``) runs in the same invocation when torch is installed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

from benchmarks import _echo_baseline, torch_ref
from benchmarks._report import Metric, render, timed

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

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((dim, dim)) / dim**0.5).astype(np.float32)
    _STATE["chain_w"] = ag.tensor(w, requires_grad=True)


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


async def measure_actorgrad(seconds: float = SECONDS) -> dict[str, float]:
    """``hop_it_s``, ``bw_mib_s`` (and ``bw_it_s``), ``chain_it_s`` of actorgrad."""
    import actorgrad as ag

    out: dict[str, float] = {}
    saved = {k: os.environ.get(k) for k in _BLAS_ENV}
    os.environ.update({k: str(THREADS) for k in _BLAS_ENV})  # inherited by the workers
    try:
        async with ag.local_cluster(torch_ref.CHAIN_STAGES, processes=True):
            await _measure(out, seconds)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


async def _measure(out: dict[str, float], seconds: float) -> None:
    import actorgrad as ag

    await ag.rpc("w1", setup_hop, (torch_ref.HOP_N,))
    rng = np.random.default_rng(0)
    x = ag.tensor(rng.random(torch_ref.HOP_N, dtype=np.float32), requires_grad=True)
    g = await _hop_step(x)
    np.testing.assert_allclose(g, np.full(torch_ref.HOP_N, 0.5, dtype=np.float32))
    per = await timed(lambda: _hop_step(x), warmup=20, seconds=seconds)
    out["hop_it_s"] = 1 / per

    await ag.rpc("w1", setup_hop, (torch_ref.BW_N,))
    xb = ag.tensor(rng.random(torch_ref.BW_N, dtype=np.float32), requires_grad=True)
    per = await timed(lambda: _hop_step(xb), warmup=2, seconds=seconds)
    out["bw_it_s"] = 1 / per
    out["bw_mib_s"] = torch_ref.BW_TRANSFERS * torch_ref.BW_N * 4 / per / MIB

    for i in range(torch_ref.CHAIN_STAGES):
        await ag.rpc(f"w{i + 1}", setup_chain, (torch_ref.CHAIN_DIM, i))
    shape = (torch_ref.CHAIN_BATCH, torch_ref.CHAIN_DIM)
    xc = ag.tensor(rng.standard_normal(shape, dtype=np.float32), requires_grad=True)
    per = await timed(lambda: _chain_step(xc), warmup=5, seconds=seconds)
    out["chain_it_s"] = 1 / per


def main() -> None:
    """Measure actorgrad and (when installed) PyTorch; print the table with ratios."""
    with asyncio.Runner(loop_factory=_echo_baseline.new_loop) as runner:
        ours = runner.run(measure_actorgrad(SECONDS))
    torch: dict[str, float] | None = None
    if torch_ref.available():
        torch = torch_ref.measure_dist(SECONDS, threads=THREADS)
    else:
        print("(torch not installed: PyTorch column skipped)")
    print(render(METRICS, ours, [("torch", torch)], target_column="torch"), flush=True)


if __name__ == "__main__":
    main()
