"""actorgrad: a distributed autograd runtime for Python.

Layout (each layer imports only from the ones before it; see docs/design.md):

- ``errors``            the error tree
- ``autograd``, ``tensor``, ``nn``, ``optim``   numpy tensors and the local engine (no asyncio)
- ``wire``              msgpack codec (no sockets)
- ``runtime``           workers as asyncio actors, transports, RPC, RRefs, clusters
- ``dist``              distributed autograd: contexts, send/recv, backward, optimizer
- ``cli``               the ``actorgrad`` command

Public names are re-exported here; ``import actorgrad as ag``.
"""

# (first: a Ctrl-C while the command imports the rest, see there)
import actorgrad._startup as _startup  # noqa: F401

# --- tensors and local autograd (section 1) ---
# --- distributed autograd (section 3) ---
from actorgrad import dist, nn, optim
from actorgrad.autograd import no_grad
from actorgrad.errors import (
    ActorgradError,
    AuthError,
    ContextError,
    ProtocolError,
    RemoteError,
    RpcTimeout,
    WorkerLost,
)

# --- runtime (section 2) ---
from actorgrad.runtime import (
    RRef,
    init,
    local_cluster,
    remote,
    rpc,
    shutdown,
    wait_for_workers,
    worker_name,
    workers,
)
from actorgrad.tensor import Tensor, cat, matmul, ones, randn, split, stack, tensor, where, zeros

__all__ = [
    "ActorgradError",
    "AuthError",
    "ContextError",
    "ProtocolError",
    "RRef",
    "RemoteError",
    "RpcTimeout",
    "Tensor",
    "WorkerLost",
    "cat",
    "dist",
    "init",
    "local_cluster",
    "matmul",
    "nn",
    "no_grad",
    "ones",
    "optim",
    "randn",
    "remote",
    "rpc",
    "shutdown",
    "split",
    "stack",
    "tensor",
    "wait_for_workers",
    "where",
    "worker_name",
    "workers",
    "zeros",
]

__version__ = "0.1.0"
