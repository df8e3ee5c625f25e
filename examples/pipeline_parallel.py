"""Pipeline parallelism: a 3-stage model on w1, w2, w3, trained with distributed
backward and a DistributedOptimizer until it reaches 95% test accuracy on a generated
three-arm spiral. The model and the training loop are ``actorgrad.demo`` (the job
``make demo`` runs); this script runs them on a cluster:

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

import actorgrad as ag
from actorgrad.cli import at_least
from actorgrad.demo import fraction, report, train_pipeline


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
            result = await train_pipeline(stages, steps=steps, target=target)
        finally:
            await ag.shutdown()
    else:
        async with ag.local_cluster(3, processes=True) as cluster:
            result = await train_pipeline(cluster.names, steps=steps, target=target)
    return report(result, target)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=at_least(1), default=600)
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
