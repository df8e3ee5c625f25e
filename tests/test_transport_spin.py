"""The transport's busy-poll window after traffic (see transport._Spinner)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import on_uvloop

from actorgrad.runtime import transport


async def test_spinner_keeps_the_loop_polling_for_its_window_then_lets_it_sleep(monkeypatch):
    monkeypatch.setattr(transport, "SPIN_SECONDS", 0.005)
    yields = []
    monkeypatch.setattr(transport, "_sched_yield", lambda: yields.append(time.perf_counter()))
    loop = asyncio.get_running_loop()
    sp = transport._spinner(loop)
    assert sp is not None and transport._spinner(loop) is sp  # one per loop
    # (nothing else ready at its ticks, as on an idle loop: this task's next step waits
    # behind each; see the test after the next)
    monkeypatch.setattr(sp, "ready", ())
    start = time.perf_counter()
    sp.poke(False)
    assert sp.active
    ticks = 0
    while sp.active:  # each yield runs one loop iteration: the spinner's tick among them
        await asyncio.sleep(0)
        ticks += 1
        assert time.perf_counter() - start < 5, "the spinner never stopped"
    assert time.perf_counter() - start >= 0.005
    assert ticks > 1
    assert abs(len(yields) - ticks) <= 3  # it yields the CPU at every idle poll...


async def test_spinner_does_not_yield_at_the_first_poll_after_a_frame(monkeypatch):
    monkeypatch.setattr(transport, "SPIN_SECONDS", 1.0)
    yields: list[int] = []
    monkeypatch.setattr(transport, "_sched_yield", lambda: yields.append(1))
    sp = transport._Spinner(asyncio.get_running_loop())
    sp.ready = ()  # (as on an idle loop: see the next test)
    sp.poke(True)  # starts the spinner: its first tick comes after this frame
    await asyncio.sleep(0)
    assert yields == []  # ...not while what the frame caused waits behind it
    await asyncio.sleep(0)
    assert yields == [1]
    sp.poke(False)
    await asyncio.sleep(0)
    assert yields == [1]
    sp.until = 0.0  # stop
    await asyncio.sleep(0)


async def test_spinner_yields_the_core_only_while_nothing_else_is_ready(monkeypatch):
    # A tick queued ahead of asyncio.run's main task's last callback (the stop of its
    # run_until_complete) yielded the core there: a Ctrl-C then broke the loop's close
    # (see test_runtime's test_a_ctrl_c_as_the_main_coroutine_ends_is_a_keyboard_interrupt)
    if on_uvloop():
        pytest.skip("uvloop's loop has no queue of ready callbacks to look at")
    monkeypatch.setattr(transport, "SPIN_SECONDS", 1.0)
    loop = asyncio.get_running_loop()
    yields: list[int] = []
    monkeypatch.setattr(transport, "_sched_yield", lambda: yields.append(len(loop._ready)))
    sp = transport._Spinner(loop)
    sp.poke(False)
    for _ in range(10):
        await asyncio.sleep(0)  # (this task's next step waits behind each tick)
    assert yields == []
    idle = loop.create_future()
    loop.call_later(0.01, idle.set_result, None)  # (a stretch with nothing else to run)
    await idle
    assert yields and set(yields) == {0}
    sp.until = 0.0  # stop
    await asyncio.sleep(0)


async def test_spinning_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(transport, "SPIN_SECONDS", 0.0)
    assert transport._spinner(asyncio.get_running_loop()) is None


async def test_spinner_stops_spinning_when_frames_come_farther_apart_than_its_window(
    monkeypatch,
):
    monkeypatch.setattr(transport, "SPIN_SECONDS", 0.001)
    sp = transport._Spinner(asyncio.get_running_loop())
    for _ in range(20):  # frames 2 ms apart: spinning would never catch one
        sp.last = time.perf_counter() - 0.002
        sp.poke(True)
    assert sp.score < transport.SPIN_HIT_RATE
    sp.active = False
    sp.poke(False)
    assert not sp.active
    for _ in range(20):  # back-to-back frames: it spins again
        sp.poke(True)
    assert sp.score > transport.SPIN_HIT_RATE and sp.active


async def test_the_loop_does_not_spin_while_its_worker_runs_a_job_in_a_thread(monkeypatch):
    # (each tick takes the GIL: the job's thread would wait for it)
    import threading

    from actorgrad.runtime import Worker

    monkeypatch.setattr(transport, "SPIN_SECONDS", 1.0)
    loop = asyncio.get_running_loop()
    sp = transport._spinner(loop)
    assert sp is not None
    w = Worker("spin-test", token="t", transport_kind="inproc")
    await w.start()
    try:
        go = threading.Event()
        fut = w.offload(go.wait)
        assert sp.held == 1
        sp.poke(False)
        assert not sp.active  # held: no spinning starts
        go.set()
        await fut
        assert sp.held == 0
        sp.poke(False)
        assert sp.active  # (and spinning is back)
        sp.until = 0.0
        while sp.active:  # noqa: ASYNC110 (one loop turn each: its tick ends it)
            await asyncio.sleep(0)
    finally:
        await w.shutdown()


def test_a_malformed_spin_setting_is_named_and_the_default_used() -> None:
    # float("abc") at import: `import actorgrad` and every CLI command failed with a
    # bare ValueError traceback.
    code = (
        "from actorgrad.runtime import transport; transport.read_settings(); "
        "print(transport.SPIN_SECONDS)"
    )
    for raw in ("abc", "-5", "nan"):
        env = dict(os.environ, ACTORGRAD_SPIN_US=raw)
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "0.005"
        # (one line: the message, not warnings' file path and source line around it)
        assert (
            r.stderr
            == f"ACTORGRAD_SPIN_US={raw!r} is not a number of microseconds >= 0; using 5000\n"
        )
    # A window of 0.5 s or more counted every heartbeat as traffic: idle workers spun
    # for good (108% of a core for an idle cluster of 2).
    env = dict(os.environ, ACTORGRAD_SPIN_US="1000000")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0.1"
    assert "ACTORGRAD_SPIN_US='1000000' is more than 100000 (0.1 s); using 100000" in r.stderr


def test_the_bounds_of_the_spin_setting_are_taken_as_they_are(monkeypatch, caplog) -> None:
    # (0 and MAX_SPIN_US are in range: the test above tries values past them only)
    caplog.set_level(logging.WARNING, "actorgrad")
    for raw, us in (
        ("0", 0.0),
        (str(transport.MAX_SPIN_US), transport.MAX_SPIN_US),
        ("250.5", 250.5),
    ):
        monkeypatch.setenv("ACTORGRAD_SPIN_US", raw)
        assert transport._spin_seconds() == pytest.approx(us / 1e6, rel=1e-12), raw
        assert os.environ["ACTORGRAD_SPIN_US"] == raw  # (taken: not rewritten)
    assert not caplog.records, caplog.text


def test_on_off_settings_take_the_usual_spellings_and_name_a_bad_one(monkeypatch, caplog) -> None:
    # (only "0" was off: "false", "off" or " 0" left local sockets and the malloc
    # tuning on, silently)
    name = "ACTORGRAD_TEST_SWITCH"
    for raw in ("0", " 0", "false", "OFF", "no\n"):
        monkeypatch.setenv(name, raw)
        assert transport.env_switch(name) is False, raw
    for raw in ("1", "", "true", " On ", "YES"):
        monkeypatch.setenv(name, raw)
        assert transport.env_switch(name) is True, raw
    monkeypatch.delenv(name)
    assert transport.env_switch(name) is True
    monkeypatch.setenv(name, "nope")
    with caplog.at_level(logging.WARNING, "actorgrad.runtime"):
        assert transport.env_switch(name) is True
    assert [r.getMessage() for r in caplog.records] == [
        f"{name}='nope' is not 0 or 1 (nor off or on, false or true, no or yes); taking it as 1"
    ]
    assert os.environ[name] == "1"  # (inherited by the processes started: they warn not)


async def test_heartbeats_are_no_traffic_to_the_spinner() -> None:
    # A connection someone waits on is pinged every 0.5 s: a process with many peers got
    # a ping every few ms, and they kept it spinning while idle (a driver of 16 workers
    # spun at 68% of a core with a 0.1 s window; 512 peers would with the default 5 ms).
    # Nor are the asks for pings (K_ASK) traffic.
    import actorgrad as ag
    from actorgrad import wire
    from actorgrad.runtime.worker import K_PING

    ping = b"".join(wire.encode_frame([K_PING], None))
    async with ag.local_cluster(1, transport="tcp") as c:
        assert await ag.rpc("w1", max, (1, 2)) == 2
        conn = c.driver._out["w1"]
        sp = transport._spinner(asyncio.get_running_loop())
        assert sp is not None
        pinged = asyncio.Event()
        on_frame = conn.on_frame

        def seen(cn: Any, frame: Any) -> None:
            on_frame(cn, frame)
            if bytes(frame) == ping:
                pinged.set()

        conn.on_frame = seen
        last = sp.last
        c.driver.expect_heartbeats("w1")  # (the driver's ask goes out, w1 answers it)
        await asyncio.wait_for(pinged.wait(), 5)
        assert sp.last == last
