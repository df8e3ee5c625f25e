"""Optimizers: SGD, Adam and AdamW on numpy arrays (no asyncio here).

The update formulas are torch's (``torch.optim.SGD`` with its momentum, dampening,
nesterov, weight_decay and maximize; ``torch.optim.Adam`` with weight_decay (added to
the gradient), amsgrad and maximize; ``torch.optim.AdamW``, decoupled weight decay),
not its implementation options (foreach, fused, capturable, differentiable).
``step(grads)`` takes an explicit ``{Tensor: ndarray}`` mapping (what
``ag.dist.get_gradients`` returns); without it, each parameter's ``.grad`` is used.
Parameters without a gradient are skipped, and so are tensors in the mapping that are
not parameters of the optimizer (``get_gradients`` returns every leaf of the worker:
inputs, other optimizers' parameters).

Parameters must have a floating point dtype (TypeError). Tensors that do not require
grad are accepted, as torch accepts them (frozen parameters: they get no ``.grad`` and
are skipped, unless ``step`` is given a gradient for them).

A step gives each parameter it updates a new array (see ``Optimizer.step``: graphs
recorded before it keep the values they were computed with); a subclass's
``_update(p, g, data)`` writes the update into ``data``, a copy of ``p.data`` that
becomes ``p.data`` once written.

``state_dict()``/``load_state_dict()`` save and restore the optimizer's state (momentum
buffers, Adam's step counts and moments, the hyperparameters) as ``torch.optim``'s do,
in the same layout: a run checkpointed with the model's ``state_dict()`` and resumed
with new ones goes on as if never stopped.

Example::

    >>> import actorgrad as ag
    >>> w = ag.tensor([1.0, -1.0], requires_grad=True)
    >>> opt = ag.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> (w * w).sum().backward(); opt.step(); opt.zero_grad()
    >>> w.data
    array([ 0.8, -0.8], dtype=float32)
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

import numpy as np

from actorgrad.autograd import is_unused
from actorgrad.errors import check_bool, short_repr
from actorgrad.tensor import Tensor, clear_grads, real_array, shaped_as

__all__ = ["SGD", "Adam", "AdamW", "Optimizer"]


#: Updates of parameters bigger than this many elements run in blocks of about this
#: size (slices of the first axis, or of the flat array when a row is bigger: see
#: _blocks): each expression's temporaries (``lr * g``, ``g * g``)
#: are then a block's size, not the parameter's. Whole, SGD's step of a 64 MiB parameter
#: took 128 MiB more memory than the parameter (its copy and ``lr * g``), Adam's 256 MiB;
#: PyTorch's, updating in place, none.
UPDATE_BLOCK = 1 << 18


def _blocks(data: Any, g: Any, *state: Any) -> Iterator[tuple[Any, ...]]:
    """``data``, the gradient ``g`` and the ``state`` arrays (None stays None) of one
    shape, more than ``UPDATE_BLOCK`` elements, cut into blocks of about
    ``UPDATE_BLOCK`` elements: tuples of views (of ``g``, read only, maybe a block's
    copy). Along the first axis, or along the flat arrays when a row is bigger than a
    block (a (1, N) weight: a row was a block, whole-array temporaries again) and
    ``data`` and ``state``, written in place, are C-contiguous (only then are their
    flat forms views, of the elements in one order). (Callers take small arrays
    whole, without calling this: steps of small parameters cost as before.)"""
    arrays = (data, g, *state)
    if data.size // data.shape[0] > UPDATE_BLOCK and all(
        a is None or a.flags.c_contiguous for a in (data, *state)
    ):
        # (g of another layout: its flat iterator, whose slices are each a block's
        # copy, made one at a time; its reshape was a copy of the whole)
        flat = [None if a is None else a.reshape(-1) for a in (data, *state)]
        flat.insert(1, g.reshape(-1) if g.flags.c_contiguous else g.flat)
        return (
            tuple(None if a is None else a[i : i + UPDATE_BLOCK] for a in flat)
            for i in range(0, data.size, UPDATE_BLOCK)
        )
    rows = max(1, UPDATE_BLOCK // (data.size // data.shape[0]))
    return (
        tuple(None if a is None else a[i : i + rows] for a in arrays)
        for i in range(0, data.shape[0], rows)
    )


def _number(owner: str, name: str, value: Any) -> None:
    """TypeError unless ``value`` is a real number (not a bool, not a string)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{owner}: {name} must be a number, got {type(value).__name__} {value!r:.40}"
        )


def _plain(value: Any) -> Any:
    """A hyperparameter as a state dict holds it: numpy scalars (an ``lr`` given as
    ``np.float32(0.1)``, or set so by a schedule) as Python numbers, in tuples and lists
    too, so that the file recipes of docs/limits.md take it (``json.dumps`` and their
    msgpack hooks refused a numpy scalar); anything else a deep copy."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (tuple, list):
        return type(value)(_plain(v) for v in value)
    return copy.deepcopy(value)


def _state_key(key: Any) -> int | None:
    """A key of a state dict's ``"state"`` as the int it stands for: an int, or its
    decimal digits as a str (JSON turns int keys into strings); else None."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.isdecimal():
        return int(key)
    return None


def _count(value: Any, what: str) -> int:
    """``value`` (an int, or a whole float or 0-d array: torch keeps Adam's ``step`` as
    a float tensor) as an int >= 0; else TypeError/ValueError naming ``what``."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"load_state_dict: {what} must be an int, got {type(value).__name__} {value!r:.40}"
        )
    if isinstance(value, numbers.Integral):
        count = int(value)
    else:  # (a whole float: torch's step, 3.0)
        count = int(float(value)) if float(value).is_integer() else -1
    if count < 0:
        raise ValueError(f"load_state_dict: {what} must be a whole number >= 0, got {value}")
    return count


def _constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The parameters ``cls``'s constructor takes by name (``params`` aside), and those
    of its base classes' that it passes on through ``*args``/``**kwargs``: a subclass
    written ``__init__(self, params, **options)`` takes its base class's options. (Its
    own signature named none: its state dict kept no ``lr``, and loading one, its own
    too, failed with "missing 1 required positional argument: 'lr'".) A subclass's
    parameter comes before, and hides, a base class's of the same name."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    passed_on = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        if klass is object:
            break
        # (through the class, as the constructor is called: a descriptor, a
        # functools.partialmethod, is no callable itself; its signature raised TypeError.
        # getattr: mypy refuses klass.__init__, "unsound" on an instance)
        ctor = getattr(klass, "__init__")  # noqa: B009
        prms = inspect.signature(ctor).parameters.values()
        for prm in prms:
            if prm.kind in kinds and prm.name not in ("self", "params"):
                out.setdefault(prm.name, prm)
        if not any(prm.kind in passed_on for prm in prms):
            break
    return out


def _given_twice(exc: BaseException) -> str | None:
    """The keyword argument a call got twice, if that is what ``exc`` says (Python's
    TypeError "f() got multiple values for keyword argument 'x'")."""
    if type(exc) is TypeError:
        m = re.search(r"got multiple values for (?:keyword )?argument '(\w+)'", str(exc))
        if m is not None:
            return m.group(1)
    return None


def _made_leaving_out_twice(
    cls: type[Optimizer], params: list[Tensor], options: dict[str, Any], passed_on: Any
) -> tuple[Optimizer, dict[str, Any]]:
    """``cls(params, **options)``, to check the options with the constructor's own
    checks; an option of ``passed_on`` that the constructor then gets twice, a base
    class's hyperparameter the class sets itself (``super().__init__(params, lr=0.1,
    **options)``), is left out of the call (it cannot be given it to check) and
    returned with the others left out. Other errors propagate."""
    given = dict(options)
    left_out: dict[str, Any] = {}
    while True:
        try:
            return cls(params, **given), left_out
        except TypeError as exc:
            twice = _given_twice(exc)
            if twice is None or twice not in passed_on or twice not in given:
                raise
            left_out[twice] = given.pop(twice)


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

    #: The per-parameter state (``self.state[p]``) that ``load_state_dict`` checks: each
    #: key and what it holds, ``"param"`` (an array of the parameter's shape, cast to
    #: its dtype) or ``"count"`` (an int >= 0). A state dict must give each of them, and
    #: no other, for every parameter it has state for (those ``_state_keys`` gives: a
    #: key kept only under some hyperparameters, Adam's ``max_exp_avg_sq``, only then).
    #: None (the base class): any keys, arrays and numbers loaded as they were saved (a
    #: subclass whose ``_update`` keeps other state than its base class's sets its own).
    STATE_KEYS: ClassVar[dict[str, str] | None] = None

    #: Hyperparameters the class gained after state dicts of it were saved: a state dict
    #: without them (saved before) loads with the constructor's defaults for them. The
    #: others must all be there: an older class's state dict (Adam's, before it had a
    #: weight_decay) would otherwise load into a newer class (AdamW) as its own.
    ADDED_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ()

    #: Keys of ``STATE_KEYS`` a step starts when a parameter's state lacks them (Adam's
    #: ``max_exp_avg_sq``, at zeros, once amsgrad is on): a state dict's entry may lack
    #: them (taken before the setting was switched).
    LAZY_STATE_KEYS: ClassVar[tuple[str, ...]] = ()

    #: Entries of the state dict's group fixed by the class, not by its constructor
    #: (torch's ``decoupled_weight_decay``: False in Adam's, True in AdamW's, which
    #: have the same hyperparameters otherwise). ``state_dict`` writes them; a state
    #: dict giving another value is another class's and is refused (one without them
    #: is taken as this class's).
    FIXED_HYPERPARAMETERS: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: Iterable[Tensor], lr: float) -> None:
        if inspect.iscoroutinefunction(type(self)._update):
            # (called as a plain method by step, its coroutine was dropped unrun: every
            # step changed nothing. An async step its user awaits works: refused by a
            # DistributedOptimizer only, whose owners call it plainly)
            raise TypeError(
                f"{type(self).__name__}._update is a coroutine function (async def): an "
                "optimizer's step and _update are plain methods, called without an await"
            )
        if isinstance(params, Tensor):
            # (iterating it would give 0-d views of its rows: steps that never reach it)
            raise TypeError(
                "optimizer params must be an iterable of Tensors, got Tensor; pass [tensor]"
            )
        if callable(getattr(params, "parameters", None)):
            # (a model itself, for its parameters: "'Linear' object is not iterable"; a
            # Sequential, which iterates its layers, "parameters must be Tensors, got
            # Linear")
            raise TypeError(
                f"optimizer params must be an iterable of Tensors, got "
                f"{type(params).__name__}; pass model.parameters()"
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
            # A distributed pass gives a leaf it reached without a gradient marked zeros
            # (get_gradients reports them): skipped, as a parameter whose .grad is None
            # (weight decay, momentum and Adam's moments moved it, where
            # DistributedOptimizer and a local step leave it)
            given = [(i, p, g) for i, p, g in given if not is_unused(g)]
        out = []
        for i, p, g in given:
            arr = real_array(g, f"step: the gradient of parameter {i}")
            if arr.shape != p.data.shape:
                raise ValueError(
                    f"step: gradient of shape {arr.shape} for parameter {i}, of shape "
                    f"{p.data.shape}"
                )
            dt = arr.dtype
            if dt != p.data.dtype and np.promote_types(dt, p.data.dtype) != dt:
                # (integers, bools and narrower floats as the parameter's floats: the
                # update's arithmetic in their dtype wrapped or overflowed, Adam's g * g
                # of a uint8 20 was 144, of a float16 300 inf, maximize's -g of a uint8
                # 1 was 255, and -g of bools raised, with the parameters before stepped)
                arr = arr.astype(p.data.dtype)
            out.append((p, arr))
        return out

    def step(self, grads: Mapping[Tensor, np.ndarray] | None = None) -> None:
        """Apply one update to every parameter that has a gradient: in ``grads``
        (``{tensor: array}``, what ``ag.dist.get_gradients`` returns) when given, else
        its ``.grad``. Tensors in ``grads`` that are not parameters of this optimizer
        are ignored. Every gradient is checked before anything changes: one of another
        shape than its parameter raises ValueError, one that is not real numbers
        TypeError. Integer, bool and narrower float gradients (float16 for a float32
        parameter) are taken as the parameter's dtype.

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

    @property
    def param_groups(self) -> list[_ParamGroup]:
        """torch.optim's ``param_groups``, of one group: a mapping of ``"params"`` (the
        parameters) and the hyperparameters, which are the optimizer's attributes
        (``param_groups[0]["lr"]`` is ``opt.lr``): set one there or as the attribute.

        Example::

            >>> opt = ag.optim.SGD([ag.ones(2, requires_grad=True)], lr=0.1)
            >>> for g in opt.param_groups:   # a learning-rate schedule, as with torch
            ...     g["lr"] = 0.01
            >>> opt.lr, sorted(opt.param_groups[0])[:3]
            (0.01, ['dampening', 'lr', 'maximize'])
        """
        return [_ParamGroup(self)]

    def _hyperparameters(self) -> list[str]:
        """The names of the hyperparameters: the constructor's parameters (``params``
        aside, those it passes on included: see ``_constructor_parameters``) that the
        optimizer keeps as attributes of the same name."""
        return [n for n in _constructor_parameters(type(self)) if n in vars(self)]

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, as ``torch.optim``'s ``state_dict()`` lays it out:
        ``{"state": {index: {name: value}}, "param_groups": [{hyperparameter: value,
        ..., "params": [index, ...]}]}``, each parameter named by its index in the list
        the optimizer was given (one group: the optimizer's hyperparameters). Only
        parameters that have state appear in ``"state"`` (SGD without momentum keeps
        none; a parameter not stepped yet has none). Everything is a copy (changing it
        changes nothing here) and travels: numpy arrays, ints, floats, tuples, dicts of
        int and str keys. Save it with the model's ``state_dict()``; to resume, load
        both into a new model and optimizer (``load_state_dict``).

        >>> w = ag.tensor([1.0, -1.0], requires_grad=True)
        >>> opt = ag.optim.Adam([w], lr=0.1)
        >>> opt.step({w: np.array([0.5, 0.5])})
        >>> sd = opt.state_dict()
        >>> sd["param_groups"]  # doctest: +NORMALIZE_WHITESPACE
        [{'lr': 0.1, 'betas': (0.9, 0.999), 'eps': 1e-08, 'weight_decay': 0.0,
          'amsgrad': False, 'maximize': False, 'decoupled_weight_decay': False,
          'params': [0]}]
        >>> sorted(sd["state"][0]), sd["state"][0]["step"]
        (['exp_avg', 'exp_avg_sq', 'step'], 1)
        """
        state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self.params):
            entry = self.state.get(p)
            if entry is not None:
                state[i] = {
                    k: v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v)
                    for k, v in entry.items()
                }
        group = {n: _plain(getattr(self, n)) for n in self._hyperparameters()}
        group.update(type(self).FIXED_HYPERPARAMETERS)
        group["params"] = list(range(len(self.params)))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state of ``state_dict()``: the hyperparameters (``lr`` ...) and
        each parameter's state (momentum buffers, Adam's step counts and moments), the
        parameters matched by position (the state dict's ``params`` list against the
        list this optimizer was given), as ``torch.optim`` does. Arrays are copied in,
        cast to their parameter's dtype. Parameters the state dict has no state for
        start afresh. Everything is checked before anything changes.

        Raises:
            TypeError: ``state`` or a part of it is not of the type ``state_dict()``
                gives (a value that is not a number or an array of real numbers, an
                integer array where a parameter's state is floating point).
            ValueError: it does not fit this optimizer: missing or unexpected keys, a
                number of parameters other than this optimizer's, the hyperparameters
                or per-parameter state of another optimizer class, a state array of
                another shape than its parameter, a hyperparameter out of range.

        >>> w = ag.tensor([1.0, -1.0], requires_grad=True)
        >>> opt = ag.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> opt.step({w: np.array([1.0, 1.0])})
        >>> w2 = ag.tensor(w.data, requires_grad=True)
        >>> opt2 = ag.optim.SGD([w2], lr=0.5)
        >>> opt2.load_state_dict(opt.state_dict()); opt2.momentum, opt2.lr
        (0.9, 0.1)
        >>> opt2.state[w2]["momentum_buffer"]
        array([1., 1.], dtype=float32)
        """
        self._load(*self._loadable(state))

    def _load(self, hyper: dict[str, Any], loaded: dict[Tensor, dict[str, Any]]) -> None:
        """Apply what ``_loadable`` gave (checked: nothing here can fail)."""
        for name, value in hyper.items():
            if type(value) is list and type(getattr(self, name, None)) is tuple:
                value = tuple(value)  # (Adam's betas after JSON or msgpack: a list)
            setattr(self, name, value)
        self.state.clear()
        self.state.update(loaded)

    def _loadable(
        self, state: Any, adopt: bool = False
    ) -> tuple[dict[str, Any], dict[Tensor, dict[str, Any]]]:
        """Everything ``load_state_dict`` checks, nothing changed: the hyperparameters
        and each parameter's state as they would be loaded (raises as it does; ``_load``
        applies them). ``adopt``: see ``_fitted``. A DistributedOptimizer's owners check
        their part first and keep what this gives until every owner has checked its own,
        so that a state no owner refuses is loaded everywhere, and one refused is loaded
        nowhere."""
        hyper, entries, ids = self._checked_state_dict(state, len(self.params))
        # All the arrays kept, or none: the decoded arrays are views into the one buffer
        # of the message, and each one kept keeps all of it. One cast (another dtype)
        # beside arrays kept left its bytes held as long as the state lived: a 0.5 MiB
        # array kept held a message of 8.6 MiB, its neighbour's 8 MiB cast to float32.
        adopt = adopt and all(
            self._fits_as_is(v, p, k)
            for p, entry in zip(self.params, entries, strict=True)
            if entry is not None
            for k, v in entry.items()
        )
        loaded = {}
        for p, entry, key in zip(self.params, entries, ids, strict=True):
            if entry is not None:
                loaded[p] = self._fitted(entry, p, f"state[{key}]", adopt)
        return hyper, loaded

    def _checked_state_dict(
        self, state: Any, n: int
    ) -> tuple[dict[str, Any], list[dict[str, Any] | None], list[int]]:
        """What ``load_state_dict`` checks without the parameters (a
        DistributedOptimizer checks it on the caller, before any owner changes): the
        hyperparameters (copies), each of the ``n`` parameters' state entry or None
        (arrays as given: ``_fitted`` copies them), and the index the state dict gives
        each parameter."""
        cls = type(self).__name__
        if not isinstance(state, Mapping):
            raise TypeError(
                "load_state_dict: expected an optimizer state dict ({'state': ..., "
                f"'param_groups': [...]}}, what state_dict() returns), got {type(state).__name__}"
            )
        missing = [k for k in ("state", "param_groups") if k not in state]
        unexpected = [k for k in state if k not in ("state", "param_groups")]
        if missing or unexpected:
            listed = ", ".join(short_repr(k) for k in unexpected[:10])
            raise ValueError(
                f"load_state_dict: missing keys {missing}, unexpected keys "
                f"[{listed}]: an optimizer state dict has "
                "'state' and 'param_groups' (what state_dict() returns)"
            )
        groups = state["param_groups"]
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
            raise TypeError(
                "load_state_dict: 'param_groups' must be a list of dicts, got "
                f"{type(groups).__name__} {groups!r:.60}"
            )
        if len(groups) != 1:
            raise ValueError(
                f"load_state_dict: the state dict has {len(groups)} parameter groups; an "
                "ag.optim optimizer has one"
            )
        group = groups[0]
        if "params" not in group:
            raise ValueError("load_state_dict: param_groups[0] has no 'params' list")
        ids = group["params"]
        if not isinstance(ids, (list, tuple)) or any(_state_key(i) is None for i in ids):
            raise TypeError(
                "load_state_dict: param_groups[0]['params'] must be a list of parameter "
                f"indexes (ints), got {ids!r:.60}"
            )
        ids = [_state_key(i) for i in ids]
        names = self._hyperparameters()
        fixed = type(self).FIXED_HYPERPARAMETERS
        given = sorted(str(k) for k in group if k != "params" and k not in fixed)
        defaults = _constructor_parameters(type(self))
        own = inspect.signature(type(self).__init__).parameters
        # (one added later may be missing, if it has a default: a subclass's constructor
        # may require it; and one the constructor passes on to its base class's, which
        # a state dict saved before those were saved lacks: it keeps its value. Only in
        # one that gives none of them: one giving some is of a class that saves them, and
        # must give them all, as its base class's would. Else an older class's state dict
        # loaded as its own: Adam's {lr, betas, eps} into a subclass of AdamW taking
        # **options, which AdamW itself refuses.)
        passed_on = any(k in group for k in names if k not in own)
        needed = {
            k
            for k in names
            if (k in own or passed_on)
            and (
                k not in type(self).ADDED_HYPERPARAMETERS
                or defaults[k].default is inspect.Parameter.empty
            )
        }
        if not needed <= set(given) <= set(names):
            raise ValueError(
                f"load_state_dict: param_groups[0] has the hyperparameters {given}, {cls} "
                f"takes {sorted(names)} (a state dict of another optimizer class?)"
            )
        for k, v in fixed.items():
            given = _plain(group.get(k, v))  # (np.bool_ from an npz file: a bool)
            if type(given) is not type(v) or given != v:
                raise ValueError(
                    f"load_state_dict: param_groups[0] has {k} {given!r:.40}, {cls}'s is "
                    f"{v!r} (a state dict of another optimizer class?)"
                )
        if len(ids) != n:
            raise ValueError(
                f"load_state_dict: the state dict is of {len(ids)} parameters, this {cls} has {n}"
            )
        if len(set(ids)) != n:
            raise ValueError(
                f"load_state_dict: param_groups[0]['params'] names a parameter twice: {ids!r:.60}"
            )
        hyper = {
            k: copy.deepcopy(group[k])
            if k in group
            else defaults[k].default
            if k in own
            else copy.deepcopy(getattr(self, k))
            for k in names
        }
        probe = [Tensor(np.zeros(1), requires_grad=True)]
        try:
            inspect.signature(type(self)).bind(probe, **hyper)
        except TypeError:
            # (a subclass's constructor that needs more than its hyperparameters, one it
            # keeps under another name: it cannot be called to check them, and calling
            # it refused every state dict of its class, "missing 1 required argument")
            pass
        else:
            # (the constructor's checks: a state dict edited into nonsense. One of the
            # base class's hyperparameters the class sets itself is left out of them,
            # and loaded as saved: dropped, an lr a schedule had changed after
            # construction, opt.lr = lr, went back to the class's on a resume.)
            try:
                _made_leaving_out_twice(type(self), probe, hyper, hyper.keys() - own.keys())
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"load_state_dict: param_groups[0]: {exc}") from None
        per_param = state["state"]
        if not isinstance(per_param, Mapping):
            raise TypeError(
                f"load_state_dict: 'state' must be a dict of parameter index to that "
                f"parameter's state, got {type(per_param).__name__}"
            )
        place = {i: j for j, i in enumerate(ids)}
        entries: list[dict[str, Any] | None] = [None] * n
        spec = type(self).STATE_KEYS
        keys = self._state_keys(hyper)
        for key, entry in per_param.items():
            i = _state_key(key)
            if i is None or i not in place:
                raise ValueError(
                    f"load_state_dict: 'state' has an entry for {short_repr(key)}, not one of "
                    "the parameters in param_groups[0]['params']"
                )
            what = f"state[{i}]"
            if not isinstance(entry, Mapping) or not all(isinstance(k, str) for k in entry):
                raise TypeError(
                    f"load_state_dict: {what} must be a dict of str keys, got "
                    f"{type(entry).__name__} {entry!r:.60}"
                )
            if spec is not None and sorted(entry) != keys and not self._keys_switched(entry, keys):
                raise ValueError(
                    f"load_state_dict: {what} has the keys {sorted(entry)}, {cls} keeps "
                    f"{keys} (a state dict of another optimizer class?)"
                )
            checked: dict[str, Any] = {}
            for k, v in entry.items():
                kind = spec[k] if spec is not None else None
                if kind == "count":
                    checked[k] = _count(v, f"{what}[{k!r}]")
                elif isinstance(v, numbers.Real) and kind is None:
                    checked[k] = v
                else:
                    arr = real_array(v, f"load_state_dict: {what}[{k!r}]")
                    if kind == "param" and arr.dtype.kind != "f":
                        raise TypeError(
                            f"load_state_dict: {what}[{k!r}] has dtype {arr.dtype}; it must "
                            "be floating point, as its parameter is"
                        )
                    checked[k] = arr
            entries[place[i]] = checked
        return hyper, entries, ids

    def _keys_switched(self, entry: Mapping[str, Any], keys: list[str]) -> bool:
        """Whether a state entry whose keys are not ``keys`` (those kept under the
        state dict's hyperparameters) is one of this class all the same, taken under
        other settings of them: its extra keys are this class's (Adam's
        ``max_exp_avg_sq``, amsgrad switched off since: unused, kept, as torch keeps
        it), and the keys it lacks are ``LAZY_STATE_KEYS`` (amsgrad switched on since:
        the next step starts it). (Refused, an optimizer's own state dict did not load,
        into itself neither, after ``param_groups[0]["amsgrad"]`` was switched.)"""
        spec = type(self).STATE_KEYS or {}
        extra = set(entry) - set(keys)
        missing = set(keys) - set(entry)
        return extra <= spec.keys() and missing <= set(type(self).LAZY_STATE_KEYS)

    def _state_keys(self, hyper: dict[str, Any]) -> list[str]:
        """The keys of each parameter's state under the hyperparameters ``hyper`` (those
        of a state dict being loaded), sorted: ``STATE_KEYS``'s, unless a subclass keeps
        some only under some hyperparameters (Adam's ``max_exp_avg_sq``)."""
        return sorted(type(self).STATE_KEYS or {})

    def _fitted(
        self, entry: dict[str, Any], p: Tensor, what: str, adopt: bool = False
    ) -> dict[str, Any]:
        """A checked state entry of ``p`` as the optimizer keeps it: arrays copied (those
        of ``STATE_KEYS`` "param" checked against ``p``'s shape, cast to its dtype).
        ``adopt``: the arrays are nobody else's (a DistributedOptimizer's owner decoded
        them from the message that brought them) and each is kept as it is, not copied
        (the owner's peak memory during a load: the state it holds, plus one copy of the
        new one, not two); ``_loadable`` adopts all of a state's arrays, when every one
        fits as it is (``_fits_as_is``), or none."""
        spec = type(self).STATE_KEYS or {}
        out: dict[str, Any] = {}
        for k, v in entry.items():
            if spec.get(k) == "param":
                fitted = shaped_as(v, p.data.shape)
                if fitted is None:
                    raise ValueError(
                        f"load_state_dict: {what}[{k!r}] has shape {v.shape}, its parameter "
                        f"{p.data.shape}"
                    )
                # (C order: a step cuts its blocks from the flat views of C-ordered
                # state; a Fortran-ordered one, loaded, made its temporaries whole again)
                out[k] = (np.asarray if adopt else np.array)(fitted, dtype=p.data.dtype, order="C")
            elif isinstance(v, np.ndarray):
                out[k] = v if adopt else np.array(v)
            else:
                out[k] = v
        return out

    def _fits_as_is(self, v: Any, p: Tensor, k: str) -> bool:
        """Whether ``_fitted`` can keep state value ``v`` (of key ``k``) of ``p`` as it is
        when adopting: not an array, or a writable one needing no cast nor reordering."""
        if not isinstance(v, np.ndarray):
            return True
        if (type(self).STATE_KEYS or {}).get(k) == "param":
            return v.flags.writeable and v.dtype == p.data.dtype and v.flags.c_contiguous
        return bool(v.flags.writeable)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every parameter's ``.grad`` (set to None), or with
        ``set_to_none=False`` make each one there zeros (as torch's).

        >>> w = ag.ones(2, requires_grad=True); opt = ag.optim.SGD([w], lr=0.1)
        >>> w.sum().backward(); opt.zero_grad(); w.grad is None
        True
        """
        clear_grads(self.params, set_to_none)


class _ParamGroup(MutableMapping[str, Any]):
    """``Optimizer.param_groups[0]``: reads and writes go to the optimizer's attributes
    (no copy to keep in step). A key that is no hyperparameter of it is refused (a typo
    would change nothing), and so is a change of ``"params"`` or a deletion."""

    __slots__ = ("_opt",)

    def __init__(self, opt: Optimizer) -> None:
        self._opt = opt

    def _names(self) -> list[str]:
        return self._opt._hyperparameters()

    def __getitem__(self, key: str) -> Any:
        if key == "params":
            return list(self._opt.params)
        if key in self._names():
            return getattr(self._opt, key)
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        names = self._names()
        if key not in names:
            why = "fixed" if key == "params" else "not a hyperparameter of it"
            raise KeyError(
                f"param_groups[0][{key!r}] of {type(self._opt).__name__}: {why} (its "
                f"hyperparameters: {', '.join(names)})"
            )
        setattr(self._opt, key, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"param_groups[0][{key!r}]: an optimizer's group keeps every key")

    def __iter__(self) -> Iterator[str]:
        return iter(["params", *self._names()])

    def __len__(self) -> int:
        return 1 + len(self._names())

    def __repr__(self) -> str:
        return repr(dict(self))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (dampened, or Nesterov's) and
    weight decay, as ``torch.optim.SGD``.

    ``g = -g`` (maximize); ``g += weight_decay * p``; ``buf = g`` (first step) else
    ``buf = momentum*buf + (1 - dampening)*g``; ``g = g + momentum*buf`` (nesterov) else
    ``g = buf``; ``p -= lr * g``.

    ``dampening``, ``nesterov`` and ``maximize`` are keyword-only: torch's positional
    order (``lr, momentum, dampening, weight_decay, nesterov``) is not ours after
    ``momentum``, and a torch call's positional arguments would mean other options here.

    Example::

        >>> model = ag.nn.Linear(3, 2, seed=0)
        >>> opt = ag.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(ag.ones(4, 3)).sum().backward(); opt.step(); opt.zero_grad()
    """

    STATE_KEYS: ClassVar[dict[str, str] | None] = {"momentum_buffer": "param"}
    ADDED_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ("dampening", "nesterov", "maximize")

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr)
        _number("SGD", "momentum", momentum)
        _number("SGD", "weight_decay", weight_decay)
        _number("SGD", "dampening", dampening)
        if not (momentum >= 0 and weight_decay >= 0):  # (nan too)
            raise ValueError(
                f"invalid momentum {momentum} or weight_decay {weight_decay}: both must be >= 0"
            )
        nesterov = check_bool(nesterov, "SGD: nesterov")
        if nesterov and not (momentum > 0 and dampening == 0):
            # (torch's check: Nesterov's look-ahead is along an undampened momentum)
            raise ValueError(
                f"SGD: nesterov requires a momentum > 0 and dampening 0, got momentum "
                f"{momentum} and dampening {dampening}"
            )
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.dampening = dampening
        self.nesterov = nesterov
        self.maximize = check_bool(maximize, "SGD: maximize")

    def _update(self, p: Tensor, g: np.ndarray, data: np.ndarray) -> None:
        buf: np.ndarray | None = None
        first = False
        if self.momentum:
            state = self.state.get(p)
            if state is None:
                # torch: a clone of the first grad (written below, block by block; kept
                # once whole: a step cut short kept a buffer partly np.empty's garbage)
                buf = np.empty_like(data)
                first = True
            else:
                buf = state["momentum_buffer"]
        lr, wd, momentum = self.lr, self.weight_decay, self.momentum
        damping, nesterov, maximize = 1 - self.dampening, self.nesterov, self.maximize
        blocks = ((data, g, buf),) if data.size <= UPDATE_BLOCK else _blocks(data, g, buf)
        for d, gs, b in blocks:  # (see UPDATE_BLOCK)
            if maximize:
                gs = -gs
            if wd:
                gs = gs + wd * d
            if b is not None:
                if first:
                    b[...] = gs
                else:
                    b *= momentum
                    b += gs if damping == 1 else damping * gs
                gs = gs + momentum * b if nesterov else b
            d -= lr * gs
        if first:
            self.state[p] = {"momentum_buffer": buf}


class Adam(Optimizer):
    """Adam (Kingma & Ba) with torch's bias correction, as ``torch.optim.Adam``: with
    ``weight_decay``, ``weight_decay * p`` is added to the gradient (L2; AdamW decays
    the parameter instead); with ``amsgrad``, the denominator uses the largest
    ``exp_avg_sq`` so far (kept as ``max_exp_avg_sq``); with ``maximize``, the
    gradient's sign is flipped.

    ``weight_decay`` and ``amsgrad`` take torch's places (after ``eps``), ``maximize``
    is keyword-only as in torch.

    Example::

        >>> model = ag.nn.Linear(3, 2, seed=0)
        >>> opt = ag.optim.Adam(model.parameters(), lr=1e-3)
        >>> model(ag.ones(4, 3)).sum().backward(); opt.step()
    """

    STATE_KEYS: ClassVar[dict[str, str] | None] = {
        "step": "count",
        "exp_avg": "param",
        "exp_avg_sq": "param",
        "max_exp_avg_sq": "param",  # (with amsgrad only: see _state_keys)
    }
    ADDED_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ("weight_decay", "amsgrad", "maximize")
    LAZY_STATE_KEYS: ClassVar[tuple[str, ...]] = ("max_exp_avg_sq",)
    FIXED_HYPERPARAMETERS: ClassVar[dict[str, Any]] = {"decoupled_weight_decay": False}

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr)
        cls = type(self).__name__
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{cls}: betas must be a pair (beta1, beta2), got {betas!r:.40}")
        _number(cls, "betas[0]", betas[0])
        _number(cls, "betas[1]", betas[1])
        _number(cls, "eps", eps)
        _number(cls, "weight_decay", weight_decay)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or not eps >= 0:
            raise ValueError(
                f"invalid betas {betas} or eps {eps}: betas must be in [0, 1), eps >= 0"
            )
        if not weight_decay >= 0:  # (nan too)
            raise ValueError(f"invalid weight_decay {weight_decay}: weight_decay must be >= 0")
        self.betas = tuple(betas)  # (as state_dict gives it, whatever was given)
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsgrad = check_bool(amsgrad, f"{cls}: amsgrad")
        self.maximize = check_bool(maximize, f"{cls}: maximize")

    def _state_keys(self, hyper: dict[str, Any]) -> list[str]:
        # (torch keeps max_exp_avg_sq only with amsgrad; a subclass's constructor that
        # does not take amsgrad keeps it as it is)
        keys = super()._state_keys(hyper)
        amsgrad = hyper.get("amsgrad", self.amsgrad)
        return keys if amsgrad else [k for k in keys if k != "max_exp_avg_sq"]

    def _update(self, p: Tensor, g: np.ndarray, data: np.ndarray) -> None:
        b1, b2 = self.betas
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {
                "step": 0,
                "exp_avg": np.zeros_like(data),
                "exp_avg_sq": np.zeros_like(data),
            }
        top: np.ndarray | None = None
        if self.amsgrad:
            top = state.get("max_exp_avg_sq")
            if top is None:  # (the first step; or amsgrad set since: torch's KeyError)
                top = state["max_exp_avg_sq"] = np.zeros_like(data)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        bias1 = 1 - b1**t
        bias2 = 1 - b2**t
        root2, eps, rate = math.sqrt(bias2), self.eps, self.lr / bias1
        wd, maximize = self.weight_decay, self.maximize
        decay = None  # (AdamW's: the parameter decays, not through the moments)
        if wd and self.FIXED_HYPERPARAMETERS["decoupled_weight_decay"]:
            decay = 1 - self.lr * wd
        blocks = (
            ((data, g, m, v, top),) if data.size <= UPDATE_BLOCK else _blocks(data, g, m, v, top)
        )
        for d, gs, ms, vs, tops in blocks:  # (see UPDATE_BLOCK)
            if maximize:
                gs = -gs
            if decay is not None:
                d *= decay
            elif wd:
                gs = gs + wd * d
            ms *= b1
            ms += (1 - b1) * gs
            vs *= b2
            vs += (1 - b2) * (gs * gs)
            if tops is not None:
                vs = np.maximum(tops, vs, out=tops)
            denom = np.sqrt(vs) / root2 + eps
            d -= rate * (ms / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``:
    each step first scales the parameter by ``1 - lr * weight_decay``, where Adam adds
    ``weight_decay * p`` to the gradient (its moments then scale the decay with the
    gradients'). The default ``weight_decay`` is torch's, 1e-2. Its state dict is
    Adam's with ``decoupled_weight_decay`` True (False in Adam's), as torch's: one
    class's is refused by the other.

    Example::

        >>> w = ag.tensor([1.0, -1.0], requires_grad=True)
        >>> opt = ag.optim.AdamW([w], lr=0.1, weight_decay=0.5)
        >>> opt.step({w: np.zeros(2)}); w.data  # (a zero gradient: the decay alone)
        array([ 0.95, -0.95], dtype=float32)
    """

    ADDED_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ()  # (none saved without them)
    FIXED_HYPERPARAMETERS: ClassVar[dict[str, Any]] = {"decoupled_weight_decay": True}

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
