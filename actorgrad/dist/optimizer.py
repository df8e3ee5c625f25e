"""``DistributedOptimizer``: one local optimizer per parameter owner, stepped with the
gradients of a distributed autograd context.

``load_state_dict`` is two rounds, and the state crosses the network once: each owner
gets its part in the first (``_LocalOptimizer.stage``), checks it and keeps it, checked
and not applied, under a token naming the load (``_Stages``, per worker); the second
sends only the token, to commit it everywhere once every owner staged, or to abort it
where it was staged once one refused or was lost. A staged state goes at its commit or
abort, when its driver is lost to the owner (the peer-lost callback that reclaims the
contexts of a lost initiator, ``dist.context._on_peer_lost``), when a later load of the
same optimizer replaces it, when the optimizer goes (its RRef released), and after
``STAGE_TIMEOUT`` s without either.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import inspect
import secrets
import threading
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from actorgrad import wire
from actorgrad.autograd import enable_grad, is_unused
from actorgrad.dist.api import get_gradients
from actorgrad.dist.context import as_context_id, int_list, state_of
from actorgrad.errors import (
    ContextError,
    ProtocolError,
    RemoteError,
    WorkerLost,
    clip_text,
    refusal_type,
    short_repr,
)
from actorgrad.optim import BASE_CLASS_HINT, Optimizer, _made_leaving_out_twice, _plain
from actorgrad.runtime import RRef, Worker, current_worker, remote
from actorgrad.runtime.calls import fn_spec, resolve
from actorgrad.runtime.worker import caller_id
from actorgrad.tensor import Tensor

__all__ = ["DistributedOptimizer"]

# Held by every local optimizer's step in this process (owners' parameters can be
# shared by several DistributedOptimizers: one lock for all, as PyTorch has).
_STEP_LOCK = threading.Lock()

#: Seconds an owner keeps the state a load staged there (checked, not applied) when
#: neither its commit nor its abort came: a driver that lives on but never ended the
#: load (one lost drops it at once). Far longer than a load's first round takes: an
#: owner whose staged state expired before its commit refuses the commit, after the
#: other owners loaded.
STAGE_TIMEOUT = 300.0
#: How many tokens of loads gone from an owner (committed, aborted, expired, replaced,
#: their driver lost, their optimizer released) it remembers, so that a commit of one says why it finds nothing.
STAGE_MEMORY = 256


def _class_spec(cls: Any) -> str | list[Any]:
    """The wire name of ``optimizer_class`` (as the runtime names a function it calls:
    a class of the driver's script travels with the script's path)."""
    if not isinstance(cls, type) or not issubclass(cls, Optimizer):
        # (the owners step it with a context's gradients: Optimizer.step(grads=...))
        raise TypeError(
            "optimizer_class must be an ag.optim.Optimizer subclass (ag.optim.SGD, "
            f"ag.optim.Adam or one of yours), got {cls!r:.80}"
        )
    if cls._update is Optimizer._update and cls.step is Optimizer.step:
        # (constructed, it failed at every step on every owner: NotImplementedError)
        raise TypeError(
            f"optimizer_class {cls.__qualname__} has no update: it defines neither "
            f"_update(p, g, data) nor step ({BASE_CLASS_HINT})"
        )
    if inspect.iscoroutinefunction(cls.step):
        # (the owners call it plainly: its coroutine was dropped unrun, every step
        # changed nothing; its user may await it, so Optimizer itself takes it)
        raise TypeError(
            f"optimizer_class {cls.__qualname__}'s step is a coroutine function (async def): "
            "the owners of a DistributedOptimizer's parameters call it without an await"
        )
    qual = getattr(cls, "__qualname__", "")
    try:
        if "<locals>" in qual:
            raise TypeError("defined inside a function")
        return fn_spec(cls)
    except TypeError as exc:
        raise TypeError(
            f"optimizer_class must be a module-level class (e.g. ag.optim.SGD), got {cls!r}: {exc}"
        ) from None


async def _local_optimizer(
    class_spec: str | list[Any], params: list[RRef], options: dict[str, Any], indices: list[int]
) -> _LocalOptimizer:
    """An owner's local optimizer (async: the class is resolved on the worker's loop,
    where the runtime resolves the functions it calls; by a plain "module:Class" import,
    a class of the driver's script was looked up in the owner's own ``__main__``)."""
    if (
        type(params) is not list
        or not all(isinstance(p, RRef) for p in params)
        or type(options) is not dict
        or not int_list(indices)
        or len(indices) != len(params)
    ):
        # (each was used as it came: "'int' object has no attribute 'local_value'",
        # "argument after ** must be a mapping", "zip() argument 2 is shorter ...")
        raise ProtocolError(
            f"malformed optimizer construction: params {short_repr(params)}, options "
            f"{short_repr(options)}, indices {short_repr(indices)}"
        )
    return _LocalOptimizer(resolve(class_spec), params, options, indices)


class _LocalOptimizer:
    """Lives on a parameter owner; steps its local optimizer with a context's gradients."""

    def __init__(
        self,
        cls: type[Optimizer],
        params: list[RRef],
        options: dict[str, Any],
        indices: list[int] | None = None,
    ) -> None:
        self.params: list[Tensor] = [p.local_value() for p in params]
        # (errors name each parameter by its place in the caller's list: ``indices``;
        # the local optimizer would name its place among this owner's)
        where = self.indices = indices if indices is not None else list(range(len(params)))
        self.stage_token: int | None = None  # (of the load staged here for it, see _Stages)
        seen: dict[int, int] = {}
        for i, p in zip(where, self.params, strict=True):
            if not isinstance(p, Tensor):
                many = ""
                if isinstance(p, list | tuple | dict):
                    many = " (give an RRef of each of its tensors)"
                raise TypeError(
                    f"params[{i}] refers to a {type(p).__name__}, not an actorgrad Tensor{many}"
                )
            if not p.is_leaf:
                raise ValueError(
                    f"params[{i}] refers to a non-leaf tensor (an op's output): updating it "
                    "changes no parameter; give the leaf itself"
                )
            if p.data.dtype.kind != "f":
                raise TypeError(
                    f"params[{i}] refers to a tensor of dtype {p.data.dtype}; parameters "
                    "must have a floating point dtype"
                )
            first = seen.setdefault(id(p), i)
            if first != i:
                raise ValueError(
                    f"params[{i}] refers to the same tensor as params[{first}]; give each "
                    "parameter once"
                )
        self.optim = cls(self.params, **options)

    def step(self, context_id: int, hyper: dict[str, Any] | None = None) -> int:
        """Step with ``context_id``'s gradients here, after setting the hyperparameters
        in ``hyper`` (those the caller's ``param_groups`` changed since this owner's
        optimizer last had them); returns how many parameters got a gradient."""
        if hyper is not None:
            names = self.optim._hyperparameters()
            if type(hyper) is not dict or not all(k in names for k in hyper):
                raise ProtocolError(f"malformed hyperparameters {short_repr(hyper)} for a step")
        grads = get_gradients(context_id)
        mine: dict[Tensor, np.ndarray] = {}
        for i, p in zip(self.indices, self.params, strict=True):
            g = grads.get(p)
            if g is None or is_unused(g):
                continue
            if g.shape != p.data.shape:
                # (the local optimizer refuses it too, but names the parameter by its
                # place among this owner's: params[1] was "parameter 0")
                raise ValueError(
                    f"step: the gradient of params[{i}] in context {context_id:#x} has shape "
                    f"{g.shape}, the parameter {p.data.shape} (its array was replaced after "
                    "the forward pass)"
                )
            mine[p] = g
        # One step at a time on this owner, as PyTorch's: a long step runs in the
        # worker's thread pool, and two at once (two trainers) lost updates. The
        # hyperparameters are set under the same hold, once the gradients are checked:
        # set apart, another trainer's step could set its own in between (this step
        # ran with them), and a step refused here (a released context) kept them.
        with _STEP_LOCK:
            if hyper is not None:
                for k, v in hyper.items():
                    setattr(self.optim, k, v)
            if mine:
                self.optim.step(grads=mine)
        return len(mine)

    def state_dict(self) -> dict[str, Any]:
        with _STEP_LOCK:  # (not a copy of a step half made)
            return self.optim.state_dict()

    async def stage(self, token: int, driver: str, state: dict[str, Any]) -> None:
        """Check this owner's part of a load, as ``load_state_dict`` would (raises what
        it refuses, nothing changed), and keep it as it would be loaded under ``token``
        until ``commit(token)`` or ``abort(token)`` (or its driver's loss, or
        ``STAGE_TIMEOUT``; see ``_Stages``). A load staged here for this optimizer
        before is dropped: one staged state per optimizer."""
        worker = current_worker()
        stages = _stages_of(worker)
        driver_id = caller_id(driver)  # (the driver's process: see _driver_lost)
        # (in the thread pool: it reads every array, and copies those it casts. The
        # others it keeps: they came in the call's message, decoded into memory of
        # their own, which nothing else holds; all copied where one is cast, see
        # Optimizer._loadable)
        check = functools.partial(self.optim._loadable, state, adopt=True)
        hyper, loaded = await worker.offload(check)
        if token in stages.gone:  # (its abort came while it was checked)
            raise ValueError(f"load_state_dict: load {token:#x} was aborted while checked")
        if (worker.is_lost(driver) or worker.dropped_by(driver) is not None) and _driver_lost(
            worker, driver, driver_id
        ):
            # (its loss was reported while it was checked: kept, it stayed until expiry)
            raise WorkerLost(
                f"load_state_dict: load {token:#x}: its driver, worker {driver!r}, was lost "
                f"while worker {worker.name!r} checked it ({worker.lost_cause(driver)})"
            )
        stages.put(token, self, driver, hyper, loaded, driver_id)

    async def commit(self, token: int) -> None:
        """Load the state staged under ``token`` (ValueError naming it if none is)."""
        worker = current_worker()
        staged = _stages_of(worker).take(token, self)
        await worker.offload(functools.partial(self._load, staged.hyper, staged.loaded))

    async def abort(self, token: int) -> None:
        """Drop the state staged under ``token``, if any (a coroutine: the stages
        change on the loop only)."""
        _stages_of(current_worker()).drop(token, "it was aborted")

    def _load(self, hyper: dict[str, Any], loaded: dict[Tensor, dict[str, Any]]) -> None:
        with _STEP_LOCK:
            # What can have changed since the check is the parameters' arrays: a step
            # gives each a new one (of its shape and dtype), user code may give one of
            # another. The state of one that changed is fitted to it again (as the
            # check did: cast, or refused naming its shape), the others' taken as is;
            # unless one changed: then all are copied, as _loadable does when one is
            # cast (the arrays kept as they came hold the message's buffer, with the
            # bytes of the one cast).
            spec = type(self.optim).STATE_KEYS or {}
            if any(
                spec.get(k) == "param" and (v.shape, v.dtype) != (p.data.shape, p.data.dtype)
                for p, entry in loaded.items()
                for k, v in entry.items()
            ):
                for j, p in enumerate(self.params):
                    entry = loaded.get(p)
                    if entry is not None:
                        loaded[p] = self.optim._fitted(entry, p, f"state[{self.indices[j]}]")
            self.optim._load(hyper, loaded)


def _driver_lost(worker: Worker, driver: str, driver_id: int | None) -> bool:
    """Whether a loss of worker ``driver`` reported to ``worker`` (by name) is that of
    the process that drove a load there, of cluster id ``driver_id`` (None: not known,
    taken as that one): no commit or abort will come from it.

    A process that joined under the name of one that left can stage a load on an owner
    before the owner reads the head's word of the leave (its link to the head slower
    than the new one's): taken by its name, that leave dropped the new driver's part,
    whose commit then failed ("its driver ... was lost") after the other owners had
    loaded theirs. The loss is the driver's when its process left the cluster, when the
    driver dropped this worker, or when that process is the member of the name here
    (a broken connection, or silence, reports the member's loss only)."""
    if driver_id is None:
        return True
    if worker.left_cluster(driver, driver_id) or worker.dropped_by(driver) is not None:
        return True
    member = worker.members.get(driver)
    return member is not None and member[0] == driver_id


class _Staged:
    """A load's checked part on one owner, waiting for its commit or abort."""

    __slots__ = ("driver", "driver_id", "hyper", "loaded", "nbytes", "optimizer", "timer")

    def __init__(
        self,
        optimizer: weakref.ref[_LocalOptimizer],
        driver: str,
        driver_id: int | None,
        hyper: dict[str, Any],
        loaded: dict[Tensor, dict[str, Any]],
    ) -> None:
        # (weakly: held here, an optimizer whose RRef was released with a load staged
        # for it lived on, with its state, until that load expired; see _Stages.put)
        self.optimizer = optimizer
        self.driver = driver  # (the worker that staged it: its loss drops it)
        self.driver_id = driver_id  # (its process, where known: see _driver_lost)
        self.hyper = hyper
        self.loaded = loaded
        self.nbytes = sum(
            v.nbytes for e in loaded.values() for v in e.values() if isinstance(v, np.ndarray)
        )
        self.timer: asyncio.TimerHandle | None = None


class _Stages:
    """The loads staged on one worker (``worker.ext["optim_stages"]``), by token, and
    why the last ``STAGE_MEMORY`` tokens gone went. Changed on the worker's loop only
    (``stage``, ``commit`` and ``abort`` are coroutines; the check and the load run in
    the thread pool, outside)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.staged: dict[int, _Staged] = {}
        self.gone: collections.OrderedDict[int, str] = collections.OrderedDict()

    def put(
        self,
        token: int,
        optimizer: _LocalOptimizer,
        driver: str,
        hyper: dict[str, Any],
        loaded: dict[Tensor, dict[str, Any]],
        driver_id: int | None = None,
    ) -> None:
        """Keep ``optimizer``'s checked part of load ``token`` from ``driver`` (its
        process ``driver_id``, where known)."""
        # A second load of an optimizer replaces the first: refused instead, a load whose
        # driver was cancelled between its rounds (its abort lost) blocked every later
        # one until it expired.
        old = optimizer.stage_token
        if old is not None:
            self.drop(old, f"a later load ({token:#x}) of the same optimizer replaced it")
        loop = self.worker.loop

        def released(_: Any) -> None:
            # (no commit can come once its RRef is released. Called where the optimizer
            # goes, by the collector maybe, in any thread: the stages change on the loop)
            try:
                loop.call_soon_threadsafe(self.drop, token, "its optimizer was released")
            except RuntimeError:
                # (the loop closed, the stages with it: nothing to drop. Caught, as
                # rref._release does, not checked before: it may close between the two,
                # and the error was printed as "Exception ignored in ... released")
                pass

        staged = _Staged(weakref.ref(optimizer, released), driver, driver_id, hyper, loaded)
        self.staged[token] = staged
        optimizer.stage_token = token
        staged.timer = self.worker.loop.call_later(
            STAGE_TIMEOUT,
            self.drop,
            token,
            f"it expired: no commit came within {STAGE_TIMEOUT:g} s of its check",
        )

    def take(self, token: int, optimizer: _LocalOptimizer) -> _Staged:
        """The state staged under ``token`` for ``optimizer``, no longer staged."""
        staged = self.staged.get(token)
        if staged is None or staged.optimizer() is not optimizer:
            why = self.gone.get(token) or (
                "it was staged for another optimizer"
                if staged is not None
                else "no load of that token was staged here"
            )
            raise ValueError(
                f"load_state_dict: no state staged under token {token:#x} on worker "
                f"{self.worker.name!r} to commit: {why}"
            )
        self.drop(token, "a commit took it already")
        return staged

    def drop(self, token: int, why: str) -> None:
        """Forget the state staged under ``token`` (if any), remembering ``why``."""
        staged = self.staged.pop(token, None)
        if staged is not None:
            if staged.timer is not None:
                staged.timer.cancel()
            optimizer = staged.optimizer()
            if optimizer is not None and optimizer.stage_token == token:
                optimizer.stage_token = None
        if token not in self.gone:  # (the first reason stays: it is the one that counts)
            self.gone[token] = why
            if len(self.gone) > STAGE_MEMORY:
                self.gone.popitem(last=False)

    def peer_lost(self, name: str) -> None:
        # As the contexts a lost initiator held here (dist.context's lease): no commit
        # or abort will come from a lost driver. (One lost to this worker only, that
        # lives on, finds its commit refused, naming the cause.)
        # (Not another process of its name that staged a load since: see _driver_lost.)
        why = f"its driver, worker {name!r}, was lost ({self.worker.lost_cause(name)})"
        for token in [
            t
            for t, s in self.staged.items()
            if s.driver == name and _driver_lost(self.worker, name, s.driver_id)
        ]:
            self.drop(token, why)

    def stats(self) -> dict[str, int]:
        # (a snapshot first, in one C call: debug_info may run in a pool thread)
        staged = list(self.staged.values())
        return {
            "num_staged_loads": len(staged),
            "staged_load_bytes": sum(s.nbytes for s in staged),
        }


def _stages_of(worker: Worker) -> _Stages:
    """The loads staged on ``worker``, the table made (and hooked to the worker's peer
    losses) on first use."""
    stages = worker.ext.get("optim_stages")
    if stages is None:
        stages = worker.ext["optim_stages"] = _Stages(worker)
        worker.add_peer_lost_callback(stages.peer_lost)
        worker.add_status_provider("optim_stages", stages.stats)
    return stages


def staged_stats(worker: Worker) -> dict[str, int]:
    """``num_staged_loads`` and ``staged_load_bytes`` of ``worker`` (for debug_info)."""
    stages = worker.ext.get("optim_stages")
    return stages.stats() if stages is not None else {"num_staged_loads": 0, "staged_load_bytes": 0}


class DistributedOptimizer:
    """Applies a distributed autograd context's gradients on each parameter's owner.

    Parameters are grouped by owner; each owner gets one ``optimizer_class`` instance
    (created on the first ``step``) holding its parameters. ``step(ctx)`` runs every
    owner's local step concurrently, with the gradients that owner accumulated in
    ``ctx``; parameters without a gradient in ``ctx`` are left as they are, and so are
    those a backward pass reached without giving them any (their output went unused:
    ``get_gradients`` reports zeros for them, a local step would see ``.grad`` None).
    Steps on one owner run one at a time (several trainers stepping at once lose no
    update),
    and each gives the parameters new arrays (see ``ag.optim.Optimizer.step``): a
    trainer whose forward pass ran before another's step gets the gradients of the
    values its forward pass used.

    ``state_dict()``/``load_state_dict()`` (awaited) save and restore every owner's
    optimizer state, keyed by each parameter's place in ``params``.

    ``param_groups`` holds the hyperparameters as ``torch.optim``'s does (one group, no
    ``"params"`` entry): set a value there, a learning-rate schedule's say, and the
    next ``step`` checks it on the caller (raising what the optimizer's constructor
    would, before any owner changes) and takes it to every owner with its step (no
    message of its own). ``state_dict()`` shows it, ``load_state_dict()`` replaces it.

    Raises:
        TypeError: ``params`` holds something other than ``RRef``s, or
            ``optimizer_class`` is not a module-level ``ag.optim.Optimizer`` subclass, or
            the options do not fit it.
        ValueError: ``params`` is empty, holds one RRef twice, or an RRef held by a
            worker that has shut down (kept from a cluster left since).
        RemoteError: constructing or stepping failed on an owner (names the owner).
        ContextError: ``step`` of a context an owner does not know (released, or not a
            context id; a step made inside the context reaches every owner).

    Example::

        opt = ag.dist.DistributedOptimizer(ag.optim.SGD, [w1_ref, w2_ref], lr=0.05)
        async with ag.dist.context() as ctx:
            loss = await forward(ctx)
            await ag.dist.backward(ctx, [loss])
            await opt.step(ctx)
        for g in opt.param_groups:   # from the next step on, on every owner
            g["lr"] = 0.01
    """

    def __init__(
        self, optimizer_class: type[Optimizer], params: Sequence[RRef], **options: Any
    ) -> None:
        self._class_spec = _class_spec(optimizer_class)
        self._class_name = f"{optimizer_class.__module__}.{optimizer_class.__qualname__}"
        if isinstance(params, RRef):
            raise TypeError(
                "params must be a list of RRefs, one per parameter tensor, got one RRef "
                "(of one tensor: pass [rref]; of a model or a list: make the list on its "
                "owner, [ag.RRef(p) for p in model.parameters()])"
            )
        try:
            params = list(params)
        except TypeError:  # (None, a number: "'NoneType' object is not iterable")
            raise TypeError(
                f"params must be a list of RRefs, one per parameter tensor, got {params!r:.80}"
            ) from None
        if not params:
            raise ValueError("DistributedOptimizer needs at least one parameter RRef")
        self._by_owner: dict[str, list[RRef]] = {}
        self._indices: dict[str, list[int]] = {}  # per owner: places in ``params``
        seen: dict[tuple[str, Any], int] = {}
        for i, p in enumerate(params):
            if not isinstance(p, RRef):
                raise TypeError(
                    f"params[{i}] is a {type(p).__name__}, not an ag.RRef (make one on the "
                    "parameter's owner: ag.RRef(tensor))"
                )
            if p._worker.closed:
                # (kept from a cluster left, in a notebook say: its first step failed with
                # WorkerLost, as if a worker of the running cluster had been lost)
                raise ValueError(
                    f"params[{i}] is {p!r}, held by a worker that has shut down (of a "
                    "cluster left since?): an RRef does not outlive the worker that holds "
                    "it; make the parameter RRefs in the running cluster"
                )
            first = seen.setdefault((p.owner, p._rid), i)
            if first != i:  # (it would be stepped once per appearance)
                raise ValueError(
                    f"params[{i}] is the same RRef as params[{first}]; give each parameter once"
                )
            self._by_owner.setdefault(p.owner, []).append(p)
            self._indices.setdefault(p.owner, []).append(i)
        # Surface option mistakes here, not on the first remote step. (Kept: it checks
        # a state dict on the caller, before load_state_dict changes any owner.)
        try:
            self._probe = optimizer_class(
                [Tensor(np.zeros(1, dtype=np.float32), requires_grad=True)], **options
            )
        except Exception as exc:
            # (a class that refuses the stand-in itself, not the options, said nothing
            # of it: its error named none of the caller's parameters)
            given = ", ".join(f"{k}={short_repr(v)}" for k, v in options.items())
            exc.add_note(
                f"DistributedOptimizer: raised by {optimizer_class.__qualname__}([stand_in]"
                f"{', ' + given if given else ''}), made on the caller to check the options "
                "before any owner makes one: stand_in is a float32 Tensor of shape (1,), "
                "not one of params"
            )
            raise
        self._num_params = len(params)
        try:
            wire.encode_frame([], options, where="options")
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the optimizer options cannot travel to the owners: {exc}") from None
        self._options = options
        # The hyperparameters, laid out as torch.optim's ``param_groups`` (one group,
        # without "params"): what the user changes there (a learning-rate schedule,
        # ``for g in opt.param_groups: g["lr"] = lr``) goes to each owner with the next
        # step, checked on the caller first. ``_had``: per owner, the values its
        # optimizer has as far as this one knows (from its construction's options, a
        # step that reached it, or a load).
        self._made_with = self._hyper_of(self._probe)
        # (copies: a value changed in place in param_groups, a list a subclass keeps,
        # changed what the owners are taken to have too)
        self.param_groups: list[dict[str, Any]] = [copy.deepcopy(self._made_with)]
        self._had: dict[str, dict[str, Any]] = {}
        # (per owner: its steps running, and how many ever started; a step that ran
        # beside another of this optimizer there cannot tell which set the values last)
        self._stepping: collections.Counter[str] = collections.Counter()
        self._started: collections.Counter[str] = collections.Counter()
        # (the last change of param_groups checked, and the hyperparameters it makes:
        # checked once, not at every step)
        self._checked: tuple[dict[str, Any], dict[str, Any]] | None = None
        # per owner, its optimizer (made at the first step that reaches it)
        self._remote: dict[str, RRef] = {}
        self._setup_lock: asyncio.Lock | None = None
        # (one load at a time: an owner keeps one staged load per optimizer, so a
        # second load's first round replaced the first's part, whose commit then failed,
        # or each load was committed on some owners)
        self._load_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        owners = {o: len(ps) for o, ps in self._by_owner.items()}
        return f"DistributedOptimizer({self._class_name}, params_per_owner={owners})"

    @staticmethod
    def _hyper_of(opt: Optimizer) -> dict[str, Any]:
        return {k: getattr(opt, k) for k in opt._hyperparameters()}

    def _groups_checked(self) -> dict[str, Any]:
        """``param_groups[0]``'s hyperparameters, checked as the optimizer's
        constructor checks them (on the caller, before any owner changes), and able to
        travel: TypeError/ValueError naming what is wrong."""
        groups = self.param_groups
        if type(groups) is not list or len(groups) != 1 or not isinstance(groups[0], dict):
            raise TypeError(
                "param_groups must be a list of one dict of hyperparameters (one group: "
                f"set values in it, param_groups[0]['lr'] = lr), got {short_repr(groups)}"
            )
        group = groups[0]
        names = self._made_with
        unknown = sorted(str(k) for k in group if k not in names)
        missing = sorted(k for k in names if k not in group)
        if unknown or missing:
            raise ValueError(
                f"param_groups[0] must hold the hyperparameters {sorted(names)} of "
                f"{self._class_name}: "
                + "; ".join(
                    f"{what} {', '.join(map(repr, keys))}"
                    for what, keys in (("unknown:", unknown), ("missing:", missing))
                    if keys
                )
            )
        changed = {k: v for k, v in group.items() if not _same(v, self._made_with[k])}
        if not changed:
            return self._made_with
        checked = self._checked
        if checked is None or not _all_same(checked[0], changed):
            try:
                # (a base class's hyperparameter the class sets itself is left out of
                # the check, but changed all the same, as load_state_dict loads it)
                probe, unchecked = _made_leaving_out_twice(
                    type(self._probe),
                    [Tensor(np.zeros(1, dtype=np.float32), requires_grad=True)],
                    {**self._options, **changed},
                    changed,
                )
                # (as the optimizer keeps them: Adam's betas given as a list, a tuple)
                made = {**self._hyper_of(probe), **unchecked}
                wire.encode_frame([], made, where="param_groups[0]")
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"param_groups[0]: {exc}") from None
            # (a deep copy: kept as they are in param_groups, a change made in place
            # there, in a list, changed the kept one too, and was taken as checked)
            checked = self._checked = (copy.deepcopy(changed), made)
        return checked[1]

    async def _setup(self) -> dict[str, RRef | BaseException]:
        """Each owner's optimizer, made there if not yet; or why it could not be (then
        tried again at the next step). (All of them settle: a dead owner at the first
        step failed it before any other owner stepped, with no note, where at a later
        step the others step and the note names them.)"""
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        failed: dict[str, BaseException] = {}
        async with self._setup_lock:
            missing = [o for o in self._by_owner if o not in self._remote]
            if missing:
                made = await asyncio.gather(
                    *(
                        remote(
                            o,
                            _local_optimizer,
                            (self._class_spec, self._by_owner[o], self._options, self._indices[o]),
                        )
                        for o in missing
                    ),
                    return_exceptions=True,
                )
                for o, r in zip(missing, made, strict=True):
                    if isinstance(r, RRef):
                        self._remote[o] = r
                        self._had[o] = dict(self._made_with)
                    else:
                        failed[o] = r
        return {o: failed.get(o) or self._remote[o] for o in self._by_owner}

    async def step(self, context_id: int) -> None:
        """Step every owner's optimizer with the gradients of ``context_id``.

        Not atomic across owners (one call each, at the same time): when it fails on
        some owners, the others have stepped. It returns or raises only once every
        owner's step ended; the error raised is the first owner's (in the order of
        ``params``), with a note naming the owners that stepped and the other failures.
        A step cancelled (a timeout around it) may have run on every owner, on some or on
        none: an owner's step that started runs to its end (one in the owner's thread
        pool cannot be stopped), and the cancellation does not say which did; do not
        simply retry it (``state_dict()`` shows Adam's step counts).

        Example::

            opt = ag.dist.DistributedOptimizer(ag.optim.SGD, [w1_ref, w2_ref], lr=0.05)
            async with ag.dist.context() as ctx:
                loss = await forward(ctx)
                await ag.dist.backward(ctx, [loss])
                await opt.step(ctx)     # inside: a released context raises ContextError
        """
        context_id = as_context_id(context_id)  # (it travels: a numpy integer would not)
        if not 0 <= context_id < 1 << 64:
            # (no context has it: one that does not fit in 64 bits failed as every
            # owner's TypeError, "cannot send int", though none was reached)
            raise ContextError(
                f"unknown distributed autograd context {context_id:#x}: no context has that "
                "id (an int of 64 bits, >= 0, that `async with ag.dist.context() as ctx` gives)"
            )
        # (a context this worker opened and left: every owner refused it, each naming
        # itself, "unknown or released ... on worker 'w1'", as if w1 had lost it)
        state_of(current_worker()).check_not_left_here(context_id)
        hyper = self._groups_checked()
        refs = await self._setup()
        owners = list(refs)
        # (an owner not in _had: what its optimizer has is not known, it gets them all)
        news = [_changes(self._had.get(o), hyper) for o in owners]
        alone = {o: not self._stepping[o] for o in owners}
        started = dict(self._started)
        self._stepping.update(owners)
        self._started.update(owners)
        results: list[Any] | None = None
        try:
            # (all of them settle first: raising at the first failure left the user
            # looking at parameters other owners were still changing, and hid their
            # failures)
            results = await asyncio.gather(
                *(_stepped(r, context_id, n) for r, n in zip(refs.values(), news, strict=True)),
                return_exceptions=True,
            )
        finally:
            self._stepping.subtract(owners)
            for i, (o, n) in enumerate(zip(owners, news, strict=True)):
                r = results[i] if results is not None else None
                if not alone[o] or self._started[o] != started.get(o, 0) + 1:
                    # Another step of this optimizer ran there meanwhile: which one's
                    # values the owner set last, their replies do not tell.
                    self._had.pop(o, None)
                elif n is None:
                    pass  # (nothing sent: it has what it had)
                elif results is None or isinstance(r, BaseException):
                    # Failed (after setting them, or lost once it had: "may have run"),
                    # or cancelled: it may have them or not. Taken as not, and the
                    # values put back in param_groups meanwhile were not sent (it kept
                    # those of the failed step).
                    self._had.pop(o, None)
                else:
                    self._had[o] = hyper
        assert results is not None
        try:
            _raise_failures(
                f"step of context {context_id:#x}",
                owners,
                results,
                "stepped",
                convert=_step_error,
                # (an owner lost before its reply came may have stepped, the reply being
                # what got lost: "failed on" it invited a retry that stepped it twice)
                lost_note=("its step", "their steps"),
                # (an owner whose optimizer could not be made was sent no step: a lost
                # one, gone before, was said to have maybe stepped, where none was there)
                unsent={o for o, r in refs.items() if isinstance(r, BaseException)},
            )
        except BaseException:
            del results, refs  # (see _raise_failures)
            raise

    async def state_dict(self) -> dict[str, Any]:
        """Every owner's optimizer state, gathered (one call per owner, all at once),
        laid out as one local optimizer's over the whole ``params`` list would be
        (``ag.optim.Optimizer.state_dict``): ``{"state": {index: {...}}, "param_groups":
        [{hyperparameters..., "params": [0, ..., len(params) - 1]}]}``, each parameter
        named by its index in ``params``, not by its RRef or owner (after a restart the
        RRefs differ; their order is what a new DistributedOptimizer is given again).
        Save it (with the model's parameters) and load it into a DistributedOptimizer
        made over the same list, in the same order, in this cluster or a new one.

        Take it between steps: a step running meanwhile may be in it on some owners and
        not on others. It makes the owners' optimizers if no step has yet. An owner that
        fails it (a ``WorkerLost``, a ``RemoteError``) makes it raise, once every owner
        answered, the first one's error with a note naming the others'.

        Example::

            sd = await opt.state_dict()   # {"state": {i: {...}}, "param_groups": [...]}
            # saved with the model's state_dict(); later, in a new cluster, the
            # parameters restored from it and refs to them in the same order:
            opt = ag.dist.DistributedOptimizer(ag.optim.Adam, refs, lr=1e-3)
            await opt.load_state_dict(sd)
        """
        # (a change in param_groups not stepped yet is the optimizer's all the same)
        current = self._groups_checked()
        refs = await self._setup()
        results = await asyncio.gather(
            *(_called(r, "state_dict") for r in refs.values()), return_exceptions=True
        )
        try:
            _raise_failures("state_dict", list(refs), results, "answered")
        except BaseException:
            # (the error's traceback holds this frame: with results, the error among
            # them, and refs in it, a cycle kept the owners' optimizer RRefs until a
            # garbage collection, as step's did)
            del results, refs
            raise
        state: dict[int, dict[str, Any]] = {}
        group: dict[str, Any] = {}
        for owner, sd in zip(refs, results, strict=True):
            assert isinstance(sd, dict)  # (failures raised above)
            where = self._indices[owner]
            for j, entry in sd["state"].items():
                state[where[j]] = entry
            group = group or {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
        # (plain, as each owner's are: a numpy scalar of a schedule as a Python number)
        group.update({k: _plain(v) for k, v in current.items()})
        group["params"] = list(range(self._num_params))
        return {"state": dict(sorted(state.items())), "param_groups": [group]}

    async def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state of ``state_dict()`` into every owner's optimizer (one call per
        owner, all at once), each owner getting the state of its parameters, matched
        by their index in ``params``; the hyperparameters it holds apply everywhere
        (and, once every owner loaded, to owners' optimizers made later).

        What can be checked without the parameters is checked here, before any owner
        changes (``ag.optim.Optimizer.load_state_dict`` raises the same errors): another
        number of parameters than ``params``, another optimizer class's
        hyperparameters or state, missing keys, values of the wrong type.
        Each owner checks the shapes of its parameters' state before changing its own:
        one that refuses (a ``RemoteError`` naming ``state[i]``) or is lost
        (``WorkerLost``) makes it raise once every owner answered, the first one's
        error, with a note naming the others. Every owner checks its part before any
        loads: a state one of them refuses is loaded nowhere. Only an owner lost between
        the check and the load leaves the others loaded (the note names those). A load
        cancelled (a timeout around it) during the check is dropped everywhere; once
        the second calls went out, the owners may have loaded it, each or some, and the
        cancellation does not say which: load the state again.

        Each owner's part crosses the network once: the owner keeps it, checked (its
        arrays as they came; all copied where one is cast to its parameter's dtype),
        until every owner has answered, then loads it at a second call that carries
        only a token naming the load, or drops it (one refused or was lost). Meanwhile
        each owner holds its old state and the new one. What an owner kept goes also
        when this worker is lost to it, when a later load of the same optimizer reaches
        it (that one replaces it), and ``actorgrad.dist.optimizer.STAGE_TIMEOUT`` (300)
        s after it was kept if no second call came (a first round that took longer than
        0.9 x that loads nowhere: TimeoutError); ``ag.dist.debug_info()`` counts what
        a worker keeps (``num_staged_loads``, ``staged_load_bytes``). Two loads at once
        run one after the other, in the order they were called. Of what the check
        looked at, only the parameters' arrays can change before the second call: one
        of another shape (user code) makes its owner refuse it, one of another dtype
        gets its state cast to it.

        Example::

            opt = ag.dist.DistributedOptimizer(ag.optim.SGD, refs, lr=0.1, momentum=0.9)
            await opt.load_state_dict(saved)   # (saved = await old_opt.state_dict())
        """
        hyper, entries, _ = self._probe._checked_state_dict(state, self._num_params)
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            await self._load(hyper, entries)

    async def _load(self, hyper: dict[str, Any], entries: list[dict[str, Any] | None]) -> None:
        """``load_state_dict``'s two rounds, ``state`` checked (its ``hyper`` and
        ``entries``, one per parameter)."""
        refs = await self._setup()
        parts = []
        for owner in refs:
            where = self._indices[owner]
            # (keyed by their places in ``params``: an owner's errors name state[i] as
            # the caller's state dict does)
            mine = {i: e for i in where if (e := entries[i]) is not None}
            group = {**hyper, "params": list(where)}
            parts.append({"state": mine, "param_groups": [group]})
        # Two rounds: each owner checks its part first (the shapes only it knows), and
        # the state is loaded only once none refused: a state one owner refused was
        # loaded on the others, the optimizers left half in one state, half in another.
        # The part crosses once: the owner keeps it, checked, under the token, and the
        # second round sends only the token (the part sent again, a 256 MiB Adam state
        # over 3 owners took 2x the traffic and the owners' decode and check twice).
        # (An owner lost between the rounds still leaves the others loaded.)
        token = secrets.randbits(63)  # (names this load on the owners: no other's)
        # (per owner: whether no step of this optimizer ran there as the commits went
        # out, and how many had started by then: see the commits below)
        alone: dict[str, bool] = {}
        steps_before: dict[str, int] = {}
        me = current_worker().name
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            results = await asyncio.gather(
                *(
                    _called(r, "stage", token, me, sd)
                    for r, sd in zip(refs.values(), parts, strict=True)
                ),
                return_exceptions=True,
            )
            del parts  # (the caller's arrays: the owners have their part now)
            refused = any(isinstance(x, BaseException) for x in results)
            took = loop.time() - started
            if not refused and took > STAGE_TIMEOUT * 0.9:
                # An owner that kept its part early may have dropped it at its expiry, or
                # drop it before the commit comes, and refuse the commit after the others
                # loaded: a round this slow (a big part on a slow link) loads nowhere. (The
                # last tenth: for the commits to arrive.)
                await _aborted(list(refs.values()), token)
                del results, refs
                raise TimeoutError(
                    f"load_state_dict: the owners took {took:.0f} s to check their parts, "
                    f"past 0.9 x STAGE_TIMEOUT ({STAGE_TIMEOUT:g} s, how long an owner keeps "
                    "its part): one that kept its part early could have dropped it before "
                    "its commit; nothing loaded (raise actorgrad.dist.optimizer.STAGE_TIMEOUT "
                    "on every worker)"
                )
            if refused:
                # (where a part was staged it goes now, not at its expiry; an owner lost
                # meanwhile lost it with its process, or drops it at this driver's loss)
                staged = [r for r, x in zip(refs.values(), results, strict=True) if x is None]
                await _aborted(staged, token)
                del staged
            else:
                # A commit sets the hyperparameters on its owner as a step does, so it
                # counts as one of this optimizer's steps there (see step): a step that
                # reached an owner meanwhile may have set the values of param_groups
                # before the load was made, after the commit; taken as loaded there,
                # the owner kept stepping with them, unsent, while param_groups showed
                # the loaded ones.
                alone = {o: not self._stepping[o] for o in refs}
                steps_before = dict(self._started)
                owners = list(refs)  # (a list: a Counter adds a dict's values)
                self._stepping.update(owners)
                self._started.update(owners)
                try:
                    results = await asyncio.gather(
                        *(_called(r, "commit", token) for r in refs.values()),
                        return_exceptions=True,
                    )
                finally:
                    self._stepping.subtract(owners)
        except asyncio.CancelledError:
            # (the owners that staged it drop it at once, not at its expiry; those that
            # committed it, or never staged it, ignore the abort)
            current_worker().spawn(_aborted(list(refs.values()), token), name="abort-load")
            self._had.clear()  # (some may have loaded its hyperparameters: see below)
            raise
        try:
            done = "nothing loaded; checked" if refused else "loaded"
            _raise_failures("load_state_dict", list(refs), results, done)
        except BaseException:
            if not refused:
                # The owners that loaded have the state dict's hyperparameters, where
                # param_groups keeps the old ones (the load failed): taken as having
                # the old ones, they were sent nothing by the next steps, which ran
                # with the loaded ones. Not known now: the next step sends them all.
                self._had.clear()
            del results, refs  # (see state_dict)
            raise
        # (only now: owners' optimizers made later take these; after a failed load the
        # old ones stand, as on the owners that did not load)
        self._options = {**self._options, **hyper}
        loaded = {k: v for k, v in hyper.items() if k in self._made_with}
        self._made_with = {**self._made_with, **loaded}
        self.param_groups = [copy.deepcopy(self._made_with)]
        self._checked = None
        for o in refs:
            if alone.get(o, False) and self._started[o] == steps_before.get(o, 0) + 1:
                self._had[o] = dict(self._made_with)
            else:  # (a step ran there meanwhile: not known; the next step sends them all)
                self._had.pop(o, None)


async def _aborted(refs: list[RRef | BaseException], token: int) -> None:
    """Abort load ``token`` on every owner (those that never staged it ignore it)."""
    await asyncio.gather(*(_called(r, "abort", token) for r in refs), return_exceptions=True)


async def _called(ref: RRef | BaseException, method: str, *args: Any) -> Any:
    """``method`` of the owner's optimizer ``ref`` (or the failure to make it)."""
    if isinstance(ref, BaseException):
        raise ref
    return await getattr(ref.rpc(), method)(*args)


def _raise_failures(
    what: str,
    owners: list[str],
    results: list[Any],
    done: str,
    *,
    convert: Callable[[BaseException], BaseException] | None = None,
    lost_note: tuple[str, str] | None = None,
    unsent: Collection[str] = (),
) -> None:
    """Raise the first owner's failure among ``results`` (one per owner; ``convert``ed
    first), with a note naming the owners that ``done`` (stepped, answered, loaded), those
    that gave no answer (``lost_note``: what of one, of several, may have run or not;
    not those of ``unsent``, which were sent nothing: they failed) and the others'
    failures."""
    failed = [(o, r) for o, r in zip(owners, results, strict=True) if isinstance(r, BaseException)]
    if not failed:
        return
    ok = [o for o, r in zip(owners, results, strict=True) if not isinstance(r, BaseException)]
    lost = [o for o, r in failed if o not in unsent and isinstance(r, (WorkerLost, TimeoutError))]
    said = [o for o, _ in failed if o not in lost]
    parts = [f"failed on {', '.join(repr(o) for o in said)}"] if said else []
    if lost:
        part = f"no answer from {', '.join(repr(o) for o in lost)}"
        if lost_note is not None:
            part += f" ({lost_note[len(lost) > 1]} may have run or not)"
        parts.append(part)
    parts.append(f"{done} on {', '.join(repr(o) for o in ok) or 'no owner'}")
    errors = [exc if convert is None else convert(exc) for _, exc in failed]
    first = errors[0]
    note = f"DistributedOptimizer.{what}: " + "; ".join(parts)
    for (o, _), exc in zip(failed[1:], errors[1:], strict=True):
        note += f"\n  on {o!r} too: {type(exc).__name__}: {clip_text(str(exc), 500)}"
    first.add_note(note)
    try:
        raise first
    finally:
        # (the error's traceback holds this frame and its callers': their locals, the
        # owners' optimizer RRefs among them, were kept, in a cycle, until a garbage
        # collection)
        del first, errors, failed, results


def _same(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are the same (by type too: 1 and 1.0 are not,
    nor (0.9, 0.999) and [0.9, 0.999], since the optimizer keeps what it is given).
    Arrays (a subclass's hyperparameter) by dtype and values: ``a == b`` of two gave an
    array, whose truth failed every step ("ambiguous"). NaN is the same as NaN (else
    one was sent again at every step). What cannot be compared is taken as changed:
    sent again, which is harmless."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b) or bool(a != a and b != b)  # (NaN: unequal to itself)
    except Exception:
        return False


def _all_same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())


def _changes(had: dict[str, Any] | None, hyper: dict[str, Any]) -> dict[str, Any] | None:
    """The hyperparameters of ``hyper`` an owner whose optimizer has ``had`` lacks (all
    of them when what it has is not known: None)."""
    if had is None:
        return dict(hyper)
    new = {k: v for k, v in hyper.items() if not _same(v, had.get(k))}
    return new or None


@enable_grad()
async def _stepped(
    ref: RRef | BaseException, context_id: int, hyper: dict[str, Any] | None = None
) -> None:
    """The step of the owner of optimizer ``ref`` (or the failure to make it).

    With grad recording on: under ``no_grad`` a call goes out as outside its context,
    and an owner the context had not reached (none of its parameters used) did not know
    it and failed the step with "unknown or released context" (the others stepped). The
    call carries no tensor: nothing is recorded."""
    if isinstance(ref, BaseException):
        raise ref
    if hyper is None:
        await ref.rpc().step(context_id)
    else:
        await ref.rpc().step(context_id, hyper)


def _step_error(exc: BaseException) -> BaseException:
    """An owner's failure as ``step`` raises it: an owner that does not know the context
    (released, or not a context id) is the caller's mistake, raised as backward and
    get_gradients raise it, not as an error of the step's code."""
    if isinstance(exc, RemoteError) and refusal_type(exc.remote_type) is ContextError:
        return ContextError(exc.remote_message)
    return exc
