"""A typed user program on the local layer (tensors, nn, optim), kept clean under
``mypy --strict`` by tests/test_typing.py: it type checks against the package as a
user's program does (the package installed, its py.typed marker read)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import actorgrad as ag
from actorgrad.nn import functional as F


class MLP(ag.nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, seed: int | None = None) -> None:
        super().__init__()
        self.body = ag.nn.Sequential(ag.nn.Linear(d_in, d_hidden, seed=seed), ag.nn.ReLU())
        self.head = ag.nn.Linear(d_hidden, d_out, bias=False, seed=seed)
        self.act = ag.nn.Tanh()

    def forward(self, x: ag.Tensor) -> ag.Tensor:
        h: ag.Tensor = self.body(x)  # (Sequential: Any, as the modules it holds decide)
        return self.act(self.head(h))  # (built-in modules: module(x) is a Tensor)


def operators(a: ag.Tensor, b: ag.Tensor, arr: npt.NDArray[np.float32]) -> ag.Tensor:
    c = a + b - 1.0 + 2 * a / 3.0 - 1 / a + a**2 + 2.0**a
    c = c + arr + (a @ b.T) + ag.matmul(a, b) - abs(-a)
    c = c[0] + c[0, 1:] + c[np.array([0, 1])] + c[:, None]
    mask = a != b
    c = ag.where(mask, a, b) + ag.where(arr > 0, a, 0.0)
    c = c.sum() + c.mean(axis=0) + c.max(axis=(0, 1), keepdims=True)
    c = c.reshape(-1).reshape(1, 2).reshape((2, 1)).transpose().transpose(1, 0)
    c = c.exp().log().sqrt().abs().relu().tanh().sigmoid().softmax().log_softmax(axis=0)
    c = c.sum() + ag.cat([a, b], axis=0)[:2] + ag.stack((a, b))[0]
    c = c + ag.split(a, 1)[0] + ag.split(a, [1, 1], axis=0)[1]
    c += a
    c *= 2.0
    return c


def attributes(t: ag.Tensor) -> tuple[int, ...]:
    data: np.ndarray = t.data
    grad: np.ndarray | None = t.grad
    flags: tuple[bool, bool] = (t.requires_grad, t.is_leaf)
    kind: np.dtype = t.dtype
    n: int = t.ndim + len(t)
    value: float = float(t.sum())
    print(data, grad, flags, kind, n, value, t.grad_fn, t.numpy(), t.detach(), t.sum().item())
    return t.shape


def double(g: np.ndarray) -> np.ndarray | None:
    return g * 2


@ag.no_grad()
def evaluate(model: MLP, x: ag.Tensor) -> float:
    logits: ag.Tensor = model(x)  # (a Module subclass's call is Any: annotate it)
    return float(logits.max())


@ag.no_grad  # (bare, as the docs allow: the function keeps its type)
def accuracy(logits: ag.Tensor, y: np.ndarray) -> float:
    return float((logits.data.argmax(axis=-1) == y).mean())


def train(steps: int) -> float:
    model = MLP(4, 8, 3, seed=0)
    opt = ag.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    adam = ag.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    nesterov = ag.optim.SGD(model.parameters(), 0.1, 0.9, nesterov=True, maximize=False)
    adamw = ag.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, amsgrad=True)
    x = ag.randn(16, 4, seed=1)
    y = np.random.default_rng(0).integers(0, 3, 16)
    last = float("nan")
    for _ in range(steps):
        loss = F.cross_entropy(model.forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        last = float(loss.item())
    for other in (adam, nesterov, adamw):
        other.step({p: np.zeros_like(p.data) for p in model.parameters()})
    first: ag.nn.Module = model.body[0]
    rest: ag.nn.Sequential = model.body[1:]
    emb = ag.nn.Embedding(10, 4, seed=0)
    e = emb(np.array([1, 2, 3])) + F.embedding(np.array([1, 2, 3]), emb.weight)
    print(first, len(rest), F.mse_loss(e, np.zeros((3, 4), dtype=np.float32)).item())
    model.load_state_dict(model.state_dict())
    for name, p in model.named_parameters():
        print(name, p.shape)
    handle = model.head.weight.register_hook(double)
    handle.remove()
    with ag.no_grad():
        print(evaluate(model, x), accuracy(model(x), y))
    w = ag.tensor([[1.0, 2.0]], dtype="float64", requires_grad=True)
    n = np.int64(2)  # (sizes: ints, numpy's too, one by one or in a tuple or list)
    r = ag.randn((1, n), dtype=np.float64, requires_grad=True, seed=0) + ag.zeros(
        [1, 2], dtype=None
    )
    r = r.reshape(n, 1).reshape([1, -1]).transpose((1, 0)).astype(np.float32)
    print(ag.ones(1, 2, dtype=np.dtype("float64")), ag.nn.Linear(2, 2, dtype="float64"), r)
    (w * ag.ones(1, 2) + ag.zeros(1, 2)).sum().backward(retain_graph=True)
    (w * 2.0).backward(gradient=np.ones((1, 2)), retain_graph=False)
    return last


def mistakes(model: MLP, x: ag.Tensor) -> None:
    """Calls mypy must reject (each line's ignore would be reported as unused, were it
    accepted)."""
    accuracy(x)  # type: ignore[call-arg]
    evaluate(x, model)  # type: ignore[arg-type]
    ag.zeros(2.5)  # type: ignore[arg-type]
    ag.ones("2, 3")  # type: ignore[arg-type]
    x.reshape(range(4))  # type: ignore[arg-type]
    x.transpose(1.0, 0.0)  # type: ignore[arg-type]
    ag.tensor([1.0], dtype=3.5)  # type: ignore[arg-type]
    ag.nn.Embedding(3, 4, dtype=1.0)  # type: ignore[arg-type]


if __name__ == "__main__":
    a, b = ag.ones(2, 2), ag.tensor([[1.0, 2.0], [3.0, 4.0]])
    print(operators(a, b, np.ones((2, 2), dtype=np.float32)).shape, attributes(b), train(3))
