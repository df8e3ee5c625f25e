"""PyTorch RPC tutorials ported by docs/porting.md, against the local engine.

The batch-updating parameter server (``@rpc.functions.async_execution`` on a static
method, its trainers calling back into the driver's RRef and waiting on one shared
future per round) and an ``rpc_async`` fan-out with ``fut.then`` in a distributed
autograd context, as the porting guide maps them.
"""

from __future__ import annotations

import asyncio
import operator

import numpy as np

import actorgrad as ag
from actorgrad import nn
from actorgrad.nn import functional as F

TRAINERS, ROUNDS = 2, 3


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 6, seed=0, dtype="float64"),
        nn.Tanh(),
        nn.Linear(6, 3, seed=1, dtype="float64"),
    )


def batch(rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 * rank + step)
    return rng.normal(size=(4, 5)), np.eye(3)[rng.integers(0, 3, 4)]


class BatchUpdateParameterServer:
    def __init__(self) -> None:
        self.model = make_model()
        self.future_model: asyncio.Future | None = None  # (made on the loop: porting.md)
        self.curr_update_size = 0
        self.optimizer = ag.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        for p in self.model.parameters():
            p.grad = np.zeros_like(p.data)

    def get_model(self) -> dict[str, np.ndarray]:
        return self.model.state_dict()

    @staticmethod
    async def update_and_fetch_model(ps_rref: ag.RRef, grads: list[np.ndarray]) -> dict:
        self = ps_rref.local_value()
        if self.future_model is None:
            self.future_model = asyncio.get_running_loop().create_future()
        for p, g in zip(self.model.parameters(), grads, strict=True):
            p.grad += g
        self.curr_update_size += 1
        fut = self.future_model
        if self.curr_update_size >= TRAINERS:
            for p in self.model.parameters():
                p.grad /= TRAINERS
            self.curr_update_size = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)
            fut.set_result(self.model.state_dict())
            self.future_model = None
        return await fut


async def run_trainer(ps_rref: ag.RRef, rank: int) -> list[float]:
    m = make_model()
    m.load_state_dict(await ps_rref.rpc().get_model())
    losses = []
    for step in range(ROUNDS):
        x, y = batch(rank, step)
        m.zero_grad()
        loss = F.mse_loss(m(ag.tensor(x)), y)
        losses.append(loss.item())
        loss.backward()
        grads = [p.grad for p in m.parameters()]
        m.load_state_dict(
            await ag.rpc(
                ps_rref.owner, BatchUpdateParameterServer.update_and_fetch_model, (ps_rref, grads)
            )
        )
    return losses


async def test_batch_updating_parameter_server_matches_averaged_local_sgd():
    async with ag.local_cluster(TRAINERS):
        ps = BatchUpdateParameterServer()
        ps_rref = ag.RRef(ps)
        futs = [
            asyncio.ensure_future(ag.rpc(f"w{r}", run_trainer, (ps_rref, r)))
            for r in range(1, TRAINERS + 1)
        ]
        losses = await asyncio.gather(*futs)  # (torch.futures.wait_all)
    # The reference: one model, each round's gradients averaged over the trainers.
    ref = make_model()
    opt = ag.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    want: list[list[float]] = [[] for _ in range(TRAINERS)]
    for step in range(ROUNDS):
        total = [np.zeros_like(p.data) for p in ref.parameters()]
        for r in range(1, TRAINERS + 1):
            ref.zero_grad()
            x, y = batch(r, step)
            loss = F.mse_loss(ref(ag.tensor(x)), y)
            want[r - 1].append(loss.item())
            loss.backward()
            total = [t + p.grad for t, p in zip(total, ref.parameters(), strict=True)]
        opt.step({p: t / TRAINERS for p, t in zip(ref.parameters(), total, strict=True)})
    np.testing.assert_allclose(losses, want, rtol=1e-12)
    for k, v in ps.model.state_dict().items():
        np.testing.assert_allclose(v, ref.state_dict()[k], rtol=1e-12, atol=1e-15)


def scaled_tanh(x: ag.Tensor, w: ag.Tensor) -> ag.Tensor:
    return (x * w).tanh()


async def async_add_chained(to: str, x: ag.Tensor, y: ag.Tensor, z: ag.Tensor) -> ag.Tensor:
    # (torch: rpc.rpc_async(to, torch.add, args=(x, y)).then(lambda f: f.wait() + z))
    return await ag.rpc(to, operator.add, (x, y)) + z


async def then(fut, cb):  # (fut.then(cb), as porting.md writes it)
    return cb(await fut)


async def test_rpc_async_fan_out_with_then_and_chained_async_function_has_local_gradients():
    rng = np.random.default_rng(0)
    x0, w0 = rng.normal(size=(4, 3)), rng.normal(size=(2, 3))

    def loss_of(parts, x):
        chained = parts[0] + parts[1] + x[:, 0]
        return (chained * chained).sum()

    x = ag.tensor(x0, requires_grad=True)
    ws = [ag.tensor(w, requires_grad=True) for w in w0]
    async with ag.local_cluster(2):
        async with ag.dist.context() as cid:
            futs = [
                asyncio.ensure_future(ag.rpc(w, scaled_tanh, (x, wi)))
                for w, wi in zip(["w1", "w2"], ws, strict=True)
            ]
            sums = [asyncio.ensure_future(then(f, lambda v: v.sum(axis=1))) for f in futs]
            parts = await asyncio.gather(*sums)
            chained = await ag.rpc("w1", async_add_chained, ("w2", parts[0], parts[1], x[:, 0]))
            loss = (chained * chained).sum()
            await ag.dist.backward(cid, [loss])
            grads = ag.dist.get_gradients(cid)
    lx = ag.tensor(x0, requires_grad=True)
    lws = [ag.tensor(w, requires_grad=True) for w in w0]
    local = loss_of([scaled_tanh(lx, w).sum(axis=1) for w in lws], lx)
    local.backward()
    assert loss.item() == local.item()
    np.testing.assert_allclose(grads[x], lx.grad, rtol=1e-14)
    for w, lw in zip(ws, lws, strict=True):
        np.testing.assert_allclose(grads[w], lw.grad, rtol=1e-14)
