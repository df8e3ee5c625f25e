"""Distributed autograd (``ag.dist``): contexts, send/recv recording, the
message-passing backward with its completion protocol, and ``DistributedOptimizer``.

Modules: ``context`` (contexts, send/recv nodes, the runtime interceptor), ``backward``
(the pass protocol), ``api`` (context manager, gradients, debug info, release),
``optimizer``. See docs/distributed.md for the design.

Example (a driver with a worker ``w1``)::

    w = await ag.remote("w1", ag.randn, (3,), {"requires_grad": True})
    opt = ag.dist.DistributedOptimizer(ag.optim.SGD, [w], lr=0.1)
    async with ag.dist.context() as ctx:
        loss = ((await w.to_here()) ** 2).sum()    # the fetched copy links to w on w1
        await ag.dist.backward(ctx, [loss])
        await opt.step(ctx)                        # w1 updates w with its gradient
"""

from actorgrad.dist.api import context, debug_info, get_gradients
from actorgrad.dist.backward import backward
from actorgrad.dist.context import DistInterceptor
from actorgrad.dist.optimizer import DistributedOptimizer
from actorgrad.runtime import set_interceptor

__all__ = ["DistributedOptimizer", "backward", "context", "debug_info", "get_gradients"]

set_interceptor(DistInterceptor())
del DistInterceptor, set_interceptor  # (wiring, not API)
