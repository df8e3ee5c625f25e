"""The thread pool a worker runs plain functions' calls (and offloaded work) in.

Two differences from ``concurrent.futures.ThreadPoolExecutor``, both for calls that
never return (``time.sleep(10**9)``, a read that hangs), which no thread can stop:

* Its threads are daemon threads. The interpreter's exit joins a
  ThreadPoolExecutor's threads: a process whose worker had shut down stayed alive for
  good behind such a call (an in-process worker's script never exited).
* A call its caller gave up on does not hold one of the pool's threads: the worker
  *lends* the thread to it (:meth:`CallPool.lend`) and the pool may start another one
  for the work that comes, until the call ends (:meth:`CallPool.unlend`). With a fixed
  8 threads, 8 such calls wedged their worker for good: every later call of a plain
  function, and every backward pass moved to a thread, waited behind them.

The pool starts threads as work comes (up to ``size`` plus the threads lent), keeps
them, and a thread beyond that bound ends once its job ends.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

__all__ = ["CallPool"]

log = logging.getLogger(__name__)

#: Taken by a waiting thread: it ends, already counted out (see CallPool.unlend).
_RETIRE: Any = object()


class CallPool(Executor):
    """An executor of at most ``size`` busy threads, not counting those lent to calls
    whose callers gave up; thread names are ``{name}_{n}``.

    Example::

        pool = CallPool(2, "actorgrad-w1")
        assert pool.submit(sum, [1, 2]).result() == 3
        pool.shutdown()
    """

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least 1 thread, got {size}")
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0  # alive
        self._waiting = 0  # threads waiting for a job no one has claimed yet
        self._backlog = 0  # jobs queued that no thread is coming for yet
        self._lent = 0
        self._closed = False
        self._numbers = itertools.count()
        self._alive: set[threading.Thread] = set()

    def __repr__(self) -> str:
        return (
            f"<CallPool {self._name} threads={self._threads}/{self._size} lent={self._lent} "
            f"waiting={self._waiting} backlog={self._backlog}{' closed' if self._closed else ''}>"
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._put((fut, fn, args, kwargs), "futures")
        return fut

    def run_soon(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """Run ``fn(*args)`` in a thread of the pool, with no future: ``fn`` reports its
        own outcome (an exception it lets out is logged). A worker's call of a plain
        function hands its result back to the loop itself, in one callback: a future
        per call, and the loop's task waiting on it, were about a third of a pooled round
        trip's time. Jobs not started at a shutdown that cancels futures are
        dropped.

        Example::

            pool.run_soon(print, "from a pool thread")
        """
        self._put((None, fn, args, None), "jobs")

    def _put(self, job: tuple[Any, ...], what: str) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"cannot schedule new {what} after shutdown")
            if self._waiting:
                self._waiting -= 1  # (that thread takes it)
            elif self._threads < self._size + self._lent:
                # (before the job is queued: a thread that cannot start, the process at
                # its limit, fails this submission, and no job waits for a thread that
                # never comes)
                self._start()
            else:
                self._backlog += 1
            self._jobs.put(job)

    def lend(self) -> None:
        """A call running in the pool was given up by its caller: it no longer counts
        against ``size`` (a job waiting for a thread gets one now)."""
        with self._lock:
            self._lent += 1
            if self._backlog and not self._closed:
                try:
                    self._start()
                except RuntimeError as exc:  # (the jobs wait for a thread that ends)
                    log.warning("%s: no thread for a queued job: %s", self._name, exc)
                else:
                    self._backlog -= 1

    def unlend(self) -> None:
        """A call :meth:`lend` was called for ended. (Its thread, which ended the job
        before this came, may be waiting for work beyond the bound: one waiting thread
        ends, or the pool ran more than ``size`` calls at once from then on.)"""
        with self._lock:
            self._lent -= 1
            if self._threads > self._size + self._lent and self._waiting:
                # (counted out now, not when a waiting thread takes the sentinel: a
                # lent thread ending its job meanwhile ended too, and a job submitted
                # meanwhile waited for a thread that never came)
                self._waiting -= 1
                self._threads -= 1
                self._jobs.put(_RETIRE)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; ``cancel_futures``: those not started are cancelled. Idle
        threads end; busy ones end after their job (``wait``: waited for)."""
        with self._lock:
            self._closed = True
            retiring = 0
            if cancel_futures:
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is _RETIRE:
                        retiring += 1  # (its thread, counted out, still waits: an end)
                    elif job is not None and job[0] is not None:
                        job[0].cancel()  # (a job of run_soon, without a future, just goes)
                self._backlog = 0
            for _ in range(self._threads + retiring):
                # (each thread ends at the first it takes, after the jobs queued before)
                self._jobs.put(None)
            threads = list(self._alive)
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()

    def _start(self) -> None:
        # (under the lock)
        t = threading.Thread(
            target=self._work, name=f"{self._name}_{next(self._numbers)}", daemon=True
        )
        t.start()  # (RuntimeError "can't start new thread": nothing counted)
        self._threads += 1
        self._alive.add(t)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None or job is _RETIRE:
                with self._lock:
                    if job is None:  # (a retiring thread was counted out already)
                        self._threads -= 1
                    self._alive.discard(threading.current_thread())
                return
            fut, fn, args, kwargs = job
            del job
            if fut is None:  # (run_soon's)
                try:
                    fn(*args)
                except BaseException:
                    log.exception("%s: a job failed", self._name)
            elif fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # (any: it is the job's, reported on its future)
                    fut.set_exception(exc)
                    del exc
                else:
                    fut.set_result(result)
                    del result
            # (what the job held goes now, not when the next job comes)
            del fut, fn, args, kwargs
            with self._lock:
                if self._backlog:
                    self._backlog -= 1  # (it takes one of those next)
                elif self._threads > self._size + self._lent:
                    self._threads -= 1  # (beyond the bound again: a lent call ended)
                    self._alive.discard(threading.current_thread())
                    return
                else:
                    self._waiting += 1  # (after a shutdown: it takes its end, None)
