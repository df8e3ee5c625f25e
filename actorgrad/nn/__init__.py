"""Neural-network building blocks on top of ``actorgrad.tensor`` (no asyncio here).

A ``Module`` finds its parameters (tensor attributes) and submodules (module
attributes, or lists/tuples of modules) by looking at its attributes, in the order
they were set.

Example::

    >>> import actorgrad as ag
    >>> model = ag.nn.Sequential(ag.nn.Linear(2, 8, seed=0), ag.nn.ReLU(), ag.nn.Linear(8, 1, seed=1))
    >>> model(ag.randn(4, 2)).shape
    (4, 1)
    >>> sorted(model.state_dict())
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from actorgrad.nn import functional
from actorgrad.tensor import Tensor

__all__ = ["Embedding", "Linear", "Module", "ReLU", "Sequential", "Tanh", "functional"]


class Module:
    """Base class: subclasses set tensors and submodules as attributes and define
    ``forward``; calling the module calls ``forward``.

    Example::

        >>> class Affine(Module):
        ...     def __init__(self):
        ...         self.w = ag.ones(3, requires_grad=True)
        ...     def forward(self, x):
        ...         return x * self.w
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """``(dotted name, tensor)`` for every tensor attribute, submodules included;
        a tensor shared by several modules is listed once."""
        seen: set[int] = set()
        stack: list[tuple[str, Module]] = [(prefix, self)]
        while stack:
            pre, mod = stack.pop(0)
            for name, value in vars(mod).items():
                if isinstance(value, Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    yield pre + name, value
            children = [(f"{pre}{name}.", child) for name, child in mod.named_children()]
            stack[0:0] = children

    def parameters(self) -> list[Tensor]:
        """Every parameter tensor, in registration order."""
        return [t for _, t in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{name: numpy array copy}`` (msgpack-safe through the wire codec)."""
        return {name: t.data.copy() for name, t in self.named_parameters()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy arrays into the parameters in place (their identity is kept).

        Raises ``KeyError`` naming missing or unexpected keys, ``ValueError`` naming a
        shape mismatch.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            value = state[name]
            arr = np.asarray(value.data if isinstance(value, Tensor) else value)
            if arr.shape != p.data.shape:
                raise ValueError(
                    f"load_state_dict: {name} has shape {arr.shape}, the parameter {p.data.shape}"
                )
            p.data[...] = arr

    def __repr__(self) -> str:
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        inner = "\n".join(
            f"  ({name}): {child!r}".replace("\n", "\n  ") for name, child in children
        )
        return f"{type(self).__name__}(\n{inner}\n)"

    def extra_repr(self) -> str:
        return ""


class Linear(Module):
    """``y = x @ weight.T + bias`` with ``weight`` of shape (out_f, in_f), initialized
    uniformly in +-1/sqrt(in_f) like torch.

    Example::

        >>> Linear(3, 2, seed=0)(ag.ones(5, 3)).shape
        (5, 2)
    """

    def __init__(
        self,
        in_f: int,
        out_f: int,
        bias: bool = True,
        seed: int | None = None,
        dtype: Any = "float32",
    ) -> None:
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(in_f) if in_f > 0 else 0.0
        self.in_f, self.out_f = in_f, out_f
        self.weight = Tensor(
            rng.uniform(-bound, bound, (out_f, in_f)).astype(dtype), requires_grad=True
        )
        self.bias = (
            Tensor(rng.uniform(-bound, bound, (out_f,)).astype(dtype), requires_grad=True)
            if bias
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_f={self.in_f}, out_f={self.out_f}, bias={self.bias is not None}"


class Embedding(Module):
    """A table of ``num`` vectors of size ``dim`` (standard normal init, like torch).

    Example::

        >>> Embedding(10, 4, seed=0)([1, 1, 3]).shape
        (3, 4)
    """

    def __init__(self, num: int, dim: int, seed: int | None = None, dtype: Any = "float32") -> None:
        rng = np.random.default_rng(seed)
        self.num, self.dim = num, dim
        self.weight = Tensor(rng.standard_normal((num, dim)).astype(dtype), requires_grad=True)

    def forward(self, ids: Any) -> Tensor:
        return functional.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"num={self.num}, dim={self.dim}"


class Sequential(Module):
    """Apply modules in order; parameters are named ``"<index>.<name>"``.

    Example::

        >>> Sequential(Linear(2, 3), Tanh())(ag.ones(1, 2)).shape
        (1, 3)
    """

    def __init__(self, *mods: Module) -> None:
        self.layers = list(mods)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for i, m in enumerate(self.layers):
            yield str(i), m

    def forward(self, x: Any) -> Any:
        for m in self.layers:
            x = m(x)
        return x

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


class ReLU(Module):
    """Elementwise ``max(x, 0)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.relu()


class Tanh(Module):
    """Elementwise ``tanh(x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.tanh()
