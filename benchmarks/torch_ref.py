"""PyTorch reference numbers: ``torch.distributed.rpc`` + ``torch.distributed.autograd``.

The same shapes as ``bench_rpc`` and ``bench_dist`` measure with actorgrad, run with the
TensorPipe backend between real processes on 127.0.0.1: a driver (rank 0, named
``driver``) and workers ``w1``..``wN``, each a process spawned here. The calling process
never initializes torch RPC itself; it only starts the world, waits for the driver's
result with a deadline, and always stops every process it started.

torch is optional: every torch import is inside a function, so this module imports
without it (``available()`` says whether the measurements can run).

Public functions, each returning a dict of numbers:

- ``measure_rpc()``: ``rtt_us`` (sequential ``rpc_sync`` of a function returning its
  argument, µs/call), ``pipelined_calls_s`` (64 ``rpc_async`` in flight, calls/s),
  ``echo_mib_s`` (16 MiB float32 echo, MiB/s counting both directions).
- ``measure_dist()``: ``hop_it_s``, ``bw_mib_s`` (and ``bw_it_s``), ``chain_it_s``; see
  the shape helpers below for the exact workloads.

Run ``python -m benchmarks.torch_ref`` to print both.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

# --- shapes shared with the actorgrad side (bench_rpc / bench_dist import these) ---
ECHO_BYTES = 16 * 1024 * 1024
PIPELINE_DEPTH = 64
HOP_N = 16
BW_N = 4 * 1024 * 1024  # float32 elements: 16 MiB
CHAIN_BATCH = 64
CHAIN_DIM = 256
CHAIN_STAGES = 3
# bytes moved per bw iteration: x out, y back, grad(y) out, grad(x) back
BW_TRANSFERS = 4

MIB = 1024 * 1024
_ENV = {"TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}


def available() -> bool:
    """True when torch with ``torch.distributed.rpc`` is importable."""
    try:
        import torch.distributed.rpc as rpc
    except Exception:
        return False
    return bool(rpc.is_available())


def timed_loop(step: Callable[[], Any], *, warmup: int, seconds: float, windows: int = 3) -> float:
    """Seconds per ``step()``: the best of ``windows`` windows of ``seconds/windows``.

    ``warmup`` calls run first (the same method as ``benchmarks._report.timed``).
    """
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(windows):
        n = 0
        start = time.perf_counter()
        while True:
            step()
            n += 1
            now = time.perf_counter()
            if now - start >= seconds / windows:
                break
        best = min(best, (now - start) / n)
    return best


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# functions that run on the workers (module level so torch RPC pickles them by name)
# --------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _echo(x: Any) -> Any:
    return x


def _setup_hop(n: int) -> None:
    import torch

    _STATE["hop_w"] = torch.full((n,), 0.5, requires_grad=True)


def _hop_mul(x: Any) -> Any:
    return x * _STATE["hop_w"]


def _setup_chain(dim: int, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g) / dim**0.5
    _STATE["chain_w"] = w.requires_grad_(True)


def _chain_stage(x: Any) -> Any:
    import torch

    return torch.tanh(x @ _STATE["chain_w"])


# --------------------------------------------------------------------------------------
# driver-side workloads (rank 0)
# --------------------------------------------------------------------------------------


def _driver_rpc(seconds: float) -> dict[str, float]:
    import torch
    import torch.distributed.rpc as rpc

    out: dict[str, float] = {}
    per = timed_loop(lambda: rpc.rpc_sync("w1", _echo, args=(1,)), warmup=200, seconds=seconds)
    out["rtt_us"] = per * 1e6

    def batch() -> None:
        futs = [rpc.rpc_async("w1", _echo, args=(i,)) for i in range(PIPELINE_DEPTH)]
        torch.futures.wait_all(futs)

    per = timed_loop(batch, warmup=5, seconds=seconds)
    out["pipelined_calls_s"] = PIPELINE_DEPTH / per

    arr = torch.ones(ECHO_BYTES // 4, dtype=torch.float32)
    per = timed_loop(lambda: rpc.rpc_sync("w1", _echo, args=(arr,)), warmup=2, seconds=seconds)
    out["echo_mib_s"] = 2 * ECHO_BYTES / per / MIB
    return out


def _hop_step(x: Any) -> Any:
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc

    with dist_autograd.context() as cid:
        y = rpc.rpc_sync("w1", _hop_mul, args=(x,))
        loss = y.sum()
        dist_autograd.backward(cid, [loss])
        return dist_autograd.get_gradients(cid)[x]


def _chain_step(x: Any) -> Any:
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc

    with dist_autograd.context() as cid:
        h = x
        for i in range(CHAIN_STAGES):
            h = rpc.rpc_sync(f"w{i + 1}", _chain_stage, args=(h,))
        loss = (h * h).mean()
        dist_autograd.backward(cid, [loss])
        return dist_autograd.get_gradients(cid)[x]


def _driver_dist(seconds: float) -> dict[str, float]:
    import torch
    import torch.distributed.rpc as rpc

    out: dict[str, float] = {}
    rpc.rpc_sync("w1", _setup_hop, args=(HOP_N,))
    x = torch.rand(HOP_N, requires_grad=True)
    g = _hop_step(x)
    assert torch.allclose(g, torch.full((HOP_N,), 0.5)), g
    per = timed_loop(lambda: _hop_step(x), warmup=20, seconds=seconds)
    out["hop_it_s"] = 1 / per

    rpc.rpc_sync("w1", _setup_hop, args=(BW_N,))
    xb = torch.rand(BW_N, requires_grad=True)
    per = timed_loop(lambda: _hop_step(xb), warmup=2, seconds=seconds)
    out["bw_it_s"] = 1 / per
    out["bw_mib_s"] = BW_TRANSFERS * BW_N * 4 / per / MIB

    for i in range(CHAIN_STAGES):
        rpc.rpc_sync(f"w{i + 1}", _setup_chain, args=(CHAIN_DIM, i))
    xc = torch.randn(CHAIN_BATCH, CHAIN_DIM, generator=torch.Generator().manual_seed(7))
    xc.requires_grad_(True)
    per = timed_loop(lambda: _chain_step(xc), warmup=5, seconds=seconds)
    out["chain_it_s"] = 1 / per
    return out


_DRIVERS: dict[str, Callable[[float], dict[str, float]]] = {
    "rpc": _driver_rpc,
    "dist": _driver_dist,
}


# --------------------------------------------------------------------------------------
# process orchestration
# --------------------------------------------------------------------------------------


def _env_list(name: str) -> list[str] | None:
    """TensorPipe transports/channels override from a comma-separated env var."""
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


def _proc_main(
    rank: int, world: int, port: int, task: str, seconds: float, threads: int, conn: Any
) -> None:
    """Entry point of every spawned process: rank 0 is the driver, others are workers."""
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import torch
        import torch.distributed.rpc as rpc

        torch.set_num_threads(threads)
        opts = rpc.TensorPipeRpcBackendOptions(
            init_method=f"tcp://127.0.0.1:{port}",
            num_worker_threads=16,
            rpc_timeout=60,
            _transports=_env_list("TORCH_REF_TRANSPORTS"),
            _channels=_env_list("TORCH_REF_CHANNELS"),
        )
        name = "driver" if rank == 0 else f"w{rank}"
        rpc.init_rpc(name, rank=rank, world_size=world, rpc_backend_options=opts)
        result: tuple[str, Any] = ("ok", None)
        if rank == 0:
            try:
                result = ("ok", _DRIVERS[task](seconds))
            except Exception:
                result = ("error", traceback.format_exc())
        rpc.shutdown()
        if conn is not None:
            conn.send(result)
    except Exception:
        if conn is not None:
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        if conn is not None:
            conn.close()


def run_world(
    task: str,
    workers: int,
    *,
    seconds: float = 2.0,
    threads: int = 1,
    timeout: float = 120.0,
) -> dict[str, float]:
    """Spawn the driver and ``workers`` worker processes, run ``task``, return its dict.

    Raises ``TimeoutError`` when the driver has not answered within ``timeout`` seconds
    and ``RuntimeError`` (with the remote traceback) when it failed. Every process
    started here is joined, then terminated, then killed, in all cases.
    """
    if task not in _DRIVERS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_DRIVERS)}")
    ctx = mp.get_context("spawn")
    world = workers + 1
    port = free_port()
    recv, send = ctx.Pipe(duplex=False)
    procs = []
    try:
        for rank in range(world):
            p = ctx.Process(
                target=_proc_main,
                args=(rank, world, port, task, seconds, threads, send if rank == 0 else None),
                name=f"torch_ref-{task}-{rank}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        send.close()
        if not recv.poll(timeout):
            raise TimeoutError(f"torch reference {task!r} gave no result in {timeout:.0f} s")
        try:
            status, value = recv.recv()
        except EOFError:
            raise RuntimeError(
                f"torch reference {task!r}: driver exited (code {procs[0].exitcode})"
            ) from None
        if status != "ok":
            raise RuntimeError(f"torch reference {task!r} failed:\n{value}")
        return dict(value)
    finally:
        recv.close()
        _stop_all(procs)


def _stop_all(procs: list[Any], grace: float = 10.0) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def measure_rpc(seconds: float = 2.0, *, threads: int = 1) -> dict[str, float]:
    """RPC numbers of torch (driver + one worker): rtt_us, pipelined_calls_s, echo_mib_s."""
    return run_world("rpc", 1, seconds=seconds, threads=threads)


def measure_dist(seconds: float = 2.0, *, threads: int = 1) -> dict[str, float]:
    """Dist-autograd numbers of torch (driver + w1..w3): hop_it_s, bw_mib_s, chain_it_s."""
    return run_world("dist", CHAIN_STAGES, seconds=seconds, threads=threads)


def main() -> None:
    """Print the torch reference numbers (``python -m benchmarks.torch_ref``)."""
    if not available():
        print("torch with torch.distributed.rpc is not installed")
        return
    for name, fn in (("rpc", measure_rpc), ("dist", measure_dist)):
        t0 = time.perf_counter()
        res = fn()
        took = time.perf_counter() - t0
        print(f"{name} ({took:.1f} s):", {k: round(v, 1) for k, v in res.items()}, flush=True)


if __name__ == "__main__":
    main()
