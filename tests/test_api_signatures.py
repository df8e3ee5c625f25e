"""Every callable of the public API contract (the project's API.md) has the signature
the contract gives it: parameter names, kinds (positional, keyword-only, *args,
**kwargs) and defaults, checked with ``inspect.signature``.

The contract lets the API grow where users would expect more: a callable may take
parameters the contract does not list, after its own and with defaults (so a call
written against the contract still works), and only those named in ``ADDITIONS``
(each documented where it is: docstrings, README)."""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest

import actorgrad as ag
from actorgrad.nn import functional as F

# name: (the object, its signature as the contract writes it)
CONTRACT: dict[str, tuple[Any, str]] = {
    # 1. tensors and local autograd
    "ag.tensor": (ag.tensor, "(data, *, dtype=None, requires_grad=False)"),
    "ag.zeros": (ag.zeros, "(*shape, dtype='float32', requires_grad=False)"),
    "ag.ones": (ag.ones, "(*shape, dtype='float32', requires_grad=False)"),
    "ag.randn": (ag.randn, "(*shape, dtype='float32', requires_grad=False, seed=None)"),
    "Tensor.numpy": (ag.Tensor.numpy, "(self)"),
    "Tensor.item": (ag.Tensor.item, "(self)"),
    "Tensor.detach": (ag.Tensor.detach, "(self)"),
    "Tensor.backward": (ag.Tensor.backward, "(self, gradient=None, retain_graph=False)"),
    "Tensor.register_hook": (ag.Tensor.register_hook, "(self, fn)"),
    "Tensor.sum": (ag.Tensor.sum, "(self, axis=None, keepdims=False)"),
    "Tensor.mean": (ag.Tensor.mean, "(self, axis=None, keepdims=False)"),
    "Tensor.max": (ag.Tensor.max, "(self, axis=None, keepdims=False)"),
    "Tensor.reshape": (ag.Tensor.reshape, "(self, *shape)"),
    "Tensor.transpose": (ag.Tensor.transpose, "(self, *axes)"),
    **{
        f"Tensor.{m}": (getattr(ag.Tensor, m), "(self)")
        for m in ("exp", "log", "sqrt", "abs", "relu", "tanh", "sigmoid")
    },
    "Tensor.softmax": (ag.Tensor.softmax, "(self, axis=-1)"),
    "Tensor.log_softmax": (ag.Tensor.log_softmax, "(self, axis=-1)"),
    "ag.matmul": (ag.matmul, "(a, b)"),
    "ag.cat": (ag.cat, "(tensors, axis=0)"),
    "ag.stack": (ag.stack, "(tensors, axis=0)"),
    "ag.split": (ag.split, "(t, split_size_or_sizes, axis=0)"),
    "ag.where": (ag.where, "(cond, a, b)"),
    "nn.Module.parameters": (ag.nn.Module.parameters, "(self)"),
    "nn.Module.named_parameters": (ag.nn.Module.named_parameters, "(self)"),
    "nn.Module.state_dict": (ag.nn.Module.state_dict, "(self)"),
    "nn.Module.load_state_dict": (ag.nn.Module.load_state_dict, "(self, state)"),
    "nn.Linear": (ag.nn.Linear, "(in_f, out_f, bias=True, seed=None)"),
    "nn.Embedding": (ag.nn.Embedding, "(num, dim, seed=None)"),
    "nn.Sequential": (ag.nn.Sequential, "(*mods)"),
    "nn.ReLU": (ag.nn.ReLU, "()"),
    "nn.Tanh": (ag.nn.Tanh, "()"),
    "nn.functional.cross_entropy": (F.cross_entropy, "(logits, targets)"),
    "nn.functional.mse_loss": (F.mse_loss, "(pred, target)"),
    "nn.functional.embedding": (F.embedding, "(ids, weight)"),
    "optim.SGD": (ag.optim.SGD, "(params, lr, momentum=0.0, weight_decay=0.0)"),
    "optim.Adam": (ag.optim.Adam, "(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)"),
    "optim.Optimizer.step": (ag.optim.Optimizer.step, "(self, grads=None)"),
    "optim.Optimizer.zero_grad": (ag.optim.Optimizer.zero_grad, "(self)"),
    # 2. runtime
    "ag.init": (ag.init, "(name, *, address=None, token=None, host='127.0.0.1', port=0)"),
    "ag.local_cluster": (
        ag.local_cluster,
        "(workers=2, *, processes=False, driver='driver', token=None)",
    ),
    "ag.rpc": (ag.rpc, "(to, fn, args=(), kwargs=None, *, timeout=None)"),
    "ag.remote": (ag.remote, "(to, fn, args=(), kwargs=None, *, timeout=None)"),
    "ag.RRef": (ag.RRef, "(value)"),
    "RRef.is_owner": (ag.RRef.is_owner, "(self)"),
    "RRef.local_value": (ag.RRef.local_value, "(self)"),
    "RRef.to_here": (ag.RRef.to_here, "(self, timeout=None)"),
    "RRef.rpc": (ag.RRef.rpc, "(self)"),
    "RRef.remote": (ag.RRef.remote, "(self)"),
    "ag.worker_name": (ag.worker_name, "()"),
    "ag.workers": (ag.workers, "()"),
    "ag.shutdown": (ag.shutdown, "(graceful=True, timeout=None)"),
    # 3. distributed autograd
    "dist.context": (ag.dist.context, "()"),
    "dist.backward": (ag.dist.backward, "(context_id, roots, retain_graph=False)"),
    "dist.get_gradients": (ag.dist.get_gradients, "(context_id)"),
    "dist.DistributedOptimizer": (
        ag.dist.DistributedOptimizer,
        "(optimizer_class, params, **options)",
    ),
    "dist.DistributedOptimizer.step": (ag.dist.DistributedOptimizer.step, "(self, context_id)"),
    "dist.debug_info": (ag.dist.debug_info, "()"),
}

# Parameters beyond the contract's, each with its default (documented additions).
ADDITIONS: dict[str, dict[str, Any]] = {
    "nn.Module.named_parameters": {"prefix": ""},
    "nn.Linear": {"dtype": "float32"},
    "nn.Embedding": {"dtype": "float32"},
    "ag.local_cluster": {"transport": "inproc"},
    "ag.init": {"advertise": None},
    "RRef.rpc": {"timeout": None},
    "RRef.remote": {"timeout": None},
    "optim.Optimizer.zero_grad": {"set_to_none": True},
    # (torch.optim's options, with its names and defaults: docs/limits.md, "Optimizer state")
    "optim.SGD": {"dampening": 0.0, "nesterov": False, "maximize": False},
    "optim.Adam": {"weight_decay": 0.0, "amsgrad": False, "maximize": False},
}


def _contract(text: str) -> inspect.Signature:
    namespace: dict[str, Any] = {}
    exec(f"def f{text}: pass", namespace)
    return inspect.signature(namespace["f"])


def _described(p: inspect.Parameter) -> tuple[str, Any, Any]:
    return (p.name, p.kind, p.default)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_signature_is_the_contracts(name):
    obj, text = CONTRACT[name]
    want = [_described(p) for p in _contract(text).parameters.values()]
    got = list(inspect.signature(obj).parameters.values())
    assert [_described(p) for p in got[: len(want)]] == want, f"{name}{inspect.signature(obj)}"
    extra = got[len(want) :]
    assert {p.name: p.default for p in extra} == ADDITIONS.get(name, {}), (
        f"{name}{inspect.signature(obj)}: parameters beyond the contract's {text}"
    )
    for p in extra:  # (a call written against the contract still works)
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), p
        assert p.default is not p.empty, p


def test_the_contracts_names_are_exported():
    for name in (
        "tensor zeros ones randn Tensor matmul cat stack split where no_grad nn optim "
        "init local_cluster rpc remote RRef worker_name workers shutdown dist "
        "ActorgradError RemoteError WorkerLost RpcTimeout AuthError ProtocolError "
        "ContextError"
    ).split():
        assert hasattr(ag, name), name
        assert name in ag.__all__, name
    for name in ("context", "backward", "get_gradients", "DistributedOptimizer", "debug_info"):
        assert name in ag.dist.__all__, name
    for name in ("Module", "Linear", "Embedding", "Sequential", "ReLU", "Tanh", "functional"):
        assert hasattr(ag.nn, name), name
    for name in ("SGD", "Adam", "AdamW"):
        assert hasattr(ag.optim, name), name
        assert name in ag.optim.__all__, name
    assert issubclass(ag.RpcTimeout, TimeoutError)
    for name in ("RemoteError", "WorkerLost", "RpcTimeout", "AuthError", "ProtocolError"):
        assert issubclass(getattr(ag, name), ag.ActorgradError), name
    assert issubclass(ag.ContextError, ag.ActorgradError)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_annotations_resolve_at_run_time(name):
    # (typing.get_type_hints evaluates them: what documentation generators, CLI and
    # validation libraries do; a name imported for type checkers only, under
    # TYPE_CHECKING, made it raise NameError)
    obj, _ = CONTRACT[name]
    fn = obj.__init__ if isinstance(obj, type) else obj
    typing.get_type_hints(getattr(fn, "__wrapped__", fn))
