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
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt  # (at run time too: see actorgrad.tensor)

from actorgrad.errors import check_bool, short_repr
from actorgrad.nn import functional
from actorgrad.tensor import Tensor, clear_grads, real_array, seeded_rng, shaped_as

__all__ = ["Dropout", "Embedding", "Linear", "Module", "ReLU", "Sequential", "Tanh", "functional"]


class Module:
    """Base class: subclasses set tensors and submodules as attributes and define
    ``forward``; calling the module calls ``forward``.

    Example::

        >>> class Affine(ag.nn.Module):
        ...     def __init__(self):
        ...         self.w = ag.ones(3, requires_grad=True)
        ...     def forward(self, x):
        ...         return x * self.w
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's computation: subclasses define it (here it raises
        NotImplementedError). Call the module rather than ``forward``.

        >>> ag.nn.Tanh().forward(ag.zeros(2)).numpy()
        array([0., 0.], dtype=float32)
        """
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``module(x)`` is ``module.forward(x)``.

        >>> ag.nn.ReLU()(ag.tensor([-1.0, 1.0])).numpy()
        array([0., 1.], dtype=float32)
        """
        return self.forward(*args, **kwargs)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """``(name, submodule)`` for each direct submodule: module attributes, and the
        modules in list/tuple attributes as ``"<attribute>.<index>"``.

        >>> m = ag.nn.Module(); m.body = ag.nn.Linear(2, 2)
        >>> m.heads = [ag.nn.ReLU(), ag.nn.Tanh()]
        >>> [name for name, _ in m.named_children()]
        ['body', 'heads.0', 'heads.1']
        """
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """``(dotted name, tensor)`` for every tensor attribute, submodules included;
        a tensor shared by several modules is listed once. A ``prefix`` starts every
        name, joined by a dot (as in PyTorch).

        >>> model = ag.nn.Sequential(ag.nn.Linear(2, 3), ag.nn.ReLU())
        >>> [name for name, _ in model.named_parameters()]
        ['0.weight', '0.bias']
        >>> [name for name, _ in ag.nn.Linear(2, 3).named_parameters(prefix="fc")]
        ['fc.weight', 'fc.bias']
        """
        if not isinstance(prefix, str):
            raise TypeError(f"named_parameters: prefix must be a str, got {type(prefix).__name__}")
        seen: set[int] = set()
        for pre, mod in self._walk(prefix + "." if prefix else ""):
            for name, value in vars(mod).items():
                if isinstance(value, Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    yield pre + name, value

    def _walk(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """``(dotted prefix of its names, module)`` for this module and every module
        under it, each once, depth first: a module's children, then theirs, before its
        next sibling (as a recursive walk, and torch, order them)."""
        walked: set[int] = set()  # (a module that refers to its parent looped for good)
        stack: list[tuple[str, Module]] = [(prefix, self)]
        while stack:
            pre, mod = stack.pop()
            if id(mod) in walked:
                continue
            walked.add(id(mod))
            yield pre, mod
            children = [(f"{pre}{name}.", child) for name, child in mod.named_children()]
            # (reversed onto the end: the first child is walked next, as before. Taken
            # from the front, each pop moved every module waiting: a Sequential of
            # 32,000 Sequentials took 0.36 s, 3.7x torch's parameters(); now 2.1x)
            stack.extend(reversed(children))

    def modules(self) -> list[Module]:
        """This module and every module under it, each once, in the order their
        parameters are named.

        >>> [type(m).__name__ for m in ag.nn.Sequential(ag.nn.Linear(2, 2), ag.nn.ReLU()).modules()]
        ['Sequential', 'Linear', 'ReLU']
        """
        return [mod for _, mod in self._walk()]

    #: Whether the module is in training mode (``train()``, the default) or in
    #: evaluation mode (``eval()``): ``Dropout`` drops only in training, as torch's.
    training: bool = True

    def train(self, mode: bool = True) -> Module:
        """Set training mode (``mode=False``: evaluation) on this module and every
        module under it; returns this module, as torch's.

        >>> net = ag.nn.Sequential(ag.nn.Linear(2, 2), ag.nn.Dropout(0.5)).eval()
        >>> net.training, net[1].training
        (False, False)
        >>> net.train()[1].training
        True
        """
        mode = check_bool(mode, "train: mode")
        for mod in self.modules():
            mod.training = mode
        return self

    def eval(self) -> Module:
        """``train(False)``: evaluation mode (``Dropout`` passes its input through).

        >>> ag.nn.Dropout().eval().training
        False
        """
        return self.train(False)

    def parameters(self) -> list[Tensor]:
        """Every parameter tensor, in registration order.

        >>> [p.shape for p in ag.nn.Linear(2, 3).parameters()]
        [(3, 2), (3,)]
        """
        return [t for _, t in self.named_parameters()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every parameter's ``.grad`` (set to None), or with
        ``set_to_none=False`` make each one there zeros (as torch's).

        >>> m = ag.nn.Linear(2, 1); m(ag.ones(1, 2)).sum().backward(); m.zero_grad()
        >>> m.weight.grad is None
        True
        """
        clear_grads(self.parameters(), set_to_none)

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{name: numpy array copy}`` (msgpack-safe through the wire codec).

        >>> {name: a.shape for name, a in ag.nn.Linear(2, 3).state_dict().items()}
        {'weight': (3, 2), 'bias': (3,)}
        """
        return {name: t.data.copy() for name, t in self.named_parameters()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set every parameter to the array of its name in ``state``, cast to the
        parameter's dtype. All are checked before any changes. Each parameter gets a
        new array (its ``.data`` is replaced, the Tensor stays, as with an optimizer's
        step: graphs recorded before keep their values).

        Raises ``KeyError`` naming missing or unexpected keys, ``ValueError`` naming a
        shape mismatch, ``TypeError`` naming a key that is not a str or a value
        that is not an array of numbers.

        >>> a, b = ag.nn.Linear(2, 3, seed=0), ag.nn.Linear(2, 3, seed=1)
        >>> b.load_state_dict(a.state_dict()); np.array_equal(a.weight.data, b.weight.data)
        True
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                "load_state_dict: expected a mapping of parameter names to arrays (what "
                f"state_dict() returns), got {type(state).__name__}"
            )
        for key in state:
            if not isinstance(key, str):
                # (sorted() below failed on them with words of its own: a Tensor key, as
                # in get_gradients' {Tensor: array}, with numpy's "operands could not be
                # broadcast together")
                raise TypeError(
                    "load_state_dict: keys are parameter names (str), as state_dict() "
                    f"gives; got a key of type {type(key).__name__} ({short_repr(key)})"
                )
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(
                f"load_state_dict: missing {_keys(missing)}, unexpected {_keys(unexpected)}"
            )
        arrays = {}
        for name, p in params.items():
            arr = real_array(state[name], f"load_state_dict: {name}")
            fitted = shaped_as(arr, p.data.shape)
            if fitted is None:
                raise ValueError(
                    f"load_state_dict: {name} has shape {arr.shape}, the parameter {p.data.shape}"
                )
            arrays[name] = fitted
        for name, p in params.items():
            p.data = np.array(arrays[name], dtype=p.data.dtype)  # (a copy the module owns)

    def __repr__(self) -> str:
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        inner = "\n".join(
            f"  ({name}): {child!r}".replace("\n", "\n  ") for name, child in children
        )
        return f"{type(self).__name__}(\n{inner}\n)"

    def extra_repr(self) -> str:
        """What a module without submodules shows between the parentheses of its
        repr; subclasses override it (here: nothing).

        >>> ag.nn.ReLU(), ag.nn.Linear(2, 3)
        (ReLU(), Linear(in_f=2, out_f=3, bias=True))
        """
        return ""


def _keys(names: list[str]) -> str:
    """``keys [...]`` for a message: the first 10 names and a count of the others (every
    name went in: a wrong state dict of a large model made a message of 80 KB)."""
    if len(names) <= 10:
        return f"keys {names}"
    shown = ", ".join(short_repr(n, 80) for n in names[:10])
    return f"{len(names)} keys [{shown}, ... ({len(names) - 10} more)]"


def _size(owner: str, name: str, value: Any) -> int:
    """A layer's size argument: a non-negative int (TypeError, ValueError otherwise)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r:.40}")
    if value < 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value}")
    return int(value)


def _float_dtype(owner: str, dtype: Any) -> np.dtype:
    """A layer's parameter dtype: floating point (they require grad); None: float32."""
    dt = np.dtype(np.float32) if dtype is None else np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"{owner}: dtype must be a floating point dtype, got {dt}")
    return dt


class Linear(Module):
    """``y = x @ weight.T + bias`` with ``weight`` of shape (out_f, in_f), initialized
    uniformly in +-1/sqrt(in_f) like torch.

    Example::

        >>> ag.nn.Linear(3, 2, seed=0)(ag.ones(5, 3)).shape
        (5, 2)
    """

    def __init__(
        self,
        in_f: int,
        out_f: int,
        bias: bool = True,
        seed: int | None = None,
        dtype: npt.DTypeLike | None = "float32",
    ) -> None:
        in_f, out_f = _size("Linear", "in_f", in_f), _size("Linear", "out_f", out_f)
        dtype = _float_dtype("Linear", dtype)
        bias = check_bool(bias, "Linear: bias")  # ("no" made a bias)
        rng = seeded_rng(seed, "Linear")
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
        """``x @ weight.T + bias`` over the last dimension of ``x`` (size ``in_f``).

        >>> ag.nn.Linear(3, 2, bias=False, seed=0)(ag.zeros(1, 3)).numpy()
        array([[0., 0.]], dtype=float32)
        """
        return functional.linear(x, self.weight, self.bias)

    if TYPE_CHECKING:  # (``module(x)`` is ``forward(x)``: its types, not Module.__call__'s Any)
        __call__ = forward

    def extra_repr(self) -> str:
        """``in_f``, ``out_f`` and whether there is a bias, as the repr shows them.

        >>> ag.nn.Linear(3, 2, bias=False).extra_repr()
        'in_f=3, out_f=2, bias=False'
        """
        return f"in_f={self.in_f}, out_f={self.out_f}, bias={self.bias is not None}"


class Embedding(Module):
    """A table of ``num`` vectors of size ``dim`` (standard normal init, like torch).

    Example::

        >>> ag.nn.Embedding(10, 4, seed=0)([1, 1, 3]).shape
        (3, 4)
    """

    def __init__(
        self, num: int, dim: int, seed: int | None = None, dtype: npt.DTypeLike | None = "float32"
    ) -> None:
        num, dim = _size("Embedding", "num", num), _size("Embedding", "dim", dim)
        dtype = _float_dtype("Embedding", dtype)
        rng = seeded_rng(seed, "Embedding")
        self.num, self.dim = num, dim
        self.weight = Tensor(rng.standard_normal((num, dim)).astype(dtype), requires_grad=True)

    def forward(self, ids: Any) -> Tensor:
        """The rows of ``weight`` for integer ``ids`` of any shape (the result's shape:
        the ids' shape, then ``dim``).

        >>> e = ag.nn.Embedding(5, 2, seed=0)
        >>> np.array_equal(e([[4, 0]]).numpy()[0], e.weight.data[[4, 0]])
        True
        """
        return functional.embedding(ids, self.weight)

    if TYPE_CHECKING:  # (``module(x)`` is ``forward(x)``: its types, not Module.__call__'s Any)
        __call__ = forward

    def extra_repr(self) -> str:
        """``num`` and ``dim``, as the repr shows them.

        >>> ag.nn.Embedding(10, 4)
        Embedding(num=10, dim=4)
        """
        return f"num={self.num}, dim={self.dim}"


class Sequential(Module):
    """Apply modules in order; parameters are named ``"<index>.<name>"``.

    Example::

        >>> ag.nn.Sequential(ag.nn.Linear(2, 3), ag.nn.Tanh())(ag.ones(1, 2)).shape
        (1, 3)
    """

    def __init__(self, *mods: Module) -> None:
        for i, m in enumerate(mods):
            if not isinstance(m, Module):
                # (it would fail only when called, or be skipped by parameters())
                what = (
                    "a Module class, not an instance" if isinstance(m, type) else type(m).__name__
                )
                raise TypeError(f"Sequential: argument {i} must be a Module, got {what}")
        self.layers = list(mods)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """``(index as a string, module)`` for each module, in order, then any other
        submodule attribute (of a subclass) as a Module's.

        >>> seq = ag.nn.Sequential(ag.nn.ReLU(), ag.nn.Tanh())
        >>> [name for name, _ in seq.named_children()]
        ['0', '1']
        """
        for i, m in enumerate(self.layers):
            yield str(i), m
        # (a subclass's own submodules too: they were skipped, never trained or saved)
        for name, m in super().named_children():
            if name.partition(".")[0] != "layers":
                yield name, m

    def forward(self, x: Any) -> Any:
        """Feed ``x`` through each module in turn.

        >>> seq = ag.nn.Sequential(ag.nn.ReLU(), ag.nn.Tanh())
        >>> seq(ag.tensor([-1.0, 100.0])).numpy()
        array([0., 1.], dtype=float32)
        """
        for m in self.layers:
            x = m(x)
        return x

    @overload
    def __getitem__(self, i: int) -> Module: ...
    @overload
    def __getitem__(self, i: slice) -> Sequential: ...
    def __getitem__(self, i: int | slice) -> Module:
        """The module at index ``i``; a slice is a Sequential of those (as torch's),
        sharing their parameters.

        >>> ag.nn.Sequential(ag.nn.Linear(2, 3), ag.nn.ReLU(), ag.nn.Linear(3, 1))[:2]
        Sequential(
          (0): Linear(in_f=2, out_f=3, bias=True)
          (1): ReLU()
        )
        """
        if isinstance(i, slice):  # (a list, which has no forward, parameters or state)
            return Sequential(*self.layers[i])
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


class ReLU(Module):
    """Elementwise ``max(x, 0)``.

    Example::

        >>> ag.nn.ReLU()(ag.tensor([-1.0, 2.0])).numpy()
        array([0., 2.], dtype=float32)
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x.relu()``.

        >>> ag.nn.ReLU().forward(ag.tensor([-3.0, 3.0])).numpy()
        array([0., 3.], dtype=float32)
        """
        return x.relu()

    if TYPE_CHECKING:  # (``module(x)`` is ``forward(x)``: its types, not Module.__call__'s Any)
        __call__ = forward


class Tanh(Module):
    """Elementwise ``tanh(x)``.

    Example::

        >>> ag.nn.Tanh()(ag.tensor([0.0, -100.0])).numpy()
        array([ 0., -1.], dtype=float32)
    """

    def forward(self, x: Tensor) -> Tensor:
        """``x.tanh()``.

        >>> ag.nn.Tanh().forward(ag.tensor([0.0, 100.0])).numpy()
        array([0., 1.], dtype=float32)
        """
        return x.tanh()

    if TYPE_CHECKING:  # (``module(x)`` is ``forward(x)``: its types, not Module.__call__'s Any)
        __call__ = forward


class Dropout(Module):
    """In training mode, zero each element with probability ``p`` and scale the rest by
    ``1 / (1 - p)``, as ``torch.nn.Dropout``; in evaluation mode (``eval()``), pass the
    input through. ``seed``: of the generator that draws which elements go (None: fresh
    entropy), so that a run can be repeated.

    Example::

        >>> drop = ag.nn.Dropout(0.5, seed=0)
        >>> sorted(set(drop(ag.ones(1000)).numpy().tolist()))
        [0.0, 2.0]
        >>> drop.eval()(ag.ones(3)).numpy()
        array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        self.p = functional._probability(p, "Dropout")
        self.rng = seeded_rng(seed, "Dropout")

    def forward(self, x: Tensor) -> Tensor:
        """``functional.dropout(x, p, training, rng)``.

        >>> ag.nn.Dropout(0.0)(ag.tensor([1.0, 2.0])).numpy()
        array([1., 2.], dtype=float32)
        """
        return functional.dropout(x, self.p, self.training, self.rng)

    if TYPE_CHECKING:  # (``module(x)`` is ``forward(x)``: its types, not Module.__call__'s Any)
        __call__ = forward

    def extra_repr(self) -> str:
        """``p``, as the repr shows it.

        >>> ag.nn.Dropout(0.25)
        Dropout(p=0.25)
        """
        return f"p={self.p}"
