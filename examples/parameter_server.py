"""Parameter server: several trainers train one model held on a parameter server.

The server (w1) owns a softmax-regression model's weights. Each trainer (w2, w3, ...)
runs its own loop on its own shard of the data: fetch the weights (``to_here`` inside
a distributed autograd context), compute the loss locally, run a distributed backward
(the gradients flow back to the server's weights) and step a
``DistributedOptimizer``, which applies that trainer's gradients on the server. The
trainers run at the same time; each context keeps its own gradients.

    python examples/parameter_server.py            # in-process workers
    actorgrad run -n 3 examples/parameter_server.py

With ``ACTORGRAD_ADDRESS`` (and ``ACTORGRAD_TOKEN``) set, as ``actorgrad cluster`` says
to export them, ``python`` it joins that cluster as "driver" instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import numpy as np

import actorgrad as ag
from actorgrad.nn import functional as F

CLASSES, FEATURES = 4, 8


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around fixed class centres."""
    centres = np.random.default_rng(42).normal(0, 2.0, (CLASSES, FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = centres[y] + rng.normal(0, 1.0, (n, FEATURES))
    return x.astype(np.float32), y


def new_weights() -> ag.Tensor:
    return ag.zeros(FEATURES, CLASSES, requires_grad=True)


def new_bias() -> ag.Tensor:
    return ag.zeros(CLASSES, requires_grad=True)


async def trainer(w: ag.RRef, b: ag.RRef, shard: int, steps: int) -> float:
    """Runs on a trainer worker; returns its last loss."""
    x_all, y_all = make_data(2000, seed=shard)
    opt = ag.dist.DistributedOptimizer(ag.optim.SGD, [w, b], lr=0.1, momentum=0.5)
    rng = np.random.default_rng(shard)
    loss = None
    for _ in range(steps):
        idx = rng.integers(0, len(x_all), 64)
        async with ag.dist.context() as ctx:
            weights, bias = await asyncio.gather(w.to_here(), b.to_here())
            logits = ag.tensor(x_all[idx]) @ weights + bias
            loss = F.cross_entropy(logits, y_all[idx])
            await ag.dist.backward(ctx, [loss])
            await opt.step(ctx)
    return float(loss.item()) if loss is not None else float("nan")


async def run(workers: list[str], steps: int) -> float:
    server, trainers = workers[0] if workers else "", workers[1:]
    if not trainers:  # (none at all: an IndexError's traceback, before)
        print(
            f"error: a parameter server needs at least one trainer: the cluster has "
            f"{len(workers)} worker (actorgrad run -n 3 ...)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    w = await ag.remote(server, new_weights)
    b = await ag.remote(server, new_bias)
    losses = await asyncio.gather(
        *(ag.rpc(t, trainer, (w, b, i + 1, steps)) for i, t in enumerate(trainers))
    )
    for t, loss in zip(trainers, losses, strict=True):
        print(f"trainer {t}: last loss {loss:.4f}")
    x_test, y_test = make_data(2000, seed=0)
    logits = ag.tensor(x_test) @ await w.to_here() + await b.to_here()
    accuracy = float((logits.numpy().argmax(axis=1) == y_test).mean())
    print(f"server {server}: test accuracy {accuracy:.3f} after {steps} steps per trainer")
    return accuracy


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


async def main(steps: int) -> float:
    # (blank is unset, as for ag.init: with " ", ag.init started a cluster of its own,
    # without workers: "the pipeline needs 3 workers, the cluster has 0", an IndexError)
    address = os.environ.get("ACTORGRAD_ADDRESS", "").strip()
    if address:  # under `actorgrad run`, or a cluster's exported address
        try:
            await ag.init("driver")
        except ValueError as exc:
            # (the name taken: another driver runs on that cluster; or no token. Its
            # traceback, before)
            raise SystemExit(f"error: cannot join the cluster at {address}: {exc}") from None
        try:
            return await run([n for n in ag.workers() if n != "driver"], steps)
        finally:
            await ag.shutdown()
    async with ag.local_cluster(workers=3) as cluster:
        return await run(cluster.names, steps)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="parameter server with concurrent trainers")
    parser.add_argument("--steps", type=positive_int, default=60)
    try:
        accuracy = asyncio.run(main(parser.parse_args().steps))
        if sys.stdout is not None:  # (None: run with stdout closed, >&-)
            sys.stdout.flush()  # (here, where a reader gone is handled: not at the exit)
    except ag.ActorgradError as exc:  # (a worker died, say: one line, not a traceback)
        raise SystemExit(f"error: {type(exc).__name__}: {exc}") from None
    except KeyboardInterrupt:  # (Ctrl-C: stopped, not a traceback)
        raise SystemExit(130) from None
    except BrokenPipeError:
        # (`... | head -1`: the reader of our output went away. Quiet, as a command
        # killed by SIGPIPE, and stdout to /dev/null: the exit's flush would fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGPIPE) from None
    raise SystemExit(0 if accuracy >= 0.9 else 1)
