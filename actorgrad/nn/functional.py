"""Loss functions and layers as functions of tensors.

NOTE: like ``actorgrad.tensor``, no asyncio or runtime imports here.

Example::

    >>> import actorgrad as ag
    >>> logits = ag.tensor([[2.0, 0.5], [0.1, 1.0]], requires_grad=True)
    >>> loss = ag.nn.functional.cross_entropy(logits, [0, 1])
    >>> loss.backward()
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actorgrad.autograd import Function
from actorgrad.tensor import Tensor, _data, _unary

__all__ = ["cross_entropy", "embedding", "mse_loss"]


class CrossEntropy(Function):
    """Fused log_softmax + pick + mean: one node, and the gradient is simply
    ``(softmax - onehot) / N`` instead of a scatter through an indexing node."""

    __slots__ = ()

    def forward(self, x: Any, targets: np.ndarray) -> Any:
        n = x.shape[0]
        shifted = x - x.max(axis=1, keepdims=True)  # shift: stable for logits of any size
        lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(n)
        logp = shifted - lse
        self.saved = (logp, targets)
        if n == 0:
            return np.full((), np.nan, x.dtype)
        return -logp[rows, targets].mean()

    def backward(self, g: Any) -> tuple:
        logp, targets = self.saved
        n = logp.shape[0]
        grad = np.exp(logp)
        grad[np.arange(n), targets] -= 1
        return (grad * (g / max(n, 1)),)


def cross_entropy(logits: Tensor, targets: Any) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, C) against integer class ids (N,).

    Example::

        >>> cross_entropy(ag.tensor([[10.0, 0.0]]), [0]).item() < 1e-3
        True
    """
    t = np.asarray(_data(targets))
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got shape {logits.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {t.dtype}")
    if t.shape != (logits.shape[0],):
        raise ValueError(
            f"cross_entropy: targets of shape {t.shape} do not fit logits of shape {logits.shape}"
        )
    if t.size and (t.min() < 0 or t.max() >= logits.shape[1]):
        raise IndexError(
            f"cross_entropy: class ids must be in [0, {logits.shape[1]}), "
            f"got range [{t.min()}, {t.max()}]"
        )
    return _unary(CrossEntropy, logits, t)


def mse_loss(pred: Tensor, target: Any) -> Tensor:
    """Mean squared error, ``((pred - target) ** 2).mean()``.

    Example::

        >>> mse_loss(ag.tensor([1.0, 3.0]), ag.tensor([1.0, 1.0])).item()
        2.0
    """
    diff = pred - target
    return (diff * diff).mean()


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of ``weight`` picked by integer ``ids`` (any shape); repeated ids add up
    their gradients.

    Example::

        >>> embedding([[0, 2]], ag.randn(5, 3)).shape
        (1, 2, 3)
    """
    idx = np.asarray(_data(ids))
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {idx.dtype}")
    return weight[idx]
