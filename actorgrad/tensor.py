"""Tensor: a numpy array plus the autograd graph, and every differentiable op.

NOTE: no asyncio, sockets or runtime imports here (see docs/design.md): this layer is
plain numpy + ``actorgrad.autograd``. The wire codec imports only the ``Tensor`` class.

Each op is a small ``Function`` subclass whose ``forward`` (numpy in, numpy out) and
``backward`` (gradient rule) sit next to each other. Ops record a node only when an
input requires grad and grad mode is on; otherwise they cost one numpy call and one
tensor allocation. Broadcasting is undone in backward by ``_fit`` (a no-op when the
shapes already match).

Example::

    >>> import actorgrad as ag
    >>> x = ag.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    >>> loss = (x @ x.T).relu().mean()
    >>> loss.backward()
    >>> x.grad.shape
    (2, 2)
"""

from __future__ import annotations

import itertools
import math
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, SupportsIndex, TypeAlias

import numpy as np

# (imported, not only for type checkers: typing.get_type_hints, as documentation
# generators and validation libraries call it, resolves the annotations that use it;
# numpy imported most of it already)
import numpy.typing as npt

from actorgrad.autograd import (
    AccumulateGrad,
    Function,
    Node,
    Scatter,
    grad_enabled,
    grad_node,
    no_grad,
    seed_grad,
)
from actorgrad.autograd import GraphTask as _GraphTask
from actorgrad.errors import check_bool, check_retain_graph, short_repr

#: Sizes or axes as the factories, reshape and transpose take them: each as an argument,
#: or all in one tuple or list (no other sequence: see _shape).
Sizes: TypeAlias = SupportsIndex | tuple[SupportsIndex, ...] | list[SupportsIndex]

__all__ = [
    "Tensor",
    "cat",
    "matmul",
    "no_grad",
    "ones",
    "randn",
    "split",
    "stack",
    "tensor",
    "where",
    "zeros",
]

_new = object.__new__
_ndarray = np.ndarray
_INF = math.inf
# (by the dtype's scalar type: a float16 dtype is not always numpy's cached instance,
# an array unpickled (multiprocessing, a data loader's queue) has one of its own, and
# equality missed a big-endian one)
_F16 = np.float16
_F32_MAX = float(np.finfo(np.float32).max)
_SCALARS = (int, float, bool, np.generic)
#: the most dimensions a numpy array has: 64 with numpy 2, 32 with numpy 1.x (between
#: workers, 32 either way: wire.MAX_NDIM)
_MAX_NDIM = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32


def _check_ndim(what: str, ndim: int) -> None:
    """ValueError naming the limit when a result of ``what`` would have more than
    _MAX_NDIM dimensions: numpy's own words blamed something else (reshape's "cannot
    reshape a tensor of shape (1, 1, ...) (1 elements)", stack's IndexError "indexing
    result would have 65")."""
    if ndim > _MAX_NDIM:
        raise ValueError(
            f"{what}: the result would have {ndim} dimensions: a tensor has at most "
            f"{_MAX_NDIM} (numpy's limit; at most 32 travel to another worker)"
        )


# ---------------------------------------------------------------------------------------
# Tensor
# ---------------------------------------------------------------------------------------


class Tensor:
    """A numpy array that can record the operations applied to it.

    Users create tensors with ``ag.tensor``/``zeros``/``ones``/``randn``;
    ``Tensor(array, requires_grad=False)`` wraps ``array`` without copying (the wire
    codec uses it). Hashing is by identity, so tensors work as dict keys even though
    ``==`` is elementwise.

    Example::

        >>> w = ag.randn(3, requires_grad=True, seed=0)
        >>> (w * w).sum().backward()
        >>> np.allclose(w.grad, 2 * w.data)
        True

    In-place operators (``+= -= *= /= **= @=``) update a leaf under ``no_grad`` (or
    when no operand requires grad): the tensor gets the result as a new array, with
    its own dtype and shape. On a leaf that requires grad while grad mode is on they
    raise RuntimeError; on a non-leaf, or with an operand that requires grad, they
    are the out-of-place op (``total += loss`` records ``total + loss``)::

        >>> old = w.data
        >>> with ag.no_grad():
        ...     w -= 0.1 * w.grad
        >>> w.requires_grad, w.data is old, np.allclose(w.data, old * 0.8)
        (True, False, True)
    """

    __slots__ = ("_data", "grad", "_rg", "grad_fn", "_accum", "_hooks", "__weakref__")
    # Make numpy hand binary ops with a Tensor on the right to our reflected methods
    # (np_array * tensor -> Tensor.__rmul__) instead of converting the tensor.
    __array_ufunc__ = None

    def __init__(self, data: np.ndarray, requires_grad: bool = False) -> None:
        if type(data) is not np.ndarray:
            data = np.asarray(data)
        if requires_grad is not False:
            requires_grad = check_bool(requires_grad, "requires_grad")
        kind = data.dtype.kind
        if kind != "f" and (requires_grad or kind not in "biuc"):
            # (as ag.tensor checks: an object or string array was taken, and failed
            # later, in an op or a send, far from where it came in)
            _check_values(data, requires_grad, "tensor data")
        self._data = data
        self.grad: np.ndarray | None = None
        self._rg = bool(requires_grad)
        self.grad_fn: Node | None = None
        # (the cached AccumulateGrad, weakly: see autograd.grad_node)
        self._accum: weakref.ref[AccumulateGrad] | None = None
        self._hooks: dict[int, Callable[[np.ndarray], np.ndarray | None]] | None = None

    __hash__ = object.__hash__

    @property
    def data(self) -> np.ndarray:
        """The tensor's values, a numpy array. Assigning one replaces them (of any
        shape, as torch's ``.data``): outside autograd, as an optimizer step does.

        >>> w = ag.tensor([1.0, 2.0], requires_grad=True)
        >>> w.data = np.zeros(3)
        >>> w.shape
        (3,)
        """
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        # (checked here, as ag.tensor checks: a list, strings, or ints under
        # requires_grad failed later, in an op or a send, far from the assignment)
        if type(value) is not np.ndarray:
            if not isinstance(value, (np.ndarray, np.generic)):
                raise TypeError(
                    f"Tensor.data must be a numpy array, not {type(value).__name__} (to "
                    "change values in place: tensor.data[...] = ...)"
                )
            # (a 0-d tensor's arithmetic gives numpy scalars; a matrix or a masked
            # array would change what the ops compute: plain arrays, as Tensor() takes)
            value = np.asarray(value)
        _check_values(value, self._rg, "Tensor.data")
        self._data = value

    # --- copies and pickling -------------------------------------------------------
    # (Python's defaults copied the slots as they were: a copy's gradients went to the
    # original's AccumulateGrad, found through _accum, and pickle failed on that weak
    # reference once a backward had made it. As torch: a leaf's data, grad and flag.)

    def __copy__(self) -> Tensor:
        """A new tensor sharing this one's arrays: a leaf of its own (its gradients are
        its own), or for an op's output, another output of the same node."""
        t = _new(Tensor)
        t._data, t.grad, t._rg, t.grad_fn = self._data, self.grad, self._rg, self.grad_fn
        t._accum = t._hooks = None
        return t

    def __deepcopy__(self, memo: dict[int, Any]) -> Tensor:
        """A leaf with copies of this one's data and grad (no hooks).

        >>> import copy
        >>> w = ag.tensor([1.0], requires_grad=True)
        >>> copy.deepcopy(w).requires_grad, copy.deepcopy(w) is w
        (True, False)
        """
        _check_leaf_to_copy(self, "deep-copied")
        t = Tensor(self._data.copy(), self._rg)
        t.grad = None if self.grad is None else self.grad.copy()
        memo[id(self)] = t
        return t

    def __reduce__(self) -> tuple[Any, ...]:
        _check_leaf_to_copy(self, "pickled")
        return (_rebuilt, (self._data, self.grad, self._rg))

    # --- attributes ---------------------------------------------------------------

    @property
    def requires_grad(self) -> bool:
        """Whether ops on this tensor record the graph; settable on leaves only.

        >>> ag.tensor([1.0], requires_grad=True).requires_grad
        True
        """
        return self._rg

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        if self.grad_fn is not None:
            raise RuntimeError(
                "requires_grad can only be changed on leaf tensors; use .detach() first"
            )
        flag = check_bool(flag, "requires_grad")
        if flag and self._data.dtype.kind != "f":
            raise TypeError(_needs_float(self._data.dtype))
        self._rg = flag

    @property
    def is_leaf(self) -> bool:
        """True for a tensor the user made, False for an op's output (it has a ``grad_fn``).

        >>> w = ag.ones(2, requires_grad=True)
        >>> w.is_leaf, (w * 2).is_leaf
        (True, False)
        """
        return self.grad_fn is None

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape.

        >>> ag.zeros(2, 3).shape
        (2, 3)
        """
        return self._data.shape

    @property
    def dtype(self) -> np.dtype:
        """The array's numpy dtype.

        >>> ag.zeros(2).dtype
        dtype('float32')
        """
        return self._data.dtype

    @property
    def ndim(self) -> int:
        """The number of dimensions.

        >>> ag.zeros(2, 3).ndim
        2
        """
        return self._data.ndim

    def numel(self) -> int:
        """The number of elements.

        >>> ag.zeros(2, 3).numel()
        6
        """
        return self._data.size

    def numpy(self) -> np.ndarray:
        """The underlying array (shared, not copied).

        >>> ag.tensor([1.0, 2.0]).numpy()
        array([1., 2.], dtype=float32)
        """
        return self._data

    def item(self) -> Any:
        """The value of a one-element tensor as a Python number (else ValueError).

        >>> ag.tensor([[2.5]]).item()
        2.5
        """
        if self._data.size != 1:
            raise ValueError(f"item() needs a one-element tensor, got shape {self.shape}")
        return self._data.item()

    def detach(self) -> Tensor:
        """A new leaf sharing this tensor's data array, outside the graph (an
        optimizer's step gives a parameter a new array: the detached one keeps the
        values from before).

        >>> d = (ag.ones(2, requires_grad=True) * 2).detach()
        >>> d.is_leaf, d.requires_grad
        (True, False)
        """
        return Tensor(self._data)

    def detach_(self) -> Tensor:
        """``detach()`` in place, as torch's: this tensor becomes a leaf that does not
        require grad (an RNN's hidden state carried to the next step), its data and
        ``.grad`` kept, its hooks dropped. A graph recorded before still computes with
        it, and a backward through that graph no longer reaches its ``.grad`` (as
        torch's).

        >>> h = ag.ones(2, requires_grad=True) * 2
        >>> h.detach_() is h, h.is_leaf, h.requires_grad
        (True, True, False)
        """
        self.grad_fn = None
        self._rg = False
        self._accum = self._hooks = None  # (a leaf's node and hooks: of the graph)
        return self

    def __repr__(self) -> str:
        body = np.array2string(self._data, separator=", ", prefix="tensor(")
        extra = ""
        if self.grad_fn is not None:
            extra = f", grad_fn=<{self.grad_fn.name()}>"
        elif self._rg:
            extra = ", requires_grad=True"
        if self._data.dtype != np.float32:
            extra = f", dtype={self._data.dtype}" + extra
        return f"tensor({body}{extra})"

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[Tensor]:
        if self._data.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(len(self._data)))

    def __bool__(self) -> bool:
        return bool(self._data)

    def __float__(self) -> float:
        return float(self.item())

    def __format__(self, spec: str) -> str:
        # A 0-d tensor formats as its number, as numpy's 0-d arrays and torch's 0-d
        # tensors do: ``f"{loss:.4f}"`` raised "unsupported format string passed to
        # Tensor.__format__" (object's), and ``f"loss {loss}"`` printed the repr,
        # ``tensor(..., grad_fn=...)``, where both print the number (as a Python
        # number: a float32's float64 digits, as theirs). A tensor with dimensions
        # formats as ``str()`` and refuses a spec, as numpy and torch do.
        if self._data.ndim == 0:
            return format(self._data.item(), spec)
        return super().__format__(spec)

    def __int__(self) -> int:
        return int(self.item())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if dtype is not None and dtype != self._data.dtype:
            return self._data.astype(dtype)
        return self._data.copy() if copy else self._data

    # --- autograd -----------------------------------------------------------------

    def backward(self, gradient: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``.grad`` of every leaf that requires grad.

        ``gradient`` may be omitted only for a one-element tensor. Without
        ``retain_graph`` the graph's saved buffers are freed afterwards.

        Example::

            >>> x = ag.tensor([1.0, 2.0], requires_grad=True)
            >>> (x * 3).sum().backward(); x.grad
            array([3., 3.], dtype=float32)
        """
        if retain_graph is not False:
            retain_graph = check_retain_graph(retain_graph)
        if not self._rg:
            raise RuntimeError(
                "backward() on a tensor that does not require grad (and has no grad_fn)"
            )
        if gradient is None:
            if self._data.size != 1:
                raise RuntimeError(
                    "backward() without a gradient works only for a one-element tensor, "
                    f"got shape {self.shape}; pass gradient= explicitly"
                )
            grad = seed_grad(self._data)
        else:
            # (numpy would turn None into nan, and drop an imaginary part with a warning:
            # a wrong .grad, found far from here)
            given = real_array(gradient, "backward(): gradient")
            grad = np.array(given, dtype=self._data.dtype)  # a copy the engine may keep
            if grad.shape != self._data.shape:
                raise ValueError(
                    f"backward(): gradient of shape {grad.shape} does not fit a tensor "
                    f"of shape {self.shape}"
                )
        node = grad_node(self)
        assert node is not None
        _GraphTask([(node, grad)], retain_graph=retain_graph).run()

    def register_hook(self, fn: Callable[[np.ndarray], np.ndarray | None]) -> _HookHandle:
        """Call ``fn(grad)`` with this tensor's gradient during backward; a non-None
        return value replaces the gradient. Returns a handle with ``.remove()``.

        Example::

            >>> x = ag.tensor([1.0, 2.0], requires_grad=True)
            >>> h = x.register_hook(lambda g: g * 2)
            >>> x.sum().backward(); x.grad
            array([2., 2.], dtype=float32)
            >>> h.remove()
        """
        if not callable(fn):
            raise TypeError(f"register_hook needs a callable fn(grad), got {fn!r:.80}")
        if not self._rg:
            raise RuntimeError("register_hook on a tensor that does not require grad")
        node = grad_node(self)
        assert node is not None
        hooks = node.pre_hooks
        # Each registration is its own entry, under its own number, which its handle
        # removes: a function registered twice runs twice, and removing one of them
        # leaves the other in its place in the order.
        key = next(_hook_numbers)
        hooks[key] = fn
        if self.grad_fn is None:
            self._hooks = hooks  # keep the leaf's hooks beyond the node's life
        return _HookHandle(hooks, key)

    # --- operators ----------------------------------------------------------------

    def __add__(self, other: Any) -> Tensor:
        return _binary(Add, self, other)

    def __radd__(self, other: Any) -> Tensor:
        return _binary(Add, other, self)

    def __sub__(self, other: Any) -> Tensor:
        return _binary(Sub, self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return _binary(Sub, other, self)

    def __mul__(self, other: Any) -> Tensor:
        return _binary(Mul, self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return _binary(Mul, other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return _binary(Div, self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return _binary(Div, other, self)

    def __pow__(self, other: Any) -> Tensor:
        return _binary(Pow, self, other)

    def __rpow__(self, other: Any) -> Tensor:
        return _binary(Pow, other, self)

    def __matmul__(self, other: Any) -> Tensor:
        """Matrix product, as ``np.matmul`` (batched, 1-d operands promoted);
        ValueError when the inner sizes differ.

        >>> (ag.ones(2, 3) @ ag.ones(3, 4)).shape
        (2, 4)
        """
        return _binary(MatMul, self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return _binary(MatMul, other, self)

    # In-place operators (see _inplace): on a leaf under no_grad, or when no operand
    # requires grad, the tensor gets the result as a new array (``w -= lr * w.grad``
    # updates the parameter, as in torch); on a leaf that requires grad while grad
    # mode is on, RuntimeError; otherwise (a non-leaf, or an operand requiring grad
    # under grad mode) the out-of-place op, as Python falls back to it:
    # ``total += loss`` records ``total + loss``.
    def __iadd__(self, other: Any) -> Tensor:
        out = _inplace(Add, self, other)
        return NotImplemented if out is None else out

    def __isub__(self, other: Any) -> Tensor:
        out = _inplace(Sub, self, other)
        return NotImplemented if out is None else out

    def __imul__(self, other: Any) -> Tensor:
        out = _inplace(Mul, self, other)
        return NotImplemented if out is None else out

    def __itruediv__(self, other: Any) -> Tensor:
        out = _inplace(Div, self, other)
        return NotImplemented if out is None else out

    def __ipow__(self, other: Any) -> Tensor:
        out = _inplace(Pow, self, other)
        return NotImplemented if out is None else out

    def __imatmul__(self, other: Any) -> Tensor:
        out = _inplace(MatMul, self, other)
        return NotImplemented if out is None else out

    def __neg__(self) -> Tensor:
        return _unary(Neg, self)

    def __pos__(self) -> Tensor:
        return self

    def __abs__(self) -> Tensor:  # (``abs(t)``, as for numbers and arrays)
        return _unary(Abs, self)

    def __getitem__(self, index: Any) -> Tensor:
        """Indexing with ints, slices, ``None``, ``...`` and integer arrays (numpy's
        rules); the gradient goes back to the positions read, summed where one is read
        twice.

        >>> ag.tensor([1.0, 2.0, 3.0])[[0, 0, 2]]
        tensor([1., 1., 3.])
        """
        return _unary(GetItem, self, _index(index, self._data.shape))

    # Comparisons: plain boolean tensors, never part of the graph.
    def __lt__(self, other: Any) -> Tensor:
        return Tensor(np.asarray(np.less(self._data, _data(other))))

    def __le__(self, other: Any) -> Tensor:
        return Tensor(np.asarray(np.less_equal(self._data, _data(other))))

    def __gt__(self, other: Any) -> Tensor:
        return Tensor(np.asarray(np.greater(self._data, _data(other))))

    def __ge__(self, other: Any) -> Tensor:
        return Tensor(np.asarray(np.greater_equal(self._data, _data(other))))

    def __eq__(self, other: Any) -> Tensor:  # type: ignore[override]
        return Tensor(np.asarray(np.equal(self._data, _data(other))))

    def __ne__(self, other: Any) -> Tensor:  # type: ignore[override]
        return Tensor(np.asarray(np.not_equal(self._data, _data(other))))

    # --- methods ------------------------------------------------------------------

    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Sum over ``axis`` (all axes by default).

        >>> x = ag.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> x.sum().item(), x.sum(axis=0).numpy()
        (10.0, array([4., 6.], dtype=float32))
        """
        return _reduce(Sum, self, axis, keepdims)

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Mean over ``axis`` (all axes by default).

        >>> ag.tensor([[1.0, 2.0], [3.0, 4.0]]).mean(axis=1).numpy()
        array([1.5, 3.5], dtype=float32)
        """
        return _reduce(Mean, self, axis, keepdims)

    def max(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Maximum over ``axis`` (all axes by default); ties share the gradient equally.

        >>> ag.tensor([[1.0, 5.0], [3.0, 4.0]]).max(axis=0).numpy()
        array([3., 5.], dtype=float32)
        """
        return _reduce(Max, self, axis, keepdims)

    def reshape(self, *shape: Sizes) -> Tensor:
        """``t.reshape(2, 3)`` or ``t.reshape((2, 3))``; one dimension may be -1.

        >>> ag.zeros(6).reshape(2, -1).shape
        (2, 3)
        """
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _unary(Reshape, self, shape)

    def transpose(self, *axes: Sizes) -> Tensor:
        """Permute axes (reverse them when none are given).

        >>> ag.zeros(2, 3, 4).transpose(2, 0, 1).shape, ag.zeros(2, 3, 4).transpose().shape
        ((4, 2, 3), (4, 3, 2))
        """
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _unary(Transpose, self, axes or None)

    @property
    def T(self) -> Tensor:
        """The transpose, all axes reversed (``transpose()``).

        >>> ag.zeros(2, 3).T.shape
        (3, 2)
        """
        return _unary(Transpose, self, None)

    def astype(self, dtype: npt.DTypeLike | None) -> Tensor:
        """Cast to ``dtype``; the gradient is cast back. An integer or bool target
        gives a tensor outside the graph (integers carry no gradient); a complex one
        raises TypeError on a tensor that requires grad, as every op that gives complex
        values from one does.

        >>> x = ag.tensor([1.5, 2.0], requires_grad=True)
        >>> x.astype("float64").dtype, x.astype("int64").numpy(), x.astype("int64").requires_grad
        (dtype('float64'), array([1, 2]), False)
        """
        dt = np.dtype(dtype)
        if dt.kind not in "fc":
            return Tensor(self._data.astype(dt))
        # (complex too goes through the op, whose result check refuses it under grad:
        # taken out of the graph, x.sum() + x.astype(complex).abs().sum() gave x half
        # its gradient, silently; torch differentiates it)
        return _unary(Cast, self, dt)

    def exp(self) -> Tensor:
        """Elementwise ``e**x``.

        >>> ag.tensor([0.0, 1.0]).exp().numpy()
        array([1.      , 2.718282], dtype=float32)
        """
        return _unary(Exp, self)

    def log(self) -> Tensor:
        """Elementwise natural logarithm.

        >>> ag.tensor([1.0, 4.0]).log().numpy()
        array([0.       , 1.3862944], dtype=float32)
        """
        return _unary(Log, self)

    def sqrt(self) -> Tensor:
        """Elementwise square root.

        >>> ag.tensor([4.0, 9.0]).sqrt().numpy()
        array([2., 3.], dtype=float32)
        """
        return _unary(Sqrt, self)

    def abs(self) -> Tensor:
        """Elementwise absolute value (gradient ``sign(x)``, 0 at 0).

        >>> ag.tensor([-1.5, 2.0]).abs().numpy()
        array([1.5, 2. ], dtype=float32)
        """
        return _unary(Abs, self)

    def relu(self) -> Tensor:
        """Elementwise ``max(x, 0)`` (gradient 0 at 0).

        >>> ag.tensor([-1.0, 2.0]).relu().numpy()
        array([0., 2.], dtype=float32)
        """
        return _unary(ReLU, self)

    def tanh(self) -> Tensor:
        """Elementwise hyperbolic tangent.

        >>> ag.tensor([0.0, 100.0]).tanh().numpy()
        array([0., 1.], dtype=float32)
        """
        return _unary(Tanh, self)

    def sigmoid(self) -> Tensor:
        """Elementwise ``1 / (1 + e**-x)``, without overflow for large ``|x|``.

        >>> ag.tensor([0.0, -1000.0]).sigmoid().numpy()
        array([0.5, 0. ], dtype=float32)
        """
        return _unary(Sigmoid, self)

    def softmax(self, axis: int = -1) -> Tensor:
        """Softmax along ``axis``, shifted by the max: stable for logits of any size.

        Example::

            >>> ag.tensor([1e4, 0.0]).softmax().numpy()
            array([1., 0.], dtype=float32)
        """
        return _unary(Softmax, self, _one_axis("softmax", axis))

    def log_softmax(self, axis: int = -1) -> Tensor:
        """``log(softmax(x))`` along ``axis``, computed as ``x - max - log(sum(exp(x -
        max)))``: finite for logits of any size.

        >>> ag.tensor([1e4, 0.0]).log_softmax().numpy()
        array([     0., -10000.], dtype=float32)
        """
        return _unary(LogSoftmax, self, _one_axis("log_softmax", axis))


# Registration numbers of hooks, unique in the process: a handle's key stays its own
# whatever else is registered or removed on its tensor.
_hook_numbers = itertools.count()


class _HookHandle:
    """What ``register_hook`` returns: ``remove()`` takes out that registration (once;
    again does nothing), whatever else is registered, the same function included."""

    __slots__ = ("_hooks", "_key", "_fn")

    def __init__(self, hooks: dict[int, Any], key: int) -> None:
        self._hooks: dict[int, Any] | None = hooks
        self._key = key
        self._fn = hooks[key]

    def __repr__(self) -> str:
        state = "removed" if self._hooks is None else "registered"
        return f"<hook handle {state}: {self._fn!r:.80}>"

    def remove(self) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.pop(self._key, None)


def _needs_float(dtype: Any) -> str:
    return f"requires_grad=True needs a floating point dtype, got {np.dtype(dtype)}"


def _check_values(arr: np.ndarray, requires_grad: bool, what: str) -> None:
    """TypeError unless a tensor takes ``arr``'s dtype: bool or numeric, floating point
    under ``requires_grad``. ``what``: the values' name in the error."""
    if arr.dtype.kind not in "biufc":
        # (strings, objects, dates: no op, gradient or message would take them)
        raise TypeError(f"{what} must be bool or numeric, got dtype {arr.dtype}")
    if requires_grad and arr.dtype.kind != "f":
        raise TypeError(_needs_float(arr.dtype))


# ---------------------------------------------------------------------------------------
# recording helpers
# ---------------------------------------------------------------------------------------


def _check_leaf_to_copy(t: Tensor, how: str) -> None:
    if t.grad_fn is not None:
        raise RuntimeError(
            f"only leaf tensors can be {how}, not an op's output (its graph does not "
            "come along): detach() it first"
        )


def _rebuilt(data: np.ndarray, grad: np.ndarray | None, requires_grad: bool) -> Tensor:
    """A pickled leaf, unpickled (see Tensor.__reduce__)."""
    t = Tensor(data, requires_grad)
    t.grad = grad
    return t


def _result(out: Any, node: Node | None) -> Tensor:
    """Wrap an op's output (numpy may hand back a scalar for 0-d results)."""
    t = _new(Tensor)
    t._data = out if type(out) is np.ndarray else np.asarray(out)
    if node is not None and t._data.dtype.kind == "c":
        # (the backward rules are those of real numbers: no conjugates; the gradient
        # came out wrong, its imaginary part silently dropped at the float leaf)
        raise TypeError(
            f"{type(node).__name__.lower()} of a tensor that requires grad gave a "
            f"{t._data.dtype} result: complex values are not differentiable in actorgrad "
            "(detach() the input, or compute it under ag.no_grad())"
        )
    t.grad = None
    t._rg = node is not None
    t.grad_fn = node
    t._accum = None
    t._hooks = None
    return t


def _data(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x._data
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    return x  # numpy arrays and Python scalars (kept weak for numpy's promotion)


def _unary(cls: type[Function], x: Tensor, *params: Any) -> Tensor:
    node = _new(cls)
    a = x._data
    if x._rg and grad_enabled():  # (a tensor that requires grad is a float one)
        out = node.forward(a, *params)
        node.next = (x.grad_fn or grad_node(x),)
        node._hooks = None
        return _result(out, node)
    if a.dtype.kind in "biu":
        return _result(_int_unary(node, a, params), None)
    return _result(node.forward(a, *params), None)


def _reduce(cls: type[Function], x: Tensor, axis: Any, keepdims: Any) -> Tensor:
    """``x.sum``/``mean``/``max`` over ``axis``."""
    if keepdims is not False and keepdims is not True:  # (max kept them for "no")
        keepdims = check_bool(keepdims, "keepdims")
    return _unary(cls, x, _axes(axis, x._data.ndim), keepdims)


def _int_unary(node: Function, a: np.ndarray, params: tuple[Any, ...]) -> Any:
    """A unary op on a bool or integer array. A float op (``exp``, ``sigmoid``,
    ``softmax``...: ``_FLOAT_INPUT``) takes the array in float32, torch's default
    float, as torch does: numpy would compute bool, int8 and uint8 in float16 (e**20
    = inf, e**1 = 2.71875), wrap a uint8 subtraction (the softmax shift) and refuse a
    bool one. Another op's float result (the float64 mean of integers) is given in
    float32 too, unless the op is the explicit cast."""
    if getattr(node, "_FLOAT_INPUT", False):
        a = a.astype(np.float32)
    out = node.forward(a, *params)
    if out.dtype.kind == "f" and out.dtype != np.float32 and type(node) is not Cast:
        out = out.astype(np.float32)  # (the mean of an int tensor: the default float)
    return out


def _binary(cls: type[Function], a: Any, b: Any) -> Tensor:
    # The hot path of every arithmetic op: inlined checks, no helper calls for the
    # common Tensor / Python-number operands.
    ad: Any
    bd: Any
    if isinstance(a, Tensor):
        ad, ar = a._data, a._rg
    elif type(a) is float or type(a) is int:
        ad, ar = a, False
        if isinstance(b, Tensor) and b._data.dtype.type is _F16:
            ad = _widened(a)
    else:
        ad, ar = _operand(cls, a), False
    if isinstance(b, Tensor):
        bd, br = b._data, b._rg
    elif type(b) is float or type(b) is int:
        bd, br = b, False
        if type(ad) is _ndarray and ad.dtype.type is _F16:
            bd = _widened(b)
    else:
        bd, br = _operand(cls, b), False
    node = _new(cls)
    try:
        out = node.forward(ad, bd)
    except (TypeError, ValueError):  # (matmul's shape check met an object first)
        _refuse_bool_subtraction(cls, ad, bd)
        _check_operands(cls, a, b)
        _check_broadcast(cls, ad, bd)
        raise
    # (a Python number's weakness numpy 2 has: only the other operand's dtype tells.
    # Arrays only: where numpy's dtype differs from torch's, it differs from an array
    # operand's, and a Python bool or complex has no dtype to look at)
    dt = out.dtype
    if (type(ad) is _ndarray and ad.dtype != dt) or (type(bd) is _ndarray and bd.dtype != dt):
        _refuse_bool_subtraction(cls, ad, bd)
        want = _promoted(((a, ad), (b, bd)), dt)
        if want is not None:
            out = out.astype(want)
    if (ar or br) and grad_enabled():
        node.next = (
            (a.grad_fn or grad_node(a)) if ar else None,
            (b.grad_fn or grad_node(b)) if br else None,
        )
        node._hooks = None
        return _result(out, node)
    return _result(out, None)


def _inplace(cls: type[Function], t: Tensor, other: Any) -> Tensor | None:
    """``t op= other``: on a leaf, under ``no_grad`` or with no operand requiring grad,
    ``t`` gets the out-of-place result as a new array (the old one is never written:
    a recorded graph or a zero-copy send may hold it) and is returned, with its dtype
    (numpy's same_kind casting: an int tensor ``+= 1.5`` is a TypeError, as in torch)
    and its shape (a result that broadcasts to another shape: ValueError). A leaf that
    requires grad while grad mode is on: RuntimeError. A non-leaf, or an ``other``
    that requires grad under grad mode: None, for the operator to return
    NotImplemented, so Python computes ``t op other`` out of place and rebinds the name
    (the graph goes on recording). (Type checkers accept NotImplemented only from an
    operator method itself.)"""
    if t.grad_fn is not None:
        return None
    sym = _SYMBOLS[cls.__name__]
    if grad_enabled():
        if t._rg:
            raise RuntimeError(
                f"in-place {sym}= on a leaf tensor that requires grad, while grad mode is "
                f"on; update it under `with ag.no_grad():` (as an optimizer step does), "
                f"or write `x = x {sym} ...` for a new tensor in the graph"
            )
        if isinstance(other, Tensor) and other._rg:
            return None
    out = _binary(cls, t, other)._data
    if out.shape != t._data.shape:
        raise ValueError(
            f"in-place {sym}=: the result's shape {out.shape} differs from the tensor's "
            f"{t._data.shape}; an in-place op keeps the tensor's shape"
        )
    dt = t._data.dtype
    if out.dtype != dt:
        if not np.can_cast(out.dtype, dt, casting="same_kind"):
            raise TypeError(
                f"in-place {sym}=: the result's dtype {out.dtype} cannot be cast to the "
                f"tensor's dtype {dt}"
            )
        out = out.astype(dt)
    t._data = out
    return t


def _widened(x: float | int) -> Any:
    """A Python number met by a float16 array, as torch takes it: in float32 (its
    "opmath" for float16), not cast to float16 first as numpy does, where 70,000 is inf
    and 1e-8 is 0 (``x / 70_000`` was 0, torch's is 1.43e-05). The op then computes in
    float32 and ``_binary`` rounds the result to float16 once (the number ranks below
    the array), which is what numpy's float16 loops do anyway with a number float16
    holds exactly (they compute in float32): only the numbers float16 cannot hold give
    other results. Beyond float32's range float64 (no overflow warning; the value is
    the same once rounded to float16)."""
    return np.float32(x) if -_F32_MAX <= x <= _F32_MAX else np.float64(x)


def _operand(cls: type[Function], x: Any) -> Any:
    """The data of an operand of ``_binary`` that is neither a Tensor, a float nor an
    int (those take the fast path). A Python bool stays one: numpy takes it as torch
    does (``x * True``), except in a subtraction, which torch refuses."""
    if cls is Sub and type(x) in (bool, np.bool_):
        raise TypeError(
            f"subtraction with a bool ({x}) is not supported, as in torch; use int({x}), "
            "or ~ to invert a mask"
        )
    return _data(x)


def _refuse_bool_subtraction(cls: type[Function], ad: Any, bd: Any) -> None:
    """TypeError for a subtraction with a bool array or tensor, as in torch (numpy takes
    bool minus float, and refuses bool minus bool in words of its own). Called from
    _binary's slow branches only, which every such subtraction takes: bool minus bool
    fails in numpy, and with anything else the result's dtype is not the bool
    operand's. (Checked in Sub.forward, it cost every subtraction 7%.)"""
    if cls is Sub and (
        (type(ad) is _ndarray and ad.dtype.kind == "b")
        or (type(bd) is _ndarray and bd.dtype.kind == "b")
    ):
        raise TypeError(
            "subtraction with a bool tensor or array is not supported, as in torch; convert "
            "it first (an array: mask.astype(np.float32); a tensor: ag.tensor(mask.data, "
            "dtype='float32')), or use ~ to invert a mask"
        ) from None


_CATEGORY = {"b": 0, "u": 1, "i": 1, "f": 2, "c": 3}
_DEFAULT = {
    0: np.dtype(np.bool_),
    1: np.dtype(np.int64),
    2: np.dtype(np.float32),
    3: np.dtype(np.complex64),
}


def _promoted(operands: Sequence[tuple[Any, Any]], dt: np.dtype) -> np.dtype | None:
    """The result dtype of an op on ``operands`` (each: as given, and its data) as torch
    gives it, where numpy's ``dt`` differs (None: it does not). numpy promotes by value
    type alone, so a float32 tensor met an integer array, a numpy float64 scalar
    (``x / np.sqrt(d)``) or a list of floats and the graph went on in float64, at twice
    the memory and time. torch ranks operands: tensors with dimensions first, then 0-d
    tensors, then Python numbers and numpy scalars (and lists here, as "Python floats
    become float32"); a lower rank decides only when it is of a higher category (bool <
    int < float < complex), and numbers then give the default dtype of their category
    (float32, int64, complex64)."""
    ranked: list[tuple[int, int, np.dtype]] = []  # (rank, category, dtype)
    for x, xd in operands:
        if isinstance(x, (Tensor, np.ndarray)):
            d = xd.dtype
            rank = 0 if xd.ndim else 1
        else:  # Python numbers and numpy scalars (as torch takes them), lists
            d = np.asarray(xd).dtype
            rank = 2
        cat = _CATEGORY.get(d.kind)
        if cat is None:
            return None  # (objects, strings: numpy's error or result stands)
        ranked.append((rank, cat, d))
    top = max(c for _, c, _ in ranked)
    rank = min(r for r, c, _ in ranked if c == top)
    if rank == 2:
        want = _DEFAULT.get(top)
        if want is None:
            return None
    else:
        want = np.result_type(*(d for r, c, d in ranked if r == rank and c == top))
    if top == 3:
        # (a complex of a lower rank keeps the precision of the first rank above it with
        # a float: float64 tensor * 1j is complex128, as in torch)
        for r in range(rank):
            floats = [d for rr, c, d in ranked if rr == r and c == 2]
            if floats:
                want = np.result_type(np.complex64, *floats)
                break
    if dt.kind == "f" and want.kind in "biu":  # (int / int: the default float)
        want = _DEFAULT[2]
    return None if want == dt else want


def _check_operands(cls: type[Function], a: Any, b: Any) -> None:
    """Raise a TypeError naming the operator and the operand that is not a number or
    an array of numbers (numpy's message would name the array's scalar type, e.g.
    "'float' and 'NoneType'"); return for numeric operands (numpy's error stands)."""
    for x in (a, b):
        if not isinstance(x, Tensor) and np.asarray(_data(x)).dtype.kind not in "biufc":
            sym = _SYMBOLS.get(cls.__name__, cls.__name__)
            raise TypeError(
                f"unsupported operand type(s) for {sym}: {_kind(a)} and {_kind(b)} "
                "(operands must be tensors, numpy arrays, lists or numbers)"
            )


def _check_broadcast(cls: type[Function], ad: Any, bd: Any) -> None:
    """ValueError naming the operator and both shapes, in the order written, when an
    elementwise op's operands do not broadcast (numpy's "operands could not be
    broadcast together with shapes (2,3) (4,)" named no operator); return otherwise
    (another ValueError keeps numpy's words, matmul its own message)."""
    if cls is MatMul:
        return
    sa, sb = np.shape(ad), np.shape(bd)
    try:
        np.broadcast_shapes(sa, sb)
    except ValueError:
        raise ValueError(
            f"{_SYMBOLS.get(cls.__name__, cls.__name__)}: operands of shapes {sa} and {sb} "
            "do not broadcast (each dimension, from the last, must be equal or 1)"
        ) from None


_SYMBOLS = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/", "Pow": "**", "MatMul": "@"}


def _kind(x: Any) -> str:
    if isinstance(x, (Tensor, np.ndarray)):
        return f"'{type(x).__name__}' of dtype {x.dtype}"
    return f"'{type(x).__name__}'"


def _as_tensor(x: Any, where: str) -> Tensor:
    """``x`` as a Tensor: a Tensor as it is, a numpy array or (nested) list of numbers
    wrapped (as the ops take them); anything else raises TypeError naming ``where``."""
    if isinstance(x, Tensor):
        return x
    return Tensor(_numeric(x, where))


def clear_grads(params: Iterable[Tensor], set_to_none: bool = True) -> None:
    """Forget each tensor's ``.grad`` (``set_to_none=True``), or make it zeros of its
    shape and dtype (False, as torch's ``zero_grad(set_to_none=False)``; a tensor with
    no gradient keeps None): what ``Module.zero_grad`` and ``Optimizer.zero_grad`` do.

    >>> w = tensor([1.0, 2.0], requires_grad=True); w.sum().backward()
    >>> clear_grads([w], set_to_none=False); w.grad
    array([0., 0.], dtype=float32)
    """
    set_to_none = check_bool(set_to_none, "set_to_none")
    for p in params:
        g = p.grad
        # (a fresh array, not filled in place: .grad may be a caller's, or read-only)
        p.grad = None if set_to_none or g is None else np.zeros_like(g)


def real_array(value: Any, what: str) -> np.ndarray:
    """``value`` (an array, a Tensor, a list, a number) as an array of real numbers;
    else TypeError naming ``what``: for gradients and parameter values, which numpy
    would take as objects (None), strings, or complex numbers."""
    arr = np.asarray(value._data if isinstance(value, Tensor) else value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{what} is a {type(value).__name__} of dtype {arr.dtype}, not an array of real numbers"
        )
    return arr


def shaped_as(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``arr`` as a state dict's load takes it for a parameter of ``shape``: as it is
    when it has that shape, reshaped when it is what an empty array of ``shape`` comes
    back from JSON as (its nested lists end at the first zero: (0, 3) is ``[]``, (2, 0,
    3) ``[[], []]``; it holds nothing either way, and docs/limits.md's JSON recipe works
    for every parameter so); None for any other shape."""
    if arr.shape == shape:
        return arr
    if 0 in shape and arr.shape == shape[: shape.index(0) + 1]:
        return arr.reshape(shape)
    return None


def _numeric(x: Any, where: str) -> np.ndarray:
    """``x`` (not a Tensor) as an array of numbers, else TypeError naming ``where``."""
    arr = np.asarray(_data(x))
    if arr.dtype.kind not in "biufc":
        raise TypeError(
            f"{where} must be a Tensor, a numpy array or a list of numbers, "
            f"got {type(x).__name__}"
            + (f" of dtype {arr.dtype}" if isinstance(x, (np.ndarray, list, tuple)) else "")
        )
    return arr


def _check_sequence(tensors: Any, what: str) -> None:
    """TypeError/ValueError naming ``what`` (cat, stack) unless ``tensors`` is a
    non-empty sequence of numeric operands."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        # (a Tensor: iterating it would split it into its rows)
        raise TypeError(f"{what}: expected a sequence of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{what}: expected a non-empty sequence of tensors")
    _check_numeric(tensors, f"{what}: tensors")


def _check_numeric(xs: Sequence[Any], where: str) -> None:
    """TypeError naming ``where[i]`` for an operand that is not numbers (a string or
    None made a tensor of strings or objects, whose backward failed inside numpy)."""
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            _numeric(x, f"{where}[{i}]")


def _nary(cls: type[Function], xs: Sequence[Any], *params: Any) -> Tensor:
    datas = [_data(x) for x in xs]
    node = _new(cls)
    out = node.forward(datas, *params)
    dt = out.dtype
    if any(type(d) is not np.ndarray or d.dtype != dt for d in datas):
        want = _promoted(list(zip(xs, datas, strict=True)), dt)
        if want is not None:
            out = out.astype(want)
    flags = [isinstance(x, Tensor) and x._rg for x in xs]
    if any(flags) and grad_enabled():
        node.next = tuple(grad_node(x) if f else None for x, f in zip(xs, flags, strict=True))
        node._hooks = None
        return _result(out, node)
    return _result(out, None)


def _fit(g: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """Reduce a broadcast gradient back to ``shape`` and cast it to ``dtype``."""
    if g.shape != shape:
        lead = g.ndim - len(shape)
        if lead:
            g = _sum(g, tuple(range(lead)))
        ones = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
        if ones:
            g = _sum(g, ones, keepdims=True)
    if g.dtype != dtype:
        g = g.astype(dtype)
    return g


def _meta(x: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    return (x.shape, x.dtype) if isinstance(x, np.ndarray) else None


def _axes(axis: Any, ndim: int) -> tuple[int, ...] | None:
    """Normalize an axis argument to a sorted tuple of non-negative axes (None: all).

    A 0-d tensor takes axis 0 or -1 (as torch does) and reduces over nothing: ``()``.
    An axis given twice is an error (numpy's, torch's), not merged."""
    if axis is None:
        return None
    if isinstance(axis, np.ndarray) and axis.ndim == 0:
        axis = axis.item()  # (np.array(1): an int, as torch takes a 0-d tensor)
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    if not isinstance(axis, (tuple, list, range, np.ndarray)) or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis
    ):
        # (numpy's words: "'float' object is not iterable", "'<=' not supported ...")
        raise TypeError(f"axis must be an int, a tuple of ints or None, got {axis!r:.40}")
    out: list[int] = []
    for ax in axis:
        if not (-ndim <= ax < ndim if ndim else ax in (0, -1)):
            raise ValueError(_bad_axis("", ax, ndim))
        norm = int(ax) % max(ndim, 1)
        if norm in out:
            raise ValueError(
                f"axis {norm} appears more than once in axis={short_repr(tuple(axis), 80)}"
            )
        out.append(norm)
    return tuple(sorted(out)) if ndim else ()


def _one_axis(fn: str, axis: Any) -> int | None:
    """``axis`` if it is an int (or None: all elements), else TypeError naming ``fn``."""
    if axis is None:
        return None
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{fn}: axis must be an int or None, got {axis!r:.40}")
    return int(axis)


def _int_axis(fn: str, axis: Any, ndim: int, of: str = "a tensor") -> int:
    """``axis`` as a non-negative axis of ``ndim`` dimensions: TypeError naming ``fn``
    unless it is an int (None too: numpy's concatenate would flatten, and the backward
    fail), ValueError when it is out of range (for ``of`` with ``ndim`` dimensions)."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{fn}: axis must be an int, got {axis!r:.40}")
    if not -ndim <= axis < ndim:
        raise ValueError(_bad_axis(fn, axis, ndim, of))
    return int(axis) % ndim


def _bad_axis(fn: str, axis: Any, ndim: int, of: str = "a tensor") -> str:
    where = f"{fn}: " if fn else ""
    return f"{where}axis {axis} is out of range for {of} with {ndim} dimensions"


def _check_axis(fn: str, axis: Any, ndim: int) -> None:
    try:
        _axes(axis, ndim)
    except ValueError:
        raise ValueError(_bad_axis(fn, axis, ndim)) from None


def _perm(axes: Any, ndim: int) -> tuple[int, ...]:
    """Normalize ``transpose``'s axes to a permutation of ``range(ndim)``."""
    given = tuple(axes)
    shown = short_repr(given, 80)  # (a tuple of any length: cut)
    bad = next((ax for ax in given if not isinstance(ax, (int, np.integer))), None)
    if bad is not None:  # (a float or str axis: the wrong type, not the wrong value)
        raise TypeError(f"transpose: axes must be ints, got {bad!r:.40} in {shown}")
    if len(given) != ndim:
        raise ValueError(
            f"transpose: axes {shown} must be {ndim} integers, one per dimension of the tensor"
        )
    out = []
    for ax in given:
        if not -ndim <= ax < ndim:
            raise ValueError(
                f"transpose: axes {shown}: axis {ax} is out of range for a tensor with "
                f"{ndim} dimensions"
            )
        norm = int(ax) % ndim
        if norm in out:
            raise ValueError(f"transpose: axes {shown} name axis {norm} twice")
        out.append(norm)
    return tuple(out)


#: Broadcasts smaller than this many bytes are materialized (see broadcast_view).
SMALL_BROADCAST_BYTES = 4096


def broadcast_view(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``np.broadcast_to(g, shape)`` (read-only, stride 0 along broadcast dimensions)
    for a C-contiguous ``g`` of ``len(shape)`` dimensions that fit ``shape``, without
    broadcast_to's ~10 us of Python (a reduction's backward runs it every step). A
    result under ``SMALL_BROADCAST_BYTES`` comes as a fresh array instead: filling it
    costs a quarter of building the view, and it travels and accumulates without a
    copy."""
    if g.ndim != len(shape) or not g.flags.c_contiguous:
        return np.broadcast_to(g, shape)
    if g.itemsize * math.prod(shape) < SMALL_BROADCAST_BYTES:
        out = np.empty(shape, g.dtype)
        out[...] = g  # (raises for shapes that do not fit, like broadcast_to)
        return out
    strides = []
    for b, d, st in zip(g.shape, shape, g.strides, strict=True):
        if b == d:
            strides.append(st)
        elif b == 1:
            strides.append(0)
        else:
            return np.broadcast_to(g, shape)  # raises the usual ValueError
    view = np.ndarray(shape, g.dtype, buffer=g, strides=tuple(strides))
    view.flags.writeable = False
    return view


def _expand(g: Any, axes: tuple[int, ...] | None, keepdims: bool, ndim: int) -> Any:
    """Put back the reduced axes of a reduction's gradient as size-1 dimensions."""
    if keepdims:
        return g
    g = np.asarray(g)  # (methods, not np.reshape/np.expand_dims: ~10x less overhead)
    if axes is None:
        return g.reshape((1,) * ndim)
    shape = list(g.shape)
    for ax in sorted(axes):
        shape.insert(ax, 1)
    return g.reshape(shape)


def _index(index: Any, shape: tuple[int, ...]) -> Any:
    """Turn tensors/lists in an index into numpy arrays, and boolean masks into integer
    arrays (so backward can always use ``np.add.at``). Each mask must fit the dimensions
    it indexes: its nonzero() alone would hide a misfit (a mask of 2 on 3 elements picks
    from the first 2, where numpy raises)."""
    parts = [_index_part(p) for p in (index if isinstance(index, tuple) else (index,))]
    if any(_is_mask(p) for p in parts):
        _check_masks(parts, shape)
    if not isinstance(index, tuple):
        part = parts[0]
        return np.nonzero(part) if _is_mask(part) else part
    out: list[Any] = []
    for part in parts:
        if _is_mask(part):  # a boolean mask spans several axes
            out.extend(np.nonzero(part))
        else:
            out.append(part)
    return tuple(out)


def _index_part(part: Any) -> Any:
    if isinstance(part, Tensor):
        part = part._data
    if isinstance(part, (np.ndarray, np.bool_)) and part.dtype == np.bool_ and part.ndim == 0:
        return bool(part)  # (a 0-d mask indexes as True/False; nonzero() refuses it)
    if isinstance(part, list):
        part = np.asarray(part)
        if part.size == 0:
            part = part.astype(np.intp)
    return part


def _is_mask(part: Any) -> bool:
    return isinstance(part, np.ndarray) and part.dtype == np.bool_


def _check_masks(parts: list[Any], shape: tuple[int, ...]) -> None:
    """Raise IndexError (as numpy does) for a boolean mask whose shape differs from the
    dimensions it indexes. Other misfits (too many indices, ...) are numpy's to name."""

    def ndims(part: Any) -> int:  # dimensions of the tensor that `part` indexes
        if part is None or isinstance(part, bool):
            return 0  # (a Python bool indexes like a 0-d mask: it adds a dimension)
        return part.ndim if _is_mask(part) else 1

    used = sum(ndims(p) for p in parts if p is not Ellipsis)
    dim = 0
    for part in parts:
        if part is Ellipsis:
            dim += max(len(shape) - used, 0)
            continue
        n = ndims(part)
        if _is_mask(part) and n and dim + n <= len(shape):
            dims = shape[dim : dim + n]
            if part.shape != dims:
                raise IndexError(
                    f"boolean mask of shape {part.shape} does not fit the dimensions {dims} "
                    f"it indexes (from axis {dim} of a tensor of shape {shape})"
                )
        dim += n


def _is_basic(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    for p in parts:
        if not (p is None or p is Ellipsis or isinstance(p, (int, np.integer, slice))):
            return False
    return True


# ---------------------------------------------------------------------------------------
# ops: forward and gradient rule side by side
# ---------------------------------------------------------------------------------------


def _fit_meta(a: Any, out: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """What ``_fit`` needs to undo broadcasting/promotion of input ``a``; None when
    nothing is to undo (the common case: no allocation, no reduction)."""
    if type(a) is np.ndarray and (a.shape != out.shape or a.dtype != out.dtype):
        return (a.shape, a.dtype)
    return None


class Add(Function):
    __slots__ = ()

    def forward(self, a: Any, b: Any) -> Any:
        out = a + b
        ma, mb = _fit_meta(a, out), _fit_meta(b, out)
        self.saved = (ma, mb) if ma or mb else None
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        saved, (na, nb) = self.saved, self.next
        if saved is None:
            return (g if na else None, g if nb else None)
        ma, mb = saved
        return (
            (g if ma is None else _fit(g, *ma)) if na else None,
            (g if mb is None else _fit(g, *mb)) if nb else None,
        )


class Sub(Function):
    __slots__ = ()

    def forward(self, a: Any, b: Any) -> Any:
        out = a - b
        ma, mb = _fit_meta(a, out), _fit_meta(b, out)
        self.saved = (ma, mb) if ma or mb else None
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        saved, (na, nb) = self.saved, self.next
        ma, mb = saved if saved is not None else (None, None)
        return (
            (g if ma is None else _fit(g, *ma)) if na else None,
            (-g if mb is None else _fit(-g, *mb)) if nb else None,
        )


class Mul(Function):
    __slots__ = ()

    def forward(self, a: Any, b: Any) -> Any:
        self.saved = (a, b)
        return a * b

    def backward(self, g: Any) -> tuple[Any, ...]:
        (a, b), (na, nb) = self.saved, self.next
        return (
            _fit(g * b, a.shape, a.dtype) if na else None,
            _fit(g * a, b.shape, b.dtype) if nb else None,
        )


class Div(Function):
    __slots__ = ()

    def forward(self, a: Any, b: Any) -> Any:
        if (type(b) is int and b) or (type(b) is float and 1.0 <= abs(b) < _INF):
            # (the common x / n, |n| >= 1 and finite: |x / n| <= |x|, nothing to
            # silence; skips errstate's ~1.3 us)
            out = a / b
        else:
            # No warnings: inf (1 / 0, 1e30 / 1e-30) and nan (0 / 0) are the values,
            # as in torch.
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                out = a / b
        self.saved = (a, b, out)
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        (a, b, out), (na, nb) = self.saved, self.next
        if (type(b) is int and b) or (type(b) is float and 1.0 <= abs(b) < _INF):
            return (_fit(g / b, a.shape, a.dtype) if na else None, None)
        # (b == 0: inf, nan; a tiny b: inf)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ga = g / b
            gb = -ga * out if nb else None
        return (
            _fit(ga, a.shape, a.dtype) if na else None,
            _fit(gb, b.shape, b.dtype) if nb else None,
        )


class Pow(Function):
    __slots__ = ()

    def forward(self, a: Any, b: Any) -> Any:
        # No warnings: inf (0 ** -1, 1e30 ** 2) and nan ((-1) ** 0.5) are the values,
        # as in torch.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = a**b
        self.saved = (a, b, out)
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        (a, b, out), (na, nb) = self.saved, self.next
        ga = gb = None
        if na:
            if type(b) is int and b == 2:
                ga = _fit(g * (2 * a), a.shape, a.dtype)
            elif np.ndim(b) == 0 and b == 0:
                # a**0 is constant: exactly 0, whatever g is (inf or nan too), as torch
                ga = np.zeros(a.shape, a.dtype)
            else:
                # d(a**b)/da = b * a**(b-1); 0 where b == 0, whatever g is there (as
                # torch does: 0 * 0**-1 would be nan, and so would an inf g times 0).
                # No warnings: inf where a == 0 and b < 1 is the value.
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    gd = g * (b * a ** (b - 1))
                    if np.ndim(b) != 0:
                        gd = _zeroed(gd, b == 0)
                    ga = _fit(gd, a.shape, a.dtype)
        if nb:
            # d(a**b)/db = a**b * log(a); defined as 0 where a == 0 and b >= 0 (as torch
            # does). Where a == 0 and b < 0 it stays inf * log(0) = -inf (times g).
            # (masked before g multiplies it, as torch does: a nan or inf g stays one)
            # (the log in the result's dtype: a float32 base's gave a float64 exponent
            # a gradient of float32's precision)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                log_a = np.log(np.asarray(a, dtype=np.result_type(out)))
                gb = g * _zeroed(out * log_a, (a == 0) & (b >= 0))
            gb = _fit(gb, b.shape, b.dtype)
        return ga, gb


class MatMul(Function):
    __slots__ = ()

    def forward(self, a: Any, b: Any) -> Any:
        self.saved = (a, b)
        try:
            return np.matmul(a, b)
        except ValueError:
            raise ValueError(
                f"matmul: shapes {np.shape(a)} and {np.shape(b)} do not fit "
                "(need a.shape[-1] == b.shape[-2], both at least 1-d, batch dims "
                "broadcastable)"
            ) from None

    def backward(self, g: Any) -> tuple[Any, ...]:
        (a, b), (na, nb) = self.saved, self.next
        if a.ndim == 2 and b.ndim == 2:  # the common case, no reshaping needed
            return (
                _fit(g @ b.T, a.shape, a.dtype) if na else None,
                _fit(a.T @ g, b.shape, b.dtype) if nb else None,
            )
        # Treat 1-d operands as matrices (as matmul does), then undo it.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if b.ndim == 1:
            g = np.expand_dims(g, -1)
        if a.ndim == 1:
            g = np.expand_dims(g, -2)
        ga = gb = None
        if na:
            ga = _fit(g @ np.swapaxes(b2, -1, -2), a2.shape, a.dtype).reshape(a.shape)
        if nb:
            gb = _fit(np.swapaxes(a2, -1, -2) @ g, b2.shape, b.dtype).reshape(b.shape)
        return ga, gb


class Neg(Function):
    __slots__ = ()

    def forward(self, a: Any) -> Any:
        self.saved = ()  # nothing to keep, but release()/apply() look at it
        return -a

    def backward(self, g: Any) -> tuple[Any, ...]:
        return (-g,)


class Exp(Function):
    __slots__ = ()
    _FLOAT_INPUT = True  # (bool and integer inputs come as float32: see _int_unary)

    def forward(self, a: Any) -> Any:
        with np.errstate(over="ignore"):  # (exp(100) in float32 is inf, as in torch)
            out = np.exp(a)
        self.saved = out
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        return (g * self.saved,)


class Log(Function):
    __slots__ = ()
    _FLOAT_INPUT = True  # (bool and integer inputs come as float32: see _int_unary)

    def forward(self, a: Any) -> Any:
        self.saved = a
        # No warnings: -inf (log 0) and nan (log -1) are the values, as in torch.
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(a)

    def backward(self, g: Any) -> tuple[Any, ...]:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return (g / self.saved,)  # (inf at 0)


class Sqrt(Function):
    __slots__ = ()
    _FLOAT_INPUT = True  # (bool and integer inputs come as float32: see _int_unary)

    def forward(self, a: Any) -> Any:
        with np.errstate(invalid="ignore"):  # (sqrt(-1) is nan, as in torch)
            out = np.sqrt(a)
        self.saved = out
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (g / (2 * self.saved),)  # (inf at 0)


class Abs(Function):
    __slots__ = ()

    def forward(self, a: Any) -> Any:
        self.saved = a
        return np.abs(a)

    def backward(self, g: Any) -> tuple[Any, ...]:
        s = np.sign(self.saved)
        if s.dtype.kind == "f" and np.isnan(s).any():
            s = np.nan_to_num(s, nan=0.0)  # (sign(nan) is 0 for the gradient, as torch)
        return (g * s,)


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # (float16, float32, float64)


def _zeroed(g: Any, drop: np.ndarray) -> Any:
    """``np.where(drop, 0, g)``, bit for bit, for a float ``g`` of ``drop``'s shape: as
    a bitwise AND of ``g``'s bits with a mask, because np.where branches on every
    element, ~4 ns each on a mask of mixed values (a ReLU's gradient over 1M float32
    elements took 4.2 ms, torch's 0.68; the AND: 0.77). Selected, not multiplied by
    the mask: an inf or nan ``g`` where ``drop`` is True gives 0, not nan."""
    u = _UINT.get(g.dtype.itemsize) if type(g) is _ndarray and g.dtype.kind == "f" else None
    if u is None or type(drop) is not _ndarray or g.shape != drop.shape:
        return np.where(drop, 0, g)
    mask = drop.astype(u)
    mask -= 1  # True -> 0, False -> every bit set
    np.bitwise_and(mask, g.view(u), out=mask)
    return mask.view(g.dtype)


class ReLU(Function):
    __slots__ = ()

    def forward(self, a: Any) -> Any:
        out = np.maximum(a, 0)
        self.saved = out
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        # g where the output is positive, else 0: selected, not multiplied by a mask
        # (an inf g from sqrt(relu(x)) at x <= 0 gave inf * 0 = nan), and nan outputs
        # pass g on, as torch does
        return (_zeroed(g, self.saved <= 0),)


class Tanh(Function):
    __slots__ = ()
    _FLOAT_INPUT = True  # (bool and integer inputs come as float32: see _int_unary)

    def forward(self, a: Any) -> Any:
        out = np.tanh(a)
        self.saved = out
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        out = self.saved
        return (g * (1 - out * out),)


class Sigmoid(Function):
    __slots__ = ()
    _FLOAT_INPUT = True  # (bool and integer inputs come as float32: see _int_unary)

    def forward(self, a: Any) -> Any:
        # exp of -|a| only: no overflow for large |a| (unlike 1/(1+exp(-a))), and for
        # a < 0 the value e/(1+e) keeps its relative precision where 0.5*(tanh+1) or
        # 1 - sigmoid(-a) would cancel to 0 (sigmoid(-20) = 2e-9, not 0 in float32).
        # In place, and the numerator (1 for a >= 0, else e) a maximum, not np.where:
        # its branch per element cost ~4 ns on inputs of mixed signs (1M float32: 6.5
        # ms, torch 0.4), and the whole-size temporaries came to 5.25x the input's size.
        e = np.empty(a.shape, a.dtype)  # (an array also for a 0-d ``a``, to write into)
        np.abs(a, out=e)
        np.negative(e, out=e)
        np.exp(e, out=e)  # e = exp(-|a|), in [0, 1]
        d = e + 1
        np.maximum(e, a >= 0, out=e)  # (nan stays nan)
        e /= d
        self.saved = e
        return e

    def backward(self, g: Any) -> tuple[Any, ...]:
        out = self.saved
        return (g * out * (1 - out),)


def _wide_sum(dtype: np.dtype) -> type[np.float32] | None:
    """The accumulator of the sums inside softmax, log_softmax and cross_entropy (and
    their gradients): float32 for float16 (None: the array's own dtype). In float16 a
    row of more than 65,504 exp()s summed to inf: softmax gave zeros, log_softmax -inf,
    where the values (1/70000, -11.16) are well within its range (torch's CPU kernels
    accumulate half in float32 too)."""
    return np.float32 if dtype == np.float16 else None


def _log_softmax_shifted(shifted: Any, axis: int) -> Any:
    """log_softmax along ``axis`` of ``shifted`` (an array less its max along ``axis``:
    stable for any values), in its dtype, the sum of exp()s of float16 in float32 (see
    _wide_sum). The caller sets numpy's errstate (inf and all -inf rows give nan)."""
    wide = _wide_sum(shifted.dtype)
    out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True, dtype=wide))
    return out if wide is None else out.astype(shifted.dtype)


def _shares(g: Any, count: Any) -> Any:
    """``g / count`` in ``g``'s dtype, ``count`` a number of elements (a Python int or an
    integer array broadcasting with ``g``). Float16 divides in float32, rounded once:
    numpy casts the count to float16, inf past 65,504 elements, and every share was 0."""
    if g.dtype == np.float16:
        return (g / np.asarray(count, np.float32)).astype(np.float16)
    # (an int64 count array would make a float32 gradient float64; a Python int does not)
    return g / (count.astype(g.dtype) if isinstance(count, np.ndarray) else count)


class Softmax(Function):
    __slots__ = ()
    _FLOAT_INPUT = True  # (bool and integer inputs come as float32: see _int_unary)

    def forward(self, a: Any, axis: int) -> Any:
        if a.size == 0:  # (max() of a size-0 axis raises; the result is empty anyway)
            _check_axis("softmax", axis, a.ndim)  # (as for any other size)
            out = np.exp(a)
            self.saved = (out, axis)
            return out
        try:
            m = a.max(axis=axis, keepdims=True)
        except np.exceptions.AxisError:
            raise ValueError(_bad_axis("softmax", axis, a.ndim)) from None
        # (an inf or an all -inf row gives nan, as in torch: no warning; nor does a
        # shift that overflows, values more than the dtype's range apart: -inf is its
        # value, and exp() of it the 0 it stands for)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            # One whole-size array, the shift, exp and division in place: as
            # expressions they made three (4M float32 took 9.6 ms, now 6.6; torch 2.2).
            # (``out=``: an array also for a 0-d ``a``)
            e = np.subtract(a, m, out=np.empty(a.shape, a.dtype))  # shift: stable
            np.exp(e, out=e)
            e /= e.sum(axis=axis, keepdims=True, dtype=_wide_sum(e.dtype))
        self.saved = (e, axis)
        return e

    def backward(self, g: Any) -> tuple[Any, ...]:
        out, axis = self.saved
        wide = _wide_sum(out.dtype)
        gout = (g * out).sum(axis=axis, keepdims=True, dtype=wide)
        if wide is not None:
            gout = gout.astype(out.dtype)
        return (out * (g - gout),)


class LogSoftmax(Function):
    __slots__ = ()
    _FLOAT_INPUT = True  # (bool and integer inputs come as float32: see _int_unary)

    def forward(self, a: Any, axis: int) -> Any:
        if a.size == 0:  # (as in Softmax: the dtype of the usual result, no elements)
            _check_axis("log_softmax", axis, a.ndim)
            out = np.exp(a)
            self.saved = (out, axis)
            return out
        try:
            m = a.max(axis=axis, keepdims=True)
        except np.exceptions.AxisError:
            raise ValueError(_bad_axis("log_softmax", axis, a.ndim)) from None
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # (as in Softmax)
            out = _log_softmax_shifted(a - m, axis)
        self.saved = (out, axis)
        return out

    def backward(self, g: Any) -> tuple[Any, ...]:
        out, axis = self.saved
        # g - exp(out) * sum(g), in one new array: the expression made two (numpy
        # reuses a temporary in place for ``T * s`` but not for ``g - T``)
        t = np.exp(out, out=np.empty(out.shape, np.result_type(g, out)))
        t *= g.sum(axis=axis, keepdims=True, dtype=_wide_sum(t.dtype))
        np.subtract(g, t, out=t)
        return (t,)


#: Elements summed per output from which a float32 or float16 reduction over axes
#: other than the innermost accumulates in float64 (see _accumulator).
WIDE_SUM_FROM = 1024


def _accumulator(a: Any, axes: tuple[int, ...] | None) -> Any:
    """The dtype to sum ``a`` over ``axes`` in: None for its own, float64 for a long
    reduction (``WIDE_SUM_FROM`` elements per output or more) of a narrow float over
    axes that are not the innermost in memory. Numpy sums those one row after another
    (its pairwise summation runs along the innermost axis only): a float32 sum of 1e5
    rows was off by 1e-5, ~100x torch's; the float64 accumulator costs 1.2x-5x the
    time, so short ones keep numpy's. (The cheap tests first: this is on every
    reduction. Innermost in memory, not trailing: a transposed view's trailing axes
    are its outer ones, and summed row after row too; but numpy keeps the axes' order
    for an array that repeats itself along one, stride 0, as a broadcast view does.)"""
    if (
        axes is None
        or a.size < WIDE_SUM_FROM
        or a.dtype.kind != "f"
        or a.dtype.itemsize > 4
        or math.prod([a.shape[i] for i in axes]) < WIDE_SUM_FROM
    ):
        return None
    if a.flags.c_contiguous or any(
        n > 1 and not d for n, d in zip(a.shape, a.strides, strict=True)
    ):
        inner = tuple(range(a.ndim - len(axes), a.ndim))
    else:
        by_stride = sorted(range(a.ndim), key=lambda i: (a.shape[i] > 1, -abs(a.strides[i])))
        inner = tuple(sorted(by_stride[a.ndim - len(axes) :]))
    return None if axes == inner else np.float64


def _sum(a: Any, axes: tuple[int, ...] | None, keepdims: bool = False) -> Any:
    """``a.sum(axis=axes, keepdims=keepdims)`` in ``a``'s dtype, accumulated as
    :func:`_accumulator` says (forward sums, and gradients reduced to an input's
    shape: a bias's gradient over 1e5 rows was off by 1.5e-5 in float32)."""
    if a.size >= WIDE_SUM_FROM and 0 in a.strides:  # (a broadcast view: a mean's gradient)
        copies = [
            i
            for i in (range(a.ndim) if axes is None else axes)
            if a.strides[i] == 0 and a.shape[i] > 1
        ]
        if copies:
            # The sum over axes along which ``a`` repeats itself is one copy times their
            # length: exact, and O(the copy). Numpy added the copies one after another
            # (a float32 mean's gradient reduced over 1e6 rows was off by 1.4%).
            n = math.prod([a.shape[i] for i in copies])
            one = a[tuple(slice(0, 1) if i in copies else slice(None) for i in range(a.ndim))]
            total = _sum(one, axes, keepdims)
            if total.dtype.kind != "f":
                return total * n
            # (the product in float64, rounded once: n itself may not fit a float16)
            return (total * np.float64(n)).astype(total.dtype)
    wide = _accumulator(a, axes)
    if wide is not None:
        return a.sum(axis=axes, keepdims=keepdims, dtype=wide).astype(a.dtype)
    return a.sum(axis=axes, keepdims=keepdims)


class Sum(Function):
    __slots__ = ()

    def forward(self, a: Any, axes: tuple[int, ...] | None, keepdims: bool) -> Any:
        self.saved = (a.shape, axes, keepdims)
        if a.dtype.kind == "u" and a.dtype.itemsize < 8:
            # (torch sums every bool and integer dtype in int64; numpy the unsigned ones
            # in uint64, where a later subtraction wrapped: the sum of a uint8 [1, 2]
            # less 10 was 18446744073709551609, torch's -7. uint64 stays, as torch's)
            return a.sum(axis=axes, keepdims=keepdims, dtype=np.int64)
        return _sum(a, axes, keepdims)

    def backward(self, g: Any) -> tuple[Any, ...]:
        shape, axes, keepdims = self.saved
        return (broadcast_view(_expand(g, axes, keepdims, len(shape)), shape),)


class Mean(Function):
    __slots__ = ()

    def forward(self, a: Any, axes: tuple[int, ...] | None, keepdims: bool) -> Any:
        n = math.prod(a.shape if axes is None else [a.shape[i] for i in axes])
        self.saved = (a.shape, axes, keepdims, n)
        if n == 0:  # numpy would warn; the mean of nothing is nan
            # (in mean's dtype: float64 for ints and bools, as for a non-empty mean)
            dtype = a.dtype if a.dtype.kind in "fc" else np.dtype(np.float64)
            return np.full(np.sum(a, axis=axes, keepdims=keepdims).shape, np.nan, dtype)
        wide = _accumulator(a, axes)
        if wide is not None:
            return a.mean(axis=axes, keepdims=keepdims, dtype=wide).astype(a.dtype)
        return a.mean(axis=axes, keepdims=keepdims)

    def backward(self, g: Any) -> tuple[Any, ...]:
        shape, axes, keepdims, n = self.saved
        g = _expand(g, axes, keepdims, len(shape))
        return (broadcast_view(np.asarray(_shares(g, max(n, 1))), shape),)


class Max(Function):
    __slots__ = ()

    def forward(self, a: Any, axes: tuple[int, ...] | None, keepdims: bool) -> Any:
        try:
            m = a.max(axis=axes, keepdims=True)
        except ValueError:
            raise ValueError(f"max() of an empty tensor of shape {a.shape}") from None
        mask = a == m
        if m.dtype.kind == "f" and np.isnan(m).any():
            # (nan == nan is False: the nan that is the max would get no gradient, and
            # its neighbours nan from the division by a count of 0; as torch.max, the
            # nan gets it)
            mask |= np.isnan(a) & np.isnan(m)
        self.saved = (mask, axes, keepdims)
        if keepdims:
            return m
        return m.reshape(()) if axes is None else np.squeeze(m, axes)

    def backward(self, g: Any) -> tuple[Any, ...]:
        mask, axes, keepdims = self.saved
        g = _expand(g, axes, keepdims, mask.ndim)
        count = mask.sum(axis=axes, keepdims=True)
        return (mask * _shares(g, count),)  # ties share the gradient


class Reshape(Function):
    __slots__ = ()

    def forward(self, a: Any, shape: tuple[int, ...]) -> Any:
        self.saved = a.shape
        for d in shape:  # (numpy's words named neither the call nor the size)
            try:
                operator.index(d)
            except TypeError:
                raise TypeError(
                    f"reshape: sizes must be integers, got {d!r:.40} in {short_repr(tuple(shape), 80)}"
                ) from None
        _check_ndim("reshape", len(shape))
        try:
            # (numpy takes any negative size for the one it infers: -1 only, as torch)
            if any(isinstance(d, (int, np.integer)) and d < -1 for d in shape):
                raise ValueError
            return a.reshape(shape)
        except ValueError:
            raise ValueError(
                f"reshape: cannot reshape a tensor of shape {a.shape} ({a.size} elements) "
                f"into shape {short_repr(tuple(shape), 80)}"
            ) from None

    def backward(self, g: Any) -> tuple[Any, ...]:
        return (np.reshape(g, self.saved),)


class Transpose(Function):
    __slots__ = ()

    def forward(self, a: Any, axes: tuple[int, ...] | None) -> Any:
        if axes is not None:
            # Non-negative: backward inverts the permutation with argsort, which on
            # (-1, 0) would give (0, 1), not the inverse of (2, 0) on 2-d.
            axes = _perm(axes, a.ndim)
        self.saved = axes
        return a.transpose(axes)

    def backward(self, g: Any) -> tuple[Any, ...]:
        axes = self.saved
        return (np.transpose(g) if axes is None else np.transpose(g, np.argsort(axes)),)


class Cast(Function):
    __slots__ = ()

    def forward(self, a: Any, dtype: np.dtype) -> Any:
        self.saved = a.dtype
        return a.astype(dtype)

    def backward(self, g: Any) -> tuple[Any, ...]:
        return (g.astype(self.saved),)


class GetItem(Function):
    __slots__ = ()

    def forward(self, a: Any, index: Any) -> Any:
        self.saved = (a.shape, a.dtype, index)
        return a[index]

    def backward(self, g: Any) -> tuple[Any, ...]:
        shape, dtype, index = self.saved
        # (zero but at the index: the engine adds all of a tensor's in one array)
        return (Scatter(shape, dtype, index, g, _is_basic(index)),)


def _misfit(fn: str, arrays: list[Any], axis: int | None, exc: ValueError) -> str:
    """The message of ``cat`` (``axis``) or ``stack`` (None) on arrays whose shapes do
    not fit: the first one that does not fit the first, and numpy's own words (every
    shape went in: 20,000 rows made a message of 160 KB)."""
    first = arrays[0]

    def fits(x: Any) -> bool:
        if axis is None:
            return bool(x.shape == first.shape)
        if x.ndim != first.ndim:
            return False
        ax = axis % max(x.ndim, 1)
        return all(
            a == b for d, (a, b) in enumerate(zip(x.shape, first.shape, strict=True)) if d != ax
        )

    along = "" if axis is None else f" along axis {axis}"
    bad = next((i for i, x in enumerate(arrays) if not fits(x)), None)
    if bad is None:
        return f"{fn}: the shapes do not fit{along}: {exc}"
    return (
        f"{fn}: tensors[{bad}] of shape {arrays[bad].shape} does not fit tensors[0] of "
        f"shape {first.shape}{along}: {exc}"
    )


class Cat(Function):
    __slots__ = ()

    def forward(self, xs: list[Any], axis: int) -> Any:
        arrays = [np.asarray(x) for x in xs]
        self.saved = ([(x.shape, x.dtype) for x in arrays], axis)
        try:
            return np.concatenate(arrays, axis=axis)
        except ValueError as exc:
            raise ValueError(_misfit("cat", arrays, axis, exc)) from None

    def backward(self, g: Any) -> tuple[Any, ...]:
        metas, axis = self.saved
        offsets = np.cumsum([shape[axis] for shape, _ in metas])[:-1]
        parts = np.split(g, offsets, axis=axis)
        return tuple(
            _fit(p, *m) if n is not None else None
            for p, m, n in zip(parts, metas, self.next, strict=True)
        )


class Stack(Function):
    __slots__ = ()

    def forward(self, xs: list[Any], axis: int) -> Any:
        arrays = [np.asarray(x) for x in xs]
        self.saved = ([x.dtype for x in arrays], axis)
        _check_ndim("stack", arrays[0].ndim + 1)
        try:
            return np.stack(arrays, axis=axis)
        except ValueError as exc:
            raise ValueError(_misfit("stack", arrays, None, exc)) from None

    def backward(self, g: Any) -> tuple[Any, ...]:
        dtypes, axis = self.saved
        ax = axis % g.ndim
        lead = (slice(None),) * ax
        return tuple(
            g[(*lead, i)].astype(dt, copy=False) if n is not None else None
            for i, (dt, n) in enumerate(zip(dtypes, self.next, strict=True))
        )


class Where(Function):
    __slots__ = ()

    def forward(self, xs: list[Any], cond: Any) -> Any:
        a, b = xs
        self.saved = (cond, _meta(a), _meta(b))
        try:
            return np.where(cond, a, b)
        except ValueError:
            # (numpy's "operands could not be broadcast together with shapes (3,) (2,)
            # ()" named neither the call nor which shape was whose)
            raise ValueError(
                f"where: cond of shape {np.shape(cond)}, a of shape {np.shape(a)} and b of "
                f"shape {np.shape(b)} do not broadcast"
            ) from None

    def backward(self, g: Any) -> tuple[Any, ...]:
        (cond, ma, mb), (na, nb) = self.saved, self.next
        zero = np.zeros((), g.dtype)
        return (
            _fit(np.where(cond, g, zero), *ma) if na else None,
            _fit(np.where(cond, zero, g), *mb) if nb else None,
        )


# ---------------------------------------------------------------------------------------
# functions and factories
# ---------------------------------------------------------------------------------------


def matmul(a: Any, b: Any) -> Tensor:
    """Matrix product with numpy's ``@`` rules (1-d operands, broadcast batch dims).

    Example::

        >>> ag.matmul(ag.ones(2, 3), ag.ones(3)).shape
        (2,)
    """
    return _binary(MatMul, a, b)


def cat(tensors: Sequence[Any], axis: int = 0) -> Tensor:
    """Concatenate along an existing axis.

    Example::

        >>> ag.cat([ag.ones(2, 3), ag.zeros(1, 3)]).shape
        (3, 3)
    """
    _check_sequence(tensors, "cat")
    ndim = np.ndim(_data(tensors[0]))
    if ndim:  # (0-d tensors: numpy's error, "zero-dimensional arrays cannot be ...")
        axis = _int_axis("cat", axis, ndim)
    return _nary(Cat, list(tensors), axis)


def stack(tensors: Sequence[Any], axis: int = 0) -> Tensor:
    """Stack equally shaped tensors along a new axis.

    Example::

        >>> ag.stack([ag.ones(3), ag.zeros(3)], axis=1).shape
        (3, 2)
    """
    _check_sequence(tensors, "stack")
    # (the result has one dimension more than the tensors: axis may name it)
    axis = _int_axis("stack", axis, np.ndim(_data(tensors[0])) + 1, "the result")
    return _nary(Stack, list(tensors), axis)


def split(t: Tensor, split_size_or_sizes: int | Sequence[int], axis: int = 0) -> list[Tensor]:
    """Split into chunks along ``axis``: an int is each chunk's size (the last may be
    smaller), a list gives every chunk's size (as ``torch.split``). ``t`` may also be a
    numpy array or a list, as for the other ops.

    Example::

        >>> [c.shape for c in ag.split(ag.ones(5, 2), 2)]
        [(2, 2), (2, 2), (1, 2)]
    """
    t = _as_tensor(t, "split: t")
    if t.ndim == 0:
        raise ValueError("split: a 0-d tensor has no axis to split along")
    ax = _int_axis("split", axis, t.ndim)
    n = t.shape[ax]
    sizes_arg = split_size_or_sizes
    if isinstance(sizes_arg, (int, np.integer)) and not isinstance(sizes_arg, bool):
        size = int(sizes_arg)
        if size <= 0:
            raise ValueError(f"split: split_size_or_sizes must be positive, got {size}")
        sizes = [min(size, n - start) for start in range(0, n, size)] or [0]
    else:
        if not isinstance(sizes_arg, (list, tuple, np.ndarray)) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes_arg
        ):
            raise TypeError(
                "split: split_size_or_sizes must be an int (the size of each chunk) or a "
                f"list of ints (the size of every chunk), got {sizes_arg!r:.80}"
            )
        sizes = [int(s) for s in sizes_arg]
        # (every size went in: [1] * 20,000 made a message of 60 KB)
        shown = repr(sizes)
        if len(sizes) > 20:
            shown = f"({len(sizes)} sizes: {repr(sizes[:10])[:-1]}, ...])"
        negative = next((s for s in sizes if s < 0), None)
        if negative is not None:
            raise ValueError(f"split: split_size_or_sizes {shown} has a negative size ({negative})")
        if sum(sizes) != n:
            raise ValueError(
                f"split: split_size_or_sizes {shown} do not add up to {n} (axis {ax} of "
                f"shape {t.shape}): their sum is {sum(sizes)}"
            )
    lead = (slice(None),) * ax
    out = []
    start = 0
    for s in sizes:
        out.append(_unary(GetItem, t, (*lead, slice(start, start + s))))
        start += s
    return out


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """Elementwise ``a if cond else b`` with broadcasting; ``cond`` is boolean.

    Example::

        >>> x = ag.tensor([-1.0, 2.0])
        >>> ag.where(x > 0, x, 0.0).numpy()
        array([0., 2.], dtype=float32)
    """
    c = _data(cond)
    c = np.asarray(c)
    if c.dtype != np.bool_:
        raise TypeError(f"where: cond must be boolean, got dtype {c.dtype}")
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, Tensor):
            _numeric(x, f"where: {name}")
    return _nary(Where, [a, b], c)


def tensor(data: Any, *, dtype: npt.DTypeLike | None = None, requires_grad: bool = False) -> Tensor:
    """Make a leaf tensor (always a copy). Python floats become float32; numpy arrays
    keep their dtype (in a list too, as torch: ``[row1, row2]`` of float64 rows gives
    float64); ``requires_grad=True`` needs a floating point dtype. Data that is not
    bool or numeric (strings, objects) raises ``TypeError``.

    Example::

        >>> ag.tensor([1.0, 2.0], requires_grad=True).dtype
        dtype('float32')
    """
    if requires_grad is not False:
        requires_grad = check_bool(requires_grad, "tensor(): requires_grad")
    if isinstance(data, Tensor):
        arr = np.array(data._data, dtype=dtype)
    elif isinstance(data, (np.ndarray, np.generic)):
        arr = np.array(data, dtype=dtype)
    else:
        arr = np.array(data, dtype=dtype)
        if dtype is None and arr.dtype == np.float64 and not _holds_float64(data):
            arr = arr.astype(np.float32)  # Python floats -> float32 (as torch)
    _check_values(arr, requires_grad, "tensor data")
    return Tensor(arr, requires_grad=requires_grad)


#: Element types of nested data that carry no dtype of their own (Python numbers).
_PLAIN_NUMBERS = frozenset((float, int, bool))


def _holds_float64(data: Any) -> bool:
    """Whether ``data`` (nested lists and tuples, as ``tensor`` takes them) holds
    float64 data of its own: a numpy float64 array or scalar, a float64 Tensor, any
    array-like whose ``dtype`` is float64. torch.tensor keeps float64 then and gives
    only Python floats its float32 default; numpy makes float64 of both, and casting
    every float64 result to float32 cut the precision of ``ag.tensor([row1, row2])``
    of float64 rows (``ag.tensor(np.stack(...))`` kept it)."""
    stack = [data]
    while stack:
        v = stack.pop()
        if type(v) in _PLAIN_NUMBERS:
            continue
        if isinstance(v, (list, tuple)):
            # (a list of Python numbers, the usual case, is looked at in C: one set of
            # its element types)
            if not set(map(type, v)) <= _PLAIN_NUMBERS:
                stack.extend(v)
            continue
        dt = getattr(v, "dtype", None)
        if isinstance(dt, np.dtype) and dt == np.float64:
            return True
    return False


def _factory_dtype(dtype: Any) -> np.dtype:
    """The factories' dtype: None means the default, float32 (as torch's dtype=None
    means its default dtype), not numpy's float64."""
    return np.dtype(np.float32) if dtype is None else np.dtype(dtype)


def _shape(shape: tuple[Any, ...], fn: str) -> tuple[int, ...]:
    """A factory's sizes (``zeros(2, 3)`` or ``zeros((2, 3))``), checked: numpy's own
    errors ("negative dimensions are not allowed") named neither the call nor the size."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    dims = []
    for size in shape:
        try:
            n = operator.index(size)
        except TypeError:
            raise TypeError(
                f"{fn}: sizes must be integers, got {size!r:.40} in {shape!r:.80}"
            ) from None
        if n < 0:
            raise ValueError(f"{fn}: sizes must not be negative, got {n} in {shape!r:.80}")
        dims.append(n)
    return tuple(dims)


def seeded_rng(seed: Any, fn: str) -> np.random.Generator:
    """numpy's generator for ``seed`` (an int >= 0, or None: fresh entropy), checked:
    numpy's own errors ("expected non-negative integer", "SeedSequence expects int")
    named neither the call nor the argument."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"{fn}: seed must be an int or None, not {seed!r:.40}")
        if seed < 0:
            raise ValueError(f"{fn}: seed must be >= 0, not {seed}")
    return np.random.default_rng(seed)


def zeros(
    *shape: Sizes, dtype: npt.DTypeLike | None = "float32", requires_grad: bool = False
) -> Tensor:
    """A tensor of zeros: ``ag.zeros(2, 3)`` or ``ag.zeros((2, 3))``. ``dtype=None``
    is the default, float32.

    >>> ag.zeros(2, 3).shape, ag.zeros((2,), dtype="int64")
    ((2, 3), tensor([0, 0], dtype=int64))
    """
    arr = np.zeros(_shape(shape, "zeros"), dtype=_factory_dtype(dtype))
    return tensor(arr, requires_grad=requires_grad)


def ones(
    *shape: Sizes, dtype: npt.DTypeLike | None = "float32", requires_grad: bool = False
) -> Tensor:
    """A tensor of ones: ``ag.ones(2, 3)`` or ``ag.ones((2, 3))``. ``dtype=None`` is
    the default, float32.

    >>> ag.ones(2, requires_grad=True)
    tensor([1., 1.], requires_grad=True)
    """
    arr = np.ones(_shape(shape, "ones"), dtype=_factory_dtype(dtype))
    return tensor(arr, requires_grad=requires_grad)


def randn(
    *shape: Sizes,
    dtype: npt.DTypeLike | None = "float32",
    requires_grad: bool = False,
    seed: int | None = None,
) -> Tensor:
    """Standard normal samples; ``seed`` makes them reproducible. ``dtype`` must be a
    floating point dtype (TypeError otherwise); None is the default, float32.

    Example::

        >>> ag.randn(2, 3, seed=0).shape
        (2, 3)
    """
    dt = _factory_dtype(dtype)
    if dt.kind != "f":
        # (normal samples cast to integers or bools would be silently truncated)
        raise TypeError(f"randn: dtype must be a floating point dtype, got {dt}")
    rng = seeded_rng(seed, "randn")
    if dt in (np.float32, np.float64):
        arr = rng.standard_normal(_shape(shape, "randn"), dtype=dt)
    else:
        arr = rng.standard_normal(_shape(shape, "randn")).astype(dt)
    return Tensor(arr, requires_grad=requires_grad)
