"""Helpers shared by bench_rpc and bench_dist: timing windows, interleaving, the table."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple


class Metric(NamedTuple):
    """One row of a comparison table."""

    key: str  # key in the result dicts
    label: str
    unit: str
    higher_is_better: bool
    target: float | None  # wanted speedup of actorgrad over the reference, if any


#: Fewest steps a timing window takes, however long they are (PyTorch's bw step took
#: 0.11-0.53 s: a window of 1-3 steps was a draw). torch_ref's windows too.
MIN_STEPS = 5


async def timed(
    step: Callable[[], Awaitable[Any]], *, warmup: int, seconds: float, windows: int = 3
) -> float:
    """Seconds per ``await step()``: the best of ``windows`` windows of ``seconds/windows``.

    ``warmup`` calls run first; a window takes at least ``MIN_STEPS`` steps. Taking the
    best window keeps a burst of load from the other users of a shared machine out of
    the number (each side is measured alike).
    """
    for _ in range(warmup):
        await step()
    best = float("inf")
    for _ in range(windows):
        n = 0
        start = time.perf_counter()
        while True:
            await step()
            n += 1
            now = time.perf_counter()
            if now - start >= seconds / windows and n >= MIN_STEPS:
                break
        best = min(best, (now - start) / n)
    return best


class Workloads:
    """One side of a benchmark: a step function per metric, made on first use (``make``)
    and warmed up, then timed one window at a time (``window``, see ``interleave``)."""

    def __init__(self, warmup: dict[str, int]) -> None:
        self._warmup = warmup
        self._steps: dict[str, Callable[[], Awaitable[Any]]] = {}

    async def make(self, name: str) -> Callable[[], Awaitable[Any]]:
        raise NotImplementedError

    async def window(self, name: str, seconds: float) -> float:
        """Seconds per step of metric ``name`` over one window (warm-up on first use)."""
        step = self._steps.get(name)
        if step is None:
            step = self._steps[name] = await self.make(name)
            for _ in range(self._warmup.get(name, 0)):
                await step()
        return await timed(step, warmup=0, seconds=seconds, windows=1)


Window = Callable[[str, float], Awaitable[float]]
"""``window(metric, seconds)`` -> seconds per step of that metric's workload."""

#: How many times the sides that cannot share the machine (PyTorch's busy-polling
#: processes and ours) take turns; each turn gets ``1/PHASES`` of the measuring time and
#: the best window of all turns counts. With one turn each, a burst of load from the
#: other users of the machine during one side's only turn skewed the ratio by 30-40%.
PHASES = 2


def _merge_best(
    into: dict[str, float] | None, new: dict[str, float] | None
) -> dict[str, float] | None:
    """Per metric, the smaller of two sets of seconds per step (``None``: no such side)."""
    if into is None or new is None:
        return new if into is None else into
    return {k: min(into.get(k, float("inf")), new.get(k, float("inf"))) for k in into | new}


async def take_turns(
    reference: Callable[[float], Awaitable[dict[str, float] | None]],
    sides: dict[str, Window],
    metrics: Sequence[str],
    seconds: float,
) -> tuple[dict[str, float] | None, dict[str, dict[str, float] | None]]:
    """Best seconds per step of a reference measured in turns of its own
    (``reference(seconds)``, None when unusable) and of ``sides`` (interleaved with one
    another), in ``PHASES`` alternating turns sharing ``seconds``: (reference, sides)."""
    ref: dict[str, float] | None = None
    best: dict[str, dict[str, float] | None] = {side: None for side in sides}
    for _ in range(PHASES):
        ref = _merge_best(ref, await reference(seconds / PHASES))
        turn = await interleave(sides, metrics, seconds / PHASES)
        for side in sides:
            best[side] = _merge_best(best[side], turn[side])
    return ref, best


async def interleave(
    sides: dict[str, Window],
    metrics: Sequence[str],
    seconds: float,
    *,
    rounds: int = 3,
    required: str = "actorgrad",
) -> dict[str, dict[str, float]]:
    """Best seconds per step of each side and metric, windows interleaved.

    Each metric gets ``rounds`` windows of ``seconds / rounds`` per side, alternating
    between the sides (a, b, a, b, ...), so a burst of load from the other users of a
    shared machine hits both sides alike; the best window of each side is kept. A
    reference side that fails is reported and dropped (its column shows "-"); a failure
    of the ``required`` side propagates.
    """
    live = dict(sides)
    best: dict[str, dict[str, float]] = {side: {} for side in sides}
    for metric in metrics:
        for _ in range(rounds):
            for side, window in list(live.items()):
                try:
                    per = await window(metric, seconds / rounds)
                except Exception as exc:
                    if side == required:
                        raise
                    print(f"({side} failed on {metric}, dropped: {type(exc).__name__}: {exc})")
                    del live[side]
                    continue
                best[side][metric] = min(best[side].get(metric, float("inf")), per)
    return best


def speedup(ours: float, theirs: float, higher_is_better: bool) -> float:
    """How many times better ``ours`` is than ``theirs`` (> 1: ours is better)."""
    return ours / theirs if higher_is_better else theirs / ours


def render(
    metrics: Sequence[Metric],
    ours: dict[str, float],
    columns: Sequence[tuple[str, dict[str, float] | None]],
    *,
    target_column: str,
) -> str:
    """A table: each metric, actorgrad's value, each reference column, then speedups.

    ``columns`` are (name, results or None when not measured); the speedup against
    ``target_column`` is checked against each metric's target ("ok" / "MISSED").
    """
    head = ["", "unit", "actorgrad"]
    head += [name for name, _ in columns]
    head += [f"vs {name}" for name, _ in columns]
    head.append("target")
    rows = [head]
    for m in metrics:
        a = ours.get(m.key)
        row = [m.label, m.unit, "-" if a is None else f"{a:,.1f}"]
        for _, res in columns:
            v = res.get(m.key) if res else None
            row.append("-" if v is None else f"{v:,.1f}")
        for name, res in columns:
            v = res.get(m.key) if res else None
            if a is None or v is None:
                row.append("-")
                continue
            s = speedup(a, v, m.higher_is_better)
            verdict = ""
            if name == target_column and m.target is not None:
                verdict = " ok" if s >= m.target else " MISSED"
            row.append(f"{s:.2f}x{verdict}")
        row.append(f">= {m.target:g}x vs {target_column}" if m.target else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    lines.append("speedup > 1: actorgrad is better (for times: theirs / ours)")
    return "\n".join(lines)
