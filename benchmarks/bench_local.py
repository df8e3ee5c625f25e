"""Local engine speed: an MLP training step and a long scalar chain, vs torch eager.

Run: ``python -m benchmarks bench_local``. Prints time per step (median of several
repeats, machines are shared and noisy) and, when torch is importable, the same
workload in torch eager on CPU in the same process, with the speedup (torch's time /
actorgrad's: above 1, actorgrad is faster).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

import actorgrad as ag
from actorgrad import nn
from actorgrad.nn import functional as F

BATCH, D_IN, D_HID, D_OUT = 64, 256, 512, 10
CHAIN = 10_000


def timeit(fn: Callable[[], object], number: int, repeat: int = 7) -> float:
    """Best seconds per call over `repeat` runs of `number` calls.

    A warm-up of `number` calls first lets the allocator settle (glibc maps big arrays
    fresh until its mmap threshold adapts). A short pause before it lets the BLAS/OpenMP
    worker threads of the previous measurement stop spinning: numpy's OpenBLAS and
    torch's OpenMP pools busy-wait after each call and, interleaved on a 2-core
    machine, slow each other down by 10x or more.
    """
    time.sleep(0.5)
    for _ in range(number):
        fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number)
    return min(runs)  # the least disturbed run: the machine is shared


def ag_mlp_step() -> Callable[[], object]:
    rng = np.random.default_rng(0)
    x = ag.tensor(rng.standard_normal((BATCH, D_IN), dtype=np.float32))
    y = rng.integers(0, D_OUT, BATCH)
    model = nn.Sequential(
        nn.Linear(D_IN, D_HID, seed=0), nn.ReLU(), nn.Linear(D_HID, D_OUT, seed=1)
    )
    opt = ag.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> object:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def ag_chain() -> Callable[[], object]:
    def run() -> object:
        x = ag.tensor(1.0, requires_grad=True)
        y = x
        for _ in range(CHAIN):
            y = y * 1.0001 + 0.0
        y.backward()
        return x.grad

    return run


def torch_mlp_step(torch) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((BATCH, D_IN), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, D_OUT, BATCH))
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID), torch.nn.ReLU(), torch.nn.Linear(D_HID, D_OUT)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy

    def step() -> object:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def torch_chain(torch) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    def run() -> object:
        x = torch.tensor(1.0, requires_grad=True)
        y = x
        for _ in range(CHAIN):
            y = y * 1.0001 + 0.0
        y.backward()
        return x.grad

    return run


def table(single_thread: bool) -> None:
    """Time every workload in this process and print one table."""
    env_keys = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in env_keys if k in os.environ}
    print(f"numpy {np.__version__}, cpus {os.cpu_count()}, env {env or '{}'}")
    try:
        import torch
    except ImportError:
        torch = None
        print("torch not importable: actorgrad numbers only")
    else:
        if single_thread:
            torch.set_num_threads(1)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    rows = [
        (
            f"MLP step {BATCH}x{D_IN}-{D_HID}-{D_OUT} f32 (fwd+bwd+SGD)",
            ag_mlp_step,
            torch_mlp_step,
            50,
        ),
        (f"scalar chain, {CHAIN} ops x2 (fwd+bwd)", ag_chain, torch_chain, 3),
    ]
    print(f"{'workload':<48} {'actorgrad':>12} {'torch':>12} {'speedup':>8}")
    for name, make_ag, make_torch, number in rows:
        t_ag = timeit(make_ag(), number)
        if torch is not None:
            t_torch = timeit(make_torch(torch), number)
            print(
                f"{name:<48} {t_ag * 1e3:>9.3f} ms {t_torch * 1e3:>9.3f} ms {t_torch / t_ag:>7.2f}x"
            )
        else:
            print(f"{name:<48} {t_ag * 1e3:>9.3f} ms {'-':>12} {'-':>8}")
    per_op = timeit(make_ag_ops(), 2000)
    print(f"{'per recorded op (a * b, 0-d, with grad)':<48} {per_op * 1e6:>9.2f} us")
    if torch is not None:
        # (the convention of bench_rpc and bench_dist: above 1, actorgrad is faster)
        print("speedup = torch's time / actorgrad's: > 1, actorgrad is faster")


def main() -> None:
    """Default threading in this process, then both libraries on one thread in a child
    process (BLAS thread counts are fixed at import time). On a shared, loaded machine
    the multi-threaded numbers swing by 10x as BLAS workers wait for each other; the
    single-thread table is the steadier comparison of the engines themselves."""
    print("-- default threads --")
    table(single_thread=False)
    print("-- one thread (OPENBLAS_NUM_THREADS=1, torch.set_num_threads(1)) --", flush=True)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_local", "--single-thread"], env=env, check=True
    )


def make_ag_ops() -> Callable[[], object]:
    a = ag.tensor(1.0, requires_grad=True)
    b = ag.tensor(2.0)
    return lambda: a * b


if __name__ == "__main__":
    if "--single-thread" in sys.argv[1:]:
        table(single_thread=True)
    else:
        main()
