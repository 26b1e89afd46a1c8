"""Per-unit timings of one iteration on one stage: CUDA events on GPU, ``perf_counter`` on CPU.

On GPU nothing here synchronises on the hot path: each unit gets a begin and an end event (which the
notifier thread also watches), and durations are read only when someone asks for the timeline, after the
iteration. ``gather`` puts every stage's spans on one time axis for reconfiguration.
"""

from __future__ import annotations

import time
from typing import Any

from envpipe.spans import UnitSpan


class CpuUnitTimer:
    """Wall-clock spans (``perf_counter``) of the units of one iteration."""

    on_device = False

    def __init__(self) -> None:
        self._origin_s = 0.0
        self.origin_wall_s = 0.0
        self._open: dict[str, float] = {}
        self._spans: list[tuple[str, float, float, int | None]] = []

    def start_iteration(self) -> None:
        """Mark the iteration's start (time zero of this stage's spans)."""
        self._spans = []
        self._open = {}
        self.origin_wall_s = time.time()
        self._origin_s = time.perf_counter()

    def begin(self, unit: str) -> None:
        """Mark the start of ``unit``; returns no device marker (events on CPU are immediate)."""
        self._open[unit] = time.perf_counter()

    def elapsed_s(self, unit: str) -> float:
        """Seconds since ``unit`` began (used to stretch it under emulated DVFS)."""
        return time.perf_counter() - self._open[unit]

    def end(self, unit: str, clock_mhz: int | None) -> None:
        """Mark the end of ``unit``."""
        self._spans.append((unit, self._open.pop(unit), time.perf_counter(), clock_mhz))

    def spans(self, stage: int) -> list[Any]:
        """This iteration's spans in ms from its start."""
        origin = self._origin_s
        return [
            UnitSpan(stage, unit, (t0 - origin) * 1e3, (t1 - origin) * 1e3, clock)
            for unit, t0, t1, clock in self._spans
        ]


class CudaUnitTimer:
    """Spans from CUDA events recorded on the current stream at each unit boundary."""

    on_device = True

    def __init__(self) -> None:
        self.origin_wall_s = 0.0
        self._origin = None
        self._open: dict[str, Any] = {}
        self._compute_end: dict[str, Any] = {}
        self._spans: list[tuple[str, Any, Any, int | None]] = []
        self._splits: list[tuple[str, Any, Any, Any]] = []

    def _event(self) -> Any:
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start_iteration(self) -> None:
        """Record the iteration's start event."""
        self._spans = []
        self._splits = []
        self._open = {}
        self.origin_wall_s = time.time()
        self._origin = self._event()

    def begin(self, unit: str) -> Any:
        """Record ``unit``'s begin event and return it (the notifier waits on it)."""
        self._open[unit] = self._event()
        return self._open[unit]

    def mark_compute_end(self, unit: str) -> None:
        """Record where ``unit``'s own kernels end, before an emulated-DVFS spin is queued after them."""
        self._compute_end[unit] = self._event()

    def end(self, unit: str, clock_mhz: int | None) -> Any:
        """Record ``unit``'s end event and return it."""
        event = self._event()
        begin = self._open.pop(unit)
        self._spans.append((unit, begin, event, clock_mhz))
        mid = self._compute_end.pop(unit, None)
        if mid is not None:
            self._splits.append((unit, begin, mid, event))
        return event

    def splits_ms(self) -> list[tuple[str, float, float]]:
        """``(unit, compute_ms, spin_ms)`` of units with a compute-end mark (call after :meth:`spans`)."""
        return [(unit, b.elapsed_time(m), m.elapsed_time(e)) for unit, b, m, e in self._splits]

    def spans(self, stage: int) -> list[Any]:
        """This iteration's spans in ms from its start (waits for the last event: call after the iteration)."""
        if self._spans:
            self._spans[-1][2].synchronize()
        origin = self._origin
        return [
            UnitSpan(stage, unit, origin.elapsed_time(b), origin.elapsed_time(e), clock)
            for unit, b, e, clock in self._spans
        ]


def make_timer(on_gpu: bool) -> CpuUnitTimer | CudaUnitTimer:
    """The timer for this device."""
    return CudaUnitTimer() if on_gpu else CpuUnitTimer()


def gather_many(records: list[tuple[float, list[Any]]], group: Any) -> list[list[Any]]:
    """:func:`gather` for several iterations in one collective: ``records`` are ``(origin_wall_s, spans)``.

    Every rank of ``group`` must pass the same number of records; returns one common-axis timeline each.
    """
    import torch.distributed as dist

    rows = [
        (origin, [(s.stage, s.unit, s.start_ms, s.end_ms, s.clock_mhz) for s in spans])
        for origin, spans in records
    ]
    gathered: list[Any] = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(gathered, rows, group=group)
    return [_common_axis([stage_records[k] for stage_records in gathered]) for k in range(len(records))]


def _common_axis(per_stage: list[tuple[float, list[tuple]]]) -> list[Any]:
    """Span rows of every stage for one iteration, shifted so that 0 ms is the earliest stage's start."""
    earliest = min(origin for origin, _ in per_stage)
    out = []
    for origin, rows in per_stage:
        shift_ms = (origin - earliest) * 1e3
        out += [UnitSpan(st, unit, t0 + shift_ms, t1 + shift_ms, clock) for st, unit, t0, t1, clock in rows]
    return sorted(out, key=lambda s: (s.stage, s.start_ms))


def gather(spans: list[Any], origin_wall_s: float, group: Any) -> list[Any]:
    """Every stage's spans on every rank of ``group``, shifted so 0 ms is the earliest stage's start.

    Stages start their iterations at slightly different moments; the wall clock at each stage's start puts
    them on one axis (exact on one node, NTP-accurate across nodes).
    """
    import torch.distributed as dist

    rows = [(s.stage, s.unit, s.start_ms, s.end_ms, s.clock_mhz) for s in spans]
    gathered: list[Any] = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(gathered, (origin_wall_s, rows), group=group)
    return _common_axis(gathered)
