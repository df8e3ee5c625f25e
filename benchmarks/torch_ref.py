"""PyTorch reference numbers: ``torch.distributed.rpc`` + ``torch.distributed.autograd``.

The same shapes as ``bench_rpc`` and ``bench_dist`` measure with actorgrad, run with the
TensorPipe backend (its defaults; ``TORCH_REF_TRANSPORTS`` / ``TORCH_REF_CHANNELS``
override, e.g. ``uv`` / ``basic`` for plain TCP) between real processes on 127.0.0.1:
a driver (rank 0, named ``driver``) and workers ``w1``..``wN``, each a process spawned
here, each with ``torch.set_num_threads(threads)`` (default 1). The calling process
never initializes torch RPC itself: ``TorchWorld`` starts the world and commands the
driver over a pipe, one measuring window at a time (every answer awaited with a
deadline), and always stops every process it started.

torch is optional: every torch import is inside a function, so this module imports
without it (``available()`` says whether the measurements can run).

Metrics (names shared with the actorgrad side; ``to_metric`` converts seconds per step):

- ``rtt_us``: sequential ``rpc_sync`` of a function returning its small argument, µs/call;
- ``pipelined_calls_s``: batches of 64 ``rpc_async`` in flight, calls/s;
- ``echo_mib_s``: a 16 MiB float32 tensor echoed, MiB/s counting both directions;
- ``hop_it_s``: x (16 float32) -> w1 returns x * w (w on w1 requires grad), loss = sum,
  ``dist_autograd.backward``, ``get_gradients``; it/s;
- ``bw_mib_s``: the hop with 4M float32, MiB/s of x, y, dL/dy and dL/dx (4 x 16 MiB
  counted; dL/dy crosses as 4 bytes);
- ``chain_it_s``: x (64x256) through tanh(x @ W) on w1, w2, w3 (W 256x256 on each, every
  hop back to the driver), loss = mean(out^2); it/s.

``measure_rpc()`` / ``measure_dist()`` return dicts of these (best of 3 windows); run
``python -m benchmarks.torch_ref`` to print both.
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

import numpy as np

from benchmarks._report import MIN_STEPS

# --- shapes shared with the actorgrad side (bench_rpc / bench_dist import these) ---
ECHO_BYTES = 16 * 1024 * 1024
PIPELINE_DEPTH = 64
HOP_N = 16
BW_N = 4 * 1024 * 1024  # float32 elements: 16 MiB
CHAIN_BATCH = 64
CHAIN_DIM = 256
CHAIN_STAGES = 3
# 16 MiB tensors counted per bw iteration: x out, y back, grad(y) out, grad(x) back, as
# the PyTorch figure counts them (grad(y), of y.sum(), travels as a 4-byte
# broadcast on both sides: 3 of them really cross)
BW_TRANSFERS = 4


def chain_weight(dim: int, seed: int) -> np.ndarray:
    """Stage ``seed``'s chain weight, float32 (the same on both sides)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim, dim)) / dim**0.5).astype(np.float32)


def chain_input() -> np.ndarray:
    """The chain's input x, float32 (the same on both sides)."""
    return np.random.default_rng(7).standard_normal((CHAIN_BATCH, CHAIN_DIM)).astype(np.float32)


def chain_grad_reference() -> np.ndarray:
    """d mean(out^2) / dx of the chain, computed in float64 in one process, by hand."""
    h = chain_input().astype(np.float64)
    outs = []
    for i in range(CHAIN_STAGES):
        w = chain_weight(CHAIN_DIM, i).astype(np.float64)
        h = np.tanh(h @ w)
        outs.append((w, h))
    g = 2 * h / h.size
    for w, out in reversed(outs):
        g = (g * (1 - out * out)) @ w.T
    return g


def check_chain_grad(g: Any) -> None:
    """AssertionError unless ``g`` is the chain's gradient of x (float32 accuracy)."""
    np.testing.assert_allclose(np.asarray(g), chain_grad_reference(), rtol=1e-3, atol=1e-8)


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
            if now - start >= seconds / windows and n >= MIN_STEPS:
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

    _STATE["chain_w"] = torch.from_numpy(chain_weight(dim, seed)).requires_grad_(True)


def _chain_stage(x: Any) -> Any:
    import torch

    return torch.tanh(x @ _STATE["chain_w"])


# --------------------------------------------------------------------------------------
# workloads: one step function per metric, and what one step is worth
# --------------------------------------------------------------------------------------

RPC_METRICS = ("rtt_us", "pipelined_calls_s", "echo_mib_s")
DIST_METRICS = ("hop_it_s", "bw_mib_s", "chain_it_s")
# warm-up steps before the first window of each metric
WARMUP = {
    "rtt_us": 200,
    "pipelined_calls_s": 5,
    "echo_mib_s": 2,
    "hop_it_s": 20,
    "bw_mib_s": 2,
    "chain_it_s": 5,
}


def to_metric(name: str, seconds_per_step: float) -> float:
    """Convert seconds per step of workload ``name`` into the metric's unit."""
    per = seconds_per_step
    if name == "rtt_us":
        return per * 1e6
    if name == "pipelined_calls_s":
        return PIPELINE_DEPTH / per
    if name == "echo_mib_s":
        return 2 * ECHO_BYTES / per / MIB
    if name == "bw_mib_s":
        return BW_TRANSFERS * BW_N * 4 / per / MIB
    if name in ("hop_it_s", "chain_it_s"):
        return 1 / per
    raise ValueError(f"unknown metric {name!r}")


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


class _Workloads:
    """The driver's step functions, set up (and warmed up) on first use."""

    def __init__(self) -> None:
        self._steps: dict[str, Callable[[], Any]] = {}
        self._hop_n = 0  # size of w1's hop weight right now

    def _hop_weight(self, n: int) -> None:
        import torch.distributed.rpc as rpc

        if self._hop_n != n:
            rpc.rpc_sync("w1", _setup_hop, args=(n,))
            self._hop_n = n

    def _make(self, name: str) -> Callable[[], Any]:
        import torch
        import torch.distributed.rpc as rpc

        if name == "rtt_us":
            return lambda: rpc.rpc_sync("w1", _echo, args=(1,))
        if name == "pipelined_calls_s":

            def batch() -> None:
                futs = [rpc.rpc_async("w1", _echo, args=(i,)) for i in range(PIPELINE_DEPTH)]
                torch.futures.wait_all(futs)

            return batch
        if name == "echo_mib_s":
            arr = torch.ones(ECHO_BYTES // 4, dtype=torch.float32)
            return lambda: rpc.rpc_sync("w1", _echo, args=(arr,))
        if name in ("hop_it_s", "bw_mib_s"):
            n = HOP_N if name == "hop_it_s" else BW_N
            x = torch.rand(n, requires_grad=True)

            def hop() -> None:
                self._hop_weight(n)
                _hop_step(x)

            self._hop_weight(n)
            g = _hop_step(x)
            assert torch.allclose(g, torch.full((n,), 0.5)), "wrong hop gradient"
            return hop
        if name == "chain_it_s":
            for i in range(CHAIN_STAGES):
                rpc.rpc_sync(f"w{i + 1}", _setup_chain, args=(CHAIN_DIM, i))
            xc = torch.from_numpy(chain_input()).requires_grad_(True)
            check_chain_grad(_chain_step(xc))
            return lambda: _chain_step(xc)
        raise ValueError(f"unknown metric {name!r}")

    def window(self, name: str, seconds: float) -> float:
        """Seconds per step of ``name`` over one window of about ``seconds``."""
        step = self._steps.get(name)
        if step is None:
            step = self._steps[name] = self._make(name)
            for _ in range(WARMUP[name]):
                step()
        return timed_loop(step, warmup=0, seconds=seconds, windows=1)


# --------------------------------------------------------------------------------------
# process orchestration
# --------------------------------------------------------------------------------------


def describe(threads: int) -> str:
    """How the torch side is configured (printed under the tables)."""
    transports = os.environ.get("TORCH_REF_TRANSPORTS") or "default"
    channels = os.environ.get("TORCH_REF_CHANNELS") or "default"
    return (
        f"torch {_torch_version()}: TensorPipe transports={transports} "
        f"channels={channels}, {threads} thread(s) per process"
    )


def _torch_version() -> str:
    try:
        import torch
    except Exception:
        return "?"
    return str(torch.__version__)


def _env_list(name: str) -> list[str] | None:
    """TensorPipe transports/channels override from a comma-separated env var."""
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] or None


def _driver_loop(conn: Any) -> None:
    """Rank 0: answer ("window", name, seconds) commands until ("stop",)."""
    work = _Workloads()
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, name, seconds = msg
        try:
            conn.send(("ok", work.window(name, seconds)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _proc_main(rank: int, world: int, port: int, threads: int, conn: Any) -> None:
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
        if rank == 0:
            conn.send(("ok", "ready"))
            _driver_loop(conn)
        rpc.shutdown()
    except Exception:
        if conn is not None:
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        if conn is not None:
            conn.close()


class TorchWorld:
    """A running torch RPC world: this process commands its driver (rank 0) by pipe.

    ``with TorchWorld(workers) as world: world.window("hop_it_s", 0.5)`` returns the
    seconds per step of one measuring window; windows of different metrics, and of
    actorgrad, can be interleaved so both sides see the same load. Leaving stops the
    driver and the workers (join, then terminate, then kill).
    """

    def __init__(self, workers: int, *, threads: int = 1, timeout: float = 120.0) -> None:
        self.workers = workers
        self.threads = threads
        self.timeout = timeout
        self._procs: list[Any] = []
        self._conn: Any = None

    def __enter__(self) -> TorchWorld:
        ctx = mp.get_context("spawn")
        world = self.workers + 1
        port = free_port()
        self._conn, child = ctx.Pipe(duplex=True)
        try:
            for rank in range(world):
                p = ctx.Process(
                    target=_proc_main,
                    args=(rank, world, port, self.threads, child if rank == 0 else None),
                    name=f"torch_ref-{rank}",
                    daemon=True,
                )
                p.start()
                self._procs.append(p)
            child.close()
            self._answer("start")
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _answer(self, what: str) -> Any:
        if not self._conn.poll(self.timeout):
            raise TimeoutError(f"torch reference: no answer to {what} in {self.timeout:.0f} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            code = self._procs[0].exitcode if self._procs else None
            raise RuntimeError(f"torch reference: driver exited (code {code})") from None
        if status != "ok":
            raise RuntimeError(f"torch reference: {what} failed:\n{value}")
        return value

    def window(self, name: str, seconds: float) -> float:
        """Seconds per step of metric ``name``'s workload over one window (warm-up first)."""
        self._conn.send(("window", name, seconds))
        return float(self._answer(name))

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        _stop_all(self._procs)
        self._procs = []


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


def measure(
    names: tuple[str, ...], workers: int, seconds: float = 2.0, *, threads: int = 1
) -> dict[str, float]:
    """Each metric in ``names``: the best of 3 windows of ``seconds/3``."""
    with TorchWorld(workers, threads=threads) as world:
        best = {n: min(world.window(n, seconds / 3) for _ in range(3)) for n in names}
    return {n: to_metric(n, per) for n, per in best.items()}


def measure_rpc(seconds: float = 2.0, *, threads: int = 1) -> dict[str, float]:
    """RPC numbers of torch (driver + one worker): rtt_us, pipelined_calls_s, echo_mib_s."""
    return measure(RPC_METRICS, 1, seconds, threads=threads)


def measure_dist(seconds: float = 2.0, *, threads: int = 1) -> dict[str, float]:
    """Dist-autograd numbers of torch (driver + w1..w3): hop_it_s, bw_mib_s, chain_it_s."""
    return measure(DIST_METRICS, CHAIN_STAGES, seconds, threads=threads)


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
