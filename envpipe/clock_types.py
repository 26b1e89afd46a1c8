"""EnvPipe's clock types: simple per-unit rules giving a ClockPlan (stage -> unit -> MHz).

* ``baseline``: every unit at the top clock.
* ``uniform``: every unit of stage s at f_low(s), the stage's energy-optimal clock.
* ``envelope``: the "outer envelope" at the top clock -- every unit of the last stage, F_0 and B_{M-1} on
  every stage -- and every other unit at f_low(s).
"""

from __future__ import annotations

from envpipe.errors import ConfigError
from envpipe.ir import BACKWARD_KINDS, ActionKind, ClockPlan, Schedule
from envpipe.sim.costs import CostModel

CLOCK_TYPES = ("baseline", "uniform", "envelope")


def assign_clocks(schedule: Schedule, costs: CostModel, clock_type: str) -> ClockPlan:
    """The ClockPlan of ``clock_type`` for ``schedule``; f_low(s) and the top clock come from ``costs``."""
    if clock_type not in CLOCK_TYPES:
        raise ConfigError(f"unknown clock type {clock_type!r}; choose one of {', '.join(CLOCK_TYPES)}")
    top = costs.max_clock_mhz
    plan: ClockPlan = {stage: {} for stage in range(schedule.stages)}
    for rank in range(schedule.ranks):
        for unit in schedule.units(rank):
            stage = unit.stage
            low = costs.f_low_mhz(stage) if clock_type != "baseline" else top
            on_envelope = clock_type == "envelope" and _on_envelope(schedule, stage, unit)
            plan[stage][unit.unit] = top if on_envelope else low
    return plan


def _on_envelope(schedule: Schedule, stage: int, unit: object) -> bool:
    kind, mb = unit.kind, unit.microbatch  # type: ignore[attr-defined]
    return (
        stage == schedule.stages - 1
        or (kind is ActionKind.F and mb == 0)
        or (kind in BACKWARD_KINDS and mb == schedule.micro_batches - 1)
    )
