"""Finite-difference gradient checking, shared by every test module that needs it.

``gradcheck(fn, inputs)`` compares the gradients that backward computes for
``fn(*tensors)`` with central differences of the same scalar function. Outputs that
are not scalars are reduced with fixed random weights, so every element of the
Jacobian contributes (a plain ``.sum()`` would hide errors in e.g. softmax).

Example::

    from gradcheck import gradcheck   # tests/ is on sys.path under pytest
    gradcheck(lambda a, b: a * b, [np.random.rand(3), np.random.rand(3)])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import actorgrad as ag

__all__ = ["gradcheck", "numeric_grads"]


def _as_list(out: Any) -> list[ag.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _weights(outs: list[ag.Tensor], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.5, 1.5, o.shape) * rng.choice([-1.0, 1.0], o.shape) for o in outs]


def _scalar(outs: list[ag.Tensor], weights: list[np.ndarray]) -> float:
    return float(
        sum(np.sum(np.asarray(o.data, np.float64) * w) for o, w in zip(outs, weights, strict=True))
    )


def numeric_grads(
    fn: Callable[..., Any], arrays: Sequence[np.ndarray], weights: list[np.ndarray], eps: float
) -> list[np.ndarray]:
    """Central differences of ``sum(w * fn(*arrays))`` with respect to each array."""
    grads = []
    for i, base in enumerate(arrays):
        g = np.zeros(base.shape, np.float64)
        for idx in np.ndindex(*base.shape):
            vals = []
            for sign in (1.0, -1.0):
                probe = [a.copy() for a in arrays]
                probe[i][idx] += sign * eps
                with ag.no_grad():
                    outs = _as_list(fn(*[ag.tensor(a) for a in probe]))
                vals.append(_scalar(outs, weights))
            g[idx] = (vals[0] - vals[1]) / (2 * eps)
        grads.append(g)
    return grads


def gradcheck(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    seed: int = 0,
) -> bool:
    """Assert that backward through ``fn`` matches finite differences (float64).

    ``inputs``: numpy arrays (or tensors) made float64 leaves that require grad;
    ``fn`` may return one tensor or a list/tuple of tensors. Raises AssertionError
    naming the input and the largest difference; returns True otherwise.
    """
    arrays = [np.array(getattr(x, "data", x), dtype=np.float64) for x in inputs]
    leaves = [ag.tensor(a, requires_grad=True) for a in arrays]
    outs = _as_list(fn(*leaves))
    weights = _weights(outs, seed)
    roots = [(o, w) for o, w in zip(outs, weights, strict=True) if o.requires_grad]
    for o, w in roots:
        o.backward(w.astype(o.dtype), retain_graph=True)
    numeric = numeric_grads(fn, arrays, weights, eps)
    for i, (leaf, num) in enumerate(zip(leaves, numeric, strict=True)):
        ana = leaf.grad if leaf.grad is not None else np.zeros_like(num)
        assert ana.shape == num.shape, f"input {i}: grad shape {ana.shape} != {num.shape}"
        assert ana.dtype == np.float64, f"input {i}: grad dtype {ana.dtype}, expected float64"
        if not np.allclose(ana, num, atol=atol, rtol=rtol):
            err = np.max(np.abs(ana - num))
            raise AssertionError(
                f"input {i} (shape {num.shape}): analytic and numeric gradients differ by "
                f"up to {err:.3g}\nanalytic:\n{ana}\nnumeric:\n{num}"
            )
    return True
