"""Loss functions and layers as functions of tensors.

NOTE: like ``actorgrad.tensor``, no asyncio or runtime imports here.

Example::

    >>> import actorgrad as ag
    >>> logits = ag.tensor([[2.0, 0.5], [0.1, 1.0]], requires_grad=True)
    >>> loss = ag.nn.functional.cross_entropy(logits, [0, 1])
    >>> loss.backward()
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actorgrad.autograd import Function
from actorgrad.errors import check_bool
from actorgrad.tensor import (
    Tensor,
    _as_tensor,
    _data,
    _fit,
    _log_softmax_shifted,
    _nary,
    _numeric,
    _shares,
    _unary,
)

__all__ = ["cross_entropy", "dropout", "embedding", "linear", "mse_loss", "nll_loss"]


class Linear(Function):
    """Fused ``x @ weight.T + bias``: one node instead of three (transpose, matmul,
    add), the bias added in place, and a weight gradient that comes out contiguous
    in the weight's own (out_f, in_f) layout, so the optimizer streams over it."""

    __slots__ = ()

    def forward(self, xs: list[Any]) -> Any:
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) == 3 else None
        # (the last: the product's shape, when a bias broadcast it larger; see backward)
        self.saved = (x, w, None if b is None else (b.shape, b.dtype), None)
        try:
            out = np.matmul(x, w.T)
        except (TypeError, ValueError):
            if np.asarray(x).dtype.kind not in "biufc":  # (None: "input of shape ()")
                raise TypeError(
                    "linear: input must be a Tensor, a numpy array or a list of numbers, "
                    f"got {type(x).__name__}"
                ) from None
            raise ValueError(
                f"linear: input of shape {np.shape(x)} does not fit weight of shape "
                f"{np.shape(w)} (need input.shape[-1] == weight.shape[1])"
            ) from None
        if b is None:
            return out
        try:
            if type(out) is np.ndarray and np.ndim(b) == 1 and np.result_type(out, b) == out.dtype:
                out += b  # a fresh array: add the bias without another allocation
                return out
            summed = out + b
        except ValueError:
            # (numpy's "operands could not be broadcast together" named neither the
            # call nor which of its arguments was wrong)
            raise ValueError(
                f"linear: bias of shape {np.shape(b)} does not fit the product of shape "
                f"{np.shape(out)} (input @ weight.T)"
            ) from None
        if summed.shape != out.shape:  # (a bias of more rows or dimensions)
            self.saved = (*self.saved[:3], out.shape)
        return summed

    def backward(self, g: Any) -> tuple[Any, ...]:
        x, w, bmeta, product = self.saved
        nx, nw = self.next[0], self.next[1]
        gb = None
        if bmeta is not None and self.next[2] is not None:
            # (g summed over the bias's broadcast dims, whatever its shape: a bias of
            # shape (1, out_f) failed, "gradient of shape (out_f,) reached a leaf ...")
            gb = _fit(g, *bmeta)
        if product is not None:  # (the bias broadcast the product to a larger shape)
            g = _fit(g, product, g.dtype)
        # Fold leading dims so every product is one 2-d GEMM. (The rows counted, not
        # -1: with in_f or out_f 0, numpy cannot infer a -1 next to a 0.)
        rows = math.prod(x.shape[:-1])
        g2 = g.reshape(rows, w.shape[0])
        x2 = x.reshape(rows, w.shape[1])
        gx = _fit(g @ w, x.shape, x.dtype) if nx is not None else None
        gw = _fit(g2.T @ x2, w.shape, w.dtype) if nw is not None else None
        return (gx, gw) if bmeta is None else (gx, gw, gb)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` of shape (out_f, in_f), as one node.

    Example::

        >>> ag.nn.functional.linear(ag.ones(4, 3), ag.ones(2, 3), ag.zeros(2)).shape
        (4, 2)
    """
    # (checked here: a str weight or bias failed as "'str' object has no attribute 'T'",
    # a 1-d weight failed only in backward, on a reshape, and a 3-d one computed with
    # w.T's reversed axes: a result of another shape, silently)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and not isinstance(value, Tensor):
            _numeric(value, f"linear: {name}")
    wshape = np.shape(_data(weight))
    if len(wshape) != 2:
        raise ValueError(f"linear: weight must be an (out_f, in_f) matrix, got shape {wshape}")
    return _nary(Linear, [x, weight] if bias is None else [x, weight, bias])


class CrossEntropy(Function):
    """Fused log_softmax + pick + mean: one node, and the gradient is simply
    ``(softmax - onehot) / N`` instead of a scatter through an indexing node."""

    __slots__ = ()
    _FLOAT_INPUT = True  # (integer logits come as float32, as in tensor.Softmax)

    def forward(self, x: Any, targets: np.ndarray) -> Any:
        n = x.shape[0]
        if n == 0:  # (the mean of no rows, as torch; (0, 0) logits have no max either)
            self.saved = (x, targets)  # (x: as empty as its log_softmax)
            return np.full((), np.nan, x.dtype)
        # (an inf or an all -inf row gives nan, as in torch and log_softmax: no warning)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            logp = _log_softmax_shifted(x - x.max(axis=1, keepdims=True), 1)
        rows = np.arange(n)
        self.saved = (logp, targets)
        return -logp[rows, targets].mean()

    def backward(self, g: Any) -> tuple[Any, ...]:
        logp, targets = self.saved
        n = logp.shape[0]
        grad = np.exp(logp)
        grad[np.arange(n), targets] -= 1
        return (grad * _shares(g, max(n, 1)),)


def cross_entropy(logits: Tensor, targets: Any) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, C) against integer class ids (N,), or of
    (N, C, d1, ...) against (N, d1, ...), the mean over every position (as torch's).
    ``logits`` may also be a numpy array (the result is a Tensor, as from the ops).

    Example::

        >>> ag.nn.functional.cross_entropy(ag.tensor([[10.0, 0.0]]), [0]).item() < 1e-3
        True
    """
    logits = _as_tensor(logits, "cross_entropy: logits")
    logits, t = _class_ids(logits, targets, "cross_entropy", "logits")
    return _unary(CrossEntropy, logits, t)


def _class_ids(scores: Tensor, targets: Any, fn: str, what: str) -> tuple[Tensor, np.ndarray]:
    """``scores`` as rows (N', C) and ``targets`` as integer class ids, one per row, each
    in [0, C): else the error naming ``fn``, ``what`` the scores are, and what is wrong.
    Scores of shape (N, C, d1, ...) against ids (N, d1, ...), as torch takes them (a
    sequence model's (batch, classes, time)), become rows (N * d1 * ..., C): the mean
    over the rows is then torch's mean over every position."""
    t = np.asarray(_data(targets))
    if t.size == 0 and t.dtype.kind == "f":  # (an empty list: no ids, of no dtype)
        t = t.astype(np.int64)
    if scores.ndim < 2:
        raise ValueError(
            f"{fn}: {what} must be (N, C) or (N, C, d1, ...), got shape {scores.shape}"
        )
    if t.dtype.kind not in "iu":
        raise TypeError(f"{fn}: targets must be integer class ids, got dtype {t.dtype}")
    want = (scores.shape[0], *scores.shape[2:])
    if t.shape != want:
        raise ValueError(
            f"{fn}: targets of shape {t.shape} do not fit {what} of shape {scores.shape} "
            f"(they must be {want})"
        )
    classes = scores.shape[1]
    if t.size and (t.min() < 0 or t.max() >= classes):
        raise IndexError(
            f"{fn}: class ids must be in [0, {classes}), got range [{t.min()}, {t.max()}]"
        )
    if scores.ndim > 2:  # (the class axis last, then one row per position)
        scores = scores.transpose(0, *range(2, scores.ndim), 1).reshape(-1, classes)
        t = t.reshape(-1)
    return scores, t


def nll_loss(log_probs: Tensor, targets: Any) -> Tensor:
    """Mean negative log-likelihood of integer class ids (N,) under ``log_probs``
    (N, C), or of (N, d1, ...) under (N, C, d1, ...), as
    ``torch.nn.functional.nll_loss``: ``-log_probs[i, targets[i]]`` averaged over the
    rows (nan for no rows). With ``log_probs = logits.log_softmax(axis=1)`` it is
    ``cross_entropy(logits, targets)``.

    Example::

        >>> logp = ag.tensor([[-0.1, -2.0], [-3.0, -0.5]], requires_grad=True)
        >>> round(ag.nn.functional.nll_loss(logp, [0, 1]).item(), 4)
        0.3
    """
    log_probs = _as_tensor(log_probs, "nll_loss: log_probs")
    log_probs, t = _class_ids(log_probs, targets, "nll_loss", "log_probs")
    picked = log_probs[np.arange(len(t)), t]
    if not len(t):  # (the mean of no rows, as torch: nan, without numpy's warning)
        return picked.sum() * np.nan
    return -picked.mean()


def _probability(p: Any, fn: str) -> float:
    """``p`` as a float in [0, 1]: else the TypeError or ValueError naming ``fn``."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: p must be a number in [0, 1], got {p!r:.40}")
    if not 0 <= p <= 1:  # (nan too)
        raise ValueError(f"{fn}: p must be in [0, 1], got {p}")
    return float(p)


def dropout(
    x: Tensor, p: float = 0.5, training: bool = True, rng: np.random.Generator | None = None
) -> Tensor:
    """In ``training``, zero each element of ``x`` with probability ``p`` and scale the
    rest by ``1 / (1 - p)`` (all zeros for ``p`` 1), as ``torch.nn.functional.dropout``;
    else ``x`` itself. ``rng`` draws which elements go (None: a fresh generator).
    The gradient goes through the kept elements, scaled alike.

    Example::

        >>> x = ag.ones(4, requires_grad=True)
        >>> ag.nn.functional.dropout(x, 0.5, rng=np.random.default_rng(0)).numpy()
        array([2., 0., 0., 0.], dtype=float32)
    """
    p = _probability(p, "dropout")
    x = _as_tensor(x, "dropout: x")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"dropout: rng must be a numpy Generator or None, got {rng!r:.40}")
    if not check_bool(training, "dropout: training") or p == 0:
        return x
    if rng is None:
        rng = np.random.default_rng()
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    if p == 1:
        mask = np.zeros(x.shape, dtype)
    else:
        mask = (rng.random(x.shape) >= p).astype(dtype) / dtype.type(1 - p)
    return x * mask


def mse_loss(pred: Tensor, target: Any) -> Tensor:
    """Mean squared error, ``((pred - target) ** 2).mean()``, always a Tensor (also
    for numpy arrays: they are taken as the ops take them). ``target`` has as many
    elements as ``pred`` once broadcast with it: its shape, a scalar, ``(1, N)`` for
    ``(N,)``; else ValueError (``(N,)`` against ``(N, 1)`` would compare every pair).

    Example::

        >>> ag.nn.functional.mse_loss(ag.tensor([1.0, 3.0]), ag.tensor([1.0, 1.0])).item()
        2.0
    """
    pred = _as_tensor(pred, "mse_loss: pred")
    tshape = np.shape(_data(target))
    try:
        both: tuple[int, ...] | None = np.broadcast_shapes(pred.shape, tshape)
    except ValueError:
        both = None
    if both is None or math.prod(both) != pred.data.size:
        # (a (N, 1) prediction against (N,) targets broadcast to (N, N): a wrong loss,
        # silently; torch only warns)
        raise ValueError(
            f"mse_loss: target of shape {tshape} does not fit pred of shape {pred.shape}; "
            "give them the same shape"
        )
    # (Tensor.__sub__ takes any target, or raises: a type checker, seeing an Any on the
    # right, allows for its __rsub__)
    diff: Tensor = pred - target
    return (diff * diff).mean()


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of ``weight`` picked by integer ``ids`` (any shape); repeated ids add up
    their gradients. The result is a Tensor also for a numpy ``weight``.

    Example::

        >>> ag.nn.functional.embedding([[0, 2]], ag.randn(5, 3)).shape
        (1, 2, 3)
    """
    weight = _as_tensor(weight, "embedding: weight")
    if weight.ndim != 2:  # (as torch: a 1-D weight gave scalars, a 3-D one matrices)
        raise ValueError(f"embedding: weight must be a (num, dim) table, got shape {weight.shape}")
    idx = np.asarray(_data(ids))
    if idx.size == 0 and isinstance(ids, (list, tuple)):
        idx = idx.astype(np.intp)  # (numpy makes [] float64: no ids, not float ids)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {idx.dtype}")
    num = weight.shape[0]
    # Checked here, not left to indexing: a negative id would pick a row from the end.
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        raise IndexError(
            f"embedding: ids must be in [0, {num}), got range [{idx.min()}, {idx.max()}]"
        )
    return weight[idx]
