"""Optimizers: SGD and Adam on numpy arrays (no asyncio here).

The update formulas are torch's (``torch.optim.SGD`` without nesterov/dampening,
``torch.optim.Adam`` without amsgrad). ``step(grads)`` takes an explicit
``{Tensor: ndarray}`` mapping (what ``ag.dist.get_gradients`` returns); without it,
each parameter's ``.grad`` is used. Parameters without a gradient are skipped, and so
are tensors in the mapping that are not parameters of the optimizer (``get_gradients``
returns every leaf of the worker: inputs, other optimizers' parameters).

Parameters must have a floating point dtype (TypeError). Tensors that do not require
grad are accepted, as torch accepts them (frozen parameters: they get no ``.grad`` and
are skipped, unless ``step`` is given a gradient for them).

A step gives each parameter it updates a new array (see ``Optimizer.step``: graphs
recorded before it keep the values they were computed with); a subclass's
``_update(p, g, data)`` writes the update into ``data``, a copy of ``p.data`` that
becomes ``p.data`` once written.

Example::

    >>> import actorgrad as ag
    >>> w = ag.tensor([1.0, -1.0], requires_grad=True)
    >>> opt = ag.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> (w * w).sum().backward(); opt.step(); opt.zero_grad()
    >>> w.data
    array([ 0.8, -0.8], dtype=float32)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from actorgrad.tensor import Tensor, real_array

__all__ = ["SGD", "Adam", "Optimizer"]


#: Updates of parameters bigger than this many elements run in blocks of about this
#: size (slices of the first axis): each expression's temporaries (``lr * g``, ``g * g``)
#: are then a block's size, not the parameter's. Whole, SGD's step of a 64 MiB parameter
#: took 128 MiB more memory than the parameter (its copy and ``lr * g``), Adam's 256 MiB;
#: PyTorch's, updating in place, none.
UPDATE_BLOCK = 1 << 18


def _blocks(*arrays: Any) -> list[tuple[Any, ...]]:
    """``arrays`` (of one shape, more than ``UPDATE_BLOCK`` elements, at least 1-d;
    None stays None) cut into blocks of about ``UPDATE_BLOCK`` elements along their
    first axis: a list of tuples of views. (Callers take small arrays whole, without
    calling this: steps of small parameters cost as before.)"""
    data = arrays[0]
    rows = max(1, UPDATE_BLOCK // (data.size // data.shape[0]))
    return [
        tuple(None if a is None else a[i : i + rows] for a in arrays)
        for i in range(0, data.shape[0], rows)
    ]


def _number(owner: str, name: str, value: Any) -> None:
    """TypeError unless ``value`` is a real number (not a bool, not a string)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{owner}: {name} must be a number, got {type(value).__name__} {value!r:.40}"
        )


#: What to use instead of the base class (its ``_update`` is the subclasses' to write).
BASE_CLASS_HINT = (
    "ag.optim.Optimizer is the base class: use ag.optim.SGD, ag.optim.Adam or a "
    "subclass that defines _update"
)


class Optimizer:
    """Base class: holds the parameter list and per-parameter state (keyed by tensor
    identity).

    Example::

        >>> opt = ag.optim.SGD([ag.ones(2, requires_grad=True)], lr=0.1)
        >>> isinstance(opt, ag.optim.Optimizer), len(opt.params), opt.lr
        (True, 1, 0.1)
    """

    def __init__(self, params: Iterable[Tensor], lr: float) -> None:
        if isinstance(params, Tensor):
            # (iterating it would give 0-d views of its rows: steps that never reach it)
            raise TypeError(
                "optimizer params must be an iterable of Tensors, got Tensor; pass [tensor]"
            )
        self.params: list[Tensor] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        seen: dict[int, int] = {}
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer parameters must be Tensors, got {type(p).__name__}")
            if not p.is_leaf:
                # (its data is an op's output: updating it in place changes no parameter)
                raise ValueError(
                    f"optimizer parameter {i}: cannot optimize a non-leaf tensor (made by "
                    f"{p.grad_fn.name() if p.grad_fn else 'an op'}); pass the leaf itself"
                )
            if p.data.dtype.kind != "f":
                # (no gradient reaches it, and an update would fail to cast into it)
                raise TypeError(
                    f"optimizer parameter {i} has dtype {p.data.dtype}; parameters must "
                    "have a floating point dtype"
                )
            first = seen.setdefault(id(p), i)
            if first != i:
                # (it would be updated once per appearance: twice the step)
                raise ValueError(
                    f"optimizer parameter {i} is the same tensor as parameter {first}; "
                    "give each parameter once"
                )
        _number(type(self).__name__, "lr", lr)
        if not lr >= 0:  # (nan too)
            raise ValueError(f"invalid learning rate {lr}: lr must be >= 0")
        self.lr = lr
        self.state: dict[Tensor, dict[str, Any]] = {}

    def _grads(self, grads: Mapping[Tensor, np.ndarray] | None) -> list[tuple[Tensor, np.ndarray]]:
        """The (parameter, gradient) pairs of a step, every one checked before any
        parameter changes (a bad gradient for the second parameter left the first one
        stepped: a retry stepped it twice)."""
        if grads is None:
            given = [(i, p, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        elif not isinstance(grads, Mapping):
            raise TypeError(
                "step: grads must be a {Tensor: ndarray} mapping (what "
                f"ag.dist.get_gradients returns) or None, got {type(grads).__name__}"
            )
        else:
            given = [(i, p, grads[p]) for i, p in enumerate(self.params) if p in grads]
            if len(given) != len(grads):  # (other tensors are fine; other keys never match)
                for key in grads:
                    if not isinstance(key, Tensor):
                        raise TypeError(
                            "step: grads must be keyed by the parameter Tensors, got a key "
                            f"of type {type(key).__name__} ({key!r:.40})"
                        )
        out = []
        for i, p, g in given:
            arr = real_array(g, f"step: the gradient of parameter {i}")
            if arr.shape != p.data.shape:
                raise ValueError(
                    f"step: gradient of shape {arr.shape} for parameter {i}, of shape "
                    f"{p.data.shape}"
                )
            out.append((p, arr))
        return out

    def step(self, grads: Mapping[Tensor, np.ndarray] | None = None) -> None:
        """Apply one update to every parameter that has a gradient: in ``grads``
        (``{tensor: array}``, what ``ag.dist.get_gradients`` returns) when given, else
        its ``.grad``. Tensors in ``grads`` that are not parameters of this optimizer
        are ignored. Every gradient is checked before anything changes: one of another
        shape than its parameter raises ValueError, one that is not real numbers
        TypeError.

        Each updated parameter gets a new array (its ``.data`` is replaced, the Tensor
        stays): a graph recorded before the step (kept with ``retain_graph``, or the
        forward pass of another context on a parameter server) still computes its
        gradients with the values its forward pass used, and a message still sending
        the old values sends them intact. The new array becomes ``.data`` once the
        update is written: whatever reads the parameter meanwhile (another task sending
        it, as a parameter server does while a large step runs in a thread) sees the
        values before the step or after it, never a mix.

        >>> w = ag.tensor([1.0, 2.0], requires_grad=True)
        >>> ag.optim.SGD([w], lr=0.5).step({w: np.array([1.0, 1.0])}); w.data
        array([0.5, 1.5], dtype=float32)
        """
        for p, g in self._grads(grads):
            # (a copy in the same memory layout: the update streams through it)
            data = np.array(p.data, order="K")
            self._update(p, g, data)
            p.data = data

    def _update(self, p: Tensor, g: np.ndarray, data: np.ndarray) -> None:
        """Write the update of ``p`` with gradient ``g`` into ``data`` (a copy of
        ``p.data``, which it replaces afterwards)."""
        # (a bare NotImplementedError: a DistributedOptimizer of the base class failed
        # its first step with "NotImplementedError on worker 'w1': ", nothing more)
        raise NotImplementedError(
            f"{type(self).__name__} does not implement _update(p, g, data), the update of "
            f"one parameter ({BASE_CLASS_HINT})"
        )

    def zero_grad(self) -> None:
        """Forget every parameter's ``.grad`` (set to None).

        >>> w = ag.ones(2, requires_grad=True); opt = ag.optim.SGD([w], lr=0.1)
        >>> w.sum().backward(); opt.zero_grad(); w.grad is None
        True
        """
        for p in self.params:
            p.grad = None


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and weight decay.

    ``g += weight_decay * p``; ``buf = g`` (first step) else ``buf = momentum*buf + g``;
    ``p -= lr * buf``.

    Example::

        >>> model = ag.nn.Linear(3, 2, seed=0)
        >>> opt = ag.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(ag.ones(4, 3)).sum().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, lr)
        _number("SGD", "momentum", momentum)
        _number("SGD", "weight_decay", weight_decay)
        if not (momentum >= 0 and weight_decay >= 0):  # (nan too)
            raise ValueError(
                f"invalid momentum {momentum} or weight_decay {weight_decay}: both must be >= 0"
            )
        self.momentum = momentum
        self.weight_decay = weight_decay

    def _update(self, p: Tensor, g: np.ndarray, data: np.ndarray) -> None:
        buf: np.ndarray | None = None
        first = False
        if self.momentum:
            state = self.state.get(p)
            if state is None:
                # torch: a clone of the first grad (written below, block by block)
                buf = np.empty_like(data)
                self.state[p] = {"momentum_buffer": buf}
                first = True
            else:
                buf = state["momentum_buffer"]
        lr, wd, momentum = self.lr, self.weight_decay, self.momentum
        blocks = ((data, g, buf),) if data.size <= UPDATE_BLOCK else _blocks(data, g, buf)
        for d, gs, b in blocks:  # (see UPDATE_BLOCK)
            if wd:
                gs = gs + wd * d
            if b is not None:
                if first:
                    b[...] = gs
                else:
                    b *= momentum
                    b += gs
                gs = b
            d -= lr * gs


class Adam(Optimizer):
    """Adam (Kingma & Ba) with torch's bias correction.

    Example::

        >>> model = ag.nn.Linear(3, 2, seed=0)
        >>> opt = ag.optim.Adam(model.parameters(), lr=1e-3)
        >>> model(ag.ones(4, 3)).sum().backward(); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"Adam: betas must be a pair (beta1, beta2), got {betas!r:.40}")
        _number("Adam", "betas[0]", betas[0])
        _number("Adam", "betas[1]", betas[1])
        _number("Adam", "eps", eps)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or not eps >= 0:
            raise ValueError(
                f"invalid betas {betas} or eps {eps}: betas must be in [0, 1), eps >= 0"
            )
        self.betas = betas
        self.eps = eps

    def _update(self, p: Tensor, g: np.ndarray, data: np.ndarray) -> None:
        b1, b2 = self.betas
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {
                "step": 0,
                "exp_avg": np.zeros_like(data),
                "exp_avg_sq": np.zeros_like(data),
            }
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        bias1 = 1 - b1**t
        bias2 = 1 - b2**t
        root2, eps, rate = math.sqrt(bias2), self.eps, self.lr / bias1
        blocks = ((data, g, m, v),) if data.size <= UPDATE_BLOCK else _blocks(data, g, m, v)
        for d, gs, ms, vs in blocks:  # (see UPDATE_BLOCK)
            ms *= b1
            ms += (1 - b1) * gs
            vs *= b2
            vs += (1 - b2) * (gs * gs)
            denom = np.sqrt(vs) / root2 + eps
            d -= rate * (ms / denom)
