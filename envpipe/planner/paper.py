"""REFERENCE ONLY: the ATC'23 EnvPipe reconfiguration, re-implemented faithfully for comparison.

Do not use this policy to train: it has the artifact's known defects on purpose (shared ALGORITHM.md,
"Known defects"): no iteration-time guard, clocks only ever go up, the critical path comes from a
receive-wait threshold, and it stops only after quiet rounds. Use ``balanced`` or ``optimal`` instead.

The algorithm, as in the artifact:

* critical path: start at stage 0's last backward B_{M-1}; walk back. At a unit whose receive wait (its
  start minus the end of the previous unit on its stage) exceeds the threshold, step to the producer on the
  neighbouring stage (F_m <- F_m of stage s-1, B_m <- B_m of stage s+1); else to the previous unit on the
  same stage. The threshold is the minimum receive wait of the last stage times a scale (the artifact's
  comment says "average"; its code takes the minimum).
* ``paper`` (balanced): raise every critical-path unit at the path's minimum clock by 30 MHz.
  ``paper-greedy``: raise the last non-top unit on the path by 90 MHz, one unit per iteration.
* stop after 10 consecutive iterations without a change, or when the path is the outer envelope (every
  unit of the last stage, F_0 and B_{M-1}). A safety cap (not in the artifact) ends runaway loops.
"""

from __future__ import annotations

from envpipe.ir import ClockPlan, Schedule
from envpipe.planner.observe import Observation
from envpipe.planner.spec import PolicySpec
from envpipe.spans import UnitSpan

QUIET_ROUNDS = 10


class Paper:
    """The artifact's reconfiguration (reference); ``variant`` is ``balanced`` (+30 MHz) or ``greedy`` (+90)."""

    def __init__(self, schedule: Schedule, costs, *, variant: str = "balanced", threshold_scale: float = 1.0) -> None:
        if variant not in ("balanced", "greedy"):
            raise ValueError(f"paper variant must be balanced or greedy, got {variant!r}")
        self.schedule, self.costs, self.variant = schedule, costs, variant
        self.name = "paper" if variant == "balanced" else "paper-greedy"
        self.step_mhz = 30 if variant == "balanced" else 90
        self.threshold_scale = threshold_scale
        self.quiet = 0

    def step(self, obs: Observation, target_ms: float, round_no: int) -> ClockPlan | None:
        """One artifact iteration; ``target_ms`` is ignored (the artifact has no guard)."""
        clocks = {s: {u: sp.clock_mhz for (st, u), sp in obs.spans.items() if st == s}
                  for s in range(self.schedule.stages)}
        path = threshold_path(self.schedule, obs.spans, self.threshold_scale)
        if all(_on_envelope(self.schedule, s, u) for s, u in path):
            return None
        changed = self._raise(clocks, path)
        self.quiet = 0 if changed else self.quiet + 1
        if self.quiet >= QUIET_ROUNDS:
            return None
        return clocks

    def _raise(self, clocks: ClockPlan, path: list[tuple[int, str]]) -> bool:
        top = self.costs.max_clock_mhz
        if self.variant == "greedy":
            targets = [next(((s, u) for s, u in reversed(path) if clocks[s][u] < top), None)]
            targets = [t for t in targets if t is not None]
        else:
            lowest = min((clocks[s][u] for s, u in path), default=top)
            targets = [(s, u) for s, u in path if clocks[s][u] == lowest and lowest < top]
        for s, u in targets:
            clocks[s][u] = self._up(clocks[s][u])
        return bool(targets)

    def _up(self, clock_mhz: int) -> int:
        above = [c for c in self.costs.clocks_mhz if c >= clock_mhz + self.step_mhz]
        return min(above) if above else self.costs.max_clock_mhz


def threshold_path(schedule: Schedule, spans: dict[tuple[int, str], UnitSpan], scale: float) -> list[tuple[int, str]]:
    """The artifact's critical path (time order), walked back from stage 0's last backward."""
    waits = _receive_waits(schedule, spans)
    last = schedule.stages - 1
    last_waits = [waits[(last, a.unit)] for a in schedule.units(last) if a.kind.value == "F"]
    threshold = scale * min(last_waits, default=0.0)
    position = {(s, a.unit): i for s in range(schedule.stages) for i, a in enumerate(schedule.units(s))}
    key: tuple[int, str] | None = (0, f"B{schedule.micro_batches - 1}")
    path: list[tuple[int, str]] = []
    while key is not None and key not in path:
        path.append(key)
        stage, unit = key
        producer = _producer(schedule, stage, unit)
        if producer is not None and waits[key] > threshold:
            key = producer
        else:
            i = position[key]
            key = (stage, schedule.units(stage)[i - 1].unit) if i > 0 else None
    path.reverse()
    return path


def _receive_waits(schedule: Schedule, spans: dict[tuple[int, str], UnitSpan]) -> dict[tuple[int, str], float]:
    first = min(sp.start_ms for sp in spans.values())
    waits = {}
    for s in range(schedule.stages):
        previous_end = first
        for a in schedule.units(s):
            span = spans[(s, a.unit)]
            waits[(s, a.unit)] = max(0.0, span.start_ms - previous_end)
            previous_end = span.end_ms
    return waits


def _producer(schedule: Schedule, stage: int, unit: str) -> tuple[int, str] | None:
    kind = unit[0]
    if kind == "F" and stage > 0:
        return stage - 1, unit
    if kind == "B" and stage < schedule.stages - 1:
        return stage + 1, unit
    return None


def _on_envelope(schedule: Schedule, stage: int, unit: str) -> bool:
    return stage == schedule.stages - 1 or unit == "F0" or unit == f"B{schedule.micro_batches - 1}"


SPEC = PolicySpec(
    "paper",
    "the ATC'23 algorithm as published (reference only)",
    lambda schedule, costs: Paper(schedule, costs, variant="balanced"),
    2000,
)
GREEDY_SPEC = PolicySpec(
    "paper-greedy",
    "the ATC'23 algorithm, greedy variant (reference only)",
    lambda schedule, costs: Paper(schedule, costs, variant="greedy"),
    2000,
)
