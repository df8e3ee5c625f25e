"""Runtime tests with worker processes (TCP between OS processes)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gc
import io
import logging
import multiprocessing
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import has_ipv6_loopback, slow_link, until

import actorgrad as ag
from actorgrad.runtime import calls as rcalls
from actorgrad.runtime import cluster as rcluster
from actorgrad.runtime import worker as rworker
from actorgrad.runtime.procs import LinePrefixed, WorkerProcesses, group_left, proc_stat
from actorgrad.wire import decode_frame, encode_frame, join_chunks

REPO = str(Path(ag.__file__).resolve().parent.parent)


def add(a, b=0):
    return a + b


def pid():
    return os.getpid()


async def nap(seconds, value=None):
    await asyncio.sleep(seconds)
    return value


async def block_loop(seconds, started=None):
    if started is not None:  # (a FIFO its caller reads: the loop blocks right after)
        with open(started, "w") as f:  # noqa: ASYNC230 (the loop blocks anyway)
            f.write("blocking")
    time.sleep(seconds)  # noqa: ASYNC251 (blocks this worker's loop on purpose)


def owned():
    return rworker.current_worker().owned_count


def spin(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


async def relay(path, value):
    if not path:
        return [*value, ag.worker_name()]
    return await ag.rpc(path[0], relay, (path[1:], [*value, ag.worker_name()]))


def blas_env():
    return [
        os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    ]


def _gone(p: int) -> bool:
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return True
    return False


async def test_process_workers_rpc_reentrancy_and_no_orphans():
    async with ag.local_cluster(2, processes=True) as c:
        pids = c.pids
        assert len(pids) == 2
        assert await ag.rpc("w1", pid) == pids[0]
        assert await ag.rpc("w2", add, (1,), {"b": 2}) == 3
        assert await ag.rpc("w1", relay, (["w2", "driver", "w2"], [])) == [
            "w1",
            "w2",
            "driver",
            "w2",
        ]
        results = await asyncio.gather(*(ag.rpc("w2", nap, (0.05, i)) for i in range(300)))
        assert results == list(range(300))
        r = await ag.remote("w1", "builtins:list", ([1, 2, 3],))
        assert await r.to_here() == [1, 2, 3]
        assert ag.workers() == ["driver", "w1", "w2"]
    assert all(_gone(p) for p in pids)


async def stop_here(seconds: float) -> None:
    await ag.shutdown(timeout=seconds)


async def test_a_call_that_stops_its_own_worker_is_not_waited_for():
    # A graceful shutdown waits for the calls running: also for the call that asked for
    # it, which waited for the shutdown, so the worker waited out its whole grace (10 s
    # by default, here 60 s) before it stopped, and its caller heard nothing until then.
    async with ag.local_cluster(2, processes=True) as c:
        w = c.driver

        async def w2_left() -> None:
            while "w2" in ag.workers():
                await w._members_changed.wait()

        with pytest.raises(ag.WorkerLost, match="w2"):
            await asyncio.wait_for(ag.rpc("w2", stop_here, (60.0,)), 20)
        await asyncio.wait_for(w2_left(), 20)
        w2 = c.procs.procs["w2"]
        assert await asyncio.wait_for(asyncio.to_thread(w2.wait), 20) == 0
        assert await ag.rpc("w1", pid) == c.pids[0]


def _child_of_a_fork(conn, address, token):
    """In a child forked from a driver: what using the driver's worker says, then a
    worker of its own in the driver's cluster; then it lives on until told to end."""
    try:
        asyncio.run(ag.rpc("w1", pid))
        said = "no error"
    except RuntimeError as exc:
        said = str(exc)

    async def own():
        await ag.init("child", address=address, token=token)
        try:
            return await ag.rpc("w1", pid)
        finally:
            await ag.shutdown()

    try:
        conn.send((said, asyncio.run(own())))
    except BaseException as exc:  # (said too: the test would wait for the reply)
        conn.send((said, repr(exc)))
    conn.poll(60)


async def test_a_child_forked_from_the_driver_holds_none_of_its_sockets(caplog):
    # A child forked from a driver (multiprocessing's "fork" start method, a Pool's
    # default on Linux) held copies of the driver's sockets: leaving the cluster, the
    # driver closed its connections, but its worker processes heard no end of them while
    # the child lived, and local_cluster waited out its 3 s grace, then SIGTERMed them
    # ("did not exit within 3 s of leaving it"). Using the driver's worker in the child
    # said to use it from its own event loop, and ag.init there: "already initialized".
    fork = multiprocessing.get_context("fork")
    ours, theirs = fork.Pipe()
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, logger="actorgrad.runtime"):
        async with ag.local_cluster(1, processes=True) as c:
            child = fork.Process(
                target=_child_of_a_fork, args=(theirs, c.address, c.driver.token), daemon=True
            )
            child.start()
            try:
                assert await loop.run_in_executor(None, ours.poll, 60)
                said, w1 = ours.recv()
                assert said == (
                    f"worker 'driver' belongs to process {os.getpid()}, and this process is "
                    "a fork of it (os.fork(), multiprocessing's 'fork' start method): a "
                    "worker does not cross a fork; `await ag.init(...)` here makes one of "
                    "this process's own"
                )
                assert w1 == c.pids[0]
            except BaseException:
                child.kill()
                raise
        try:
            assert not [r for r in caplog.records if "did not exit" in r.getMessage()]
            assert child.is_alive()  # (it held its copies all along)
            assert [p.returncode for p in c.procs.procs.values()] == [0]
        finally:
            ours.send("end")
            await loop.run_in_executor(None, child.join, 30)
    assert child.exitcode == 0


def fork_and_sigterm(times: int) -> list[int]:
    """The exit codes of ``times`` forked children that each send themselves SIGTERM
    (1: it lived on)."""
    codes = []
    for _ in range(times):
        child = os.fork()
        if child == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(1)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    return codes


def fork_and_sigterm_at_once(times: int) -> list[int]:
    """The exit codes of ``times`` forked children, each sent SIGTERM by this process as
    soon as the fork returns (0: it lived on, until told by a pipe's end)."""
    codes = []
    for _ in range(times):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        os.kill(child, signal.SIGTERM)
        os.close(w)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
    return codes


@pytest.mark.parametrize("fork", [fork_and_sigterm, fork_and_sigterm_at_once])
async def test_a_sigterm_to_a_forked_child_is_the_childs_and_the_worker_goes_on(fork):
    # The worker process's loop took SIGTERM and SIGINT (add_signal_handler): a child
    # forked in a call (a fork Pool: its terminate() SIGTERMs its processes) ignored
    # SIGTERM, and wrote its number to the parent loop's wake-up socket, so the worker
    # process stopped as if it had been sent it (the call's caller: "w1 left the
    # cluster"); the Pool waited for good for a child stuck on its queue's lock.
    # fork_and_sigterm_at_once: one that came before the child's at-fork hook gave
    # SIGTERM its default handling found the parent's Python handler and wake-up socket
    # there (10 of 10 children forked and at once sent SIGTERM lived on, the parent's
    # loop handler ran 10 times). Forked in a worker process, in the driver's loop
    # thread and in its pool thread.
    loop = asyncio.get_running_loop()
    heard = threading.Event()
    loop.add_signal_handler(signal.SIGTERM, heard.set)  # (the driver's loop: the same)
    try:
        async with ag.local_cluster(1, processes=True) as c:
            assert await ag.rpc("w1", fork, (20,)) == [-signal.SIGTERM] * 20
            assert fork(20) == [-signal.SIGTERM] * 20
            assert await loop.run_in_executor(None, fork, 20) == [-signal.SIGTERM] * 20
            assert await ag.rpc("w1", pid) == c.pids[0]
            assert ag.workers() == ["driver", "w1"]
        assert [p.returncode for p in c.procs.procs.values()] == [0]
        assert not heard.is_set()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_process_workers_under_an_unknown_log_level_are_refused_by_name(monkeypatch):
    # (each worker process exited with status 2, the reason on its stderr only)
    monkeypatch.setenv("ACTORGRAD_LOG", "loud")
    with pytest.raises(ValueError, match=r"^ACTORGRAD_LOG='loud': not a log level \(debug,"):
        async with ag.local_cluster(1, processes=True):
            pass
    with pytest.raises(RuntimeError, match="not initialized"):
        ag.worker_name()


async def test_a_worker_process_that_exits_while_starting_fails_the_cluster_naming_it(
    monkeypatch, capfd
):
    # (the setting this process read at its start is good; the worker processes read
    # a bad one, refuse it and exit with status 2 before they join: any process that
    # ends before it joined is reported so, not waited for until the join timeout)
    from actorgrad.runtime import worker as rworker

    rworker.read_settings()
    monkeypatch.setenv(rworker.ENV_HEARTBEAT_TIMEOUT, "soon")
    with pytest.raises(
        RuntimeError, match=r"^worker process 'w1' \(pid \d+\) exited with status 2$"
    ):
        async with ag.local_cluster(1, processes=True):
            pass
    err = capfd.readouterr().err
    assert "actorgrad worker: ACTORGRAD_HEARTBEAT_TIMEOUT='soon': not a number of seconds" in err
    with pytest.raises(RuntimeError, match="not initialized"):
        ag.worker_name()


def close_stderr() -> None:
    sys.stderr.close()


def a_generator() -> Any:
    return (i for i in range(3))


async def test_a_worker_whose_stderr_a_call_closed_goes_on_and_still_logs(monkeypatch, capfd):
    # Its log handler wrote to that same sys.stderr: every record logged after it
    # raised "I/O operation on closed file" out of the runtime code that logged it
    # (logging's handleError tries sys.stderr too, and lets a ValueError through), and
    # at ACTORGRAD_LOG=debug the next call whose reply could not be encoded ended the
    # worker process.
    monkeypatch.setenv("ACTORGRAD_LOG", "debug")
    async with ag.local_cluster(1, processes=True):
        await ag.rpc("w1", close_stderr)
        for _ in range(3):
            with pytest.raises(ag.RemoteError, match="cannot send value of type 'generator'"):
                await ag.rpc("w1", a_generator, timeout=10)
            assert await ag.rpc("w1", add, (1, 2), timeout=10) == 3
    assert "reply of call" in capfd.readouterr().err  # (its records still go out)


def test_worker_processes_raise_their_open_files_limit_to_the_hard_one():
    # (at a distribution's default of 1,024, a worker ran out of files with its hard
    # limit far above: see procs.open_files_limit)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 300:
        pytest.skip(f"the hard limit of open files here is {hard}")
    code = textwrap.dedent(
        """
        import resource
        from actorgrad.runtime.procs import open_files_limit
        before = open_files_limit()
        print(before, open_files_limit(raise_to_hard=True),
              resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out == ["256", str(hard), str(hard)], out


async def test_process_workers_get_blas_threads_unless_the_user_set_them(monkeypatch):
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    share = str(max(1, (os.cpu_count() or 1) // 3))  # 2 workers + the driver
    async with ag.local_cluster(2, processes=True):
        for w in ("w1", "w2"):
            assert await ag.rpc(w, blas_env) == [share, share, share]
    # The user's OMP_NUM_THREADS: ours of OPENBLAS_NUM_THREADS overrode it (OpenBLAS
    # reads its own first), so none is set; OpenBLAS and MKL fall back to it.
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", blas_env) == [None, "7", None]
    # Another one of the user's: the others still get the cap (MKL's alone means
    # nothing to numpy's OpenBLAS, which then took every core in every process).
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    share = str(max(1, (os.cpu_count() or 1) // 2))  # 1 worker + the driver
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", blas_env) == [share, share, "3"]


def module_value(name: str) -> str:
    import importlib

    return importlib.import_module(name).VALUE


async def test_process_workers_import_what_the_driver_imports(tmp_path, monkeypatch):
    # A module the driver finds in a directory at the front of its sys.path is the one
    # the workers find, not the current directory's copy (which came first once: a
    # driver and workers running different code).
    first, cwd = tmp_path / "first", tmp_path / "cwd"
    for d in (first, cwd):
        d.mkdir()
        (d / "agshadow_mod.py").write_text(f"VALUE = {d.name!r}\n")
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(first))
    monkeypatch.delitem(sys.modules, "agshadow_mod", raising=False)
    assert module_value("agshadow_mod") == "first"
    monkeypatch.delitem(sys.modules, "agshadow_mod")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", module_value, ("agshadow_mod",)) == "first"


async def test_process_workers_import_from_a_zip_archive_on_the_drivers_path(tmp_path, monkeypatch):
    # Only folders of the driver's sys.path were passed on: a zip archive there (a
    # PYTHONPATH=deps.zip, an egg, a zipapp's) was dropped, and a function the driver
    # imported from it was "no module named ..." on every worker process.
    archive = tmp_path / "deps.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("agzipped_mod.py", "VALUE = 'zipped'\n")
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.delitem(sys.modules, "agzipped_mod", raising=False)
    assert module_value("agzipped_mod") == "zipped"
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", module_value, ("agzipped_mod",)) == "zipped"


async def test_heavy_function_on_a_process_worker_keeps_heartbeats_and_calls_going(short_heartbeat):
    async with ag.local_cluster(1, processes=True):
        heavy = asyncio.ensure_future(ag.rpc("w1", spin, (rworker.HEARTBEAT_TIMEOUT + 0.7,)))
        await asyncio.sleep(0.1)
        for i in range(5):
            t0 = time.perf_counter()
            assert await asyncio.wait_for(ag.rpc("w1", add, (i, 1)), 5) == i + 1
            # (waiting for the spin to end would take over 3 s; a loaded machine may
            # take a second to answer)
            assert time.perf_counter() - t0 < 2.0
            await asyncio.sleep(0.3)
        assert await asyncio.wait_for(heavy, 15) > 0  # no WorkerLost: heartbeats were answered


_ROUND = threading.Condition()
_ROUNDS = {"round": 0, "arrived": 0}


def sync_barrier(parties: int) -> int:
    """A blocking barrier, as a PyTorch parameter server's synchronous update waits for
    every trainer (its handlers run in a thread pool): returns the round it ended."""
    with _ROUND:
        r = _ROUNDS["round"]
        _ROUNDS["arrived"] += 1
        if _ROUNDS["arrived"] == parties:
            _ROUNDS["arrived"] = 0
            _ROUNDS["round"] += 1
            _ROUND.notify_all()
        elif not _ROUND.wait_for(lambda: _ROUNDS["round"] > r, timeout=10):
            raise TimeoutError(f"round {r}: the other parties never came")
        return r


async def test_a_plain_function_waiting_for_another_call_stays_in_the_thread_pool():
    # Its waits were often under FAST_CALL (the other party came within 1 ms), so it
    # "proved fast" and ran inline on the loop: there it waited for a request the
    # blocked loop could not read, the worker went silent and its callers got
    # WorkerLost after 3 s. A call that spent most of its time off the CPU (waiting)
    # proves nothing.
    async with ag.local_cluster(1, processes=True):
        for r in range(30):
            ends = await asyncio.wait_for(
                asyncio.gather(*(ag.rpc("w1", sync_barrier, (2,)) for _ in range(2))), 10
            )
            assert ends == [r, r]


@pytest.mark.timeout(120)
async def test_a_worker_decoding_a_request_of_many_objects_is_not_taken_for_lost(monkeypatch):
    # 8M empty lists (8 MB of msgpack) take w1's loop seconds to decode, with no ping
    # going out meanwhile: its caller took the live worker for lost ("sent nothing
    # for 3 s (heartbeat lost)"). A 2 s heartbeat timeout here (the setting's minimum:
    # 1 s lost the worker now and then on a loaded machine, between pings), on this side
    # only. The request's size is calibrated on w1 so that decoding it takes ~5 s there,
    # whatever the machine's speed: the case needs a decode well past the timeout. (Not
    # in this process: its big heap made the same decode 2x slower, by the collector.)
    async with ag.local_cluster(1, processes=True):
        per = await ag.rpc("w1", decode_seconds, (200_000,))  # (~0.3 s of w1's loop)
        n = min(40_000_000, max(1_000_000, int(5.0 / per * 200_000)))
        monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 2.0)
        # The allowance this side gives the decode: LOADED_SLOWDOWN x what the
        # calibration above took (a test run beside this one in another process, make
        # test runs the suite on every core, halved w1's rate after it; other work on
        # a 2-core machine, a load of 10, made it 3x slower and more, and the live
        # worker was lost). The case stays what it was: a decode well past the timeout.
        monkeypatch.setattr(rworker, "SLOW_DECODE_RATE", loaded_rate(per))
        t0 = time.perf_counter()
        assert await ag.rpc("w1", "builtins:len", ([[]] * n,)) == n
        took = time.perf_counter() - t0
        assert took > 2.0, f"{took:.2f} s for {n} lists: too fast to show anything"
        assert await ag.rpc("w1", add, (1, 2)) == 3


@pytest.mark.timeout(120)
async def test_a_worker_decoding_a_request_that_crossed_a_slow_link_is_not_taken_for_lost(
    monkeypatch,
):
    # The caller's allowance for its callee's decode of a request of many Python
    # objects (SLOW_DECODE_RATE) counts from the send; over a slow link the transfer
    # used it up, and the caller took the live worker for lost 3 s into the decode (12
    # MB of empty lists at 256 KiB/s: the request arrived after 46 s, the allowance was
    # 24 s). The callee now says how long it may be silent as it starts decoding. Here
    # the allowance is scaled down to the link (2.4 s on this side only, as is the 2 s
    # heartbeat timeout: 1 s lost the worker now and then on a loaded machine) and the
    # link passes the request in ~4 s; the decode takes ~6 s.
    async with ag.local_cluster(1, processes=True):
        driver = rworker.current_worker()
        wid, address, _local = driver.members["w1"]
        rate: dict[str, float] = {}
        async with slow_link(address, rate) as (link, relayed):
            # (the driver reaches w1 through the link, over TCP; it has not called it yet)
            assert "w1" not in driver._out
            monkeypatch.setitem(driver.members, "w1", (wid, link, ""))
            per = await ag.rpc("w1", decode_seconds, (200_000,))
            assert relayed, "the call did not go through the link"
            n = min(40_000_000, max(1_000_000, int(6.0 / per * 200_000)))
            rate["up"] = n / 4.0
            # (w1's allowance for its own decode, which this case is about:
            # LOADED_SLOWDOWN x the calibration's, see the test above)
            await ag.rpc("w1", set_slow_decode_rate, (loaded_rate(per),))
            monkeypatch.setattr(rworker, "SLOW_DECODE_RATE", n / 2.4)
            monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 2.0)
            t0 = time.perf_counter()
            assert await ag.rpc("w1", "builtins:len", ([[]] * n,)) == n
            took = time.perf_counter() - t0
            assert took > 6.0, f"{took:.2f} s for {n} lists: too fast to show anything"
            assert await ag.rpc("w1", add, (1, 2)) == 3


def empty_lists(n: int) -> list[list[Any]]:
    return [[]] * n


async def len_of_result_from(dest: str, n: int) -> int:
    return len(await ag.rpc(dest, empty_lists, (n,)))


@pytest.mark.timeout(120)
async def test_a_worker_decoding_a_result_of_many_objects_is_not_taken_for_lost(monkeypatch):
    # The driver waits on w1, which waits on w2's result of 8M empty lists (as many
    # MB of msgpack): w1 decodes it on its loop for seconds, with no ping going out,
    # and the driver took the live worker for lost ("sent nothing for 2 s"). A
    # request of as many objects was announced to the peers before its decode
    # (going_quiet); a result was not. A 2 s heartbeat timeout on this side only; the
    # result's size is calibrated on w1 so that decoding it takes ~5 s there.
    async with ag.local_cluster(2, processes=True):
        per = await ag.rpc("w1", decode_seconds, (200_000,))
        n = min(40_000_000, max(1_000_000, int(5.0 / per * 200_000)))
        # (w1's allowance for the decode, LOADED_SLOWDOWN x the calibration's: see
        # test_a_worker_decoding_a_request_of_many_objects_is_not_taken_for_lost)
        await ag.rpc("w1", set_slow_decode_rate, (loaded_rate(per),))
        monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 2.0)
        t0 = time.perf_counter()
        assert await ag.rpc("w1", len_of_result_from, ("w2", n)) == n
        took = time.perf_counter() - t0
        assert took > 2.0, f"{took:.2f} s for {n} lists: too fast to show anything"
        assert await ag.rpc("w1", add, (1, 2)) == 3


async def test_worker_processes_keep_the_token_out_of_their_environment():
    # (a process a call started, a tool a data loader ran, inherited it)
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", "os:getenv", ("ACTORGRAD_TOKEN",)) is None
        assert await ag.rpc("w1", add, (1, 2)) == 3


#: How much slower than its calibration a decode may run in the tests above on a loaded
#: machine (w1's share of a core falls as other processes take the cores)
LOADED_SLOWDOWN = 8


def loaded_rate(per: float) -> int:
    """A ``SLOW_DECODE_RATE`` that allows ``LOADED_SLOWDOWN`` x the time a decode of
    200,000 empty lists took (``per`` s, by ``decode_seconds``) per 200,000 bytes."""
    return int(200_000 / per / LOADED_SLOWDOWN)


def set_slow_decode_rate(rate: int) -> None:
    rworker.SLOW_DECODE_RATE = rate


def decode_seconds(n: int) -> float:
    """The best of three times to decode a request of ``n`` empty lists, here."""
    probe = join_chunks(encode_frame([0], (([[]] * n,), {})))
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        decode_frame(probe).body()
        took.append(time.perf_counter() - t0)
    return min(took)


_losses: list[tuple[str, str | None]] = []


def record_losses() -> None:
    """Record each peer this worker loses, with what it said if it dropped us."""
    from actorgrad.runtime import current_worker

    w = current_worker()
    w.add_peer_lost_callback(lambda name: _losses.append((name, w.dropped_by(name))))


def losses() -> list[tuple[str, str | None]]:
    return list(_losses)


async def stop_self_then_answer(seconds: float) -> str:
    """Stop this process (SIGSTOP) for ``seconds``, then answer at once: its first act
    once running again is a write, before its loop reads anything."""
    subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"])  # noqa: ASYNC220 (it stops the loop on purpose)
    os.kill(os.getpid(), signal.SIGSTOP)
    return "late"


async def test_a_stopped_worker_that_answers_first_reads_the_goodbye_of_its_caller(monkeypatch):
    # The driver dropped w1 (stopped past the heartbeat timeout, with a call out to
    # it) and aborted the socket; w1's late answer, its first write, drew a reset, and
    # its transport closed without reading the goodbye that waited there: w1 took the
    # live driver for lost (12 of 12 stops in a probe). The driver's socket stays
    # half-closed a while now. A 1 s heartbeat timeout here, on the driver only.
    monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 1.0)
    async with ag.local_cluster(1, processes=True):
        await ag.rpc("w1", record_losses)
        with pytest.raises(ag.WorkerLost, match="sent nothing for 1 s"):
            await asyncio.wait_for(ag.rpc("w1", stop_self_then_answer, (1.8,)), 20)
        async with asyncio.timeout(20):
            while not (seen := await ag.rpc("w1", losses)):  # noqa: ASYNC110 (no event)
                await asyncio.sleep(0.05)
        assert seen == [
            ("driver", "it heard nothing from this worker for 1 s: was its process stopped?")
        ]


@pytest.mark.parametrize("given_up", ["pending", "timed out"])
async def test_a_remote_value_whose_caller_gave_up_on_its_stopped_owner_is_freed(
    monkeypatch, given_up
):
    # The driver gave up the remote() (w1 stopped past the heartbeat timeout: it
    # dropped w1, its goodbye waiting in w1's socket); w1, running again, made the
    # value and replied before reading the goodbye: the reply was lost, and w1 counted
    # the value for the driver until the driver left the cluster (2-5 such values per
    # 5-minute chaos soak). The goodbye names the calls given up now (pending, or timed
    # out earlier, their late reply not come), and w1 takes back what its reply to one
    # counted. A 1 s heartbeat timeout, on the driver only.
    monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 1.0)
    async with ag.local_cluster(1, processes=True):
        if given_up == "pending":
            with pytest.raises(ag.WorkerLost, match="sent nothing for 1 s"):
                await asyncio.wait_for(ag.remote("w1", stop_self_then_answer, (1.8,)), 20)
        else:
            with pytest.raises(ag.RpcTimeout):
                await ag.remote("w1", stop_self_then_answer, (1.8,), timeout=0.3)
            # (a call pending on the stopped w1: the driver drops it for its silence)
            with pytest.raises(ag.WorkerLost, match="sent nothing for 1 s"):
                await asyncio.wait_for(ag.rpc("w1", add, (1, 2)), 20)
        kept = await ag.remote("w1", list, ([1],))  # (w1 heard from again: a live value)
        async with asyncio.timeout(20):
            while await ag.rpc("w1", owned) != 1:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.05)
        assert await kept.to_here() == [1]
        del kept
        gc.collect()
        async with asyncio.timeout(20):
            while await ag.rpc("w1", owned):  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.05)


async def stutter(block: float, gap: float, rounds: int) -> int:
    """Block the loop for ``block`` s, let it run for ``gap`` s; ``rounds`` times."""
    for _ in range(rounds):
        time.sleep(block)  # noqa: ASYNC251 (blocking the loop is the point)
        await asyncio.sleep(gap)
    return rounds


async def test_a_worker_whose_loop_stalls_again_and_again_still_pings():
    # Each stall is about half the heartbeat timeout, the loop free for 0.2 s in
    # between: w1's heartbeat round came late every time, and a late round skipped
    # its pings, so w1 sent nothing for 3 s and the caller took it for lost.
    block = rworker.HEARTBEAT_TIMEOUT * 0.55
    async with ag.local_cluster(1, processes=True):
        assert await asyncio.wait_for(ag.rpc("w1", stutter, (block, 0.2, 3)), 20) == 3


def in_flight() -> int:
    return rworker.current_worker().status()["in_flight"]


async def test_calls_their_callers_gave_up_stop_on_a_process_worker():
    # Each held one of the worker's in-flight slots for good (an hour here).
    async with ag.local_cluster(1, processes=True):
        calls = [ag.rpc("w1", nap, (3600,), timeout=0.5) for _ in range(200)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, ag.RpcTimeout) for r in results), results[:3]
        async with asyncio.timeout(10):
            # (no event tells of the cancelled tasks' end: the worker's count does)
            while await ag.rpc("w1", in_flight) > 1:  # noqa: ASYNC110 (1: this call)
                await asyncio.sleep(0.01)


async def test_killed_process_worker_fails_waiting_calls_with_worker_lost():
    async with ag.local_cluster(2, processes=True) as c:
        lost = asyncio.get_running_loop().create_future()
        c.driver.add_peer_lost_callback(lambda name: lost.done() or lost.set_result(name))
        call = asyncio.ensure_future(ag.rpc("w1", nap, (60,)))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        os.kill(c.pids[0], signal.SIGKILL)
        with pytest.raises(ag.WorkerLost, match=r"connection to worker 'w1' lost"):
            await asyncio.wait_for(call, 5)
        assert time.perf_counter() - t0 < 5
        assert await asyncio.wait_for(lost, 5) == "w1"
        assert await ag.rpc("w2", add, (1, 1)) == 2  # the others keep working


async def test_a_worker_process_of_local_cluster_that_died_is_reaped():
    # It stayed a zombie, its pid held, until the cluster's block was left (a notebook's
    # cluster: hours). With nothing left in its process group it is reaped at once.
    async with ag.local_cluster(2, processes=True) as c:
        victim = c.pids[0]
        os.kill(victim, signal.SIGKILL)
        try:
            await until(lambda: not os.path.exists(f"/proc/{victim}"), 15)
        except TimeoutError:
            state = (proc_stat(victim) or ["gone"])[0]
            raise AssertionError(f"not reaped (state {state})") from None
        assert await ag.rpc("w2", add, (1, 1)) == 2  # the others keep working


async def test_stopped_process_worker_is_detected_by_heartbeat():
    async with ag.local_cluster(1, processes=True) as c:
        call = asyncio.ensure_future(ag.rpc("w1", nap, (60,)))
        await asyncio.sleep(0.1)
        os.kill(c.pids[0], signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            with pytest.raises(ag.WorkerLost, match="heartbeat"):
                await asyncio.wait_for(call, rworker.HEARTBEAT_TIMEOUT + 3)
            assert time.perf_counter() - t0 < rworker.HEARTBEAT_TIMEOUT + 2
        finally:
            os.kill(c.pids[0], signal.SIGKILL)
            os.kill(c.pids[0], signal.SIGCONT)


async def test_rrefs_dropped_while_their_owner_was_hung_are_freed_once_it_runs_again(
    short_heartbeat,
):
    # The releases could not reach the stopped owner (its connection closed by the
    # heartbeat, the reconnect timed out): they were dropped, and it kept the values
    # for good, though nobody held them and everyone stayed in the cluster.
    driver = ag.runtime.api.current_worker
    async with ag.local_cluster(1, processes=True) as c:
        refs = [await ag.remote("w1", list, ([i],)) for i in range(5)]
        assert await ag.rpc("w1", owned) == 5
        os.kill(c.pids[0], signal.SIGSTOP)
        try:
            with pytest.raises(ag.WorkerLost, match="heartbeat"):
                await ag.rpc("w1", add, (1, 2), timeout=rworker.HEARTBEAT_TIMEOUT + 10)
            del refs
            gc.collect()
            async with asyncio.timeout(rworker.PEER_CONNECT_TIMEOUT + 10):
                while "w1" not in driver()._rref_unsent:  # noqa: ASYNC110 (no event)
                    await asyncio.sleep(0.05)  # (until the reconnect gave up)
        finally:
            os.kill(c.pids[0], signal.SIGCONT)
        async with asyncio.timeout(20):
            while await ag.rpc("w1", owned):  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.05)
        assert driver()._rref_unsent == {}


def run_driver(script: Path) -> subprocess.CompletedProcess[str]:
    """Run a driver script as a user would (``python script.py`` in its folder, this
    checkout importable, no cluster in the environment); its output captured."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("ACTORGRAD_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
        cwd=script.parent,
    )


def test_functions_of_a_main_script_run_on_process_workers(tmp_path):
    script = tmp_path / "driver_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            import multiprocessing  # its import rebinds sys.modules["__mp_main__"]
            import actorgrad as ag

            print("top level of", __name__, flush=True)
            _STATE = {}

            def square(x):
                return x * x

            def remember(v):
                _STATE["v"] = v

            def recall():
                return _STATE["v"]

            class Box:
                def __init__(self, v):
                    self.v = v
                def get(self):
                    return self.v

            async def main():
                async with ag.local_cluster(1, processes=True):
                    print("square", await ag.rpc("w1", square, (7,)), flush=True)
                    box = await ag.remote("w1", Box, (5,))
                    print("box", await box.rpc().get(), flush=True)
                    await ag.rpc("w1", remember, (11,))
                    print("recall", await ag.rpc("w1", recall), flush=True)

            if __name__ == "__main__":
                asyncio.run(main())
                print("done", flush=True)
            """
        )
    )
    out = run_driver(script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "square 49" in lines and "box 5" in lines and lines[-1] == "done"
    # one module on the worker: state set by one call is seen by the next
    assert "recall 11" in lines
    # the worker imported the script as __mp_main__ once, without running its main block
    assert lines.count("[w1] top level of __mp_main__") == 1
    assert lines.count("done") == 1


PRINTING_WORKERS = """
import asyncio, os, signal, sys, threading
import actorgrad as ag

def speak(name):
    sys.stdout.write(name + " first ")
    sys.stdout.write("line\\n" + name + " second line\\n")
    print(name, "on stderr", file=sys.stderr)
    t = threading.Thread(target=print, args=(name + " from a thread",))
    t.start()
    t.join()
    return name

def die():
    print("last words")  # (not flushed: stdout is a pipe, block-buffered)
    os.kill(os.getpid(), signal.SIGKILL)

async def main():
    async with ag.local_cluster(2, processes=True):
        print("called", await ag.rpc("w1", speak, ("w1",)), flush=True)
        print("called", await ag.rpc("w2", speak, ("w2",)), flush=True)
        try:
            await ag.rpc("w2", die)
        except ag.WorkerLost:
            print("w2 lost", flush=True)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_prefixed_stream_starts_each_line_and_each_redrawn_line_with_its_prefix():
    raw = io.StringIO()
    out = LinePrefixed(raw, "[w1] ")
    assert out.write("") == 0 and out.write("10%") == 3
    out.write("\r20%\r")  # (a progress bar redraws its line: the prefix stays on it)
    out.writelines(["done\r\n", "a", "b\n\n"])
    assert raw.getvalue() == "[w1] 10%\r[w1] 20%\r[w1] done\r\n[w1] ab\n[w1] \n"
    with pytest.raises(TypeError, match="bytes"):
        out.write(b"x")  # type: ignore[arg-type]
    assert out.getvalue() == raw.getvalue()  # (the rest is the stream's)
    out.write("crlf\r")
    out.write("\nnext\n")  # (a "\r\n" in two writes: no empty prefixed line between)
    assert raw.getvalue().endswith("[w1] crlf\r\n[w1] next\n")
    twin = copy.copy(out)  # (it recursed for good in __getattr__)
    assert twin.getvalue() == raw.getvalue()


def test_a_line_printed_from_inside_a_prefixed_write_does_not_hang_the_thread():
    # A signal handler (Python's run in the main thread, between any two bytecodes:
    # the event loop's thread in a worker) or an object's __del__ run by a garbage
    # collection that prints while the thread is inside a write on the same stream:
    # its lock was taken again by the thread holding it, and that thread, the worker's
    # loop, waited on itself for good.
    raw = io.StringIO()
    handled = threading.Event()

    class Interrupted(io.StringIO):
        def write(self, text: str) -> int:
            if not handled.is_set():  # (the handler runs while this write is under way)
                handled.set()
                out.write("from a signal handler\n")
            return raw.write(text)

    out = LinePrefixed(Interrupted(), "[w1] ")
    thread = threading.Thread(target=out.write, args=("a line\n",), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the write waited on its own lock"
    assert raw.getvalue() == "[w1] from a signal handler\n[w1] a line\n"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("copied", [False, True])
def test_a_process_forked_while_a_thread_writes_a_prefixed_line_can_print(copied):
    # A worker's call that forks (multiprocessing's default start method on Linux: a
    # Pool in a call) while another thread of the worker is in the middle of a line
    # (a pool thread printing, a log record): the child inherited the stream's lock
    # held by a thread it does not have, and its first print waited for good. The
    # same on a copy.copy() of the stream (copied): the child's new locks were the
    # originals' only, the copy, made without __init__, not registered for them.
    read_fd, write_fd = os.pipe()
    entered, release = threading.Event(), threading.Event()

    class Stalling(io.StringIO):
        def write(self, text: str) -> int:
            if "stalls" in text:  # (the thread's line: it holds the lock meanwhile)
                entered.set()
                release.wait(30)
                return len(text)
            return os.write(write_fd, text.encode())

    out = LinePrefixed(Stalling(), "[w1] ")
    if copied:
        out = copy.copy(out)
    thread = threading.Thread(target=out.write, args=("this line stalls\n",))
    thread.start()
    try:
        assert entered.wait(10)
        with warnings.catch_warnings():
            # (3.12+: "this process is multi-threaded, fork() may deadlock": the case)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # (the child: print, then go, whatever happens)
            try:
                out.write("printed in the child\n")
            finally:
                os._exit(0)
        try:
            readable, _, _ = select.select([read_fd], [], [], 10)
            assert readable, "the forked child's print never came (its lock was held)"
            assert os.read(read_fd, 100) == b"[w1] printed in the child\n"
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join(10)
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize("setting", ["", "0"])
def test_each_line_a_worker_process_prints_says_which_worker_printed_it(
    tmp_path, monkeypatch, setting
):
    # The worker processes of a cluster print on the terminal of the program that
    # started them: their lines came mixed, and whose each was could not be told. And
    # one killed (SIGKILL) lost what it had printed into its pipe's block buffer.
    # Now each line begins "[NAME] " (ACTORGRAD_OUTPUT_PREFIX=0: not), flushed at its end.
    script = tmp_path / "printing.py"
    script.write_text(PRINTING_WORKERS)
    monkeypatch.setenv("ACTORGRAD_OUTPUT_PREFIX", setting)  # (run_driver passes it on)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # (as a user's shell has it)
    out = run_driver(script)
    assert out.returncode == 0, out.stderr
    lines, errors = out.stdout.splitlines(), out.stderr.splitlines()
    for name in ("w1", "w2"):
        p = f"[{name}] " if setting == "" else ""
        for line in (f"{name} first line", f"{name} second line", f"{name} from a thread"):
            assert lines.count(p + line) == 1, (p + line, lines)
        assert errors.count(f"{p}{name} on stderr") == 1, errors
    assert ("[w2] last words" if setting == "" else "last words") in lines, lines
    assert "w2 lost" in lines and lines.count("called w1") == lines.count("called w2") == 1


def test_an_optimizer_class_of_the_main_script_steps_on_process_workers(tmp_path):
    # DistributedOptimizer named the class "__main__:HalfSGD" and the owner imported
    # that: its own __main__ (AttributeError at the first step), not the driver's script.
    script = tmp_path / "opt_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            import numpy as np
            import actorgrad as ag

            class HalfSGD(ag.optim.SGD):
                def step(self, grads=None):
                    super().step({p: g / 2 for p, g in grads.items()})

            def make_param():
                return ag.tensor(np.ones(2), requires_grad=True)

            async def main():
                async with ag.local_cluster(1, processes=True):
                    ref = await ag.remote("w1", make_param)
                    opt = ag.dist.DistributedOptimizer(HalfSGD, [ref], lr=1.0)
                    async with ag.dist.context() as ctx:
                        w = await ref.to_here()
                        await ag.dist.backward(ctx, [(w * 4.0).sum()])
                        await opt.step(ctx)
                    print("param", (await ref.to_here()).data.tolist(), flush=True)

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    out = run_driver(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["param [-1.0, -1.0]"]


async def test_serve_cluster_and_cluster_status():
    stop = asyncio.Event()
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(
        rcluster.serve_cluster(2, token="t0k", on_ready=ready.set_result, stop=stop)
    )
    try:
        address = await asyncio.wait_for(asyncio.shield(ready), 30)
        st = await rcluster.cluster_status(address, "t0k")
        names = [w["name"] for w in st["workers"]]
        assert names == ["_head", "w1", "w2"]
        for w in st["workers"]:
            assert {"name", "id", "address", "mailbox", "in_flight"} <= set(w)
        with pytest.raises(
            ag.AuthError, match=r"refused: wrong cluster token \(the peer does not take ours\)"
        ):
            await rcluster.cluster_status(address, "wrong")
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_process_workers_may_have_names_that_start_with_a_dash():
    # ("--name", "-x"): the worker process's argument parser took "-x" for an option
    # and exited with status 2.
    async with ag.local_cluster(["-x", "--join"], processes=True):
        assert await ag.rpc("-x", ag.worker_name) == "-x"
        assert await ag.rpc("--join", ag.worker_name) == "--join"


async def test_serve_worker_joins_a_cluster_and_stops():
    w = await ag.init("head")
    try:
        stop = asyncio.Event()
        task = asyncio.ensure_future(rcluster.serve_worker(w.address, "extra", w.token, stop=stop))

        async def joined():
            while "extra" not in ag.workers():
                await w._members_changed.wait()

        await asyncio.wait_for(joined(), 10)
        assert await ag.rpc("extra", add, (2, 3)) == 5
        stop.set()
        await asyncio.wait_for(task, 10)
        assert "extra" not in ag.workers()
    finally:
        await ag.shutdown()


async def _extra_joined(w: Any, **kwargs: Any) -> tuple[asyncio.Future, Any]:
    """serve_worker's task of a worker "extra" joining ``w``'s cluster, and the worker
    once it joined."""
    joined: asyncio.Future = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(
        rcluster.serve_worker(w.address, "extra", w.token, on_joined=joined.set_result, **kwargs)
    )
    return task, await asyncio.wait_for(joined, 10)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
async def test_a_worker_joining_an_ipv6_cluster_listens_on_ipv6():
    # It bound 127.0.0.1 (0.0.0.0 for a cluster on another host's IPv6 address) and
    # advertised the IPv6 address it reached the head from, where nothing listened.
    w = await ag.init("head", host="[::1]")
    try:
        stop = asyncio.Event()
        task, extra = await _extra_joined(w, stop=stop)
        assert extra.host == "::1"
        assert extra.address.startswith("[::1]:")
        assert await ag.rpc("extra", add, (2, 3)) == 5
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await ag.shutdown()
    assert (rcluster.bind_for("[2001:db8::1]:7000"), rcluster.bind_for("10.0.0.1:7000")) == (
        "::",
        "0.0.0.0",
    )


async def test_a_worker_the_head_dropped_for_silence_is_told_so(monkeypatch):
    # (a worker stopped for over the idle timeout, then continued, said "the cluster's
    # head went away (its connection closed)": the head had dropped it, and lived)
    monkeypatch.setattr(rworker, "HEARTBEAT_INTERVAL", 0.05)
    monkeypatch.setattr(rworker, "IDLE_TIMEOUT", 0.3)
    w = await ag.init("head")
    try:
        task, extra = await _extra_joined(w)
        for conn in extra._conns:  # (silent, as a stopped process is, but reading)
            monkeypatch.setattr(conn, "send_heartbeat", lambda *_: None)
        why = await asyncio.wait_for(task, 10)
        assert rworker.head_lost(why) == (
            "the cluster's head dropped this worker (it heard nothing from this worker "
            "for 0.3 s: was its process stopped?)"
        )
        assert "extra" not in ag.workers()
    finally:
        await ag.shutdown()


async def test_a_worker_whose_connection_to_a_live_head_broke_says_so():
    # (it said "the cluster's head went away": the head lived on, its connection broke)
    w = await ag.init("head")
    try:
        task, extra = await _extra_joined(w)
        extra.registry_conn.abort(ConnectionResetError("reset by the test"))
        why = await asyncio.wait_for(task, 10)
        assert rworker.head_lost(why) == (
            "this worker's connection to the cluster's head broke (reset by the test)"
        )
        assert rworker.head_lost(rworker.HEAD_CONN_CLOSED) == (
            "this worker's connection to the cluster's head closed (the head died, or the "
            "connection broke)"
        )
    finally:
        await ag.shutdown()


async def test_serve_worker_whose_worker_shut_itself_down_says_it_was_asked_to_stop():
    # It said the head went away ("worker 'extra' shut down"): a worker process whose
    # own code called shutdown printed so as it left.
    w = await ag.init("head")
    try:
        task, extra = await _extra_joined(w)
        await extra.shutdown()
        assert await asyncio.wait_for(task, 10) is None
    finally:
        await ag.shutdown()


async def test_cancelled_process_cluster_leaves_no_child_processes():
    inside = asyncio.Event()
    holder = {}

    async def body():
        async with ag.local_cluster(2, processes=True) as c:
            holder["pids"] = c.pids
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.ensure_future(body())
    await asyncio.wait_for(inside.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(_gone(p) for p in holder["pids"])


async def test_a_process_cluster_left_while_it_starts_says_nothing_of_its_workers(
    monkeypatch, capfd
):
    # Ctrl-C while local_cluster (or `actorgrad demo`) started its worker processes:
    # the head closed first, and each worker's join failed then, a line each on the
    # terminal ("actorgrad worker w1: WorkerLost: cannot connect to ...: Connection
    # refused"). Those not joined yet are stopped first now, and end quietly.
    from actorgrad.runtime.procs import WorkerProcesses

    started = asyncio.Event()
    holder: dict[str, Any] = {}
    wait_registered = WorkerProcesses.wait_registered

    async def registering(self, registry, timeout=60.0):  # noqa: ASYNC109 (its signature)
        holder["pids"] = self.pids
        started.set()
        return await wait_registered(self, registry, timeout)

    monkeypatch.setattr(WorkerProcesses, "wait_registered", registering)

    async def body():
        async with ag.local_cluster(2, processes=True):
            raise AssertionError("the workers joined before the cancel")

    task = asyncio.ensure_future(body())
    await asyncio.wait_for(started.wait(), 30)  # (the processes are starting: importing)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(_gone(p) for p in holder["pids"])
    err = capfd.readouterr().err
    assert "actorgrad worker" not in err, err


def test_a_ctrl_c_before_the_loop_starts_leaves_no_coroutine_unawaited(monkeypatch):
    # (`actorgrad demo` interrupted at 0.3 s: "RuntimeWarning: coroutine '_run_demo' was
    # never awaited" on the terminal)
    import inspect

    from actorgrad.runtime import cluster as rcluster

    class Interrupted:
        def __init__(self, *args, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(asyncio, "Runner", Interrupted)
    monkeypatch.setattr(asyncio, "run", Interrupted)
    coro = asyncio.sleep(0)
    with pytest.raises(KeyboardInterrupt):
        rcluster.run(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_killing_the_driver_leaves_no_worker_processes(tmp_path):
    script = tmp_path / "doomed_driver.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            import actorgrad as ag

            async def main():
                async with ag.local_cluster(2, processes=True) as c:
                    print(*c.pids, flush=True)
                    await asyncio.sleep(60)

            asyncio.run(main())
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("ACTORGRAD_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    deadline = time.monotonic() + 15
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), "worker processes outlived their driver"


def test_a_worker_process_ends_soon_after_the_process_that_started_it():
    # Worker processes leave when their head goes, unless their loop is blocked (a call
    # that proved fast, then blocks; a backward hook): such a one stayed for good,
    # re-parented to init, when the process that started it was killed (SIGKILL, or a
    # SIGTERM the driver did not handle). Each now watches its starter (--parent).
    starter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    blocked = (
        "import time\n"
        "from actorgrad.runtime.worker_main import leave_with\n"
        f"leave_with({starter.pid}, 0.2, 'w9')\n"
        "time.sleep(120)\n"  # (a blocked loop)
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    child = subprocess.Popen(
        [sys.executable, "-c", blocked], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # (its starter lives: it stays)
            child.wait(1.0)
        starter.kill()
        starter.wait()
        assert child.wait(30) == 1
        assert f"the process that started it ({starter.pid}) is gone" in child.stderr.read()
    finally:
        for p in (starter, child):
            p.kill()
            p.wait()
        child.stderr.close()


def worker_argv() -> list[str]:
    return sys.argv


async def test_process_workers_watch_the_process_that_started_them():
    async with ag.local_cluster(1, processes=True):
        assert f"--parent={os.getpid()}" in await ag.rpc("w1", worker_argv)


async def test_init_joins_a_cluster_from_the_environment(tmp_path):
    async with ag.local_cluster(1, transport="tcp") as c:
        script = tmp_path / "joiner.py"
        script.write_text(
            textwrap.dedent(
                """
                import asyncio
                import actorgrad as ag

                async def main():
                    await ag.init("joiner")
                    print(ag.workers(), flush=True)
                    print(await ag.rpc("w1", "operator:add", (40, 2)), flush=True)
                    await ag.shutdown()

                asyncio.run(main())
                """
            )
        )
        # (spaces around it are dropped, as around the token: kept, the host was
        # " 127.0.0.1", and the join failed "cannot connect to  127.0.0.1:...")
        env = dict(os.environ, PYTHONPATH=REPO, ACTORGRAD_ADDRESS=f" {c.address}\n")
        env["ACTORGRAD_TOKEN"] = c.driver.token
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["['driver', 'joiner', 'w1']", "42"]


async def test_a_driver_blocked_for_longer_than_the_heartbeat_timeout_is_not_dropped(
    short_heartbeat,
):
    async with ag.local_cluster(1, processes=True):
        call = asyncio.ensure_future(ag.rpc("w1", nap, (0.2, "ok")))
        await asyncio.sleep(0.05)
        time.sleep(rworker.HEARTBEAT_TIMEOUT + 0.5)  # a long local computation, loop blocked  # noqa: ASYNC251 (blocking on purpose)
        assert await asyncio.wait_for(call, 5) == "ok"
        assert await ag.rpc("w1", add, (1, 2)) == 3


async def test_a_head_blocked_while_a_member_fetches_the_member_list_keeps_the_member(
    short_heartbeat,
):
    # w1 asks the head for the whole member list (a call of it names a worker it does
    # not know) and the head's loop blocks before it answers, for longer than the
    # heartbeat timeout: that fetch fails, as a call to a silent peer does, and so does
    # the call, saying so (it said "unknown worker 'nosuch'", a ValueError, whether the
    # name had joined or not: the head could not tell); w1 stays in the cluster (it
    # closed its membership for the pending fetch: it left the cluster, and its process
    # exited).
    async with ag.local_cluster(1, processes=True) as c:
        reg = c.driver.registry
        asked = asyncio.Event()
        snapshot = reg.snapshot

        def blocked_snapshot():
            asked.set()
            time.sleep(rworker.HEARTBEAT_TIMEOUT + 1.5)  # the head's loop blocked  # noqa: ASYNC251 (blocking on purpose)
            return snapshot()

        reg.snapshot = blocked_snapshot
        call = asyncio.ensure_future(ag.rpc("w1", ag.rpc, ("nosuch", "operator:add", (1, 2))))
        await asyncio.wait_for(asked.wait(), 10)
        reg.snapshot = snapshot
        with pytest.raises(
            ag.RemoteError,
            match="worker 'nosuch' is not in this worker's view of the cluster, and the "
            "cluster's head did not give its member list: worker 'driver' sent nothing for",
        ) as err:
            await asyncio.wait_for(call, 10)
        assert err.value.remote_type == "actorgrad.errors.WorkerLost"
        assert await asyncio.wait_for(ag.rpc("w1", add, (1, 2)), 5) == 3
        assert "w1" in reg.members and c.procs.procs["w1"].poll() is None


_HEAD = """
import asyncio, sys
import actorgrad as ag

async def main():
    w = await ag.init("head", token=sys.argv[1], port=int(sys.argv[2]))
    print(w.address, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def _start_head(token: str, port: int = 0) -> tuple[asyncio.subprocess.Process, str]:
    """A cluster's head in a process of its own, listening at ``port`` (0: a free one),
    and its address."""
    head = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HEAD,
        token,
        str(port),
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
    )
    try:
        assert head.stdout is not None
        address = (await asyncio.wait_for(head.stdout.readline(), 30)).decode().strip()
    except BaseException:
        head.kill()
        await asyncio.wait_for(head.wait(), 10)
        raise
    return head, address


@contextlib.asynccontextmanager
async def _a_head_and_x() -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Any]]:
    """A head in a process of its own, its address, and worker ``x`` started (not joined)
    with its token; the head is killed (stopped or not) at the end."""
    token = "t" * 32
    head, address = await _start_head(token)
    x = ag.runtime.Worker("x", token=token)
    try:
        await x.start()
        yield head, address, x
    finally:
        await x.shutdown()
        head.kill()  # (stopped or not)
        await asyncio.wait_for(head.wait(), 10)


def _stop_as_the_join_is_sent(x: Any, head: asyncio.subprocess.Process) -> asyncio.Event:
    """Stop ``head``'s process (SIGSTOP) as worker ``x`` sends its request (the join's);
    the event returned is set then."""
    call_on = x.call_on
    sent = asyncio.Event()

    async def the_head_stops_as_it_is_sent(conn: Any, target: Any, *a: Any, **kw: Any) -> Any:
        os.kill(head.pid, signal.SIGSTOP)
        sent.set()
        return await call_on(conn, target, *a, **kw)

    x.call_on = the_head_stops_as_it_is_sent
    return sent


async def test_a_join_to_a_head_stopped_right_after_the_handshake_says_it_did_not_answer(
    monkeypatch,
):
    # The head process stops (SIGSTOP, Ctrl-Z) between the token handshake and its
    # hello: the join failed once the hello's deadline passed, with "no hello from
    # 127.0.0.1:PORT", no cause and no time (the handshake's own deadline said "did not
    # answer ... within 5 s (the process is hung or overloaded ...)").
    from actorgrad.runtime import transport

    token = "t" * 32
    head, address = await _start_head(token)
    try:
        handshake = transport.handshake

        async def then_the_head_stops(conn: Any, tok: str, **kw: Any) -> None:
            await handshake(conn, tok, **kw)
            os.kill(head.pid, signal.SIGSTOP)

        monkeypatch.setattr(transport, "handshake", then_the_head_stops)
        monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT", 1.0)  # (this process's only)
        x = ag.runtime.Worker("x", token=token)
        await x.start()
        try:
            t0 = time.monotonic()
            with pytest.raises(
                ag.WorkerLost,
                match=rf"^{address} completed the handshake but sent no hello within 1 s "
                r"\(the process is hung or overloaded\)$",
            ):
                await asyncio.wait_for(x.join(address), 10)
            assert time.monotonic() - t0 < 5.0
            assert not x.members and x.registry_conn is None
        finally:
            await x.shutdown()
    finally:
        head.kill()  # (stopped or not)
        await asyncio.wait_for(head.wait(), 10)


async def test_a_join_told_to_wait_waits_out_a_head_stopped_once_its_request_left():
    # `actorgrad worker --wait`: the join's request left, then the head's process
    # stopped for longer than the heartbeat timeout. The join failed 3.5 s after it was
    # sent ("worker '_head' sent nothing for 3 s"), --wait or not, and the head, once it
    # went on, took it and heard it leave at once. It waits for the head now, on that
    # connection, and is taken once, when the head goes on.
    async with _a_head_and_x() as (head, address, x):
        sent = _stop_as_the_join_is_sent(x, head)
        joining = asyncio.ensure_future(rcluster._join_when_up(x, address, "", 120))
        try:
            await asyncio.wait_for(sent.wait(), 30)
            # (it failed 3.5 s after its request left)
            done, _ = await asyncio.wait([joining], timeout=rworker.HEARTBEAT_TIMEOUT + 3)
            assert not done, joining.exception()
        finally:
            os.kill(head.pid, signal.SIGCONT)
        await asyncio.wait_for(joining, 30)
        assert sorted(x.members) == ["head", "x"]
        # (one change in the head's registry: x's join, no leave before it)
        version, members = await x.call("head", "actorgrad.runtime.registry:_snapshot", timeout=10)
        assert version == 1 and sorted(members) == ["head", "x"]


async def test_a_join_told_to_wait_names_the_head_still_silent_at_its_deadline():
    # (the deadline of a join whose head did not answer: said as the head's silence,
    # with the wait, not as an internal call that timed out)
    async with _a_head_and_x() as (head, address, x):
        _stop_as_the_join_is_sent(x, head)
        with pytest.raises(
            ag.WorkerLost,
            match=rf"^the cluster's head at {re.escape(address)} took the connection but did "
            r"not answer the join within [\d.]+ s \(its process stopped, or its event loop "
            r"blocked, for all that time\?\) \(tried for [\d.]+ s: --wait 6\)$",
        ):
            await asyncio.wait_for(rcluster._join_when_up(x, address, "", 6), 30)
        assert not x.members and x.registry_conn is None and x.joining_conn is None


async def test_a_join_told_to_wait_joins_a_head_restarted_once_its_request_left():
    # `actorgrad worker --wait`: the head's process died as the join's request left,
    # and another started at its address. The join failed at once, "connection to
    # worker 'head' lost: [Errno 104] Connection reset by peer", --wait or not (only
    # nothing listening was tried again); it joins the new head now.
    token = "t" * 32
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    heads = []
    x = ag.runtime.Worker("x", token=token)
    try:
        head, address = await _start_head(token, port)
        heads.append(head)
        await x.start()
        call_on = x.call_on
        sent = asyncio.Event()

        async def the_head_dies_as_it_is_sent(conn: Any, target: Any, *a: Any, **kw: Any) -> Any:
            if not sent.is_set():
                os.kill(head.pid, signal.SIGKILL)
                sent.set()
            return await call_on(conn, target, *a, **kw)

        x.call_on = the_head_dies_as_it_is_sent  # type: ignore[method-assign]
        joining = asyncio.ensure_future(rcluster._join_when_up(x, address, "", 120))
        await asyncio.wait_for(sent.wait(), 30)
        await asyncio.wait_for(head.wait(), 10)
        heads.append((await _start_head(token, port))[0])
        await asyncio.wait_for(joining, 30)
        assert sorted(x.members) == ["head", "x"]
        version, members = await x.call("head", "actorgrad.runtime.registry:_snapshot", timeout=10)
        assert version == 1 and sorted(members) == ["head", "x"]
    finally:
        await x.shutdown()
        for head in heads:
            if head.returncode is None:
                head.kill()
                await asyncio.wait_for(head.wait(), 10)


async def test_connecting_to_a_peer_that_never_answers(monkeypatch):
    # The peer's kernel accepts the connection but the process is stopped: the
    # handshake never completes. A call's timeout covered only the wait for the reply
    # (it waited out the 5 s handshake timeout), and that deadline was an AuthError, as
    # if the token were wrong.
    async with ag.local_cluster(2, processes=True) as c:
        assert c.procs is not None
        pids = [c.procs.procs[n].pid for n in ("w1", "w2")]
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(ag.RpcTimeout, match=r"'w2' timed out after 0.5 s \(still connect"):
                await ag.rpc("w2", add, (1, 2), timeout=0.5)
            assert time.monotonic() - t0 < 2.0
            monkeypatch.setattr(rworker, "PEER_CONNECT_TIMEOUT", 0.3)
            # (named; and not tried again over TCP after the Unix socket: twice the wait)
            tried = []
            open_ = c.driver._open

            async def counting_open(
                address: str, local: str, deadline: float | None, peer: str | None
            ) -> Any:
                tried.append(local or address)
                return await open_(address, local, deadline, peer)

            monkeypatch.setattr(c.driver, "_open", counting_open)
            with pytest.raises(
                ag.WorkerLost,
                match=r"worker 'w1' \(127.0.0.1:\d+\) accepted the connection but did not answer "
                r"within 0.3 s: hung or overloaded$",
            ):
                await ag.rpc("w1", add, (1, 2))
            assert len(tried) == 1, tried
        finally:
            for p in pids:
                os.kill(p, signal.SIGCONT)
        monkeypatch.undo()
        # w2's connection attempt went on: the next call uses it
        assert await ag.rpc("w2", add, (1, 2), timeout=10) == 3
        assert await ag.rpc("w1", add, (1, 2), timeout=10) == 3


async def test_a_token_read_with_its_newline_lets_process_workers_join():
    # The workers get it stripped (ACTORGRAD_TOKEN, as a token file), the head kept
    # it as given: "wrong cluster token", and the worker processes exited.
    async with ag.local_cluster(1, processes=True, token="s3cret-token\n"):
        assert await ag.rpc("w1", add, (1, 2)) == 3


async def test_two_driver_scripts_with_modules_of_one_name_on_one_worker_are_refused(tmp_path):
    # The second script's `import model` found the first one's, cached: its job ran
    # the other project's code, silently.
    for project in ("a", "b"):
        folder = tmp_path / project
        folder.mkdir()
        (folder / "model.py").write_text(f"WHO = {project!r}\n")
        (folder / "job.py").write_text("import model\n\ndef which():\n    return model.WHO\n")
    async with ag.local_cluster(1, processes=True):
        a = ["__main__:which", str((tmp_path / "a" / "job.py").resolve())]
        b = ["__main__:which", str((tmp_path / "b" / "job.py").resolve())]
        assert await ag.rpc("w1", a) == "a"
        with pytest.raises(ag.RemoteError, match="already has a module 'model' from"):
            await ag.rpc("w1", b)
        assert await ag.rpc("w1", a) == "a"


async def test_modules_of_one_name_are_refused_also_from_the_workers_working_directory(
    tmp_path, monkeypatch
):
    # The folder a worker runs in is on its path already: a script there was taken
    # without the check, and its `import model` got the other project's, silently.
    # Files no script imports by name (__init__.py, __main__.py, setup.py) are no clash.
    for project in ("a", "b", "c"):
        folder = tmp_path / project
        folder.mkdir()
        for name in ("__init__", "__main__", "setup"):
            (folder / f"{name}.py").write_text("")
        (folder / f"model_{project}.py").write_text(f"WHO = {project!r}\n")
        (folder / "model.py").write_text(f"WHO = {project!r}\n")
        (folder / "job.py").write_text(
            f"import model\nimport model_{project}\n\n"
            f"def which():\n    return model.WHO + model_{project}.WHO\n"
        )
    (tmp_path / "c" / "model.py").unlink()
    (tmp_path / "c" / "job.py").write_text(
        "import model_c\n\ndef which():\n    return model_c.WHO\n"
    )
    monkeypatch.chdir(tmp_path / "a")
    async with ag.local_cluster(1, processes=True):
        a, b, c = (["__main__:which", str(tmp_path / p / "job.py"), "s"] for p in "abc")
        assert await ag.rpc("w1", b) == "bb"
        with pytest.raises(ag.RemoteError, match="already has a module 'model' from"):
            await ag.rpc("w1", a)
        assert await ag.rpc("w1", c) == "c"


class OddModule(types.ModuleType):
    """A module object whose missing attributes raise KeyError (as some lazy loaders)."""

    def __getattr__(self, name: str) -> Any:
        raise KeyError(name)


def install_odd_module() -> None:
    sys.modules["odd_module"] = OddModule("odd_module")


def _write(path: Path, text: str, stamp: int) -> None:
    """Write ``text`` with a modification time of its own (whatever the clock's grain)."""
    path.write_text(textwrap.dedent(text))
    os.utime(path, ns=(10**18 + stamp * 10**9,) * 2)


async def test_a_new_driver_session_gets_the_code_on_disk_and_an_unchanged_one_keeps_its_modules(
    tmp_path,
):
    # Versions were digests of what each driver had imported: two runs of one
    # unchanged script importing different modules re-imported it at every call; a
    # module two scripts of a folder share stayed stale for the one that had not
    # imported it first; one imported while a function ran, for good.
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import sys
            import model
            sys.__dict__.setdefault("ag_test_imports", []).append("train")

            def value():
                return model.VALUE

            def lazy_value():
                import lazy
                return lazy.VALUE

            def imports():
                return len(sys.ag_test_imports)
            """
        )
    )
    (tmp_path / "evaluate.py").write_text("import model\n\ndef value():\n    return model.VALUE\n")
    _write(tmp_path / "model.py", "VALUE = 1\n", 1)
    _write(tmp_path / "lazy.py", "VALUE = 10\n", 1)
    train, evaluate = str(tmp_path / "train.py"), str(tmp_path / "evaluate.py")

    async def call(script: str, fn: str, session: str) -> Any:
        return await ag.rpc("w1", [f"__main__:{fn}", script, session])

    async with ag.local_cluster(1, processes=True):
        assert await call(train, "value", "s1") == 1
        assert await call(evaluate, "value", "s2") == 1
        assert await call(train, "lazy_value", "s1") == 10
        for session in ("s3", "s4", "s3", "s4"):  # (two runs at once, nothing changed)
            assert await call(train, "value", session) == 1
        assert await call(train, "imports", "s4") == 1  # (imported once)
        _write(tmp_path / "model.py", "VALUE = 2\n", 2)
        assert await call(evaluate, "value", "s5") == 2  # (model came with train)
        assert await call(train, "value", "s6") == 2
        _write(tmp_path / "lazy.py", "VALUE = 20\n", 2)
        assert await call(train, "lazy_value", "s7") == 20
        # (a session still running keeps the functions it called, and their modules:
        # a purge for another session switched it to the new code midway)
        assert await call(train, "value", "s1") == 1


async def test_a_worker_passes_a_drivers_function_on_with_that_drivers_latest_session(tmp_path):
    # The worker's cache of wire names kept the first session's: the next worker got
    # a run's calls under a session that had ended (and ran what that one resolved).
    _write(
        tmp_path / "relay.py",
        """
        from actorgrad.runtime import calls

        def helper():
            return 1

        def name_of_helper():
            return calls.fn_spec(helper)
        """,
        1,
    )
    script = str(tmp_path / "relay.py")
    async with ag.local_cluster(1, processes=True):
        for session in ("s1", "s2", "s3"):  # (the one it last saw: the worker's own
            # calls don't carry their caller's)
            spec = await ag.rpc("w1", ["__main__:name_of_helper", script, session])
            assert spec == ["__main__:helper", script, session]


async def test_a_module_two_scripts_share_reaches_a_second_hop_as_of_the_latest_run(tmp_path):
    # A worker passed on a function of a module beside the driver's scripts with the
    # folder's first script and the session it last saw for that one: a run of another
    # script of the folder, after an edit, reached the next worker as that old run,
    # which called what it had resolved then (w1 ran the edited module, w2 the old).
    _write(
        tmp_path / "shared.py",
        """
        import actorgrad as ag

        VALUE = 1

        def inner():
            return VALUE

        async def outer():
            return await ag.rpc("w2", inner)
        """,
        1,
    )
    for script in ("train.py", "evaluate.py"):
        (tmp_path / script).write_text("import shared\n")
    train, evaluate = str(tmp_path / "train.py"), str(tmp_path / "evaluate.py")
    async with ag.local_cluster(2, processes=True):
        assert await ag.rpc("w1", ["shared:outer", train, "s1"]) == 1
        for value, script, session in ((2, evaluate, "s2"), (3, train, "s3")):
            text = (tmp_path / "shared.py").read_text()
            _write(tmp_path / "shared.py", text.replace(f"= {value - 1}", f"= {value}"), value)
            assert await ag.rpc("w1", ["shared:outer", script, session]) == value


async def test_a_new_run_does_not_forget_a_package_while_a_call_imports_its_module(tmp_path):
    # The modules being imported by a call in another thread were kept, but not their
    # package: the import ended in KeyError ('slowpkg').
    (tmp_path / "slowpkg").mkdir()
    (tmp_path / "slowpkg" / "__init__.py").write_text("")
    (tmp_path / "slowpkg" / "sub.py").write_text(
        "import sys\nsys.ag_test_started.set()\nsys.ag_test_gate.wait(20)\nVALUE = 7\n"
    )
    _write(
        tmp_path / "imp.py",
        """
        import sys, threading

        def prepare():
            sys.ag_test_started, sys.ag_test_gate = threading.Event(), threading.Event()

        def slow_import():
            from slowpkg import sub
            return sub.VALUE

        def wait_started():
            return sys.ag_test_started.wait(20)

        def open_gate():
            sys.ag_test_gate.set()
        """,
        1,
    )
    script = str(tmp_path / "imp.py")
    async with ag.local_cluster(1, processes=True):
        await ag.rpc("w1", ["__main__:prepare", script, "s1"])
        importing = asyncio.ensure_future(ag.rpc("w1", ["__main__:slow_import", script, "s1"]))
        assert await ag.rpc("w1", ["__main__:wait_started", script, "s1"], timeout=30)
        _write(tmp_path / "imp.py", (tmp_path / "imp.py").read_text(), 2)  # (an edit)
        await ag.rpc("w1", ["__main__:open_gate", script, "s2"])  # (forgets the folder's)
        assert await importing == 7


@pytest.mark.parametrize("what", ["script", "module beside it"])
async def test_a_worker_importing_a_drivers_code_tells_its_peers_it_may_go_quiet(tmp_path, what):
    # The top level of the driver's script, or of a module beside it, imported for a
    # call, runs on the worker's loop (a data set loaded: maybe longer than the
    # heartbeat timeout): its peers are told first not to take the silence for a hang,
    # and told after that it is over. Held between the two by a FIFO.
    said, gate = tmp_path / "said", tmp_path / "gate"
    os.mkfifo(said)
    os.mkfifo(gate)
    _write(
        tmp_path / "slowmod.py",
        f"""
        with open({str(said)!r}, "w") as f:
            f.write("importing")
        with open({str(gate)!r}) as f:
            f.read(2)

        def f():
            return 7
        """,
        1,
    )
    (tmp_path / "main.py").write_text("import slowmod\n")
    script = str(tmp_path / "main.py")
    fd = os.open(said, os.O_RDONLY | os.O_NONBLOCK)  # (open: the writer does not wait)
    opener = os.open(gate, os.O_RDWR | os.O_NONBLOCK)  # (nor the reader)
    loop = asyncio.get_running_loop()
    importing = loop.create_future()
    loop.add_reader(fd, lambda: importing.done() or importing.set_result(os.read(fd, 64)))
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", add, (1, 2)) == 3
        conns = [c for c in rworker.current_worker()._conns if c.peer_name == "w1"]
        spec = (
            ["__main__:f", str(tmp_path / "slowmod.py"), "s1"]
            if what == "script"
            else ["slowmod:f", script, "s1"]
        )
        call = asyncio.ensure_future(ag.rpc("w1", spec))
        try:
            async with asyncio.timeout(10):
                assert await importing == b"importing"
            quiet = rworker.SCRIPT_IMPORT_GRACE - 10
            await until(lambda: any(c.quiet_until > time.monotonic() + quiet for c in conns), 5)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
            os.write(opener, b"go")
        assert await call == 7
        os.close(opener)
        await until(lambda: all(c.quiet_until == 0 for c in conns), 5)


async def test_a_worker_that_went_quiet_is_waited_for_by_one_that_joined_after(
    tmp_path, monkeypatch
):
    # w1 imports a driver's module (its loop busy for long) and tells its peers it may
    # be silent meanwhile; a worker that joined after that announcement (and so never
    # heard it) and calls w1 took it for hung: "accepted the connection but did not
    # answer within 3 s". It asks the head, which heard the announcement, and waits as
    # w1's other peers do.
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    _write(
        tmp_path / "quietmod.py",
        f"""
        with open({str(gate)!r}) as f:
            f.read(2)

        def f():
            return 7
        """,
        1,
    )
    (tmp_path / "main.py").write_text("import quietmod\n")
    opener = os.open(gate, os.O_RDWR | os.O_NONBLOCK)  # (the reader does not wait to open)
    monkeypatch.setattr(rworker, "PEER_CONNECT_TIMEOUT", 1.0)  # (this process's workers)
    try:
        async with ag.local_cluster(1, processes=True) as c:
            assert await ag.rpc("w1", add, (1, 2)) == 3
            head_conn = next(conn for conn, n in c.driver.registry.conns.items() if n == "w1")
            importing = asyncio.ensure_future(
                ag.rpc("w1", ["quietmod:f", str(tmp_path / "main.py"), "s1"])
            )
            late = ag.runtime.Worker("late", token=c.driver.token)
            try:
                await until(lambda: head_conn.quiet_until > time.monotonic() + 10, 10)
                await late.start()
                await asyncio.wait_for(late.join(c.address), 10)
                call = asyncio.ensure_future(late.call("w1", add, (2, 3)))
                # (it failed once the 1 s to connect were out)
                done, _ = await asyncio.wait([call], timeout=rworker.PEER_CONNECT_TIMEOUT + 3)
                assert not done, call.exception()
                os.write(opener, b"go")
                assert await asyncio.wait_for(call, 20) == 5
                assert await asyncio.wait_for(importing, 20) == 7
            finally:
                await late.shutdown()
    finally:
        os.close(opener)


async def test_a_dozen_runs_of_a_script_at_once_each_keep_their_code(tmp_path):
    # What sessions resolved was kept for the last 8 only: the oldest of a dozen runs
    # at once got the edited code midway, and every call of a run past the eighth
    # looked through the worker's modules again (~150 us a call, 2 ms with torch).
    _write(tmp_path / "runs.py", "def f():\n    return 1\n", 1)
    script = str(tmp_path / "runs.py")
    async with ag.local_cluster(1, processes=True):
        for i in range(12):
            assert await ag.rpc("w1", ["__main__:f", script, f"s{i}"]) == 1
        _write(tmp_path / "runs.py", "def f():\n    return 2\n", 2)
        assert await ag.rpc("w1", ["__main__:f", script, "s12"]) == 2
        for i in range(12):
            assert await ag.rpc("w1", ["__main__:f", script, f"s{i}"]) == 1
        # (runs past the last KEEP_SESSIONS: what the least recently seen one resolved
        # goes, and only that: s12 here; dropping the others' got them the edited code)
        for i in range(13, rcalls.KEEP_SESSIONS + 1):
            assert await ag.rpc("w1", ["__main__:f", script, f"s{i}"]) == 2
        for i in range(12):
            assert await ag.rpc("w1", ["__main__:f", script, f"s{i}"]) == 1


async def test_a_worker_keeps_what_it_holds_of_the_driver_scripts_it_was_called_by_last(
    tmp_path, monkeypatch
):
    # Each driver script a peer called (a job in a folder of its own, every day) kept
    # on the worker its module (what its top level made), its sessions, the modules
    # beside it and its folder first on the import path, for good. Past KEEP_SCRIPTS,
    # the least recently called one is forgotten whole; a script in use, called since,
    # keeps its module and state; one forgotten is imported anew if called again.
    monkeypatch.setattr(rcalls, "KEEP_SCRIPTS", 3, raising=False)  # (1024)

    def job(i: int) -> tuple[str, str]:
        folder = tmp_path / f"job{i}"
        folder.mkdir()
        (folder / f"helper{i}.py").write_text("K = 10\n")
        (folder / "train.py").write_text(
            f"from helper{i} import K\ncalls = 0\n\n"
            "def f():\n    global calls\n    calls += 1\n    return K + calls\n"
        )
        return str(folder / "train.py"), str(folder)

    async with ag.local_cluster(1):  # (in-process: its worker's tables are this module's)
        in_use, _ = job(0)
        jobs = [job(i) for i in range(1, 8)]
        for i, (script, _) in enumerate(jobs, 1):
            assert await ag.rpc("w1", ["__main__:f", in_use, "s0"]) == 10 + i
            assert await ag.rpc("w1", ["__main__:f", script, f"s{i}"]) == 11
        for i, (script, folder) in enumerate(jobs, 1):
            kept = i >= 6  # (job6 and job7, and the one in use)
            assert (folder in sys.path, f"helper{i}" in sys.modules) == (kept, kept), i
            assert (script in rcalls._main_modules, script in rcalls._sessions) == (kept, kept)
            assert (script in rcalls._script_sessions, folder in rcalls._folder_names) == (
                kept,
                kept,
            )
            held = [k for k in rcalls._resolve_cache if type(k) is tuple and k[1] == script]
            assert bool(held) == kept, (i, held)
        assert in_use in rcalls._main_modules
        assert await ag.rpc("w1", ["__main__:f", in_use, "s0"]) == 18  # (its state went on)
        # (called again, a script forgotten is imported anew: its own state anew)
        assert await ag.rpc("w1", ["__main__:f", jobs[0][0], "s1"]) == 11
        assert jobs[0][1] in sys.path and "helper1" in sys.modules
        assert list(rcalls._scripts_used) == [jobs[6][0], in_use, jobs[0][0]]


async def test_a_run_under_way_calls_its_own_version_of_a_function_it_had_not_called(tmp_path):
    # s1 and s2 run at once, the script is edited: s1's first call of g (a run seen
    # before, not a new one) comes from the version s1 runs, as its f did; the next
    # new run gets the edit.
    _write(tmp_path / "two.py", "def f():\n    return 1\n\ndef g():\n    return 10\n", 1)
    script = str(tmp_path / "two.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", script, "s1"]) == 1
        assert await ag.rpc("w1", ["__main__:f", script, "s2"]) == 1
        _write(tmp_path / "two.py", "def f():\n    return 2\n\ndef g():\n    return 20\n", 2)
        assert await ag.rpc("w1", ["__main__:g", script, "s1"]) == 10
        assert await ag.rpc("w1", ["__main__:f", script, "s3"]) == 2


async def test_a_dataclass_of_a_script_finds_its_module_while_the_script_is_imported(tmp_path):
    # Under `from __future__ import annotations` a dataclass tells a ClassVar field by
    # looking its annotation up in the module its class names, sys.modules[
    # "__mp_main__"], while the script is imported: the script's module must be there
    # already (the previous one's, or none, made `registry` a field: "mutable default
    # <class 'list'> for field registry is not allowed").
    _write(
        tmp_path / "cfg.py",
        "from __future__ import annotations\n\nimport dataclasses\nfrom typing import ClassVar\n\n"
        "@dataclasses.dataclass\nclass Cfg:\n    n: int = 1\n    registry: ClassVar[list] = []\n\n"
        "def names():\n    return [f.name for f in dataclasses.fields(Cfg)]\n",
        1,
    )
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:names", str(tmp_path / "cfg.py"), "s1"]) == ["n"]


def stats_entries() -> int:
    from actorgrad.runtime import worker

    return len(worker.current_worker()._stats)


async def test_a_worker_learns_how_a_function_runs_once_for_all_sessions_and_anew_when_edited(
    tmp_path,
):
    # The worker's table of how each function runs had an entry per session: a
    # cluster serving many runs grew for good. (An edited function is learnt anew.)
    (tmp_path / "sessfns.py").write_text("")
    script = str(tmp_path / "sessfns.py")
    _write(tmp_path / "sessmod.py", "def f():\n    return 1\n", 1)
    async with ag.local_cluster(1, processes=True):
        before = await ag.rpc("w1", stats_entries)
        for i in range(20):
            assert await ag.rpc("w1", ["sessmod:f", script, f"s{i}"]) == 1
        assert await ag.rpc("w1", stats_entries) == before + 1
        assert await ag.rpc("w1", "sessmod:f") == 1
        _write(tmp_path / "sessmod.py", "async def f():\n    return 2\n", 2)
        assert await ag.rpc("w1", ["sessmod:f", script, "s20"]) == 2
        assert await ag.rpc("w1", "sessmod:f") == 2


def model_versions_alive() -> int:
    gc.collect()  # (an old module and its class are cycles: counted once unreachable)
    return sum(1 for o in gc.get_objects() if isinstance(o, type) and o.__name__ == "Model")


def model_stats_entries() -> int:
    from actorgrad.runtime import worker

    return sum(1 for key in worker.current_worker()._stats if "clsmod" in repr(key))


async def test_a_worker_keeps_no_table_entry_per_version_of_an_edited_class_it_called(
    tmp_path,
):
    # How a method called through an RRef runs was learnt per class object: each
    # edited version of a driver's class stayed in the worker's table for good, and
    # with it its old module (a data set its top level loaded): a cluster serving
    # runs of a script edited all day grew without end (19 MB a run, soak).
    (tmp_path / "clsruns.py").write_text("")
    script = str(tmp_path / "clsruns.py")
    async with ag.local_cluster(1, processes=True):
        for i in range(2 * rcalls.KEEP_SESSIONS):
            _write(
                tmp_path / "clsmod.py",
                f"class Model:\n    def forward(self, x):\n        return x + {i}\n",
                i,
            )
            m = await ag.remote("w1", ["clsmod:Model", script, f"s{i}"])
            assert await m.rpc().forward(1) == 1 + i
            del m
        # (one entry for the constructor, one for the method: the last version's)
        assert await ag.rpc("w1", model_stats_entries) == 2
        # (what the last KEEP_SESSIONS runs resolved is theirs; older versions go)
        assert await ag.rpc("w1", model_versions_alive) <= rcalls.KEEP_SESSIONS + 1


async def test_a_worker_passes_on_a_function_of_a_script_that_is_not_the_last_it_imported(
    tmp_path,
):
    # Its script was taken to be the module sys.modules["__mp_main__"] names: the last
    # driver script imported there, or after an `import multiprocessing` the worker's
    # own __main__ ("'__main__' has no attribute 'g'", or "that name was rebound").
    for name, extra in (("relay_a", ""), ("relay_b", "    import multiprocessing\n")):
        _write(
            tmp_path / f"{name}.py",
            "import functools\nimport actorgrad as ag\n\n"
            f"def g():\n    return {name!r}\n\n"
            f"@functools.cache\ndef cached():\n    return {name!r}\n\n"
            "class K:\n    pass\n\n"
            f"async def f():\n{extra}    return await ag.rpc('w2', g)\n\n"
            "async def f_cached():\n    return await ag.rpc('w2', cached)\n\n"
            "async def f_class():\n    return (await ag.remote('w2', K)).owner\n",
            1,
        )
    _write(tmp_path / "other.py", "def h():\n    return 'h'\n", 1)
    a, b, other = (str(tmp_path / f"{n}.py") for n in ("relay_a", "relay_b", "other"))
    async with ag.local_cluster(2, processes=True):
        assert await ag.rpc("w1", ["__main__:f", a, "s1"]) == "relay_a"
        assert await ag.rpc("w1", ["__main__:h", other, "s2"]) == "h"
        assert await ag.rpc("w1", ["__main__:f", a, "s3"]) == "relay_a"
        assert await ag.rpc("w1", ["__main__:f", b, "s4"]) == "relay_b"
        assert await ag.rpc("w1", ["__main__:f", a, "s5"]) == "relay_a"
        # (callables without globals of their own: a cached function, a class)
        assert await ag.rpc("w1", ["__main__:f_cached", a, "s5"]) == "relay_a"
        assert await ag.rpc("w1", ["__main__:f_class", a, "s5"]) == "w2"
        # (two runs at once of two versions of a script: each passes on its own)
        _write(tmp_path / "relay_a.py", (tmp_path / "relay_a.py").read_text(), 2)
        assert await ag.rpc("w1", ["__main__:f", a, "s6"]) == "relay_a"
        assert await ag.rpc("w1", ["__main__:f", a, "s5"]) == "relay_a"


async def test_a_script_run_as_a_module_of_its_package_then_as_a_file_finds_its_modules(
    tmp_path,
):
    # `python -m pkg.train`, then `python pkg/train.py`: the worker kept the first
    # run's module name, and looked for the script's modules beside the package
    # ("no module named 'helper'").
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    _write(tmp_path / "pkg" / "helper.py", "def who():\n    return 'helper'\n", 1)
    _write(
        tmp_path / "pkg" / "train.py",
        "try:\n    from . import helper\nexcept ImportError:\n    import helper\n\n"
        "def f():\n    return helper.who()\n",
        1,
    )
    train = str(tmp_path / "pkg" / "train.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", train, "s1", "pkg.train"]) == "helper"
        assert await ag.rpc("w1", ["pkg.helper:who", train, "s1", "pkg.train"]) == "helper"
        assert await ag.rpc("w1", ["helper:who", train, "s2"]) == "helper"
        assert await ag.rpc("w1", ["__main__:f", train, "s2"]) == "helper"


async def test_a_module_a_script_of_a_subfolder_imports_too_is_still_its_folders(tmp_path):
    # run.py imports sub.mod, sub/tool.py (a script of its own) imports mod, the same
    # file: sub.mod was taken for sub/'s only (its file is inside it), so run.py's
    # folder never saw it change: its runs had the first version for good.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("")
    _write(tmp_path / "sub" / "mod.py", "V = 1\n", 1)
    _write(tmp_path / "run.py", "from sub import mod\n\ndef f():\n    return mod.V\n", 1)
    _write(tmp_path / "sub" / "tool.py", "import mod\n\ndef g():\n    return mod.V\n", 1)
    run, tool = str(tmp_path / "run.py"), str(tmp_path / "sub" / "tool.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", run, "s1"]) == 1
        assert await ag.rpc("w1", ["__main__:g", tool, "s2"]) == 1
        _write(tmp_path / "sub" / "mod.py", "V = 2\n", 2)
        assert await ag.rpc("w1", ["__main__:f", run, "s3"]) == 2
        assert await ag.rpc("w1", ["__main__:g", tool, "s4"]) == 2


async def test_a_folders_scripts_are_each_checked_and_a_module_added_beside_them_is_seen(
    tmp_path,
):
    # px/model.py ran as a script, so px was checked without it, once: py's model.py
    # was accepted (rightly), then px/train.py's `import model` got py's. And a module created beside
    # a script (its `import fast` had failed) went unseen by the next runs.
    for project in ("px", "py"):
        (tmp_path / project).mkdir()
        _write(
            tmp_path / project / "model.py", f"WHO = {project!r}\n\ndef who():\n    return WHO\n", 1
        )
    _write(tmp_path / "px" / "train.py", "import model\n\ndef f():\n    return model.WHO\n", 1)
    _write(tmp_path / "py" / "run.py", "import model\n\ndef f():\n    return model.WHO\n", 1)
    (tmp_path / "pz").mkdir()
    _write(
        tmp_path / "pz" / "opt.py",
        "try:\n    import fast\nexcept ImportError:\n    fast = None\n\n"
        "def f():\n    return 'slow' if fast is None else fast.NAME\n",
        1,
    )
    px, py = str(tmp_path / "px" / "model.py"), str(tmp_path / "py" / "run.py")
    train, opt = str(tmp_path / "px" / "train.py"), str(tmp_path / "pz" / "opt.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:who", px, "s1"]) == "px"
        assert await ag.rpc("w1", ["__main__:f", py, "s2"]) == "py"
        with pytest.raises(ag.RemoteError, match="already has a module 'model' from"):
            await ag.rpc("w1", ["__main__:f", train, "s3"])
        assert await ag.rpc("w1", ["__main__:f", opt, "s4"]) == "slow"
        _write(tmp_path / "pz" / "fast.py", "NAME = 'fast'\n", 1)
        assert await ag.rpc("w1", ["__main__:f", opt, "s5"]) == "fast"


async def test_a_module_added_while_a_run_is_under_way_is_seen_by_the_next_run(tmp_path):
    # fast.py appears while s1 runs (its `import fast` had failed): s1's next call
    # resolved anew notes the folder's imports again, but must not take its listing
    # again, or s2 would find the folder as listed and keep the script without fast.
    _write(
        tmp_path / "opt.py",
        "try:\n    import fast\nexcept ImportError:\n    fast = None\n\n"
        "def f():\n    return 'slow' if fast is None else fast.NAME\n\n"
        "def g():\n    return 'g'\n",
        1,
    )
    script = str(tmp_path / "opt.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", script, "s1"]) == "slow"
        _write(tmp_path / "fast.py", "NAME = 'fast'\n", 1)
        assert await ag.rpc("w1", ["__main__:g", script, "s1"]) == "g"
        assert await ag.rpc("w1", ["__main__:f", script, "s2"]) == "fast"
        assert await ag.rpc("w1", ["__main__:f", script, "s1"]) == "slow"  # (s1 keeps its code)


async def test_a_script_imported_anew_for_a_module_added_beside_it_is_kept_by_later_runs(
    tmp_path,
):
    # Forgetting a folder drops its listing, which the next import takes anew: kept,
    # the listing from before fast.py came made every later run find the folder
    # changed and import the script (its data set loaded at its top level) again.
    _write(
        tmp_path / "opt.py",
        "import sys\nsys.__dict__.setdefault('ag_test_imports', []).append(1)\n"
        "try:\n    import fast\nexcept ImportError:\n    fast = None\n\n"
        "def f():\n    return 'slow' if fast is None else fast.NAME\n\n"
        "def imports():\n    return len(sys.ag_test_imports)\n",
        1,
    )
    script = str(tmp_path / "opt.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", script, "s1"]) == "slow"
        _write(tmp_path / "fast.py", "NAME = 'fast'\n", 1)
        assert await ag.rpc("w1", ["__main__:f", script, "s2"]) == "fast"
        for session in ("s3", "s4"):
            assert await ag.rpc("w1", ["__main__:f", script, session]) == "fast"
        assert await ag.rpc("w1", ["__main__:imports", script, "s4"]) == 2


async def test_a_package_added_beside_a_script_is_seen_by_the_next_run(tmp_path):
    # As a module file added (above): a folder with __init__.py is a module of the
    # folder's listing too, and one that appears makes the next run import anew.
    _write(
        tmp_path / "opt.py",
        "try:\n    import fastpkg\nexcept ImportError:\n    fastpkg = None\n\n"
        "def f():\n    return 'slow' if fastpkg is None else fastpkg.NAME\n",
        1,
    )
    script = str(tmp_path / "opt.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", script, "s1"]) == "slow"
        (tmp_path / "fastpkg").mkdir()
        _write(tmp_path / "fastpkg" / "__init__.py", "NAME = 'fastpkg'\n", 1)
        assert await ag.rpc("w1", ["__main__:f", script, "s2"]) == "fastpkg"


async def test_namespace_packages_and_modules_of_the_workers_own_path_count_as_modules(
    tmp_path, monkeypatch
):
    # Folders without __init__.py were no modules: two projects' utils/tool.py mixed,
    # and an edited lib/core.py stayed old (the namespace package kept its attribute
    # for the old module). A module the worker imported from its working directory
    # (called by name) was taken by a driver script holding one of that name.
    for project in ("na", "nb"):
        (tmp_path / project / "utils").mkdir(parents=True)
        _write(tmp_path / project / "utils" / "tool.py", f"WHO = {project!r}\n", 1)
        _write(
            tmp_path / project / "main.py",
            "from utils import tool\n\ndef f():\n    return tool.WHO\n",
            1,
        )
    (tmp_path / "cwd").mkdir()
    _write(tmp_path / "cwd" / "cwdmod.py", "def who():\n    return 'cwd'\n", 1)
    (tmp_path / "pw").mkdir()
    _write(tmp_path / "pw" / "cwdmod.py", "def who():\n    return 'pw'\n", 1)
    _write(tmp_path / "pw" / "runw.py", "import cwdmod\n\ndef f():\n    return cwdmod.who()\n", 1)
    na, nb = str(tmp_path / "na" / "main.py"), str(tmp_path / "nb" / "main.py")
    monkeypatch.chdir(tmp_path / "cwd")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", na, "s1"]) == "na"
        with pytest.raises(ag.RemoteError, match="already has a module 'utils' from"):
            await ag.rpc("w1", ["__main__:f", nb, "s2"])
        _write(tmp_path / "na" / "utils" / "tool.py", "WHO = 'na, edited'\n", 2)
        assert await ag.rpc("w1", ["__main__:f", na, "s3"]) == "na, edited"
        assert await ag.rpc("w1", "cwdmod:who") == "cwd"
        with pytest.raises(
            ag.RemoteError, match=f"already has a module 'cwdmod' from {tmp_path / 'cwd'}:"
        ):
            await ag.rpc("w1", ["__main__:f", str(tmp_path / "pw" / "runw.py"), "s4"])


async def test_common_project_layouts_are_no_clash_and_a_src_layouts_edit_is_seen(tmp_path):
    # Each script of a folder checked on its own refused G/train.py + eval.py after
    # F/eval.py ran (scripts are imported by path, not by name); a tests/ folder
    # without __init__.py was taken for a module of the name of another project's
    # tests package; and a package of the project found through a folder the script
    # put on sys.path (src/) was no longer the project's: its edits went unseen.
    for project in ("F", "G"):
        (tmp_path / project / "tests").mkdir(parents=True)
        for script in ("train", "eval"):
            _write(tmp_path / project / f"{script}.py", f"def f():\n    return {script!r}\n", 1)
    (tmp_path / "G" / "tests" / "__init__.py").write_text("")
    _write(tmp_path / "F" / "tests" / "test_a.py", "", 1)
    (tmp_path / "S" / "src" / "mylib").mkdir(parents=True)
    _write(tmp_path / "S" / "src" / "mylib" / "__init__.py", "V = 1\n", 1)
    _write(
        tmp_path / "S" / "run.py",
        "import os, sys\nsys.path.insert(0, os.path.join(os.path.dirname(__file__), 'src'))\n"
        "import mylib\n\ndef f():\n    return mylib.V\n",
        1,
    )
    f_train, f_eval, g_train, g_eval = (
        str(tmp_path / p / f"{n}.py") for p in "FG" for n in ("train", "eval")
    )
    run = str(tmp_path / "S" / "run.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", g_train, "s1"]) == "train"
        assert await ag.rpc("w1", ["__main__:f", f_eval, "s2"]) == "eval"
        assert await ag.rpc("w1", ["__main__:f", f_train, "s3"]) == "train"
        assert await ag.rpc("w1", ["__main__:f", g_eval, "s4"]) == "eval"
        assert await ag.rpc("w1", ["__main__:f", run, "s5"]) == 1
        _write(tmp_path / "S" / "src" / "mylib" / "__init__.py", "V = 2\n", 2)
        assert await ag.rpc("w1", ["__main__:f", run, "s6"]) == 2


async def test_a_script_of_a_subfolder_gets_the_edits_of_the_project_roots_modules(
    tmp_path, monkeypatch
):
    # P/train.py and P/scripts/eval.py both `import model` from P (the cluster's
    # working directory): eval's folder, scripts/, never changed, so its kept script
    # held the first model.py for good (while train's runs had the edits).
    (tmp_path / "scripts").mkdir()
    _write(tmp_path / "model.py", "V = 1\n", 1)
    for script in ("train.py", "scripts/eval.py"):
        _write(tmp_path / script, "import model\n\ndef f():\n    return model.V\n", 1)
    train, ev = str(tmp_path / "train.py"), str(tmp_path / "scripts" / "eval.py")
    monkeypatch.chdir(tmp_path)
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", train, "s1"]) == 1
        assert await ag.rpc("w1", ["__main__:f", ev, "s2"]) == 1
        _write(tmp_path / "model.py", "V = 2\n", 2)
        assert await ag.rpc("w1", ["__main__:f", ev, "s3"]) == 2  # (eval first)
        assert await ag.rpc("w1", ["__main__:f", train, "s4"]) == 2
        _write(tmp_path / "model.py", "V = 3\n", 3)
        assert await ag.rpc("w1", ["__main__:f", train, "s5"]) == 3  # (train first)
        assert await ag.rpc("w1", ["__main__:f", ev, "s6"]) == 3
        assert await ag.rpc("w1", ["__main__:f", ev, "s3"]) == 2  # (a run keeps its code)


async def test_a_script_of_a_subfolder_holding_functions_of_the_roots_modules_gets_their_edits(
    tmp_path, monkeypatch
):
    # As above, with the functions of model.py taken into the scripts' globals (`from
    # model import value`): the kept eval.py still holding the old version of value
    # once train's run imported the edited model.py is imported anew; kept unchanged,
    # it keeps its state (CALLS).
    (tmp_path / "scripts").mkdir()
    _write(tmp_path / "model.py", "def value():\n    return 1\n", 1)
    _write(tmp_path / "train.py", "from model import value\n\ndef f():\n    return value()\n", 1)
    _write(
        tmp_path / "scripts" / "eval.py",
        "from model import value\n\nCALLS = []\n\n"
        "def f():\n    CALLS.append(1)\n    return value(), len(CALLS)\n",
        1,
    )
    train, ev = str(tmp_path / "train.py"), str(tmp_path / "scripts" / "eval.py")
    monkeypatch.chdir(tmp_path)
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", train, "s1"]) == 1
        assert await ag.rpc("w1", ["__main__:f", ev, "s2"]) == (1, 1)
        assert await ag.rpc("w1", ["__main__:f", ev, "s3"]) == (1, 2)  # (nothing changed)
        _write(tmp_path / "model.py", "def value():\n    return 2\n", 2)
        assert await ag.rpc("w1", ["__main__:f", train, "s4"]) == 2  # (train first)
        assert await ag.rpc("w1", ["__main__:f", ev, "s5"]) == (2, 1)
        assert await ag.rpc("w1", ["__main__:f", ev, "s6"]) == (2, 2)  # (kept again)


async def test_a_module_added_to_the_project_root_after_a_subfolders_run_reimported_it_is_seen(
    tmp_path, monkeypatch
):
    # eval's run s3 forgot the root's edited model.py and imported it anew: the root's
    # listing, dropped with it, must be taken again right after (train's next run
    # would, but it may never come). Not taken, fast.py added to the root went unseen
    # by eval's next run, which kept the model.py whose `import fast` had failed.
    (tmp_path / "scripts").mkdir()
    _write(
        tmp_path / "model.py",
        "try:\n    import fast\nexcept ImportError:\n    fast = None\n\nV = 1\n\n"
        "def name():\n    return 'slow' if fast is None else fast.NAME\n",
        1,
    )
    for script in ("train.py", "scripts/eval.py"):
        _write(tmp_path / script, "import model\n\ndef f():\n    return model.V, model.name()\n", 1)
    train, ev = str(tmp_path / "train.py"), str(tmp_path / "scripts" / "eval.py")
    monkeypatch.chdir(tmp_path)
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", train, "s1"]) == (1, "slow")
        assert await ag.rpc("w1", ["__main__:f", ev, "s2"]) == (1, "slow")
        text = (tmp_path / "model.py").read_text()
        _write(tmp_path / "model.py", text.replace("V = 1", "V = 2"), 2)
        assert await ag.rpc("w1", ["__main__:f", ev, "s3"]) == (2, "slow")
        _write(tmp_path / "fast.py", "NAME = 'fast'\n", 1)
        assert await ag.rpc("w1", ["__main__:f", ev, "s4"]) == (2, "fast")


async def test_a_module_a_function_imported_as_it_ran_is_imported_anew_once_edited(tmp_path):
    # lazy.py, imported by a function of the script as it ran (after the worker noted
    # the script's imports): an edit before the next run's first look counts by its
    # time (modified since the worker last looked); once that run noted the file, by
    # its size and time, also an edit that sets an older time (a checkout, a copy).
    _write(tmp_path / "train.py", "def value():\n    import lazy\n    return lazy.VALUE\n", 1)
    _write(tmp_path / "lazy.py", "VALUE = 1\n", 1)
    script = str(tmp_path / "train.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:value", script, "s1"]) == 1
        (tmp_path / "lazy.py").write_text("VALUE = 2\n")
        os.utime(tmp_path / "lazy.py", ns=(time.time_ns(),) * 2)  # (the clock's, not the disk's)
        assert await ag.rpc("w1", ["__main__:value", script, "s2"]) == 2
        assert await ag.rpc("w1", ["__main__:value", script, "s3"]) == 2
        _write(tmp_path / "lazy.py", "VALUE = 33\n", 1)
        assert await ag.rpc("w1", ["__main__:value", script, "s4"]) == 33


async def test_odd_driver_code_is_found_or_named_and_a_first_look_forgets_nothing(
    tmp_path, monkeypatch
):
    # A script without .py: "cannot import the driver script"; one not on the worker's
    # disk: advice to guard its top level; a module object whose __getattr__ raises
    # KeyError: every later driver call failed with it; a module from a zip: imported
    # anew at every run; a script's folder on the worker's path already, after another
    # holding a module of one name: the worker imported the other's; a subfolder's
    # script's first run forgot the modules of the outer folder's running script.
    (tmp_path / "lib").mkdir()
    _write(tmp_path / "lib" / "putil.py", "WHO = 'lib'\n", 1)
    (tmp_path / "proj").mkdir()
    _write(tmp_path / "proj" / "putil.py", "WHO = 'proj'\n", 1)
    _write(tmp_path / "proj" / "trainx", "import putil\n\ndef f():\n    return putil.WHO\n", 1)
    with zipfile.ZipFile(tmp_path / "proj" / "deps.zip", "w") as z:
        z.writestr("zipped.py", "import random\nTOKEN = random.random()\n")
    _write(
        tmp_path / "proj" / "usezip.py",
        "import os, sys\nsys.path.append(os.path.join(os.path.dirname(__file__), 'deps.zip'))\n"
        "import zipped\n\ndef f():\n    return zipped.TOKEN\n",
        1,
    )
    (tmp_path / "O" / "sub").mkdir(parents=True)
    (tmp_path / "O" / "sub" / "__init__.py").write_text("")
    _write(tmp_path / "O" / "sub" / "m.py", "V = 1\n", 1)
    _write(
        tmp_path / "O" / "outer.py",
        "import sub.m as mm\n\ndef f():\n    import sub.m\n    return mm is sub.m\n",
        1,
    )
    _write(tmp_path / "O" / "sub" / "b.py", "def f():\n    return 'b'\n", 1)
    proj, outer = tmp_path / "proj", str(tmp_path / "O" / "outer.py")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'lib'}{os.pathsep}{proj}{os.pathsep}{REPO}")
    async with ag.local_cluster(1, processes=True):
        await ag.rpc("w1", install_odd_module)
        assert await ag.rpc("w1", ["__main__:f", str(proj / "trainx"), "s1"]) == "proj"
        with pytest.raises(ag.RemoteError, match="is not on this worker's disk"):
            await ag.rpc("w1", ["__main__:f", str(tmp_path / "gone.py"), "s1"])
        token = await ag.rpc("w1", ["__main__:f", str(proj / "usezip.py"), "s2"])
        assert await ag.rpc("w1", ["__main__:f", str(proj / "usezip.py"), "s3"]) == token
        assert await ag.rpc("w1", ["__main__:f", outer, "s4"]) is True
        assert await ag.rpc("w1", ["__main__:f", str(tmp_path / "O" / "sub" / "b.py"), "s5"]) == "b"
        assert await ag.rpc("w1", ["__main__:f", outer, "s4"]) is True


async def test_a_script_whose_modules_a_subfolders_run_forgot_is_imported_anew(tmp_path):
    # O/sub's script changed: its new run forgot the modules of O/sub, sub.m among them,
    # which O/outer.py had imported (as sub.m) and taken TOKEN from. Kept, outer's next
    # run held the TOKEN of a sub.m that was no longer the one its function imported.
    (tmp_path / "O" / "sub").mkdir(parents=True)
    (tmp_path / "O" / "sub" / "__init__.py").write_text("")
    _write(tmp_path / "O" / "sub" / "m.py", "import random\n\nTOKEN = random.random()\n", 1)
    _write(
        tmp_path / "O" / "outer.py",
        "from sub.m import TOKEN\n\ndef f():\n    import sub.m\n    return sub.m.TOKEN == TOKEN\n",
        1,
    )
    _write(tmp_path / "O" / "sub" / "b.py", "def f():\n    return 'b'\n", 1)
    outer, b = str(tmp_path / "O" / "outer.py"), str(tmp_path / "O" / "sub" / "b.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", outer, "s1"]) is True
        assert await ag.rpc("w1", ["__main__:f", b, "s2"]) == "b"
        _write(tmp_path / "O" / "sub" / "b.py", "def f():\n    return 'b2'\n", 2)
        assert await ag.rpc("w1", ["__main__:f", b, "s3"]) == "b2"
        assert await ag.rpc("w1", ["__main__:f", outer, "s4"]) is True


async def test_a_script_whose_import_failed_leaves_the_one_imported_before_as_mp_main(tmp_path):
    # A script's classes are found by their module's name, __mp_main__ (pickle finds
    # Box as __mp_main__.Box): the module of a script whose import failed on the worker
    # must not stay under that name, nor leave it empty, for the script imported before.
    _write(
        tmp_path / "good.py",
        "import pickle\n\nclass Box:\n    pass\n\n"
        "def f():\n    return type(pickle.loads(pickle.dumps(Box()))).__name__\n",
        1,
    )
    _write(tmp_path / "bad.py", "raise ValueError('no config')\n\ndef f():\n    return 0\n", 1)
    good, bad = str(tmp_path / "good.py"), str(tmp_path / "bad.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:f", good, "s1"]) == "Box"
        with pytest.raises(ag.RemoteError, match="failed: ValueError: no config"):
            await ag.rpc("w1", ["__main__:f", bad, "s2"])
        assert await ag.rpc("w1", ["__main__:f", good, "s1"]) == "Box"


async def test_an_unchanged_script_holding_aliases_of_its_modules_keeps_its_state(tmp_path):
    # A global of the script whose name says another object of a driver module (a
    # generic alias Box[int], a namedtuple "Pt" bound as Point, a decorated function)
    # was taken for an old version: the script was imported anew at every run.
    _write(
        tmp_path / "shapes.py",
        "import collections, functools, typing\nT = typing.TypeVar('T')\n\n"
        "class Box(typing.Generic[T]):\n    pass\n\n"
        "Point = collections.namedtuple('Pt', 'x y')\n\n"
        "def load():\n    return 1\n\n"
        "def traced(f):\n    @functools.wraps(f)\n    def g():\n        return f()\n    return g\n",
        1,
    )
    _write(
        tmp_path / "keep.py",
        "import functools\nimport shapes\nfrom shapes import Point\n\n"
        "IntBox = shapes.Box[int]\nload_cached = functools.lru_cache(shapes.load)\n"
        "load_traced = shapes.traced(shapes.load)\nCALLS = []\n\n"
        "def f():\n    CALLS.append(1)\n    return len(CALLS)\n",
        1,
    )
    script = str(tmp_path / "keep.py")
    async with ag.local_cluster(1, processes=True):
        counts = [await ag.rpc("w1", ["__main__:f", script, f"s{i}"]) for i in range(4)]
        assert counts == [1, 2, 3, 4]


async def test_the_refusal_of_a_module_of_another_projects_name_outlives_its_forgetting(tmp_path):
    # Once project A's modules were forgotten (an edit, a new session), project C's
    # helpers.py was accepted; A's next call then imported C's helpers, silently.
    for project in ("A", "C"):
        (tmp_path / project).mkdir()
        _write(tmp_path / project / "helpers.py", f"WHO = {project!r}\n", 1)
        _write(
            tmp_path / project / "drv.py", "import helpers\n\ndef g():\n    return helpers.WHO\n", 1
        )
    _write(tmp_path / "A" / "other.py", "def g():\n    return 'other'\n", 1)
    a, c = str(tmp_path / "A" / "drv.py"), str(tmp_path / "C" / "drv.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:g", a, "s1"]) == "A"
        with pytest.raises(ag.RemoteError, match="already has a module 'helpers' from"):
            await ag.rpc("w1", ["__main__:g", c, "s2"])
        # (an edit of the script, and a new session's first call is to a function of
        # the module beside it: A's modules are forgotten, helpers is not imported again)
        _write(tmp_path / "A" / "drv.py", "import helpers\n\ndef g():\n    return helpers.WHO\n", 2)
        assert await ag.rpc("w1", ["other:g", a, "s3"]) == "other"
        with pytest.raises(ag.RemoteError, match="already has a module 'helpers' from"):
            await ag.rpc("w1", ["__main__:g", c, "s4"])
        assert await ag.rpc("w1", ["__main__:g", a, "s5"]) == "A"


async def test_folders_of_driver_code_keep_to_their_own_modules(tmp_path):
    # A module two projects name alike was refused only once imported (one imported
    # later, inside a function, took the other folder's, which came first on the
    # path); a project in a subfolder of another lost its modules (and their state)
    # when the outer one changed; a function named by a string ("module:function")
    # kept its first version.
    for project in ("P", "Q"):
        (tmp_path / project).mkdir()
        _write(tmp_path / project / "pmodel.py", f"WHO = {project!r}\n", 1)
        _write(tmp_path / project / "drv.py", "def g():\n    return 1\n", 1)
    _write(tmp_path / "outer.py", "import qhelp\n\ndef f():\n    return qhelp.g()\n", 1)
    _write(tmp_path / "qhelp.py", "def g():\n    return 1\n", 1)
    (tmp_path / "exp").mkdir()
    _write(tmp_path / "exp" / "expstate.py", "N = []\n", 1)
    _write(
        tmp_path / "exp" / "sweep.py",
        "import expstate\n\ndef step():\n    expstate.N.append(1)\n    return len(expstate.N)\n",
        1,
    )
    p, q = str(tmp_path / "P" / "drv.py"), str(tmp_path / "Q" / "drv.py")
    outer, sweep = str(tmp_path / "outer.py"), str(tmp_path / "exp" / "sweep.py")
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", ["__main__:g", p, "s1"]) == 1
        with pytest.raises(ag.RemoteError, match="already has a module 'pmodel' from"):
            await ag.rpc("w1", ["__main__:g", q, "s2"])
        assert await ag.rpc("w1", ["__main__:step", sweep, "s3"]) == 1
        assert await ag.rpc("w1", ["__main__:f", outer, "s4"]) == 1
        assert await ag.rpc("w1", "qhelp:g") == 1
        _write(tmp_path / "qhelp.py", "def g():\n    return 2\n", 2)
        assert await ag.rpc("w1", ["__main__:f", outer, "s5"]) == 2
        assert await ag.rpc("w1", "qhelp:g") == 2
        assert await ag.rpc("w1", ["__main__:step", sweep, "s3"]) == 2  # (its state kept)


def spec_of_an_actorgrad_function() -> Any:
    from actorgrad.runtime import calls

    return calls.fn_spec(calls.describe)


async def test_a_worker_process_names_actorgrad_functions_plainly():
    # A worker runs `-m actorgrad.runtime.worker_main`: its "script's home" was the
    # folder holding actorgrad, every module there was taken for one beside a driver
    # script, and a driver resolving such a name put actorgrad/runtime first on its
    # import path.
    async with ag.local_cluster(1, processes=True):
        assert (
            await ag.rpc("w1", spec_of_an_actorgrad_function) == "actorgrad.runtime.calls:describe"
        )


def test_the_driver_scripts_names_are_the_same_on_process_and_in_process_workers(tmp_path):
    # On process workers an exception class of the script was "__mp_main__.AppError"
    # ("__main__.AppError" in process), its remote traceback's too, and the string
    # "__main__:hello" looked in the worker's own __main__: AttributeError.
    script = tmp_path / "names.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            import actorgrad as ag

            class AppError(Exception):
                pass

            class Cause(Exception):
                pass

            def fail():
                try:
                    raise Cause("why")
                except Cause as exc:
                    raise AppError("no __mp_main__.AppError: here") from exc

            def hello(name):
                return f"hello {name}"

            async def main():
                for processes in (False, True):
                    async with ag.local_cluster(1, processes=processes):
                        try:
                            await ag.rpc("w1", fail)
                        except ag.RemoteError as exc:
                            print(processes, exc.remote_type, flush=True)
                            tb = exc.remote_traceback.splitlines()
                            print(processes, [t for t in tb if t and t[0] not in " T"])
                        print(processes, await ag.rpc("w1", "__main__:hello", ("you",)))

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("ACTORGRAD_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=45, env=env
    )
    assert out.returncode == 0, out.stderr
    # (and the remote traceback, as Python prints the script's errors, on both kinds of
    # worker: it said "__mp_main__.Cause: why" and "__mp_main__.AppError: no ..." on
    # process workers; the message itself is the user's, kept as it was)
    said = [
        "Cause: why",
        "AppError: no __mp_main__.AppError: here",
    ]
    assert out.stdout.splitlines() == [
        "False __main__.AppError",
        f"False {said}",
        "False hello you",
        "True __main__.AppError",
        f"True {said}",
        "True hello you",
    ]


def test_a_driver_run_as_a_module_of_a_package_finds_its_relative_imports_on_workers(tmp_path):
    # `python -m trainpkg.train`: a worker imported the file alone, as __mp_main__,
    # and its `from .model import scale` failed ("attempted relative import with no
    # known parent package"), with advice to install what it imports.
    pkg = tmp_path / "trainpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("def scale(x, k):\n    return x * k\n")
    (pkg / "train.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            import actorgrad as ag
            from .model import scale

            def here(x):
                return scale(x, 2) + 1

            async def main():
                async with ag.local_cluster(1, processes=True):
                    print(await ag.rpc("w1", here, (5,)), await ag.rpc("w1", scale, (5, 3)))
                    print(await ag.rpc("w1", "__main__:here", (1,)))

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("ACTORGRAD_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", "trainpkg.train"],
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["11", "15", "3"]


def _square_on_w1(script: Path, top: str, start: str) -> subprocess.CompletedProcess[str]:
    """Run driver ``script``, written as: ``top`` at its top level, a function ``square``,
    and a ``main`` that calls ``square`` on w1 of a cluster of one worker process
    (printing "error", the type and the message of its RemoteError if it fails), then
    ``operator.add`` there ("still serving 5"); ``start`` (its last lines) runs main.
    The run must exit 0."""
    script.write_text(
        "import asyncio, operator\nimport actorgrad as ag\n\n"
        + top
        + textwrap.dedent(
            """
            def square(x):
                return x * x

            async def main():
                async with ag.local_cluster(1, processes=True):
                    try:
                        await ag.rpc("w1", square, (7,))
                    except ag.RemoteError as exc:
                        print("error", exc.remote_type, str(exc).replace("\\n", " "), flush=True)
                    print("still serving", await ag.rpc("w1", operator.add, (2, 3)), flush=True)

            """
        )
        + start
        + "\n"
    )
    out = run_driver(script)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize(
    "start",
    [
        "asyncio.run(main())",
        # (a helper of the user's holding main() while asyncio.run got a wrapper: the
        # wrapper was closed, main() was left to say "never awaited")
        "def run(coro):\n    async def bounded():\n        return await asyncio.wait_for(coro, 60)\n"
        "    return asyncio.run(bounded())\nrun(main())",
        # (its arguments parsed at the top level: on a worker, the worker's command line)
        "import argparse\nargparse.ArgumentParser().parse_args()\nasyncio.run(main())",
    ],
)
def test_a_main_script_that_starts_its_work_at_the_top_level_gets_told_why_it_fails(
    tmp_path, start
):
    # No `if __name__ == "__main__":` guard: the worker importing the script to find a
    # function runs its top level, which starts an event loop inside the worker's.
    script = tmp_path / "unguarded.py"
    out = _square_on_w1(script, "", start)
    lines = out.stdout.splitlines()
    assert lines[-1] == "still serving 5", out.stdout
    (error,) = [line for line in lines if line.startswith("error ")]
    exits = "argparse" in start
    assert error.startswith(
        f"error RuntimeError RuntimeError on worker 'w1': importing the driver's script "
        f"{os.path.realpath(script)} here (to call one of its functions) failed: "
        + ("SystemExit: 2. " if exits else "RuntimeError: ")
    ), error
    assert 'start the work under `if __name__ == "__main__":`' in error
    assert error.endswith("not the driver's)") == exits, error
    # (the worker's import made the script's main() and never ran it: "coroutine 'main'
    # was never awaited", pointing at actorgrad's code, on the worker's stderr)
    assert "never awaited" not in out.stderr, out.stderr


def test_a_main_script_whose_import_fails_on_a_worker_names_the_module_and_what_to_do(
    tmp_path,
):
    # A module the driver's process has and a worker's does not (here: only imported
    # under another name than __main__, as a worker imports the script): the call fails
    # naming the script, the module and where the worker looked; the worker serves on.
    script = tmp_path / "needs_more.py"
    out = _square_on_w1(
        script,
        'if __name__ != "__main__":\n    import actorgrad_missing_helper_module\n',
        'if __name__ == "__main__":\n    asyncio.run(main())',
    )
    assert out.stdout.splitlines() == [
        f"error RuntimeError RuntimeError on worker 'w1': importing the driver's script "
        f"{os.path.realpath(script)} here (to call one of its functions) failed: "
        "ModuleNotFoundError: No module named 'actorgrad_missing_helper_module'. This worker "
        "looked beside the script and on its own path (PYTHONPATH): install what it imports "
        "for the workers too, or put it where they find it",
        "still serving 5",
    ], out.stdout


async def _blocked(
    name: str, seconds: float, tmp_path: Path, until: str | None = None
) -> asyncio.Future[Any]:
    """Block worker ``name``'s loop for ``seconds`` (or until file ``until`` exists, at
    most ``seconds``); return (the call doing it) once it is blocked: once the call said
    so through a FIFO, right before it blocks. (The proof
    was a call to it unanswered within 0.2 s, which on a loaded machine a worker merely
    slow gave too: the test's next message, read with block_loop's request, was then
    answered before block_loop ran.)"""
    fifo = tmp_path / f"{name}-blocking"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # (open: the writer does not wait)
    loop = asyncio.get_running_loop()
    said = loop.create_future()
    loop.add_reader(fd, lambda: said.done() or said.set_result(os.read(fd, 64)))
    try:
        busy = asyncio.ensure_future(
            ag.rpc(name, block_loop, (seconds, str(fifo)))
            if until is None
            else ag.rpc(name, block_until_file, (until, seconds, str(fifo)))
        )
        async with asyncio.timeout(10):
            await asyncio.wait([said, busy], return_when=asyncio.FIRST_COMPLETED)
        if not said.done():
            await busy  # (failed: its error)
            raise AssertionError(f"block_loop on {name!r} returned without saying it blocks")
        assert said.result() == b"blocking"
        return busy
    finally:
        loop.remove_reader(fd)
        os.close(fd)
        if not said.done():
            said.cancel()


async def test_a_call_timeout_bounds_registering_the_rrefs_it_passes(tmp_path):
    # The RRef's owner w1 is busy (its loop blocked): registering the fork with it held
    # the call past its timeout; and the registration, once w1 runs again, is taken back.
    async with ag.local_cluster(2, processes=True):
        assert await ag.rpc("w2", add, (1, 2)) == 3
        r = await ag.remote("w1", np.zeros, (3,))
        # (the registration, answered inline where it is read, was otherwise answered
        # before block_loop started when both came in one read)
        busy = await _blocked("w1", 2.5, tmp_path)
        t0 = time.monotonic()
        with pytest.raises(ag.RpcTimeout, match="0.5 s .registering the RRefs it passes"):
            await ag.rpc("w2", add, (r,), timeout=0.5)
        # (before w1's loop runs again, 2.5 s in: room for a loaded machine)
        assert time.monotonic() - t0 < 2.0
        await busy
        del r
        deadline = time.monotonic() + 10
        while (n := await ag.rpc("w1", owned)) and time.monotonic() < deadline:
            gc.collect()  # (then the driver's release goes out, one-way)
            await asyncio.sleep(0.05)
        assert n == 0


async def test_an_rref_passed_to_its_owner_while_its_loop_was_blocked_leaves_no_count_there(
    monkeypatch, tmp_path
):
    # The driver passes w1 an RRef w1 owns while w1's loop is blocked past the
    # heartbeat timeout: registering the fork fails (WorkerLost), the call is given
    # up; w1, running again, reads the registration and counts itself as holding the
    # value. No message carrying it ever came, and w1 never leaves: it kept the value
    # for good. A 1 s heartbeat timeout here, on the driver only. (Now the request to
    # the owner goes at once, unregistered: w1, running again, may still read and run
    # it, as any call its caller lost; ``peek`` keeps nothing, so no count may stay.)
    monkeypatch.setattr(rworker, "HEARTBEAT_TIMEOUT", 1.0)
    flag = str(tmp_path / "go")
    async with ag.local_cluster(1, processes=True):
        r = await ag.remote("w1", Counter, (5,))
        busy = await _blocked("w1", 30.0, tmp_path, until=flag)
        try:
            with pytest.raises(ag.WorkerLost, match="heartbeat|sent nothing"):
                await asyncio.wait_for(ag.rpc("w1", peek, (r,)), 20)
        finally:
            Path(flag).touch()  # noqa: ASYNC240 (the go signal)
        with pytest.raises(ag.WorkerLost):
            await busy
        async with asyncio.timeout(10):
            while (held := await ag.rpc("w1", counted_by_itself)) != (0, 0):  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.02)
        assert held == (0, 0)
        # Nor does the driver keep its own count once it drops the RRef: the failed
        # call of busy (pending beside the registration when the connection went) kept
        # the registration's error, whose traceback held the failed call's arguments,
        # for as long as busy's error lived.
        del r
        gc.collect()  # (wait_for's task and its error make a cycle, as always)
        async with asyncio.timeout(10):
            while (n := await ag.rpc("w1", owned)) != 0:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.02)
        assert n == 0 and busy.exception() is not None


def counted_by_itself() -> tuple[int, int]:
    """(the counts this worker holds of its own values, its records of pending forks)"""
    w = rworker.current_worker()
    me = (w.name, w.id)
    mine = sum(o.holders.get(me, 0) for o in w.owned.values())
    return mine, sum(len(o.forks or ()) for o in w.owned.values())


def echo(x):
    return x


async def test_a_call_timeout_bounds_waiting_to_send_to_a_peer_that_does_not_read(tmp_path):
    # w1's loop is blocked: it reads nothing, the driver's 64 MB request fills the
    # socket and its write buffer. The wait to send was outside the timeout (a peer
    # whose mailbox stayed full held such a call for good); now RpcTimeout on time.
    async with ag.local_cluster(1, processes=True):
        assert await ag.rpc("w1", add, (1, 2)) == 3
        busy = await _blocked("w1", 2.5, tmp_path)
        big = np.ones(16 << 20, dtype=np.float32)
        t0 = time.monotonic()
        with pytest.raises(
            ag.RpcTimeout, match=r"0.5 s \(waiting to send it: it is large, or the peer is not"
        ):
            await ag.rpc("w1", echo, (big,), timeout=0.5)
        # (before w1's loop runs again, 2.5 s in: room for a loaded machine)
        assert time.monotonic() - t0 < 2.0
        await busy
        assert await ag.rpc("w1", add, (2, 3)) == 5  # (the same connection works on)


def peek(r):
    return r.local_value().value


def keep(r):
    rworker.current_worker().ext.setdefault("kept", []).append(r)
    return len(rworker.current_worker().ext["kept"])


async def kept_incr() -> int:
    return await rworker.current_worker().ext["kept"][0].rpc().incr()


async def block_until_file(path: str, deadline: float, started: str | None = None) -> None:
    """Block this worker's loop (on purpose: frames wait unread) until ``path`` exists
    (``started``: as block_loop's)."""
    if started is not None:
        with open(started, "w") as f:  # noqa: ASYNC230 (the loop blocks anyway)
            f.write("blocking")
    end = time.monotonic() + deadline
    while not os.path.exists(path) and time.monotonic() < end:  # noqa: ASYNC240
        time.sleep(0.002)  # noqa: ASYNC251


async def forward_kept_and_say_when_sent(to: str) -> None:
    """Send this worker's first kept RRef to ``to`` (which keeps it); return once the
    request has been handed to the connection (the reply is not awaited)."""
    w = rworker.current_worker()
    task = asyncio.ensure_future(ag.rpc(to, keep, (w.ext["kept"][0],)))
    w.ext["forwarding"] = task
    await until(lambda: any(c.pending for c in w._conns if c.peer_name == to))


def forks_pending_of(forker: str) -> tuple[bool, int]:
    """(whether ``forker`` still holds counts or has forks pending here, owned count)"""
    w = rworker.current_worker()
    pending = any(
        any(h[0] == forker for h in o.holders) or any(f[0] == forker for f, _ in o.forks or {})
        for o in w.owned.values()
    )
    return pending, w.owned_count


class Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    def incr(self) -> int:
        self.value += 1
        return self.value


async def test_a_fork_still_unread_when_its_forker_dies_keeps_its_count(tmp_path):
    # w3 forwards an RRef owned by w1 to w2 and is killed; its request still waits
    # unread in w2's socket (w2's loop is blocked) when w1 learns that w3 is gone and
    # asks w2 to settle w3's forks. w2 answers only once it has handled everything w3
    # sent: the fork is accepted and keeps its count (answering at once would drop it,
    # and w2's RRef would point at a freed value, when w2 reads w1's request before
    # w3's frame; here w3's frame came first, so this checks the whole path on real
    # processes, not that order).
    import signal

    flag = str(tmp_path / "go")
    async with ag.local_cluster(3, processes=True):
        pid3 = await ag.rpc("w3", pid)
        await ag.rpc("w3", add, (1,))  # (w3 -> w2 connected before w2 blocks)
        await ag.rpc("w3", relay, (["w2"], []))
        r = await ag.remote("w1", Counter, (5,))
        assert await ag.rpc("w3", keep, (r,)) == 1
        del r
        gc.collect()
        blocked = await _blocked("w2", 10.0, tmp_path, until=flag)
        await ag.rpc("w3", forward_kept_and_say_when_sent, ("w2",))
        os.kill(pid3, signal.SIGKILL)
        async with asyncio.timeout(10):  # w1 saw w3 go: its own count went
            while "w3" in (await ag.rpc("w1", holders_of_first))[0]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        Path(flag).touch()  # noqa: ASYNC240 (the go signal)
        await blocked
        async with asyncio.timeout(10):  # the settle is done: nothing of w3 left at w1
            while (state := await ag.rpc("w1", forks_pending_of, ("w3",)))[0]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert state[1] == 1  # w2's count stayed
        assert await ag.rpc("w2", kept_incr) == 6


def first_kept() -> Any:
    return rworker.current_worker().ext["kept"][0]


@pytest.mark.timeout(60)
async def test_a_result_holding_an_rref_of_a_dead_owner_fails_the_call():
    # w1 returns an RRef owned by w2, which was killed: its owner cannot register it
    # for the caller. The reply was dropped: the call waited for good (no timeout).
    import signal

    async with ag.local_cluster(2, processes=True) as c:
        r = await ag.remote("w2", Counter, (5,))
        assert await ag.rpc("w1", keep, (r,)) == 1
        del r
        os.kill(c.pids[1], signal.SIGKILL)
        with pytest.raises(ag.RemoteError) as info:
            await asyncio.wait_for(ag.rpc("w1", first_kept), 20)
        assert info.value.worker == "w1" and info.value.remote_type.endswith("WorkerLost")
        assert "an RRef whose owner could not register it for worker 'driver'" in str(info.value)
        assert await ag.rpc("w1", add, (1, 2)) == 3  # (w1 goes on)


def holders_of_first() -> tuple[list[str], int]:
    w = rworker.current_worker()
    o = next(iter(w.owned.values()), None)
    return (sorted(h[0] for h in o.holders) if o is not None else []), w.owned_count


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_cluster_run_uses_uvloop_without_a_global_policy():
    pytest.importorskip("uvloop")  # (where uvloop is not installed: the next test)
    policy = asyncio.get_event_loop_policy()
    assert rcluster.run(_loop_module()).startswith("uvloop")
    assert asyncio.get_event_loop_policy() is policy


def test_cluster_run_without_uvloop_uses_asyncios_own_loop(monkeypatch):
    # (as on a platform without uvloop: pyproject installs it on CPython off Windows only)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # (import uvloop: ImportError)
    policy = asyncio.get_event_loop_policy()
    assert rcluster.run(_loop_module()).startswith("asyncio")
    assert asyncio.get_event_loop_policy() is policy


def test_new_token_has_256_random_bits():
    token = rcluster.new_token()
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    assert token != rcluster.new_token()


def page_faults_of_fresh_arrays(n: int, kib: int = 100) -> int:
    """Minor page faults of n steps that each allocate, touch and free ten ``kib`` KiB
    arrays (like the activations and gradients of one step of a model)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        arrays = [np.ones(kib * 256, dtype=np.float32) for _ in range(10)]
        del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


async def faults_on_the_loop(n: int) -> int:
    """page_faults_of_fresh_arrays on the worker's loop thread (the main malloc arena;
    a plain function could run in the worker's thread pool)."""
    return page_faults_of_fresh_arrays(n)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
async def test_worker_processes_reuse_freed_array_memory_instead_of_faulting_it_in():
    # with glibc's defaults the freed 1 MiB is trimmed off the heap after every step and
    # faulted in again by the next (250 faults per step)
    async with ag.local_cluster(1, processes=True):
        await ag.rpc("w1", faults_on_the_loop, (5,))  # the heap's first growth
        faults = await ag.rpc("w1", faults_on_the_loop, (200,))
    assert faults < 200, f"{faults} page faults in 200 steps"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_malloc_tuning_can_be_turned_off(tmp_path):
    code = (
        "from actorgrad.runtime import procs\n"
        "from tests.test_runtime_procs import page_faults_of_fresh_arrays as f\n"
        "applied = procs.tune_malloc()\n"
        "f(5, 1024)\n"  # the heap's first growth
        "print(applied, f(50, 1024))\n"
    )
    # MALLOC_TOP_PAD_ at glibc's default value turns its dynamic thresholds off: freeing
    # a mapped block raises them, so the untuned count hung on what the interpreter had
    # allocated before (0 faults in a fresh clone after an unrelated change to the
    # modules it compiles at import, > 20,000 here). tune_malloc ignores it. Arrays of
    # 1 MiB, above glibc's mapping threshold: untuned, each is mapped anew, whatever
    # the heap holds (100 KiB ones faulted 3,600 times or 50,000, as tests were added
    # to this module).
    # (tests/ too: this module imports the conftest's helpers, as pytest finds them)
    path = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    env = dict(os.environ, PYTHONPATH=path, MALLOC_TOP_PAD_=str(128 * 1024))
    out = {}
    for flag in ("0", "1"):
        env["ACTORGRAD_MALLOC_TUNING"] = flag
        res = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=REPO,
        )
        assert res.returncode == 0, res.stderr
        applied, faults = res.stdout.split()
        out[flag] = (applied, int(faults))
    assert out["1"][0] == "True" and out["1"][1] < 200
    assert out["0"][0] == "False" and out["0"][1] > 50 * 10 * 200  # (256 pages an array)


_ARENAS_CODE = """
import ctypes, sys, threading
from actorgrad.runtime import procs
print(procs.tune_malloc())
held, barrier = [], threading.Barrier(7)
def run():
    held.append(bytearray(200_000))  # a thread's first malloc: an arena of its own
    barrier.wait()
threads = [threading.Thread(target=run) for _ in range(6)]
for t in threads:
    t.start()
barrier.wait()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()  # to C's stderr: an "Arena N:" line per arena
for t in threads:
    t.join()
"""


def malloc_arenas() -> int:
    """glibc malloc's arenas in this process (malloc_info's heaps)."""
    import ctypes
    import tempfile

    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        return f.read().count("<heap nr=")


def hold_a_while(n: int) -> int:
    time.sleep(0.2)  # (so that the calls run in threads of their own)
    return len(bytearray(n))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
async def test_a_worker_process_has_one_malloc_arena_for_all_its_threads():
    # tune_malloc runs before the process's first thread: glibc fixes its count of
    # arenas at the first one a thread asks for (the parent's watcher had one of its
    # own beside the cap)
    async with ag.local_cluster(1, processes=True):
        await asyncio.gather(*(ag.rpc("w1", hold_a_while, (200_000,)) for _ in range(4)))
        assert await ag.rpc("w1", malloc_arenas) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
@pytest.mark.parametrize(
    "env, arenas",
    [({}, 1), ({"ACTORGRAD_MALLOC_TUNING": "0"}, 7), ({"MALLOC_ARENA_MAX": "3"}, 3)],
)
def test_malloc_tuning_caps_the_arenas_of_threads(env, arenas):
    # Each thread of a worker's pool got a glibc malloc arena of its own, and the trim
    # threshold holds for each: together they kept the most each thread had ever
    # allocated at once (a worker process grew from 99 to 130 MB in 9 minutes of RRef
    # and parameter-server steps, 11 arenas nearly all free; 75 to 77 MB with one).
    ours = ("ACTORGRAD_MALLOC_TUNING", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")
    base = {k: v for k, v in os.environ.items() if k not in ours}
    base.pop("MALLOC_TRIM_THRESHOLD_", None)
    env = dict(base, PYTHONPATH=REPO, **env)
    res = subprocess.run(
        [sys.executable, "-c", _ARENAS_CODE],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str("ACTORGRAD_MALLOC_TUNING" not in env)]
    assert res.stderr.count("Arena ") == arenas, res.stderr


@pytest.mark.timeout(60)
async def test_a_stopped_worker_process_is_continued_to_handle_its_sigterm(caplog):
    # A SIGSTOPped worker cannot leave when the cluster stops, nor handle the SIGTERM
    # that follows: it waited for the SIGKILL, 2 s later.
    import signal

    with caplog.at_level(logging.WARNING, logger="actorgrad.runtime"):
        async with ag.local_cluster(1, processes=True) as c:
            assert c.procs is not None
            proc = c.procs.procs["w1"]
            os.kill(proc.pid, signal.SIGSTOP)
    assert proc.returncode != -signal.SIGKILL, proc.returncode
    # (and the wait is not silent)
    assert [r.getMessage() for r in caplog.records if "did not exit" in r.getMessage()] == [
        "local_cluster: worker process w1 did not exit within 3 s of leaving it: terminating it"
    ]


def test_the_stuck_workers_line_names_a_few_and_counts_the_rest():
    # (every name of 128 stuck workers went on one line, 1.7 KB of it at 256)
    from actorgrad.runtime.cluster import describe_stuck

    assert describe_stuck(["w3", "w7"], 3.025, "the shutdown") == (
        "worker processes w3, w7 did not exit within 3 s of the shutdown: terminating them"
    )
    assert describe_stuck([f"w{i}" for i in range(1, 129)], 6.2, "leaving it") == (
        "worker processes w1, w2, w3, w4, w5, w6, w7, w8, ... (128 in all) did not exit "
        "within 6.2 s of leaving it: terminating them"
    )


def slow_exiters(n: int, cpu: float) -> WorkerProcesses:
    """``n`` processes, as worker processes of a ``WorkerProcesses``, that each spend
    ``cpu`` s of CPU exiting once their stdin closes (as a worker once its head left)."""
    code = (
        "import sys, time\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
        f"end = time.process_time() + {cpu}\n"
        "while time.process_time() < end: pass\n"
    )
    procs = WorkerProcesses()
    for i in range(n):
        procs.procs[f"w{i + 1}"] = subprocess.Popen(
            [sys.executable, "-S", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
    for p in procs.procs.values():
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        p.stdout.close()
    return procs


async def test_worker_processes_exiting_all_at_once_get_the_cpu_they_need_before_the_stuck_ones_are_named(
    monkeypatch,
):
    # A worker process takes 40-50 ms of CPU to exit once its head is gone, and all of
    # them exit at once: 128 on 2 cores took 3.3 s, and the stop named every one of them
    # as stuck after its 3 s grace (a warning listing all 128, then SIGTERM). Here each
    # process needs 0.1 s of CPU to exit once its stdin closes (its head gone), 3 per
    # core: 0.3 s at the least, under a grace of 0.1 s and 4x the CPU each needs.
    from actorgrad.runtime import procs as rprocs

    monkeypatch.setattr(rprocs, "EXIT_CPU", 0.4)
    procs = slow_exiters(3 * (os.cpu_count() or 1), 0.1)
    try:
        for p in procs.procs.values():
            assert p.stdin is not None
            p.stdin.close()
        stuck: list[str] = []
        await procs.stop(grace=0.1, on_stuck=lambda names, grace: stuck.extend(names))
        assert stuck == []
        assert [p.returncode for p in procs.procs.values()] == [0] * len(procs.procs)
    finally:
        procs.kill()
        await procs.stop(grace=0, term_grace=0)


async def test_a_worker_process_busy_past_its_exit_cpu_is_still_named_stuck():
    # The stop waits longer for processes still exiting on a loaded machine (runnable,
    # short of their exit's CPU): one that spins on (a call that does not end) uses that
    # CPU up and is named, as one asleep is (the second here), within the bound.
    procs = slow_exiters(1, 3600)
    procs.procs["w2"] = group_leaders("import time; time.sleep(60)").procs["w1"]
    try:
        for p in procs.procs.values():
            if p.stdin is not None:
                p.stdin.close()
        named: list[tuple[list[str], float]] = []
        t0 = time.monotonic()
        await procs.stop(grace=0.1, on_stuck=lambda names, waited: named.append((names, waited)))
        assert [names for names, _ in named] == [["w1", "w2"]]
        assert named[0][1] <= time.monotonic() - t0
        assert [p.returncode for p in procs.procs.values()] == [-signal.SIGTERM] * 2
    finally:
        procs.kill()
        await procs.stop(grace=0, term_grace=0)


def group_leaders(*codes: str) -> WorkerProcesses:
    """Processes running ``codes`` (Python), as worker processes of a
    ``WorkerProcesses`` (w1, w2, ...): each leads a process group of its own."""
    procs = WorkerProcesses()
    for i, code in enumerate(codes):
        procs.procs[f"w{i + 1}"] = subprocess.Popen(
            [sys.executable, "-S", "-c", code], process_group=0
        )
    return procs


async def test_a_stop_signals_no_process_group_whose_leader_it_reaped_before(monkeypatch):
    # A worker process that died was reaped at once (watch_exits, as a cluster reports
    # it), and the stop, maybe hours later, sent SIGKILL to the process group of its pid
    # all the same ("the group may still hold grandchildren"). Reaped, its pid is free,
    # and so is its group's id once the group is empty: pid_max is 32768 on many
    # machines (this one too), and by then the id could be another process's group (a
    # shell's job, another cluster's worker process: each leads one), which was killed.
    # Now a worker process is reaped only once its group has been signalled.
    signalled: list[tuple[int, int, bool]] = []
    killpg = os.killpg

    def recorded(pgid: int, sig: int) -> None:
        try:  # (whether pgid is still a child of ours, maybe exited, not reaped)
            os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            ours = True
        except ChildProcessError:
            ours = False
        signalled.append((pgid, sig, ours))
        killpg(pgid, sig)

    procs = group_leaders("pass", "import time; time.sleep(60)")
    exits: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    unwatch = procs.watch_exits(lambda name, pid, rc: exits.put_nowait((name, rc)))
    try:
        async with asyncio.timeout(20):
            assert await exits.get() == ("w1", 0)
        unwatch()
        monkeypatch.setattr(os, "killpg", recorded)
        await procs.stop(grace=0.1, term_grace=5)
        assert [p.returncode for p in procs.procs.values()] == [0, -signal.SIGTERM]
        assert signalled and all(ours for _, _, ours in signalled), signalled
    finally:
        monkeypatch.undo()
        procs.kill()
        await procs.stop(grace=0, term_grace=0)


async def test_a_worker_process_that_died_is_reaped_at_once_only_with_its_group_empty():
    # (reaped, its group's id could be another's: one whose child lives on in its group
    # stays a zombie until the stop has signalled that group)
    procs = group_leaders("pass", "import os, time\nif os.fork() == 0:\n    time.sleep(60)")
    exits: asyncio.Queue[str] = asyncio.Queue()
    unwatch = procs.watch_exits(lambda name, pid, rc: exits.put_nowait(name))
    try:
        async with asyncio.timeout(20):
            assert {await exits.get(), await exits.get()} == {"w1", "w2"}
        unwatch()
        w1, w2 = procs.procs["w1"], procs.procs["w2"]
        assert w1.returncode == 0 and proc_stat(w1.pid) == []
        assert w2.returncode is None and proc_stat(w2.pid)[0] == "Z"
        child = [p for p in group_left(w2.pid) if p != w2.pid]
        assert len(child) == 1
        await procs.stop(grace=0.1, term_grace=5)
        assert w2.returncode == 0 and proc_stat(w2.pid) == []
        # (its child was signalled: it ends a moment later, on a loaded machine after
        # the stop returned)
        await until(lambda: group_left(w2.pid) == [], 10)
    finally:
        procs.kill()
        await procs.stop(grace=0, term_grace=0)


async def test_the_names_of_the_worker_processes_a_head_starts_are_kept_for_them():
    # Anyone holding the token could join as "w30" while the cluster's own w30 was
    # starting: the cluster said it was ready, then its own w30 failed ("already in
    # the cluster") and a foreign process served under its name.
    w = await ag.init("head")
    procs = WorkerProcesses()
    try:
        procs.start(w.address, ["w1"], w.token, registry=w.registry)
        with pytest.raises(ValueError, match=r"^the name 'w1' is kept for the worker process"):
            await rcluster.serve_worker(w.address, "w1", w.token)
        await procs.wait_registered(w.registry)
        assert await ag.rpc("w1", os.getpid) == procs.pids[0]
        # a name kept is joined with its key alone (as the process does)
        w.registry.reserve(["w2"], "the key")
        for wrong in ("another", "clé"):  # (non-ASCII: a TypeError of compare_digest)
            with pytest.raises(ValueError, match="'w2' is kept"):
                await rcluster.serve_worker(w.address, "w2", w.token, key=wrong)
        stop = asyncio.Event()
        task = asyncio.ensure_future(
            rcluster.serve_worker(w.address, "w2", w.token, key="the key", stop=stop)
        )
        while "w2" not in ag.workers():
            await asyncio.wait_for(w._members_changed.wait(), 10)
        assert w.registry.reserved == {}
        stop.set()
        assert await asyncio.wait_for(task, 10) is None
    finally:
        await ag.shutdown()
        await procs.stop()


async def test_a_join_under_the_name_of_a_member_gone_silent_says_for_how_long():
    # A dead host's member (its connection open) stays until the head's 60 s silence
    # timeout; a join under its name was refused with "a worker named 'w1' is already
    # in the cluster" alone: an operator (or `actorgrad worker --wait`'s last error)
    # could not tell a name given twice from a holder the head has not heard from.
    # Now the refusal names the holder, and says for how long it has been silent once
    # that is longer than a live member's pings leave it (they come every 9-10 s).
    async with ag.local_cluster(1, processes=True) as c:
        head = c.driver
        assert head.registry is not None
        wid, address, _ = head.registry.members["w1"]
        held = re.escape(f"a worker named 'w1' is already in the cluster (cluster id {wid}, at ")
        with pytest.raises(ValueError, match=f"^{held}{re.escape(address)}\\)$"):
            await rcluster.serve_worker(head.address, "w1", head.token)
        conn = next(k for k, n in head.registry.conns.items() if n == "w1")
        os.kill(c.pids[0], signal.SIGSTOP)
        try:
            await until(lambda: time.monotonic() - conn.last_recv > 13, 30)
            with pytest.raises(ValueError) as got:
                await rcluster.serve_worker(head.address, "w1", head.token)
            assert re.fullmatch(
                f"{held}{re.escape(address)}; silent for (\\d+) s: the head drops a member "
                "silent for 60 s\\)",
                str(got.value),
            ), got.value
        finally:
            os.kill(c.pids[0], signal.SIGCONT)
        assert await ag.rpc("w1", os.getpid) == c.pids[0]  # (still the member)


def drop_kept() -> None:
    rworker.current_worker().ext.pop("kept", None)


async def test_rrefs_passed_to_their_owner_unregistered_are_freed_with_the_last_holder():
    # Passed to its owner in a call, an RRef goes unregistered (the owner counts
    # itself as it decodes it): on process workers too, the value stays while any
    # holder has it, and goes with the last.
    async with ag.local_cluster(2, processes=True):
        r = await ag.remote("w1", Counter, (2,))
        for _ in range(3):
            assert await ag.rpc("w1", peek, (r,)) == 2
        assert await ag.rpc("w1", keep, (r,)) == 1
        assert await ag.rpc("w2", keep, (r,)) == 1
        del r
        gc.collect()

        async def owned_is(n: int) -> None:
            async with asyncio.timeout(10):
                while await ag.rpc("w1", owned) != n:  # noqa: ASYNC110 (no event for it)
                    await asyncio.sleep(0.02)

        assert await ag.rpc("w1", owned) == 1
        await ag.rpc("w1", drop_kept)
        assert await ag.rpc("w1", owned) == 1  # (w2 holds it)
        assert await ag.rpc("w2", kept_incr) == 3
        await ag.rpc("w2", drop_kept)
        await owned_is(0)
