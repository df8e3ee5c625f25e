"""The transport's busy-poll window after traffic (see transport._Spinner)."""

from __future__ import annotations

import asyncio
import time

from actorgrad.runtime import transport


async def test_spinner_keeps_the_loop_polling_for_its_window_then_lets_it_sleep(monkeypatch):
    monkeypatch.setattr(transport, "SPIN_SECONDS", 0.005)
    loop = asyncio.get_running_loop()
    sp = transport._spinner(loop)
    assert sp is not None and transport._spinner(loop) is sp  # one per loop
    start = time.perf_counter()
    sp.poke()
    assert sp.active
    ticks = 0
    while sp.active:  # each yield runs one loop iteration: the spinner's tick among them
        await asyncio.sleep(0)
        ticks += 1
        assert time.perf_counter() - start < 5, "the spinner never stopped"
    assert time.perf_counter() - start >= 0.005
    assert ticks > 1


async def test_spinning_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(transport, "SPIN_SECONDS", 0.0)
    assert transport._spinner(asyncio.get_running_loop()) is None
