"""Quickstart: a gradient that crosses a worker boundary.

python examples/quickstart.py
"""

import asyncio

import actorgrad as ag


def scale(x: ag.Tensor, w: ag.Tensor) -> ag.Tensor:
    """Runs on worker w1: the tensors arrive there, the result comes back."""
    return (x * w).tanh()


async def main() -> None:
    async with ag.local_cluster(workers=2):  # w1, w2 as actors in this process
        x = ag.tensor([1.0, 2.0, 3.0], requires_grad=True)
        w = ag.tensor([0.5, -0.5, 0.25], requires_grad=True)
        async with ag.dist.context() as ctx:
            y = await ag.rpc("w1", scale, (x, w))
            loss = y.sum()
            await ag.dist.backward(ctx, [loss])
            grads = ag.dist.get_gradients(ctx)
        print("loss    ", round(loss.item(), 4))
        print("dloss/dx", grads[x].round(4))
        print("dloss/dw", grads[w].round(4))


if __name__ == "__main__":
    asyncio.run(main())
