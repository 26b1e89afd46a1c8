"""EnvPipe's clock types: simple per-unit rules giving a ClockPlan (stage -> unit -> MHz).

* ``baseline``: every unit at the top clock.
* ``uniform``: every unit of stage s at f_low(s), the stage's energy-optimal clock.
* ``envelope``: the "outer envelope" at the top clock -- every unit of the last stage, F_0 and B_{M-1} on
  every stage -- and every other unit at f_low(s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from envpipe.ir import BACKWARD_KINDS, Action, ActionKind, ClockPlan, Schedule
from envpipe.registry import Registry
from envpipe.sim.costs import CostModel


@dataclass(frozen=True)
class ClockType:
    """A clock type: ``rule(schedule, unit, top_mhz, low_mhz)`` gives a unit's clock (``low`` = f_low(s))."""

    name: str
    summary: str
    rule: Callable[[Schedule, Action, int, int], int]
    uses_f_low: bool = True


def _on_envelope(schedule: Schedule, unit: Action) -> bool:
    kind, mb = unit.kind, unit.microbatch
    return (
        unit.stage == schedule.stages - 1
        or (kind is ActionKind.F and mb == 0)
        or (kind in BACKWARD_KINDS and mb == schedule.micro_batches - 1)
    )


CLOCK_TYPES: Registry[ClockType] = Registry(
    "clock type",
    [
        ClockType("baseline", "every unit at the top clock", lambda s, u, top, low: top, uses_f_low=False),
        ClockType("uniform", "every unit of stage s at f_low(s)", lambda s, u, top, low: low),
        ClockType(
            "envelope",
            "the last stage, F0 and the last backward of every stage at the top clock, the rest at f_low(s)",
            lambda s, u, top, low: top if _on_envelope(s, u) else low,
        ),
    ],
)


def assign_clocks(schedule: Schedule, costs: CostModel, clock_type: str) -> ClockPlan:
    """The ClockPlan of ``clock_type`` for ``schedule``; f_low(s) and the top clock come from ``costs``."""
    kind = CLOCK_TYPES.lookup(clock_type)
    top = costs.max_clock_mhz
    low = {s: costs.f_low_mhz(s) if kind.uses_f_low else top for s in range(schedule.stages)}
    plan: ClockPlan = {stage: {} for stage in range(schedule.stages)}
    for rank in range(schedule.ranks):
        for unit in schedule.units(rank):
            plan[unit.stage][unit.unit] = kind.rule(schedule, unit, top, low[unit.stage])
    return plan
