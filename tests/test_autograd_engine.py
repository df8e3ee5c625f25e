"""The engine seam (docs/design.md section 1) and backward semantics."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import select
import signal
import sys
import threading
import warnings

import numpy as np
import pytest

import actorgrad as ag
from actorgrad.autograd import AccumulateGrad, Function, GraphTask, Node, grad_node, is_grad_enabled


class Counting(Function):
    """Identity op that counts its backward calls and records the grads it saw."""

    __slots__ = ("calls",)

    def forward(self, a):
        self.saved = ()
        self.calls = []
        return a

    def backward(self, g):
        self.calls.append(np.array(g))
        return (g,)


def counted(x: ag.Tensor) -> ag.Tensor:
    from actorgrad.tensor import _unary

    return _unary(Counting, x)


class Boundary(Node):
    __slots__ = ("tag",)
    boundary = True

    def __init__(self, tag):
        super().__init__(())
        self.tag = tag


class Source(Node):
    """A send-node stand-in: forwards its grad to the local graph below it."""

    __slots__ = ()

    def apply(self, grad):
        return (grad,)


# --- grad_node / leaves -----------------------------------------------------------


def test_grad_node_of_leaf_is_cached_accumulate_grad():
    x = ag.tensor([1.0], requires_grad=True)
    n = grad_node(x)
    assert isinstance(n, AccumulateGrad) and n.tensor is x and n.next == ()
    assert grad_node(x) is n
    assert x.grad_fn is None and x.is_leaf
    assert grad_node(ag.tensor([1.0])) is None
    y = x * 2
    assert grad_node(y) is y.grad_fn and not y.is_leaf


def test_leaf_hooks_survive_when_the_cached_node_is_collected():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    x.register_hook(lambda g: g * 10)
    gc.collect()
    (x * 1).sum().backward()
    np.testing.assert_array_equal(x.grad, [10.0, 10.0])


# --- the ready queue ------------------------------------------------------------


def test_diamond_runs_each_node_once_with_the_summed_grad():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    mid = counted(x)
    out = (mid * 2 + mid * 3 + mid).sum()
    out.backward()
    calls = mid.grad_fn.calls
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], [6.0, 6.0])
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])


def test_node_feeding_many_consumers_runs_once():
    x = ag.tensor(np.ones(3), requires_grad=True)
    mid = counted(x)
    total = mid
    for _ in range(50):
        total = total + mid
    total.sum().backward()
    assert len(mid.grad_fn.calls) == 1
    np.testing.assert_array_equal(x.grad, np.full(3, 51.0))


def test_chain_of_100k_ops_backward_and_free_without_recursion():
    limit = sys.getrecursionlimit()
    x = ag.tensor(np.float32(1.0), requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.0
    y.backward()
    assert x.grad == 1.0
    # Deleting the head of the chain frees 100k nodes; must not overflow the C stack
    # or raise RecursionError from deallocation.
    del y
    gc.collect()
    assert sys.getrecursionlimit() == limit


def test_chain_of_100k_ops_freed_without_backward():
    x = ag.tensor(np.zeros(2), requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y + 1.0
    assert y.data[0] == 100_000
    del y
    gc.collect()


def test_graphtask_finished_and_none_propagation():
    a = ag.tensor([1.0], requires_grad=True)
    b = ag.tensor([2.0], requires_grad=True)
    out = a * b
    task = GraphTask([(grad_node(out), None)])
    assert not task.finished
    task.run()
    assert task.finished
    assert a.grad is None and b.grad is None  # None propagated, nothing accumulated


def test_graphtask_run_stops_after_the_node_that_ends_past_its_time_limit():
    # (the distributed backward moves a long part off its event loop between nodes)
    import time

    x = ag.tensor([1.0], requires_grad=True)
    h = x
    for _ in range(3):
        h = counted(h)
    task = GraphTask([(grad_node(h), np.array([1.0]))])
    task.run(until=time.perf_counter() - 1)  # already past: one node, then stop
    assert h.grad_fn.calls and not task.finished and task.has_ready
    assert x.grad is None
    task.run(until=time.perf_counter() + 60)
    assert task.finished and not task.has_ready
    np.testing.assert_array_equal(x.grad, [1.0])


def test_none_from_one_branch_still_lets_the_join_run():
    x = ag.tensor([1.0], requires_grad=True)
    mid = counted(x)
    src = Source([grad_node(mid)])
    task = GraphTask([(grad_node(mid), np.array([2.0]))], sources=[src])
    task.run()
    # mid waits for the source edge as well
    assert mid.grad_fn.calls == [] and not task.finished
    task.deliver(src, None)
    task.run()
    assert task.finished
    np.testing.assert_array_equal(mid.grad_fn.calls[0], [2.0])
    np.testing.assert_array_equal(x.grad, [2.0])


def test_sources_wait_for_deliver_and_sum_with_local_roots():
    x = ag.tensor([1.0, 1.0], requires_grad=True)
    y = x * 3
    src = Source([grad_node(y)])
    loss = y.sum()
    task = GraphTask([(grad_node(loss), np.float64(1.0))], sources=[src])
    task.run()
    assert x.grad is None and not task.finished
    task.deliver(src, np.array([10.0, 20.0]))
    task.run()
    assert task.finished
    np.testing.assert_array_equal(x.grad, [33.0, 63.0])
    with pytest.raises(RuntimeError, match="already ran"):
        task.deliver(src, np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="not a source"):
        task.deliver(grad_node(y), np.array([1.0, 1.0]))


def test_skipped_nodes_count_as_run_and_refuse_deliveries():
    # a source and the only node it feeds, taken out (their work is done elsewhere):
    # they do not run, and x's accumulation gets None from them
    x = ag.tensor([1.0], requires_grad=True)
    mid = counted(x)
    src = Source([grad_node(mid)])
    task = GraphTask([(grad_node(mid), None)], sources=[src])
    assert task.consumers(grad_node(mid)) == 1 and task.consumers(src) == 0
    task.skip([src, grad_node(mid)])
    assert task.consumers(src) == -1
    task.run()
    assert task.finished
    assert mid.grad_fn.calls == [] and x.grad is None
    with pytest.raises(RuntimeError, match="already ran"):
        task.deliver(src, np.array([1.0]))
    with pytest.raises(ValueError, match="not waiting"):
        task.skip([src])
    with pytest.raises(ValueError, match="not waiting"):  # (a node it never reaches)
        task.skip([Source([])])


class EqCounted(Node):
    """A node that counts the equality checks made on it (a scan of a list holding it
    makes one per node looked for)."""

    __slots__ = ()
    eqs = 0

    def __eq__(self, other):
        EqCounted.eqs += 1
        return self is other

    __hash__ = Node.__hash__


def test_skip_looks_through_the_ready_list_once_not_once_per_node():
    # The distributed backward's origin skips a send and a recv node per relay while
    # its ready list holds every recv node no gradient reaches: a scan of that list per
    # skipped node was quadratic (10,000 of each: 2.4 s, 100x the rest of the pass).
    ready = [EqCounted() for _ in range(300)]
    sources = [Source([]) for _ in range(300)]
    task = GraphTask([(n, None) for n in ready], sources=sources)
    EqCounted.eqs = 0
    task.skip(sources)
    assert EqCounted.eqs <= len(ready)  # (300 x 300 = 90,000 with a scan per node)
    task.skip(ready[:100])  # (nodes that are in the ready list go from it)
    task.run()
    assert task.finished


def test_source_only_task():
    x = ag.tensor([1.0], requires_grad=True)
    src = Source([grad_node(x)])
    task = GraphTask([], sources=[src])
    task.run()
    assert not task.finished
    assert "ran 0/2 nodes" in repr(task) and "1 sources undelivered" in repr(task)
    task.deliver(src, np.array([5.0]))
    task.run()
    assert task.finished and x.grad[0] == 5.0


def test_leaf_sink_replaces_grad_accumulation():
    a = ag.tensor([1.0, 2.0], requires_grad=True)
    b = ag.tensor([3.0], requires_grad=True)
    c = ag.tensor([4.0], requires_grad=True)
    out = (a * b).sum()
    got = {}
    task = GraphTask(
        [(grad_node(out), np.float32(1.0)), (grad_node(c), None)],
        leaf_sink=lambda t, g: got.__setitem__(t, g),
    )
    task.run()
    assert set(got) == {a, b, c}
    np.testing.assert_array_equal(got[a], [3.0, 3.0])
    np.testing.assert_array_equal(got[b], [3.0])
    assert got[c] is None
    assert a.grad is None and b.grad is None


def test_on_boundary_gets_the_summed_grad_instead_of_apply():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    bnode = Boundary("recv")
    from actorgrad.tensor import _result

    recv = _result(np.array([5.0, 6.0]), bnode)  # a tensor received from elsewhere
    out = (recv * x + recv).sum()
    seen = []
    task = GraphTask(
        [(grad_node(out), np.float64(1.0))], on_boundary=lambda n, g: seen.append((n, g))
    )
    task.run()
    assert task.finished
    assert len(seen) == 1 and seen[0][0] is bnode
    np.testing.assert_array_equal(seen[0][1], [2.0, 3.0])  # x + 1, summed over both uses
    np.testing.assert_array_equal(x.grad, [5.0, 6.0])


def test_on_boundary_called_with_none():
    bnode = Boundary("recv")
    from actorgrad.tensor import _result

    recv = _result(np.array([5.0]), bnode)
    out = recv * 2
    seen = []
    GraphTask([(grad_node(out), None)], on_boundary=lambda n, g: seen.append(g)).run()
    assert seen == [None]


def test_exception_in_apply_propagates_with_the_node_name():
    class Broken(Counting):
        __slots__ = ()

        def backward(self, g):
            raise ZeroDivisionError("boom")

    from actorgrad.tensor import _unary

    x = ag.tensor([1.0], requires_grad=True)
    y = _unary(Broken, x)
    with pytest.raises(ZeroDivisionError, match="boom") as info:
        y.sum().backward()
    assert any("Broken" in n for n in info.value.__notes__)


# --- hooks ------------------------------------------------------------------------


def test_hooks_on_leaf_and_non_leaf_see_and_replace_the_grad():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    seen = []
    y.register_hook(lambda g: seen.append(g.copy()))  # returns None: grad unchanged
    y.register_hook(lambda g: g * 10)
    h = x.register_hook(lambda g: g + 1)
    (y * y).sum().backward()
    np.testing.assert_array_equal(seen[0], [4.0, 8.0])  # d(y^2)/dy = 2y
    np.testing.assert_array_equal(x.grad, [81.0, 161.0])  # 10 * 2y * 2 + 1
    h.remove()
    x.grad = None
    (x * 1).sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


def test_a_hook_handle_removes_its_own_registration_of_a_function_registered_twice():
    def dbl(g):
        return g * 2

    def inc(g):
        return g + 1

    x = ag.tensor([1.0], requires_grad=True)
    x.register_hook(dbl)
    x.register_hook(inc)
    h = x.register_hook(dbl)
    assert "registered" in repr(h)
    h.remove()  # the last dbl goes: dbl then inc (it took the first: inc then dbl, 4)
    assert "removed" in repr(h)
    x.sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0])  # torch: 3

    y = ag.tensor([1.0], requires_grad=True)
    h1 = y.register_hook(dbl)
    y.register_hook(dbl)
    h1.remove()
    h1.remove()  # again: nothing (it took the other registration too)
    y.sum().backward()
    np.testing.assert_array_equal(y.grad, [2.0])


@pytest.mark.parametrize("leaf", [True, False])
def test_thousands_of_hooks_removed_in_any_order_leave_the_rest_in_their_order(leaf):
    # (hooks are kept by registration number: registering one of 20,000 searched the
    # list for the same function, 7.7 s in all; the order must be what it was)
    x = ag.tensor([1.0], requires_grad=True)
    t = x if leaf else x * 1
    calls: list[int] = []
    fns = [lambda g, i=i: calls.append(i) for i in range(3000)]
    handles = [t.register_hook(fn) for fn in fns]
    dup = t.register_hook(fns[7])  # the same function again: runs twice
    gone = set(random.Random(0).sample(range(3000), 2000))
    for i in sorted(gone, key=lambda i: -i if i % 2 else i):
        handles[i].remove()
    (t * 2).sum().backward(retain_graph=True)
    kept = [i for i in range(3000) if i not in gone]
    assert calls == kept + [7]
    dup.remove()
    t.register_hook(fns[kept[0]])  # registered again: from then on, last
    calls.clear()
    (t * 2).sum().backward()
    assert calls == kept + [kept[0]]


@pytest.mark.parametrize("leaf", [True, False])
def test_hooks_registered_or_removed_by_a_hook_change_the_next_pass_only(leaf):
    # (as torch: the hooks of a node when it runs all run, once. A one-shot hook
    # removing itself shifted the next one into its place: that one was skipped)
    x = ag.tensor([1.0], requires_grad=True)
    t = x if leaf else x * 1
    calls = []

    def once(g):
        calls.append("once")
        handle.remove()

    def later(g):
        calls.append("later")
        handles[0].remove()  # the last one, still run in this pass
        t.register_hook(lambda g: calls.append("added"))  # from the next pass on

    handle = t.register_hook(once)
    t.register_hook(later)
    handles = [t.register_hook(lambda g: calls.append("last"))]
    (t * 2).sum().backward(retain_graph=True)
    assert calls == ["once", "later", "last"]
    calls.clear()
    (t * 2).sum().backward()
    assert calls == ["later", "added"]


def test_a_hook_may_change_a_reductions_gradient_in_place_at_any_size():
    # (from 4 KiB on, a sum's gradient is a read-only broadcast view: the hook failed
    # with "output array is read-only" at 1,024 float32 and worked at 1,000)
    for n in (1000, 1024, 5000):
        x = ag.ones(n, requires_grad=True)
        x.register_hook(lambda g: g.__imul__(2))
        x.sum().backward()
        np.testing.assert_array_equal(x.grad, np.full(n, 2.0, np.float32))


def test_hook_runs_once_on_summed_grad():
    x = ag.tensor([1.0], requires_grad=True)
    y = x * 1
    calls = []
    y.register_hook(lambda g: calls.append(float(g[0])))
    (y + y + y).sum().backward()
    assert calls == [3.0]


def _first(g):
    return g[:1]


def test_a_hook_that_changes_the_shape_or_returns_no_array_is_named():
    # (it would otherwise broadcast: x.grad silently w's values, w.grad ones)
    x = ag.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = ag.tensor([4.0, 5.0, 6.0], requires_grad=True)
    y = x * w
    y.register_hook(_first)
    with pytest.raises(
        RuntimeError,
        match=r"hook _first changed the gradient's shape from "
        r"\(3,\) to \(1,\)",
    ) as info:
        y.sum().backward()
    assert any("MulBackward" in n or "Mul" in n for n in info.value.__notes__)
    assert x.grad is None and w.grad is None
    y = x * w
    y.register_hook(lambda g: {"not": "an array"})
    with pytest.raises(TypeError, match="returned a dict of dtype object"):
        y.sum().backward()
    # a list or a numpy scalar of the right shape is taken as an array
    y = x * w
    y.register_hook(lambda g: [1.0, 1.0, 1.0])
    loss = y.sum()
    loss.register_hook(lambda g: g * 2)  # 0-d in, numpy scalar out
    loss.backward()
    np.testing.assert_array_equal(x.grad, [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(w.grad, [1.0, 2.0, 3.0])


async def _async_hook(g):
    return g


def test_an_async_hook_is_refused_by_name_and_its_coroutine_closed():
    # (np.asarray took the coroutine for an object: "returned a coroutine of dtype
    # object", and Python warned that it was never awaited, pointing at the engine)
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    y.register_hook(_async_hook)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="hook _async_hook returned a coroutine: hooks run "):
            y.sum().backward()
        gc.collect()
    assert [str(w.message) for w in caught] == []  # (no "was never awaited")
    assert x.grad is None


def test_a_hook_result_of_another_dtype_is_cast_to_the_gradient_dtype():
    # a float64 result turned a float32 leaf's accumulated .grad into float64
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    x.register_hook(lambda g: g.astype(np.float64) * 2)
    for expected in ([2.0, 2.0], [4.0, 4.0]):  # stored, then accumulated
        x.sum().backward()
        assert x.grad.dtype == np.float32
        np.testing.assert_array_equal(x.grad, expected)
    y = x * 3  # a non-leaf's hook: what flows on keeps the dtype too
    y.register_hook(lambda g: np.ones(2, np.int64))
    seen = []
    y.register_hook(lambda g: seen.append(g.dtype))
    y.sum().backward()
    assert seen == [np.float32] and x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [10.0, 10.0])  # 4 + 2 * (1 * 3)


def test_a_leaf_stores_a_copy_of_an_array_a_hook_returned():
    # (.grad was the hook's own array, directly or through an op that passes its
    # gradient on: the hook's owner changing it later changed .grad, and clipping
    # .grad in place changed the hook's array)
    held = np.full(2, 5.0, np.float32)
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = x + 1  # (its backward hands the hook's array on as it is)
    y.register_hook(lambda g: held)
    z = ag.tensor([3.0, 4.0], requires_grad=True)
    z.register_hook(lambda g: held)
    (y.sum() + z.sum()).backward()
    held[...] = -1
    np.testing.assert_array_equal(x.grad, [5.0, 5.0])
    np.testing.assert_array_equal(z.grad, [5.0, 5.0])
    x.grad *= 0.5
    np.testing.assert_array_equal(held, [-1.0, -1.0])
    w = ag.tensor([1.0, 2.0], requires_grad=True)
    w.register_hook(lambda g: g.__imul__(3))  # its own gradient, changed in place
    (w * 1).sum().backward()
    np.testing.assert_array_equal(w.grad, [3.0, 3.0])


@pytest.mark.parametrize(
    "view",
    [lambda x: x.reshape(4), lambda x: x.T.reshape(4), lambda x: x.transpose(1, 0).reshape(4)],
    ids=["reshape", "T", "transpose"],
)
def test_a_leaf_whose_gradient_is_a_view_of_another_leafs_stores_a_copy(view):
    # ``x.reshape(4) + w``: add's backward hands one array to both inputs, and
    # reshape's backward a view of it on to x. Stored as it came (a view not copied),
    # x.grad would be a view of w.grad: w.grad clipped or scaled in place would change
    # x.grad too.
    x = ag.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    w = ag.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    ((view(x) + w) * ag.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    gx, gw = x.grad.copy(), w.grad.copy()
    assert not np.shares_memory(x.grad, w.grad)
    w.grad *= 0
    x.grad += 1
    np.testing.assert_array_equal(x.grad, gx + 1)
    np.testing.assert_array_equal(w.grad, gw * 0)


def test_register_hook_needs_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        ag.tensor([1.0]).register_hook(lambda g: g)


# --- accumulation, retain_graph, release --------------------------------------------


def test_grads_accumulate_over_backward_calls():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0, 7.0])


def test_backward_passes_in_several_threads_add_up_in_a_shared_leaf():
    # (plain functions called on a worker run in its thread pool, and two may train
    # one model: each pass read .grad, added, and wrote it back while numpy let the
    # other threads run, so sums were lost: 388 to 444 of 800 here)
    x = ag.ones(100_000, requires_grad=True)
    threads, passes = 4, 200
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            start.wait()
            for _ in range(passes):
                (x * 1.0).sum().backward()
        except BaseException as exc:  # (seen by the assertion below)
            errors.append(exc)

    workers = [threading.Thread(target=train) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    np.testing.assert_array_equal(x.grad, np.full(100_000, threads * passes, np.float32))


def test_a_backward_into_one_leaf_does_not_wait_for_an_add_into_an_unrelated_one():
    # (threads training unrelated models: one lock for the whole process made each
    # add into a leaf wait for every other thread's, numpy's GIL-free big adds too)
    from actorgrad import autograd

    x = ag.ones(3, requires_grad=True)
    others = [ag.ones(2, requires_grad=True) for _ in range(8)]
    y = next(o for o in others if autograd._grad_lock(o) is not autograd._grad_lock(x))
    done = threading.Event()

    def train() -> None:
        (y * 2.0).sum().backward()
        done.set()

    with autograd._grad_lock(x):  # (as a long add into x would hold it)
        thread = threading.Thread(target=train)
        thread.start()
        try:
            assert done.wait(10), "a backward into y waited for the add into x"
        finally:
            thread.join(10)
    np.testing.assert_array_equal(y.grad, [2.0, 2.0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_while_a_thread_adds_into_a_leaf_can_run_backward():
    # A fork (multiprocessing's default start method on Linux: a Pool in a call) while
    # another thread is inside a leaf's accumulation, which holds the engine's gradient
    # lock (numpy lets other threads run during a big add): the child inherited the lock
    # held by a thread it does not have, and its first backward waited for good.
    read_fd, write_fd = os.pipe()
    entered, release = threading.Event(), threading.Event()

    class Stalling(np.ndarray):
        # (the .grad the thread adds into: it holds the thread inside the accumulation,
        # as a long add does, until the fork is done)
        def __add__(self, other):
            entered.set()
            release.wait(30)
            return np.asarray(self) + other

    x = ag.ones(3, requires_grad=True)
    x.grad = np.zeros(3, np.float32).view(Stalling)
    thread = threading.Thread(target=lambda: (x * 1.0).sum().backward())
    thread.start()
    try:
        assert entered.wait(10)
        with warnings.catch_warnings():
            # (3.12+: "this process is multi-threaded, fork() may deadlock": the case)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # (the child: a backward of its own, then go, whatever happens)
            try:
                # (into the same leaf: its lock is the one the parent's thread holds)
                x.grad = None
                (x[:2] * 3.0).sum().backward()
                os.write(write_fd, repr(x.grad.tolist()).encode())
            finally:
                os._exit(0)
        try:
            readable, _, _ = select.select([read_fd], [], [], 10)
            assert readable, "the forked child's backward never ended (the lock was held)"
            assert os.read(read_fd, 100) == b"[3.0, 3.0, 0.0]"
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
        os.close(read_fd)
        os.close(write_fd)
    np.testing.assert_array_equal(x.grad, [1.0, 1.0, 1.0])


def test_second_backward_through_freed_graph_names_retain_graph():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_a_boundary_node_without_a_handler_is_applied_and_may_refuse():
    class Edge(Node):
        __slots__ = ()
        boundary = True

        def apply(self, grad):
            raise RuntimeError("this gradient must leave the process")

    x = ag.tensor([1.0, 2.0], requires_grad=True)
    edge = Edge((grad_node(x),))
    with pytest.raises(RuntimeError, match="must leave the process"):
        GraphTask([(edge, np.ones(2))]).run()
    seen = []
    task = GraphTask([(edge, np.ones(2))], on_boundary=lambda n, g: seen.append(g))
    task.run()
    assert task.finished and len(seen) == 1 and x.grad is None
    GraphTask([(edge, None)]).run()  # (nothing flows: nothing to refuse)


def test_retain_graph_allows_a_second_backward_that_adds_up():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    loss = (x.exp() * x).sum()
    loss.backward(retain_graph=True)
    first = x.grad.copy()
    loss.backward()
    np.testing.assert_allclose(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_saved_buffers_are_released_after_backward():
    x = ag.tensor(np.ones(4), requires_grad=True)
    y = x.exp()
    z = y * x
    loss = z.sum()
    nodes = [y.grad_fn, z.grad_fn, loss.grad_fn]
    assert isinstance(y.grad_fn.saved, np.ndarray) and len(z.grad_fn.saved) == 2
    loss.backward()
    from actorgrad.autograd import _FREED

    assert all(n.saved is _FREED for n in nodes)


def test_leaf_grad_is_not_aliased_between_leaves():
    a = ag.tensor([1.0, 2.0], requires_grad=True)
    b = ag.tensor([1.0, 2.0], requires_grad=True)
    (a + b).sum().backward()
    assert a.grad is not b.grad
    a.grad *= 5
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])
    assert a.grad.flags.writeable and b.grad.flags.writeable


def test_backward_with_explicit_gradient_and_error_cases():
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    g = np.array([1.0, -1.0], np.float32)
    y.backward(g)
    np.testing.assert_array_equal(x.grad, [2.0, -2.0])
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2).backward()
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        (x * 2).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        ag.tensor([1.0]).backward()


def test_backward_on_a_leaf():
    x = ag.tensor(3.0, requires_grad=True)
    x.backward()
    assert x.grad == 1.0


# --- no_grad ------------------------------------------------------------------------


def test_no_grad_context_and_decorator():
    x = ag.tensor([1.0], requires_grad=True)
    with ag.no_grad():
        assert not is_grad_enabled()
        y = x * 2
    assert is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None

    @ag.no_grad()
    def f(t):
        return t * 3

    assert not f(x).requires_grad
    assert (x * 3).requires_grad

    @ag.no_grad
    def g(t):
        return t * 3

    assert not g(x).requires_grad and g.__name__ == "g"
    with ag.no_grad():
        with ag.autograd.enable_grad():
            assert (x * 3).requires_grad
        assert not (x * 3).requires_grad


def test_no_grad_is_per_thread():
    x = ag.tensor([1.0], requires_grad=True)
    inside = threading.Event()
    release = threading.Event()
    results = {}

    def worker():
        with ag.no_grad():
            inside.set()
            release.wait(5)
            results["worker"] = (x * 2).requires_grad

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    results["main"] = (x * 2).requires_grad
    release.set()
    t.join()
    assert results == {"main": True, "worker": False}


async def test_no_grad_is_per_asyncio_task_and_decorates_coroutines():
    x = ag.tensor([1.0], requires_grad=True)
    entered = asyncio.Event()
    go = asyncio.Event()

    @ag.no_grad()
    async def inside():
        entered.set()
        await go.wait()
        return (x * 2).requires_grad

    task = asyncio.create_task(inside())
    await entered.wait()
    outside = (x * 2).requires_grad
    go.set()
    assert await task is False
    assert outside is True


def test_a_root_given_twice_runs_once_with_the_summed_grad():
    x = ag.tensor([1.0], requires_grad=True)
    y = counted(x)
    task = GraphTask([(grad_node(y), np.array([1.0])), (grad_node(y), np.array([2.0]))])
    task.run()
    assert task.finished and len(y.grad_fn.calls) == 1
    np.testing.assert_array_equal(x.grad, [3.0])


def test_root_reachable_from_another_root_waits_for_it():
    x = ag.tensor([1.0], requires_grad=True)
    mid = counted(x)
    out = mid * 4
    task = GraphTask([(grad_node(mid), np.array([1.0])), (grad_node(out), np.array([1.0]))])
    task.run()
    assert len(mid.grad_fn.calls) == 1
    np.testing.assert_array_equal(mid.grad_fn.calls[0], [5.0])


def test_intermediate_arrays_are_freed_by_backward_while_the_graph_object_lives():
    import weakref

    x = ag.tensor(np.ones(1000), requires_grad=True)
    loss = (x.exp() * 2.0).sum()
    exp_node = loss.grad_fn.next[0].next[0]
    assert type(exp_node).__name__ == "Exp"
    buf = weakref.ref(exp_node.saved)  # exp(x): held only by the Exp and Mul nodes
    loss.backward()
    assert buf() is None
    np.testing.assert_allclose(x.grad, 2 * np.e)


def test_retain_graph_keeps_intermediate_arrays():
    import weakref

    x = ag.tensor(np.ones(10), requires_grad=True)
    loss = (x.exp() * 2.0).sum()
    buf = weakref.ref(loss.grad_fn.next[0].next[0].saved)
    loss.backward(retain_graph=True)
    assert buf() is not None


def test_leaf_sink_never_gets_one_array_for_two_leaves():
    a = ag.tensor([1.0, 2.0], requires_grad=True)
    b = ag.tensor([1.0, 2.0], requires_grad=True)
    got = {}
    out = a + b
    GraphTask([(grad_node(out), np.ones(2, np.float32))], leaf_sink=got.__setitem__).run()
    assert got[a] is not got[b]
    np.testing.assert_array_equal(got[b], [1.0, 1.0])


@pytest.mark.parametrize(
    ("gradient", "dtype"),
    [([None, 1.0], "object"), (np.array([1 + 5j, 1]), "complex128"), (["a", "b"], "<U1")],
)
def test_backward_refuses_a_gradient_that_is_not_real_numbers(gradient, dtype):
    # None became nan in .grad; an imaginary part was dropped with a warning.
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(
        TypeError, match=f"gradient is a .* of dtype {dtype}, not an array of real numbers"
    ):
        (x * 2).backward(gradient)
    assert x.grad is None


def test_a_zero_d_gradient_stays_an_array():
    # 0-d + 0-d is a numpy scalar: after a second backward .grad was a numpy.float32
    # that `x.grad[...] = 0` could not write into; hooks got scalars too.
    x = ag.tensor(2.0, requires_grad=True)
    seen = []
    y = x * x
    y.register_hook(lambda g: seen.append(type(g)))
    y.backward(retain_graph=True)
    y.backward()
    assert type(x.grad) is np.ndarray and x.grad.shape == () and x.grad == 8.0
    x.grad[...] = 0
    assert seen == [np.ndarray, np.ndarray]


def test_a_grad_of_the_wrong_shape_set_by_the_user_is_named():
    # It was broadcast: .grad of a (2,) leaf became (3, 2).
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    x.grad = np.zeros((3, 2), np.float32)
    with pytest.raises(
        RuntimeError, match=r"the .grad of a leaf of shape \(2,\) has shape \(3, 2\)"
    ):
        (x * 2).sum().backward()
    y = ag.tensor([1.0, 2.0], requires_grad=True)
    y.grad = 0  # (a scalar may broadcast: the result has the leaf's shape)
    (y * 2).sum().backward()
    assert y.grad.tolist() == [2.0, 2.0]


async def test_one_no_grad_instance_used_by_overlapping_tasks():
    # Its token stack was the instance's: the second task's exit reset the first
    # task's token ("was created in a different Context").
    ng = ag.no_grad()
    first_in, second_in, first_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first() -> bool:
        with ng:
            first_in.set()
            await second_in.wait()
            inside = is_grad_enabled()
        first_out.set()  # (left before the second: not in the order they came in)
        return inside

    async def second() -> bool:
        await first_in.wait()
        with ng:
            second_in.set()
            await first_out.wait()
            inside = is_grad_enabled()
        return inside

    assert await asyncio.wait_for(asyncio.gather(first(), second()), 5) == [False, False]
    assert is_grad_enabled()
    with ng, ng:  # (nested, in one task)
        assert not is_grad_enabled()
    assert is_grad_enabled()


def test_no_grad_on_a_generator_function_covers_its_body_and_not_the_caller():
    # (the wrapper covered only the call that made the generator: the body recorded
    # the graph; torch's no_grad runs the body without grad, the caller's mode at yields)
    x = ag.tensor([1.0], requires_grad=True)
    seen = []

    @ag.no_grad()
    def batches(w):
        got = yield w * 2
        seen.append(("sent", got, is_grad_enabled()))
        try:
            yield w * 3
        except KeyError:
            seen.append(("thrown", is_grad_enabled()))
            yield w * 4
        finally:
            seen.append(("closed", is_grad_enabled()))
        return "done"

    it = batches(x)
    assert batches.__name__ == "batches"
    first = next(it)
    assert not first.requires_grad and is_grad_enabled()
    assert (x * 2).requires_grad  # (the caller between yields: its own mode)
    assert not it.send("hi").requires_grad
    assert not it.throw(KeyError("k")).requires_grad and is_grad_enabled()
    it.close()
    assert is_grad_enabled()
    assert seen == [("sent", "hi", False), ("thrown", False), ("closed", False)]

    def delegate():
        return (yield from batches(x))

    d = delegate()
    next(d), d.send(None)
    with pytest.raises(StopIteration) as stop:
        d.send(None)
    assert stop.value.value == "done"

    @ag.autograd.enable_grad()
    def recording(w):
        yield w * 2

    with ag.no_grad():
        assert [t.requires_grad for t in recording(x)] == [True]
        assert not is_grad_enabled()


async def test_no_grad_on_an_async_generator_function_covers_its_body():
    x = ag.tensor([1.0], requires_grad=True)
    modes = []

    @ag.no_grad
    async def stream(w):
        await asyncio.sleep(0)
        modes.append(is_grad_enabled())
        got = yield w * 2
        await asyncio.sleep(0)
        modes.append(is_grad_enabled())
        yield w * got

    agen = stream(x)
    first = await agen.__anext__()
    outside = is_grad_enabled()
    second = await agen.asend(3.0)
    await agen.aclose()
    assert [first.requires_grad, second.requires_grad, outside] == [False, False, True]
    assert second.data.tolist() == [3.0] and modes == [False, False] and is_grad_enabled()


async def test_no_grad_on_an_async_generator_runs_to_its_end_and_takes_throws_in_its_mode():
    # (the test above ends its generator with aclose: one run to its end, and a throw
    # into one, were never tested as they are for a plain generator)
    x = ag.tensor([1.0], requires_grad=True)
    seen = []

    @ag.no_grad()
    async def stream(w):
        try:
            yield w * 2
        except KeyError:
            seen.append(("thrown", is_grad_enabled()))
            yield w * 4
        yield w * 5

    got = [t async for t in stream(x)]
    assert [t.data.tolist() for t in got] == [[2.0], [5.0]]
    assert not any(t.requires_grad for t in got) and is_grad_enabled()
    agen = stream(x)
    await agen.__anext__()
    thrown = await agen.athrow(KeyError("k"))
    assert thrown.data.tolist() == [4.0] and not thrown.requires_grad and is_grad_enabled()
    assert (await agen.__anext__()).data.tolist() == [5.0]
    with pytest.raises(StopAsyncIteration):
        await agen.__anext__()
    assert seen == [("thrown", False)]


def test_a_grad_mode_left_in_another_thread_than_it_was_entered_in_says_so():
    # (the tokens to restore are per thread and task: one left elsewhere has none)
    mode = ag.no_grad()
    mode.__enter__()
    try:
        errors: list[BaseException] = []

        def leave() -> None:
            try:
                mode.__exit__(None, None, None)
            except RuntimeError as exc:
                errors.append(exc)

        t = threading.Thread(target=leave)
        t.start()
        t.join()
        assert len(errors) == 1
        assert "no_grad: left in another task or thread than the one it was entered in" in str(
            errors[0]
        )
        assert not is_grad_enabled()  # (this thread's mode: untouched)
    finally:
        mode.__exit__(None, None, None)
    assert is_grad_enabled()


def test_two_passes_through_one_split_interleaved_keep_their_gradients_apart():
    # Two passes over one graph, run in turns (as two contexts' distributed passes run
    # on one event loop): the chunks' gradients of each pass add up in its own array.
    # (A design that kept one array on the split's node, keyed by the running pass,
    # lost the third chunk's gradient here: [1 1 2 2 0 0].)
    x = ag.tensor(np.zeros(6), requires_grad=True)
    chunks = ag.split(x * 1.0, 2)
    got = {}

    def task(name):
        srcs = [Source([grad_node(c)]) for c in chunks]
        sink = lambda t, g: got.__setitem__(name, g)  # noqa: E731
        return srcs, GraphTask([], sources=srcs, retain_graph=True, leaf_sink=sink)

    (a, task_a), (b, task_b) = task("a"), task("b")
    one = np.ones(2)
    task_a.deliver(a[0], one)
    task_a.run()
    task_b.deliver(b[0], one * 10.0)
    task_b.run()
    task_a.deliver(a[1], one * 2.0)
    task_a.run()
    task_a.deliver(a[2], one * 3.0)
    task_a.run()
    np.testing.assert_array_equal(got["a"], [1, 1, 2, 2, 3, 3])
    for i in (1, 2):
        task_b.deliver(b[i], one * 10.0 * (i + 1))
    task_b.run()
    np.testing.assert_array_equal(got["b"], [10, 10, 20, 20, 30, 30])


def test_backward_of_a_one_element_tensor_seeds_a_gradient_of_its_shape():
    # (not a 0-d one: a hook sees the tensor's own shape, a leaf gets its shape)
    x = ag.tensor([[2.0]], requires_grad=True)
    seen = []
    y = x * 3.0
    y.register_hook(lambda g: seen.append(g.shape))
    y.backward()
    assert seen == [(1, 1)] and x.grad.shape == (1, 1) and x.grad.tolist() == [[3.0]]
    x.grad = None
    x.backward()
    assert x.grad.shape == (1, 1) and x.grad.tolist() == [[1.0]]


def test_a_nodes_pre_hooks_assigned_whole_are_the_ones_that_run():
    # (design.md: pre_hooks is a dict of hooks by registration number, applied to the
    # summed incoming gradient; assigning one replaces them)
    x = ag.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2.0
    y.register_hook(lambda g: g * 100)
    y.grad_fn.pre_hooks = {0: lambda g: g + 1}
    y.sum().backward()
    assert x.grad.tolist() == [4.0, 4.0]


class Bare(Node):
    __slots__ = ()


class Unwritten(Function):
    __slots__ = ()


@pytest.mark.parametrize(
    ("cls", "missing"), [(Bare, "Bare.apply"), (Unwritten, "Unwritten.backward")]
)
def test_a_node_without_its_backward_is_named_when_a_gradient_reaches_it(cls, missing):
    # (a node class of the user's, made with its constructor, that lacks the method:
    # not a silent "no gradient")
    leaf = ag.tensor([1.0, 2.0], requires_grad=True)
    task = GraphTask([(cls([grad_node(leaf)]), np.ones(2))])
    with pytest.raises(NotImplementedError) as info:
        task.run()
    assert str(info.value) == missing
    assert info.value.__notes__ == [f"(while running backward of {cls.__name__})"]
    assert leaf.grad is None
    with pytest.raises(NotImplementedError, match=r"^Unwritten\.forward$"):
        Unwritten().forward(np.ones(2))


def test_a_gradient_of_the_wrong_shape_for_a_leaf_names_the_leafs_node():
    leaf = ag.tensor([1.0, 2.0], requires_grad=True)
    node = grad_node(leaf)
    assert repr(node) == "<AccumulateGrad(2,) node>"
    with pytest.raises(RuntimeError) as info:
        GraphTask([(node, np.ones(3))]).run()
    assert str(info.value) == "gradient of shape (3,) reached a leaf of shape (2,)"
    assert info.value.__notes__ == ["(while running backward of AccumulateGrad(2,))"]
    assert leaf.grad is None


def test_a_sources_deliveries_add_up_and_its_state_is_told():
    # (the distributed backward's use: a send node gets gradients from several
    # workers before it runs; waits_for, skipped and consumers say where it stands)
    leaf = ag.tensor([1.0, 2.0], requires_grad=True)
    src, gone = Source([grad_node(leaf)]), Source([grad_node(leaf)])
    task = GraphTask([], sources=[src, gone])
    assert task.consumers(grad_node(leaf)) == 2 and task.consumers(Source()) == 0
    assert task.waits_for(src) and not task.skipped(src)
    task.skip([gone])
    assert task.skipped(gone) and not task.waits_for(gone) and task.consumers(gone) == -1
    task.deliver(src, np.array([1.0, 2.0]))
    task.deliver(src, np.array([10.0, 20.0]))
    assert not task.waits_for(src) and not task.skipped(src)
    task.run()
    assert task.finished and leaf.grad.tolist() == [11.0, 22.0]
    with pytest.raises(RuntimeError, match="already ran in this GraphTask"):
        task.deliver(src, np.ones(2))
