"""The actor runtime: workers as asyncio actors, transports, RPC, RRefs, clusters.

Modules:

- ``transport``  TCP / in-process byte transports, framing, handshake
- ``calls``      naming functions across workers (``module:qualname``, ``__main__``)
- ``worker``     the worker actor: mailbox, dispatch, connections, heartbeats
- ``registry``   cluster membership, hosted by the head worker
- ``rref``       remote references and distributed reference counting
- ``api``        ``init``/``rpc``/``remote``/``local_cluster``/... (the public API)
- ``cluster``    ``serve_cluster``/``serve_worker``/``cluster_status`` (for the CLI)
- ``procs``      worker child processes

NOTE: the runtime never imports actorgrad.tensor, actorgrad.autograd or actorgrad.dist;
tensors only pass through the codec (and the interceptor's hooks).
"""

from __future__ import annotations

from actorgrad.runtime.api import (
    LocalCluster,
    init,
    local_cluster,
    remote,
    rpc,
    shutdown,
    wait_for_workers,
    worker_name,
    workers,
)
from actorgrad.runtime.calls import inline
from actorgrad.runtime.rref import RRef
from actorgrad.runtime.worker import (
    Worker,
    current_worker,
    get_interceptor,
    loop_worker,
    on_cast,
    set_interceptor,
)

__all__ = [
    "LocalCluster",
    "RRef",
    "Worker",
    "current_worker",
    "get_interceptor",
    "init",
    "inline",
    "local_cluster",
    "loop_worker",
    "on_cast",
    "remote",
    "rpc",
    "set_interceptor",
    "shutdown",
    "wait_for_workers",
    "worker_name",
    "workers",
]
