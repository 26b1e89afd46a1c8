"""Energy of a simulated timeline: busy units at their clock, gaps at idle power of the held clock."""

from __future__ import annotations

from collections.abc import Sequence

from envpipe.sim.costs import CostModel


def unit_cost(
    costs: CostModel, stage: int, kind: str, clock_mhz: int, previous_clock_mhz: int
) -> tuple[float, float]:
    """Duration (ms) and energy (J) of a unit that starts right after a clock change.

    The agent applies a new clock when the GPU reaches the unit, so the first ``clock_switch_ms`` of the
    unit still run at the previous clock (or the whole unit, if it is shorter).
    """
    new_ms = costs.unit_duration_ms(stage, kind, clock_mhz)
    new_w = costs.unit_power_w(stage, kind, clock_mhz)
    if previous_clock_mhz == clock_mhz or costs.clock_switch_ms <= 0:
        return new_ms, new_w * new_ms / 1e3
    old_ms = costs.unit_duration_ms(stage, kind, previous_clock_mhz)
    old_w = costs.unit_power_w(stage, kind, previous_clock_mhz)
    share_old = min(1.0, costs.clock_switch_ms / old_ms)
    duration_ms = share_old * old_ms + (1 - share_old) * new_ms
    energy_j = (old_w * share_old * old_ms + new_w * (1 - share_old) * new_ms) / 1e3
    return duration_ms, energy_j


def idle_energy_j(
    costs: CostModel, stage: int, spans: Sequence[tuple[float, float, int]], makespan_ms: float
) -> tuple[float, float]:
    """Idle time (ms) and energy (J) of ``stage`` over [0, makespan] around its ``(start, end, clock)`` spans.

    A gap is spent at the clock of the unit before it (the clock stays locked); the gap before the first
    unit at the first unit's clock (the previous iteration's last clock is not modelled).
    """
    if not spans:
        return makespan_ms, costs.idle_power_w(stage, costs.max_clock_mhz) * makespan_ms / 1e3
    idle_ms = energy_j = 0.0
    cursor, clock = 0.0, spans[0][2]
    for start, end, span_clock in spans:
        if start > cursor:
            idle_ms += start - cursor
            energy_j += costs.idle_power_w(stage, clock) * (start - cursor) / 1e3
        cursor, clock = end, span_clock
    if makespan_ms > cursor:
        idle_ms += makespan_ms - cursor
        energy_j += costs.idle_power_w(stage, clock) * (makespan_ms - cursor) / 1e3
    return idle_ms, energy_j
