"""A typed user program on the distributed layer (clusters, rpc/remote, RRefs,
contexts, DistributedOptimizer, errors), kept clean under ``mypy --strict`` by
tests/test_typing.py. ``mistakes`` holds calls mypy must reject (each line's ignore
would be reported as unused, were it accepted)."""

from __future__ import annotations

import asyncio
import collections
import copy
import operator
import os

import numpy as np

import actorgrad as ag
from actorgrad.nn import functional as F


class Model(ag.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = ag.nn.Linear(8, 4, seed=0)

    def forward(self, x: ag.Tensor) -> ag.Tensor:
        return self.lin(x)


def scale(x: ag.Tensor, w: ag.Tensor) -> ag.Tensor:
    return (x * w).tanh()


def param_refs(model_ref: ag.RRef) -> list[ag.RRef]:
    model: Model = model_ref.local_value()
    return [ag.RRef(p) for p in model.parameters()]


def first_param(model_ref: ag.RRef[Model]) -> ag.RRef[ag.Tensor]:
    weight = ag.RRef(model_ref.local_value().lin.weight)  # (an RRef[Tensor])
    shape: tuple[int, ...] = weight.local_value().shape
    print(shape, copy.copy(weight).owner)
    return weight


def fail(message: str) -> None:
    raise ValueError(message)


async def quickstart() -> None:
    async with ag.local_cluster(workers=2, processes=False, driver="driver", token=None):
        x = ag.tensor([1.0, 2.0, 3.0], requires_grad=True)
        w = ag.tensor([0.5, -0.5, 0.25], requires_grad=True)
        async with ag.dist.context() as ctx:
            y: ag.Tensor = await ag.rpc("w1", scale, (x, w))
            loss = y.sum()
            await ag.dist.backward(ctx, [loss])
            grads = ag.dist.get_gradients(ctx)
        print(round(loss.item(), 4), grads[x].round(4), grads[w].round(4))


async def step(model: ag.RRef, params: list[ag.RRef], x: ag.Tensor, y: np.ndarray) -> float:
    opt = ag.dist.DistributedOptimizer(ag.optim.SGD, params, lr=0.1, momentum=0.5)
    async with ag.dist.context() as ctx:
        context_id: int = ctx
        logits: ag.Tensor = await model.rpc().forward(x)
        loss = F.cross_entropy(logits, y)
        await ag.dist.backward(context_id, [loss], retain_graph=False)
        for tensor, grad in ag.dist.get_gradients(context_id).items():
            print(tensor.shape, grad.shape)
        await opt.step(ctx)
    info = ag.dist.debug_info()
    live: int = info["num_contexts"]
    print(live, info["num_backward_passes"])
    return float(loss.item())


async def count_ones(counter: ag.RRef) -> ag.RRef:
    return await counter.remote(timeout=5.0).count(1)


def total(counter: ag.RRef[collections.Counter[str]]) -> int:  # (as torch's RRef[T])
    return sum(counter.local_value().values())


async def errors() -> str:
    try:
        await ag.rpc("w1", fail, ("boom",), timeout=5.0)
    except ag.RemoteError as exc:
        return f"{exc.worker}: {exc.remote_type}\n{exc.remote_traceback}"
    except ag.RpcTimeout as exc:
        late: TimeoutError = exc
        return str(late)
    except ag.WorkerLost as exc:
        peer: str | None = exc.peer
        return f"lost {peer}"
    except (ag.ContextError, ag.ProtocolError, ag.AuthError) as exc:
        base: ag.ActorgradError = exc
        return str(base)
    return ""


async def main() -> None:
    await quickstart()
    async with ag.local_cluster(2, processes=True) as cluster:
        names: list[str] = cluster.names
        print(names, cluster.address, ag.workers(), ag.worker_name())
        pid: int = await ag.rpc("w2", os.getpid)
        five: int = await ag.rpc("w1", operator.add, [2, 3])
        by_name = await ag.rpc("w1", "operator:add", (1, 2), {}, timeout=None)
        counter = await ag.remote("w1", collections.Counter, ("abca",))
        await counter.rpc().update("b")
        hinted: ag.RRef[collections.Counter[str]] = counter
        print(await ag.rpc("w1", total, (hinted,)))
        ones = await count_ones(await ag.remote("w1", list, ([1, 2, 1],)))
        print(
            pid, five, by_name, await ones.to_here(timeout=5.0), counter.owner, counter.is_owner()
        )
        model = await ag.remote("w1", Model)
        params: list[ag.RRef] = await ag.rpc("w1", param_refs, (model,))
        weight: ag.RRef[ag.Tensor] = await ag.rpc("w1", first_param, (model,))
        print(weight.owner, (await weight.to_here()).shape)
        x = ag.randn(16, 8, seed=0)
        y = np.random.default_rng(0).integers(0, 4, 16)
        print(await step(model, params, x, y), await errors())
    async with ag.local_cluster(("a", "b"), driver="me", transport="tcp") as named:
        print(named.names)


async def joined() -> None:
    me = await ag.init("driver", address=None, token=None, host="127.0.0.1", port=0)
    print(me)
    await ag.shutdown(graceful=True, timeout=10.0)


async def mistakes(rref: ag.RRef, x: ag.Tensor) -> None:
    rref.owner_name()  # type: ignore[attr-defined]
    with ag.dist.context():  # type: ignore[attr-defined]
        pass
    await ag.rpc("w1", scale, x)  # type: ignore[arg-type]
    await ag.rpc("w1", len(x), (x,))  # type: ignore[arg-type]
    await ag.remote("w1", x, (1,))  # type: ignore[arg-type]
    ag.dist.DistributedOptimizer(ag.nn.Linear, [rref], lr=0.1)  # type: ignore[arg-type]
    counter: ag.RRef[collections.Counter[str]] = ag.RRef(collections.Counter("ab"))
    counter.local_value().most_common(1)[0].upper()  # type: ignore[attr-defined]
    print(total(ag.RRef(x)))  # type: ignore[arg-type]


if __name__ == "__main__":
    asyncio.run(main())
