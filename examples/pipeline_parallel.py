"""Pipeline parallelism: a 3-stage model on w1, w2, w3, trained with distributed
backward and a DistributedOptimizer until it reaches 95% test accuracy on a generated
three-arm spiral (the training ``actorgrad demo``, which ``make demo`` runs, does).

Stage k (a ``Linear``, then ``tanh`` but for the last) lives on the k-th worker; the
driver holds the data and the loss. Each step splits the batch into micro-batches
that flow through the stages concurrently (w1 works on micro-batch 2 while w2 works
on micro-batch 1), runs one distributed backward over all of them, and applies the
gradients with a ``DistributedOptimizer`` (Adam, on each parameter's owner):

    actorgrad run -n 3 examples/pipeline_parallel.py     # worker processes
    python examples/pipeline_parallel.py                 # its own local cluster

With ``ACTORGRAD_ADDRESS`` (and ``ACTORGRAD_TOKEN``) set, as ``actorgrad cluster`` says
to export them, ``python`` it joins that cluster as "driver" instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import numpy as np

import actorgrad as ag
from actorgrad.nn import functional as F


def make_spirals(n_per_class: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A three-arm spiral: points (float32, shape (n, 2)) and their arm, 0..2."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(3):
        r = np.linspace(0.05, 1.0, n_per_class)
        theta = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.normal(0, 0.2, n_per_class)
        xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        ys.append(np.full(n_per_class, c))
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    perm = rng.permutation(len(x))
    return x[perm], y[perm]


class Stage:
    """One pipeline stage, made on its worker with ``ag.remote``."""

    def __init__(self, in_f: int, out_f: int, activation: bool, seed: int) -> None:
        self.layer = ag.nn.Linear(in_f, out_f, seed=seed)
        self.activation = activation

    def forward(self, x: ag.Tensor) -> ag.Tensor:
        y = self.layer(x)
        return y.tanh() if self.activation else y

    def parameter_rrefs(self) -> list[ag.RRef]:
        """RRefs to this stage's parameters, owned here (for the optimizer)."""
        return [ag.RRef(p) for p in self.layer.parameters()]


async def forward(stages: list[ag.RRef], x: ag.Tensor) -> ag.Tensor:
    for stage in stages:
        x = await stage.rpc().forward(x)
    return x


async def accuracy(stages: list[ag.RRef], x: np.ndarray, y: np.ndarray) -> float:
    logits = await forward(stages, ag.tensor(x))
    return float((logits.numpy().argmax(axis=1) == y).mean())


async def train(workers: list[str], steps: int, target: float) -> bool:
    """Train on ``workers`` (three names) until the test accuracy, checked every 25
    steps, reaches ``target``, or ``steps`` run out; whether it reached it."""
    batch, micro_batches, hidden, seed = 128, 4, 64, 0
    x_all, y_all = make_spirals(seed=seed)
    n_train = int(0.8 * len(x_all))
    x_train, y_train = x_all[:n_train], y_all[:n_train]
    x_test, y_test = x_all[n_train:], y_all[n_train:]
    dims = [(2, hidden, True), (hidden, hidden, True), (hidden, 3, False)]
    stages = [
        await ag.remote(w, Stage, (*dim, seed + k))
        for k, (w, dim) in enumerate(zip(workers, dims, strict=True))
    ]
    params = [p for s in stages for p in await s.rpc().parameter_rrefs()]
    opt = ag.dist.DistributedOptimizer(ag.optim.Adam, params, lr=0.02)
    print(
        f"pipeline: {' -> '.join(workers)}, {len(params)} parameter tensors, "
        f"{n_train} training points, batch {batch} in {micro_batches} micro-batches"
    )
    rng = np.random.default_rng(seed)
    mb = batch // micro_batches
    start = time.perf_counter()
    step, loss_value, test_acc = 0, float("nan"), 0.0
    while step < steps:
        idx = rng.choice(n_train, batch, replace=False)
        chunks = [idx[i * mb : (i + 1) * mb] for i in range(micro_batches)]
        async with ag.dist.context() as ctx:
            # The micro-batches in flight together: the stages overlap.
            outs = await asyncio.gather(*(forward(stages, ag.tensor(x_train[c])) for c in chunks))
            losses = [F.cross_entropy(o, y_train[c]) for o, c in zip(outs, chunks, strict=True)]
            loss = sum(losses[1:], losses[0]) * (1.0 / micro_batches)
            await ag.dist.backward(ctx, [loss])
            await opt.step(ctx)
        step += 1
        loss_value = loss.item()
        if step % 25 == 0 or step == steps:
            test_acc = await accuracy(stages, x_test, y_test)
            rate = step / (time.perf_counter() - start)
            print(
                f"step {step:4d}  loss {loss_value:.4f}  test accuracy {test_acc:.3f}  "
                f"{rate:.1f} steps/s"
            )
            if test_acc >= target:
                break
    seconds = time.perf_counter() - start
    train_acc = await accuracy(stages, x_train, y_train)
    print(
        f"done: {step} steps in {seconds:.1f} s ({step / seconds:.1f} steps/s), loss "
        f"{loss_value:.4f}, train accuracy {train_acc:.3f}, test accuracy {test_acc:.3f}"
    )
    reached = test_acc >= target
    print(f"target test accuracy {target:.2f}: {'reached' if reached else 'NOT reached'}")
    return reached


async def main(steps: int, target: float) -> int:
    # (blank is unset, as for ag.init: with " ", ag.init started a cluster of its own,
    # without workers: "the pipeline needs 3 workers, the cluster has 0", an IndexError)
    address = os.environ.get("ACTORGRAD_ADDRESS", "").strip()
    if address:  # under `actorgrad run -n 3`, or a cluster's exported address
        try:
            await ag.init("driver")
        except ValueError as exc:
            # (the name taken: another driver runs on that cluster; or no token. Its
            # traceback, before)
            raise SystemExit(f"error: cannot join the cluster at {address}: {exc}") from None
        try:
            stages = sorted(n for n in ag.workers() if n != "driver")[:3]
            if len(stages) < 3:
                print(
                    f"error: the pipeline needs 3 workers, the cluster has {len(stages)} "
                    "(actorgrad run -n 3 ...)",
                    file=sys.stderr,
                )
                return 2
            reached = await train(stages, steps, target)
        finally:
            await ag.shutdown()
    else:
        async with ag.local_cluster(3, processes=True) as cluster:
            reached = await train(cluster.names, steps, target)
    return 0 if reached else 1


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a test accuracy, a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:  # (nan too)
        raise argparse.ArgumentTypeError(f"a test accuracy is in [0, 1]: {value}")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=600)
    parser.add_argument("--target", type=fraction, default=0.95, help="test accuracy, in [0, 1]")
    args = parser.parse_args()
    try:
        code = asyncio.run(main(args.steps, args.target))
        if sys.stdout is not None:  # (None: run with stdout closed, >&-)
            sys.stdout.flush()  # (here, where a reader gone is handled: not at the exit)
    except ag.ActorgradError as exc:  # (a worker died, say: one line, not a traceback)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # (Ctrl-C: stopped, not a traceback)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # (`... | head -1`: the reader of our output went away. Quiet, as a command
        # killed by SIGPIPE, and stdout to /dev/null: the exit's flush would fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGPIPE) from None
    raise SystemExit(code)
