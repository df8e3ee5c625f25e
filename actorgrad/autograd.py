"""The local autograd engine: graph nodes, leaf accumulation, and one backward pass.

NOTE: this module is the lowest autograd layer. It imports only the standard library
and numpy (no asyncio, no sockets, no other actorgrad module) and must stay
that way: the distributed engine runs the same ``GraphTask`` from inside its actors.

Contract (docs/design.md section 1):

* every op output that requires grad has one ``Node`` (``tensor.grad_fn``); a leaf
  that requires grad has one cached ``AccumulateGrad`` (``grad_node(tensor)``);
* ``Node.next`` holds one entry per differentiable input (``None``: needs no grad);
* ``GraphTask`` counts dependencies once, then runs a ready queue: every node runs
  exactly once with the sum of what reached it. No recursion anywhere, so graphs of
  any depth work.

Example::

    >>> import actorgrad as ag
    >>> x = ag.tensor([1.0, 2.0], requires_grad=True)
    >>> y = (x * x).sum()
    >>> GraphTask([(grad_node(y), np.ones((), np.float32))]).run()  # what y.backward() does
    >>> x.grad
    array([2., 4.], dtype=float32)
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

import numpy as np

if TYPE_CHECKING:
    from actorgrad.tensor import Tensor

__all__ = [
    "AccumulateGrad",
    "Function",
    "GraphTask",
    "Node",
    "enable_grad",
    "grad_node",
    "is_grad_enabled",
    "no_grad",
]

Hook = Callable[[np.ndarray], "np.ndarray | None"]

# ---------------------------------------------------------------------------------------
# grad mode
# ---------------------------------------------------------------------------------------

# A ContextVar, not a global flag: asyncio tasks and threads of the runtime each see
# their own setting, so one task's `no_grad` never leaks into another's forward pass.
_GRAD_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "actorgrad_grad_enabled", default=True
)
grad_enabled = _GRAD_ENABLED.get  # bound method: the cheapest possible check per op
# The tokens of the no_grad/enable_grad blocks open in this context, innermost last.
_MODE_TOKENS: contextvars.ContextVar[tuple[contextvars.Token[bool], ...]] = contextvars.ContextVar(
    "actorgrad_grad_mode_tokens", default=()
)

F = TypeVar("F", bound=Callable[..., Any])


def is_grad_enabled() -> bool:
    """Whether ops record the graph in the current context (``False`` under no_grad)."""
    return _GRAD_ENABLED.get()


class _GradMode:
    """Sets grad mode for a ``with`` block, or for every call of a decorated function."""

    _value = True

    # Bare, ``@no_grad`` gives the decorated function, not an instance: what type
    # checkers see of ``no_grad(fn)``, so that the decorated function keeps its type.
    # mypy takes that from __new__ only while no __init__ is defined here (none is
    # needed: with __new__ defined, object.__init__ ignores the argument), and refuses
    # the second form, "__new__ must return a class instance", though Python returns
    # whatever __new__ returns (pyright follows it).
    @overload
    def __new__(cls, fn: None = None) -> Self: ...
    @overload
    def __new__(cls, fn: F) -> F: ...  # type: ignore[misc]
    def __new__(cls, fn: Callable[..., Any] | None = None) -> Any:
        self = super().__new__(cls)
        if fn is not None:  # used bare, as `@no_grad` (without parentheses)
            if not callable(fn):
                raise TypeError(
                    f"{cls.__name__}() takes no arguments, or decorates a function; got {fn!r:.80}"
                )
            return self(fn)
        return self

    # The tokens to restore live in a context variable, not on the instance: one
    # instance entered by several tasks (or threads) at once restores each its own.
    def __enter__(self) -> None:
        token = _GRAD_ENABLED.set(self._value)
        _MODE_TOKENS.set((*_MODE_TOKENS.get(), token))

    def __exit__(self, *exc: object) -> None:
        tokens = _MODE_TOKENS.get()
        if not tokens:
            raise RuntimeError(
                f"{type(self).__name__}: left in another task or thread than the one it "
                "was entered in"
            )
        _MODE_TOKENS.set(tokens[:-1])
        _GRAD_ENABLED.reset(tokens[-1])

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self:
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]
        if inspect.isgeneratorfunction(fn):
            return _generator_in_mode(self._value, fn)  # type: ignore[return-value]
        if inspect.isasyncgenfunction(fn):
            return _async_generator_in_mode(self._value, fn)  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def _in_mode(value: bool, step: Callable[..., Any], *arg: Any) -> Any:
    """``step(*arg)`` with grad mode ``value``, then the mode as it was (the generator
    wrappers run each step of a generator's body so; a generator may resume in another
    context than the last step's, so each step sets and resets on its own)."""
    token = _GRAD_ENABLED.set(value)
    try:
        return step(*arg)
    finally:
        _GRAD_ENABLED.reset(token)


def _generator_in_mode(value: bool, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A generator function running ``fn``'s body with grad mode ``value``, and the
    caller's mode restored at each ``yield`` (as torch wraps generator functions):
    sends, throws and ``close`` reach the body in that mode, its return value is the
    wrapper's."""

    @functools.wraps(fn)
    def generator_wrapper(*args: Any, **kwargs: Any) -> Any:
        gen = fn(*args, **kwargs)
        try:
            response = _in_mode(value, gen.send, None)
            while True:
                try:
                    request = yield response
                except GeneratorExit:
                    _in_mode(value, gen.close)
                    raise
                except BaseException as exc:
                    response = _in_mode(value, gen.throw, exc)
                else:
                    response = _in_mode(value, gen.send, request)
        except StopIteration as stop:
            return stop.value

    return generator_wrapper


def _async_generator_in_mode(value: bool, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``_generator_in_mode`` for an async generator function: the body runs in grad
    mode ``value`` (through its awaits too: they belong to the body), the consumer's
    mode comes back at each ``yield``."""

    async def step(aw: Any) -> Any:
        token = _GRAD_ENABLED.set(value)
        try:
            return await aw
        finally:
            _GRAD_ENABLED.reset(token)

    @functools.wraps(fn)
    async def async_generator_wrapper(*args: Any, **kwargs: Any) -> Any:
        agen = fn(*args, **kwargs)
        try:
            response = await step(agen.asend(None))
            while True:
                try:
                    request = yield response
                except GeneratorExit:
                    await step(agen.aclose())
                    raise
                except BaseException as exc:
                    response = await step(agen.athrow(exc))
                else:
                    response = await step(agen.asend(request))
        except StopAsyncIteration:
            return

    return async_generator_wrapper


class no_grad(_GradMode):
    """Disable graph recording, as a context manager or a decorator.

    Thread- and task-safe (contextvars): only the current thread / asyncio task is
    affected.

    Example::

        >>> w = ag.tensor([1.0], requires_grad=True)
        >>> with ag.no_grad():
        ...     y = w * 2
        >>> y.requires_grad
        False
        >>> @ag.no_grad()                 # or bare: @ag.no_grad
        ... def evaluate(model, x): return model(x)

    A decorated generator function (or async generator function) runs its body
    without grad, and gives the caller its own mode back at each ``yield``, as torch
    does::

        >>> @ag.no_grad()
        ... def scaled(w):
        ...     yield w * 2
        >>> [y.requires_grad for y in scaled(w)], ag.autograd.is_grad_enabled()
        ([False], True)
    """

    _value = False


class enable_grad(_GradMode):
    """Re-enable graph recording inside a ``no_grad`` region (context manager/decorator)."""

    _value = True


# ---------------------------------------------------------------------------------------
# nodes
# ---------------------------------------------------------------------------------------


class Node:
    """One backward function with a single output.

    ``next`` has one entry per differentiable input (``None``: that input needs no
    grad); ``apply(grad)`` returns one gradient (or ``None``) per entry of ``next``.
    ``pre_hooks`` run on the summed incoming gradient before ``apply``, in the order
    they were registered.
    """

    __slots__ = ("next", "_hooks", "__weakref__")
    # True for nodes whose grad leaves the process (dist RecvNode): a task hands it to
    # its ``on_boundary``; without one, ``apply`` runs (and raises, saying why)
    boundary = False

    def __init__(self, next: Sequence[Node | None] = ()) -> None:
        self.next: tuple[Node | None, ...] = tuple(next)
        self._hooks: dict[int, Hook] | None = None

    @property
    def pre_hooks(self) -> dict[int, Hook]:
        """The hooks by registration number (a dict keeps their order), created on
        first access: most nodes never get a hook, and one dict less per op is one
        GC-tracked allocation less. A dict, not a list, so that registering or removing
        one of thousands is O(1) (a list's search made 20,000 take 8.7 s)."""
        hooks = self._hooks
        if hooks is None:
            hooks = self._hooks = {}
        return hooks

    @pre_hooks.setter
    def pre_hooks(self, hooks: dict[int, Hook]) -> None:
        self._hooks = hooks

    def apply(self, grad: np.ndarray) -> tuple[np.ndarray | Scatter | None, ...]:
        raise NotImplementedError(f"{type(self).__name__}.apply")

    def release(self) -> None:
        """Drop saved buffers; nothing to drop in the base class."""

    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{self.name()} node>"


class Scatter:
    """A gradient that is zero but for ``values`` at ``index`` (``basic``: numpy basic
    indexing, which names each element once) of an array of ``shape`` and ``dtype``:
    what indexing gives its input. A node's ``apply`` may return one in place of an
    array; ``GraphTask`` adds those for one node into one array, in place, where each
    used to be a whole-size array of zeros added to the others (``x[t]`` for each of
    the n rows of ``x``, as an RNN over time steps does, or ``split`` into n chunks:
    n arrays of x's size made and summed, O(n^2); 100,000 chunks took 147 us each).
    Nothing past the engine sees one: hooks, leaves and boundaries get the array."""

    __slots__ = ("shape", "dtype", "index", "values", "basic")

    def __init__(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], index: Any, values: Any, basic: bool
    ) -> None:
        self.shape = shape
        self.dtype = dtype
        self.index = index
        self.values = values
        self.basic = basic

    def dense(self) -> np.ndarray:
        """A new array of zeros with the values in their place."""
        out = np.zeros(self.shape, self.dtype)
        if self.basic:
            out[self.index] = self.values
        else:
            _add_at(out, self.index, self.values)  # (repeated indices add up)
        return out

    def add_to(self, out: np.ndarray) -> None:
        """Add the values into ``out`` at their place."""
        if self.basic:
            out[self.index] += self.values
        else:
            _add_at(out, self.index, self.values)


#: Elements of ``_add_at``'s flat indices made at a time (8 MiB of them).
_FLAT_CHUNK = 1 << 20


def _add_at(out: np.ndarray, index: Any, values: Any) -> None:
    """``np.add.at(out, index, values)``: the same sums in the same order. Rows picked
    by one integer array (an embedding's ids) go as flat indices of their elements:
    numpy's add.at takes a slow path for rows (51,200 ids of 64 floats: 23 ms, as flat
    indices 8 ms; torch's 8). (A negative id's flat indices count from the end too.)"""
    ids = index[0] if type(index) is tuple and len(index) == 1 else index
    if not (
        type(ids) is np.ndarray
        and ids.dtype.kind in "iu"
        and ids.size
        and out.size
        and out.ndim > 1
        and out.flags.c_contiguous
    ):
        np.add.at(out, index, values)
        return
    row = out[0].size
    values = np.broadcast_to(values, (*ids.shape, *out.shape[1:])).reshape(ids.size, row)
    ids = ids.reshape(-1).astype(np.intp)  # (uint64 * int would be float64)
    flat_out = out.reshape(-1)  # (a view: out is C-contiguous)
    offsets = np.arange(row, dtype=np.intp)
    step = max(1, _FLAT_CHUNK // row)  # (the flat indices are 8 bytes an element)
    for i in range(0, len(ids), step):
        flat = ids[i : i + step, None] * row + offsets
        np.add.at(flat_out, flat.reshape(-1), values[i : i + step].reshape(-1))


_FREED: Any = object()  # `Function.saved` after release()


class Function(Node):
    """Base of the op nodes: ``forward`` on numpy arrays and ``backward`` side by side.

    Subclasses keep what backward needs in ``self.saved`` (set in ``forward``);
    ``release()`` drops it, so a second backward raises a clear error.
    """

    __slots__ = ("saved",)

    def __init__(self, next: Sequence[Node | None] = ()) -> None:
        super().__init__(next)
        self.saved: Any = ()

    def apply(self, grad: np.ndarray) -> tuple[np.ndarray | Scatter | None, ...]:
        if self.saved is _FREED:
            raise RuntimeError(
                f"{self.name()}: trying to backward through the graph a second time; its "
                "saved buffers were freed after the first backward. Pass "
                "retain_graph=True to the first backward() if you need to run it again; "
                "a tensor kept from an earlier step (an RNN's hidden state) is detach()ed "
                "instead, to stop there."
            )
        return self.backward(grad)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the op on numpy arrays; keep what backward needs in ``self.saved``."""
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray | Scatter | None, ...]:
        """One gradient per entry of ``self.next`` (None where ``next`` is None)."""
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def release(self) -> None:
        self.saved = _FREED


class AccumulateGrad(Node):
    """The node of a leaf tensor that requires grad: adds incoming grads into ``.grad``."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.next = ()
        # The leaf's hooks are shared with the tensor, so they survive when this
        # (weakly cached) node is collected and later recreated.
        hooks = tensor._hooks
        if hooks is None:
            hooks = tensor._hooks = {}
        self._hooks = hooks
        self.tensor = tensor

    def apply(self, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        return ()

    def name(self) -> str:
        return f"AccumulateGrad{tuple(self.tensor.shape)}"


#: Held while a backward pass adds into a leaf's ``.grad`` (read, add, write back): passes
#: run in several threads at once (plain functions called on a worker run in its thread
#: pool, two may train one model), and numpy lets other threads run during the add of
#: big arrays, so one pass's sum overwrote another's: 4 threads of 200 passes each
#: left a shared leaf 388 to 444 of its 800. (torch locks its AccumulateGrad too.)
#: Taken once per leaf and pass, not per op; striped by the leaf, so threads training
#: unrelated models do not wait for each other's adds (one lock for the process made
#: every add of every thread take turns, numpy's GIL-free adds of big arrays too).
_GRAD_STRIPES = 64
_GRAD_LOCKS: tuple[threading.Lock, ...] = ()


def _grad_lock(t: object) -> threading.Lock:
    """The lock guarding the ``.grad`` of leaf ``t`` (see ``_GRAD_LOCKS``)."""
    # (objects sit 16 bytes apart at least: the low bits of an id are always 0)
    return _GRAD_LOCKS[(id(t) >> 4) % _GRAD_STRIPES]


def _new_grad_locks() -> None:
    # Also in a forked child: a process forked while another thread was inside an
    # accumulation (a fork in a call: multiprocessing's default start method on Linux)
    # inherited a lock held by a thread it does not have: its first backward waited for
    # good. (The child has only the forking thread: no accumulation of its own is under
    # way.)
    global _GRAD_LOCKS
    _GRAD_LOCKS = tuple(threading.Lock() for _ in range(_GRAD_STRIPES))


_new_grad_locks()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_grad_locks)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` as a new array, also for two 0-d arrays (numpy gives a scalar there:
    a 0-d leaf's gradient became a ``numpy.float32`` that code clearing ``.grad`` in
    place, ``g[...] = 0``, cannot write into)."""
    out = a + b
    return out if type(out) is np.ndarray else np.asarray(out)


_ONES: dict[np.dtype, np.ndarray] = {}


def seed_grad(like: np.ndarray) -> np.ndarray:
    """The gradient a backward pass starts from: a fresh array of ones of ``like``'s
    shape and dtype. For the usual 0-d loss, a copy of a cached one (``np.ones`` is
    Python: ~3x the time, once per pass)."""
    if like.ndim:
        return np.ones(like.shape, like.dtype)
    one = _ONES.get(like.dtype)
    if one is None:
        one = _ONES[like.dtype] = np.ones((), like.dtype)
    return one.copy()


#: The zeros the distributed engine gives as gradient to leaves a pass reached without
#: giving them any (an input the loss does not use, a parameter whose output went
#: unused): marked by identity, so that an optimizer stepped with such gradients
#: (``DistributedOptimizer``, or ``opt.step(ag.dist.get_gradients(ctx))``) leaves those
#: parameters as they are, as a local step leaves a parameter whose ``.grad`` is None
#: (weight decay, momentum and Adam's moments moved them). ``get_gradients`` still
#: reports the zeros. (Here, not in ``dist``: the optimizers, which know nothing of
#: contexts, check it too.)
_UNUSED: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def unused_zeros(like: np.ndarray) -> np.ndarray:
    """Zeros like ``like``, marked as the gradient of an unused leaf (see is_unused)."""
    z = np.zeros_like(like)
    _UNUSED[id(z)] = z
    return z


def is_unused(g: Any) -> bool:
    """Whether ``g`` is an unused leaf's zeros (see unused_zeros) still all zero."""
    z = _UNUSED.get(id(g))
    return z is not None and z is g and not z.any()


def grad_node(t: Tensor) -> Node | None:
    """The node a gradient for ``t`` flows into: ``t.grad_fn``, the leaf's cached
    ``AccumulateGrad``, or ``None`` if ``t`` does not require grad."""
    fn = t.grad_fn
    if fn is not None:
        return fn
    if not t.requires_grad:
        return None
    # Cached through a weak reference: the graph holds the node strongly, the leaf
    # does not, so leaf <-> node never form a cycle that only the GC could free.
    ref = t._accum
    if ref is not None:
        node = ref()
        if node is not None:
            return node
    node = AccumulateGrad(t)
    t._accum = weakref.ref(node)
    return node


# ---------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------


def _hook_result(hook: Hook, grad: np.ndarray, out: Any) -> np.ndarray:
    """A hook's replacement gradient as an array of the gradient's shape and dtype; a
    hook that returns another shape or no number is a bug to name here (it would
    otherwise broadcast, silently giving every gradient after it the wrong values).
    Another dtype is cast, as op gradients are cast to their input's dtype: a float64
    result would otherwise turn a float32 leaf's ``.grad`` into float64."""
    if type(hook) is functools.partial:  # (a function registered twice: see register_hook)
        hook = hook.func
    name = getattr(hook, "__qualname__", None) or repr(hook)
    if inspect.iscoroutine(out):
        out.close()  # (else "coroutine ... was never awaited" too, pointing elsewhere)
        raise TypeError(
            f"hook {name} returned a coroutine: hooks run synchronously in the backward "
            "pass, so a hook must be a plain function (not async def)"
        )
    try:
        arr = np.asarray(out)
    except Exception as exc:
        raise TypeError(f"hook {name} returned {type(out).__name__!r}, not an array") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"hook {name} returned a {type(out).__name__} of dtype {arr.dtype}; a hook returns "
            "None or a numeric array"
        )
    if arr.shape != grad.shape:
        raise RuntimeError(
            f"hook {name} changed the gradient's shape from {grad.shape} to {arr.shape}; "
            "a hook must return None or an array of the shape it was given"
        )
    return arr if arr.dtype == grad.dtype else arr.astype(grad.dtype)


class GraphTask:
    """One backward pass over a graph. Synchronous, no asyncio.

    ``roots``: ``(node, grad)`` pairs; their grads are added before anything runs
    (``None``: the root contributes nothing but still runs).
    ``sources``: nodes that become ready only once ``deliver(node, grad)`` was called
    (the distributed engine's send nodes). ``leaf_sink(tensor, grad)`` replaces writing
    ``.grad``; ``on_boundary(node, grad)`` is called for ``boundary`` nodes instead of
    applying them (``boundaries``: those reached from the roots and sources, listed
    before anything runs; without ``on_boundary``, the first one's ``apply`` is called
    then, and raises saying why). Without ``retain_graph`` every node is released after
    it ran.

    Example::

        >>> x = ag.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = (x * x).sum()
        >>> task = GraphTask([(grad_node(loss), np.ones((), np.float32))])
        >>> task.run(); task.finished
        True
        >>> x.grad
        array([2., 4.], dtype=float32)
    """

    __slots__ = (
        "_deps",
        "_grads",
        "_ready",
        "_sources",
        "_delivered",
        "_given",
        "_ran",
        "_total",
        "_owned",
        "retain_graph",
        "leaf_sink",
        "on_boundary",
        "boundaries",
    )

    def __init__(
        self,
        roots: Sequence[tuple[Node, np.ndarray | None]],
        *,
        sources: Iterable[Node] = (),
        retain_graph: bool = False,
        leaf_sink: Callable[[Tensor, np.ndarray | None], None] | None = None,
        on_boundary: Callable[[Node, np.ndarray | None], None] | None = None,
    ) -> None:
        self.retain_graph = retain_graph
        self.leaf_sink = leaf_sink
        self.on_boundary = on_boundary
        self._sources: set[Node] = set(sources)
        self._delivered: set[Node] = set()
        self._given: set[int] = set()
        self._ran = 0
        # The pending gradients this task made itself from Scatters (node -> array):
        # nobody else holds them, so later Scatters to the node add into them in place.
        self._owned: dict[Node, np.ndarray] = {}

        # Count consumer edges of every node reachable from roots and sources: one
        # iterative pass, so a 100k-deep chain needs no recursion. (The counts double
        # as the set of nodes seen.) The boundary nodes it reaches (roots and sources
        # aside) are listed for the caller to look at before anything runs.
        deps: dict[Node, int] = dict.fromkeys([node for node, _ in roots], 0)
        deps.update(dict.fromkeys(self._sources, 0))
        stack = list(deps)
        get = deps.get
        boundaries: list[Node] = []
        while stack:
            for nxt in stack.pop().next:
                if nxt is None:
                    continue
                n = get(nxt)
                if n is None:
                    deps[nxt] = 1
                    stack.append(nxt)
                    if nxt.boundary:
                        boundaries.append(nxt)
                else:
                    deps[nxt] = n + 1
        self.boundaries = boundaries
        if boundaries and on_boundary is None:
            # Nobody takes a boundary's gradient (a local pass over a graph a
            # distributed backward records): its apply raises, saying why and what to
            # call instead. Raised before anything runs: part way, the pass had written
            # the .grad of the leaves it reached first and freed the nodes on its way,
            # so the backward the error points to then failed as a second backward
            # through a freed graph. (A boundary whose apply does not raise runs as
            # before.)
            boundaries[0].apply(None)  # type: ignore[arg-type]
        self._deps = deps
        self._total = len(deps)

        grads: dict[Node, np.ndarray] = {}
        for node, grad in roots:
            if grad is None:
                continue
            prev = grads.get(node)
            grads[node] = grad if prev is None else prev + grad
        self._grads = grads
        ready: list[Node] = []
        queued: set[Node] = set()  # a set, not `in ready`: roots may be thousands of recvs
        for node, _ in roots:
            if deps[node] == 0 and node not in self._sources and node not in queued:
                queued.add(node)
                ready.append(node)
        self._ready = ready

    def __repr__(self) -> str:
        waiting = len(self._sources - self._delivered)
        return (
            f"<GraphTask ran {self._ran}/{self._total} nodes, {len(self._ready)} ready, "
            f"{waiting} sources undelivered, retain_graph={self.retain_graph}>"
        )

    @property
    def finished(self) -> bool:
        """Every node of the task ran (so every source was delivered)."""
        return self._ran == self._total

    def deliver(self, node: Node, grad: np.ndarray | None) -> None:
        """A source's gradient arrived (``None``: nothing flows from it). Several
        deliveries to one source before it runs add up."""
        if node not in self._sources:
            raise ValueError(f"deliver: {node!r} is not a source of this GraphTask")
        if self._deps[node] < 0:  # (a source runs only once delivered, or was skipped)
            raise RuntimeError(f"deliver: {node!r} already ran in this GraphTask")
        if grad is not None:
            prev = self._grads.get(node)
            self._grads[node] = grad if prev is None else prev + grad
        if node not in self._delivered:
            self._delivered.add(node)
            if self._deps[node] == 0:
                self._ready.append(node)

    def waits_for(self, node: Node) -> bool:
        """Whether ``node`` is a source of this task whose gradient has not come."""
        return node in self._sources and node not in self._delivered and self._deps[node] >= 0

    def skipped(self, node: Node) -> bool:
        """Whether ``node`` is a source this task took out with :meth:`skip` (a source
        that ran was delivered first)."""
        return node in self._sources and node not in self._delivered and self._deps[node] < 0

    def consumers(self, node: Node) -> int:
        """How many consumer edges of ``node`` this task counts (0 for a node it does
        not reach); -1 once the node ran (or was skipped)."""
        return self._deps.get(node, 0)

    def skip(self, nodes: Iterable[Node]) -> None:
        """Take ``nodes`` out of this task: each counts as run without running (no
        hooks, no ``apply``, no boundary call) and gives ``None`` to the nodes it feeds.
        For a caller that has their work done elsewhere, e.g. a source and the only node
        it feeds (the distributed backward relays such a pair's gradient straight from
        one worker to another)."""
        nodes = list(nodes)
        deps = self._deps
        for node in nodes:
            if deps.get(node, -1) < 0:
                raise ValueError(f"skip: {node!r} is not waiting in this GraphTask")
            deps[node] = -1
            self._ran += 1
            self._grads.pop(node, None)
            self._owned.pop(node, None)
        if self._ready:
            # One pass over the ready list, not a scan of it per node: the distributed
            # backward skips two nodes per relay, and its origin's ready list holds
            # every recv node no gradient reaches (10,000 relays beside 10,000 unused
            # recvs took 2.4 s here, 100x the rest of the pass). (In place: ``run``
            # holds the list.)
            skipped = set(nodes)
            self._ready[:] = [n for n in self._ready if n not in skipped]
        for node in nodes:  # (after marking them all: no edge between them counts)
            for nxt in node.next:
                if nxt is None:
                    continue
                left = deps.get(nxt)
                if left is None or left <= 0:
                    continue
                deps[nxt] = left - 1
                if left == 1 and (nxt not in self._sources or nxt in self._delivered):
                    self._ready.append(nxt)

    @property
    def has_ready(self) -> bool:
        """Nodes are ready to run (``run`` stopped at its time limit, or deliveries came)."""
        return bool(self._ready)

    def run(self, until: float | None = None) -> None:
        """Process ready nodes until none is ready (call again after more deliveries).
        ``until``: a ``time.perf_counter()`` value; the run stops after the node that
        ends past it (``has_ready`` then tells whether work is left), so a caller that
        must stay responsive can go on elsewhere (the distributed backward moves a long
        part off its event loop)."""
        ready = self._ready
        grads = self._grads
        get = grads.get
        deps = self._deps
        sources = self._sources
        delivered = self._delivered
        owned = self._owned
        release = not self.retain_graph
        ran = 0
        try:
            while ready:
                node = ready.pop()
                grad = grads.pop(node, None)
                if owned:  # (the array is the node's now: hooks may change it in place)
                    owned.pop(node, None)
                deps[node] = -1  # ran: marks it for `deliver`'s check
                ran += 1
                outs: Sequence[np.ndarray | Scatter | None] | None = None
                try:
                    if grad is not None and node._hooks:
                        if type(grad) is not np.ndarray:  # (0-d ops give numpy scalars)
                            grad = np.asarray(grad)
                        if not grad.flags.writeable:
                            # (a reduction's gradient is a read-only broadcast view from
                            # 4 KiB on: a hook changing it in place would work or fail
                            # by the tensor's size)
                            grad = grad.copy()
                        # (the hooks registered when the node runs, as torch runs them:
                        # a hook may remove itself, a one-shot hook, or add another)
                        for hook in tuple(node._hooks.values()):
                            out = hook(grad)
                            if out is not None:
                                if (
                                    type(out) is not np.ndarray
                                    or out.shape != grad.shape
                                    or out.dtype != grad.dtype
                                ):
                                    out = _hook_result(hook, grad, out)
                                if out is not grad:
                                    # (an array the hook's code may keep: a leaf stores
                                    # a copy, as torch's does of a tensor held elsewhere;
                                    # kept as it was, a later change to it changed .grad
                                    # and get_gradients' array)
                                    self._given.add(id(out))
                                grad = out
                    if node.boundary:
                        if self.on_boundary is not None:
                            self.on_boundary(node, grad)
                        elif grad is not None:  # (nobody to take it: the node says why)
                            outs = node.apply(grad)
                    elif isinstance(node, AccumulateGrad):
                        self._accumulate(node, grad)
                    elif grad is not None:
                        outs = node.apply(grad)
                except Exception as exc:
                    exc.add_note(f"(while running backward of {node.name()})")
                    raise
                nexts = node.next
                if outs is None:  # nothing flows on: still count the edges as delivered
                    outs = (None,) * len(nexts) if nexts else ()
                elif len(outs) != len(nexts):
                    raise RuntimeError(
                        f"{node.name()}.apply returned {len(outs)} gradients for "
                        f"{len(nexts)} inputs"
                    )
                for nxt, g in zip(nexts, outs):  # noqa: B905 (lengths checked above)
                    if nxt is None:
                        continue
                    if g is not None:
                        prev = get(nxt)
                        if isinstance(g, Scatter):
                            grads[nxt] = self._scattered(nxt, prev, g)
                        else:
                            # Never in place: the same array may have been handed to
                            # several consumers (e.g. both inputs of an addition).
                            grads[nxt] = g if prev is None else prev + g
                    left = deps[nxt] - 1
                    deps[nxt] = left
                    if left == 0 and (not sources or nxt not in sources or nxt in delivered):
                        ready.append(nxt)
                if release:
                    node.release()
                if until is not None and perf_counter() > until:
                    break
        finally:
            self._ran += ran

    def _scattered(self, node: Node, prev: np.ndarray | None, g: Scatter) -> np.ndarray:
        """``prev`` (the gradient pending for ``node``) plus ``g``: added in place into
        an array this task made for ``node`` (one per node and pass, whatever the number
        of Scatters), else into a new one, which it keeps for the next Scatter."""
        owned = self._owned
        if prev is None:
            buf = g.dense()
        elif owned.get(node) is prev:
            g.add_to(prev)
            return prev
        else:  # (an array from elsewhere: copied, with the dtype ``prev + g`` has)
            buf = np.empty(g.shape, np.result_type(prev, g.dtype))
            buf[...] = prev
            g.add_to(buf)
        owned[node] = buf
        return buf

    def _accumulate(self, node: AccumulateGrad, grad: np.ndarray | None) -> None:
        t = node.tensor
        if grad is not None:
            if type(grad) is not np.ndarray:  # (0-d ops give numpy scalars)
                grad = np.asarray(grad)
            if grad.shape != t.data.shape:
                raise RuntimeError(
                    f"gradient of shape {grad.shape} reached a leaf of shape {t.data.shape}"
                )
        if self.leaf_sink is not None:
            if grad is not None:
                # Never hand one array to two leaves (a + b gives both the same one).
                if id(grad) in self._given:
                    grad = grad.copy()
                self._given.add(id(grad))
            self.leaf_sink(t, grad)
            return
        if grad is None or not t._rg:
            # (a leaf that stopped requiring grad since the graph was recorded,
            # requires_grad = False or detach_(): no .grad, as torch's AccumulateGrad)
            return
        with _grad_lock(t):  # (see _GRAD_LOCKS)
            if t.grad is None:
                # Store an array the leaf owns: views, read-only broadcasts, arrays already
                # handed to another leaf (a + b gives both the same array) and arrays a hook
                # returned (``_given`` has those too) are copied.
                if (
                    type(grad) is not np.ndarray
                    or grad.base is not None
                    or not grad.flags.writeable
                    or id(grad) in self._given
                    or grad.dtype != t.data.dtype
                ):
                    self._given.add(id(grad))
                    # empty_like: the copy gets the parameter's own memory layout, so the
                    # optimizer's elementwise updates stream instead of striding.
                    owned = np.empty_like(t.data)
                    owned[...] = grad
                    grad = owned
                self._given.add(id(grad))
                t.grad = grad
            else:
                old = t.grad
                if np.shape(old) != grad.shape and np.ndim(old) != 0:
                    # (set by the user: it would broadcast; a scalar, `x.grad = 0`, may)
                    raise RuntimeError(
                        f"the .grad of a leaf of shape {grad.shape} has shape {np.shape(old)}; "
                        "set .grad to None or to an array of the leaf's shape"
                    )
                t.grad = add(old, grad)
