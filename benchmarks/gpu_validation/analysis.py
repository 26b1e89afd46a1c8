"""Pure helpers of the GPU validation (issue 7): no torch, no NVML, so they are tested on CPU.

* :func:`integrate_power_j`: energy of a stretch of power samples (trapezoid, clipped to a window);
* :func:`expected_events` / :func:`match_events`: the phase events a stage should send, in order, matched
  against what the agent received, with the lag of each event behind the device reaching its boundary;
* :func:`sync_calls_by_thread`: CUDA synchronising runtime calls per thread in a torch.profiler trace;
* :func:`stats` and :func:`goal`: summaries and pass/fail lines for the results table.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# CUDA runtime/driver calls that block the calling host thread until device work is done.
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize",
              "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize")
DEVICE_WIDE_SYNC_CALLS = ("cudaDeviceSynchronize", "cuCtxSynchronize")


def integrate_power_j(samples: Sequence[tuple[float, float]], start_s: float, end_s: float) -> float:
    """Energy (J) of power samples ``(time_s, power_w)`` over ``[start_s, end_s]``, trapezoid rule.

    Power between samples is linear; before the first and after the last sample it is held constant, so
    a window slightly wider than the sampled stretch still gets a value.

    Raises:
        ValueError: fewer than two samples, unsorted times, or an empty window.
    """
    if len(samples) < 2:
        raise ValueError(f"need at least two power samples to integrate, got {len(samples)}")
    if end_s <= start_s:
        raise ValueError(f"empty window: start {start_s} s is not before end {end_s} s")
    times = [t for t, _ in samples]
    if any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError("power samples must be sorted by time")
    points = [(start_s, _power_at(samples, start_s))]
    points += [(t, p) for t, p in samples if start_s < t < end_s]
    points.append((end_s, _power_at(samples, end_s)))
    return sum((t1 - t0) * (p0 + p1) / 2.0 for (t0, p0), (t1, p1) in itertools.pairwise(points))


def _power_at(samples: Sequence[tuple[float, float]], time_s: float) -> float:
    """Linear interpolation of the power at ``time_s`` (held constant outside the samples)."""
    if time_s <= samples[0][0]:
        return samples[0][1]
    if time_s >= samples[-1][0]:
        return samples[-1][1]
    for (t0, p0), (t1, p1) in itertools.pairwise(samples):
        if t0 <= time_s <= t1:
            return p0 if t1 == t0 else p0 + (p1 - p0) * (time_s - t0) / (t1 - t0)
    raise AssertionError("unreachable: time_s lies inside the sorted samples")


def expected_events(unit_order: Sequence[Sequence[str]]) -> list[tuple[int, str, str]]:
    """``(iteration, unit, "begin"|"end")`` in send order, from each iteration's units in execution order."""
    return [(k, unit, kind) for k, units in enumerate(unit_order) for unit in units
            for kind in ("begin", "end")]


@dataclass(frozen=True)
class EventMatch:
    """Received phase events against the expected sequence.

    Attributes:
        expected: number of events the stage should have sent.
        received: number the agent received for the lease in the matched stretch.
        in_order: every received event is the expected one at its position, none missing or extra.
        first_mismatch: index of the first event that differs (None when in order).
        lags_ms: per matched event, receipt time minus the device reaching its boundary.
    """

    expected: int
    received: int
    in_order: bool
    first_mismatch: int | None
    lags_ms: list[float]


def match_events(expected: Sequence[tuple[int, str, str]], received: Sequence[tuple[int, str, str]],
                 boundary_ns: dict[tuple[int, str, str], int]) -> EventMatch:
    """Compare received events ``(received_ns, unit, kind)`` with ``expected`` and compute their lags.

    Args:
        expected: from :func:`expected_events`.
        received: what the agent logged for this lease in this stretch, in receipt order.
        boundary_ns: when the device reached each expected event's boundary, on the same monotonic clock.
    """
    mismatch = None
    lags_ms = []
    for index, want in enumerate(expected):
        if index >= len(received):
            mismatch = index if mismatch is None else mismatch
            break
        received_ns, unit, kind = received[index]
        if (unit, kind) != (want[1], want[2]):
            mismatch = index if mismatch is None else mismatch
            continue
        if want in boundary_ns:
            lags_ms.append((received_ns - boundary_ns[want]) / 1e6)
    if mismatch is None and len(received) != len(expected):
        mismatch = len(expected)
    return EventMatch(len(expected), len(received), mismatch is None, mismatch, lags_ms)


def sync_calls_by_thread(trace: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Synchronising CUDA API calls per host thread id in a chrome trace exported by torch.profiler."""
    counts: dict[int, dict[str, int]] = {}
    for event in trace.get("traceEvents", []):
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in SYNC_CALLS:
            continue
        per_thread = counts.setdefault(int(event.get("tid", -1)), {})
        per_thread[name] = per_thread.get(name, 0) + 1
    return counts


def counter_updates(series: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """How often an energy counter read ``(time_s, energy_j)`` as fast as possible actually changes.

    Returns the number of reads, the intervals between changes (ms) and the energy of each change (J): a
    counter that changes every ~100 ms makes any window edge uncertain by up to that long.
    """
    changes = [(t, e) for (_, e0), (t, e) in itertools.pairwise(series) if e != e0]
    intervals_ms = [(t1 - t0) * 1e3 for (t0, _), (t1, _) in itertools.pairwise(changes)]
    steps_j = [e1 - e0 for (_, e0), (_, e1) in itertools.pairwise(changes)]
    read_ms = [(t1 - t0) * 1e3 for (t0, _), (t1, _) in itertools.pairwise(series)]
    return {"reads": len(series), "changes": len(changes), "read_interval_ms": stats(read_ms),
            "change_interval_ms": stats(intervals_ms), "change_step_j": stats(steps_j)}


def stats(values: Iterable[float]) -> dict[str, float]:
    """n, median, p10/p90/p99, min and max (empty input gives n = 0 only)."""
    data = sorted(float(v) for v in values)
    if not data:
        return {"n": 0}
    return {"n": len(data), "median": statistics.median(data), "p10": _quantile(data, 0.10),
            "p90": _quantile(data, 0.90), "p99": _quantile(data, 0.99), "min": data[0], "max": data[-1]}


def _quantile(sorted_data: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: every reported value was observed)."""
    rank = max(1, math.ceil(q * len(sorted_data)))
    return sorted_data[rank - 1]


def goal(name: str, value: float | None, limit: float, *, kind: str = "abs_le") -> dict[str, Any]:
    """One goal line: ``abs_le`` means ``|value| <= limit``, ``le`` means ``value <= limit``.

    A missing value (the part did not run) is reported as not met, with ``value`` None.
    """
    if kind not in ("abs_le", "le"):
        raise ValueError(f"goal kind must be 'abs_le' or 'le', got {kind!r}")
    met = None if value is None else (abs(value) <= limit if kind == "abs_le" else value <= limit)
    return {"goal": name, "value": value, "limit": limit, "kind": kind, "met": bool(met)}


def relative_error(measured: float, reference: float) -> float:
    """``measured / reference - 1``.

    Raises:
        ValueError: the reference is zero (nothing to compare against).
    """
    if reference == 0:
        raise ValueError("reference is 0: nothing to compare against")
    return measured / reference - 1.0
