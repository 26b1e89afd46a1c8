"""Measured stretches of steps (windows) and the timeline helpers the controller's states share."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Window:
    """One measured stretch of steps, as every rank sees it (every stage's energy included).

    ``iteration_ms`` is the window's wall time over its steps (barrier to barrier, everything included);
    ``iteration_ms_median`` the median of the single steps' durations.
    """

    iterations: int
    iteration_ms: float
    iteration_ms_median: float
    stage_energy_j: dict[int, float | None]  # per iteration, summed over replicas; None = agent unavailable
    simulated: bool
    losses: list[float]
    stage_unit_ms: dict[int, dict[str, float]] = field(default_factory=dict)  # stage -> {"F": ms, "B": ms}
    span_iteration_ms: float | None = None  # median first-unit-start to last-unit-end, all stages
    statistic: str = "mean over one energy window"

    @property
    def energy_j(self) -> float | None:
        """Energy per iteration, all stages; None when the agent could not measure some stage's window."""
        values = list(self.stage_energy_j.values())
        return None if not values or any(v is None for v in values) else sum(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (stage keys as strings)."""
        data = asdict(self)
        data["stage_energy_j"] = {str(s): e for s, e in self.stage_energy_j.items()}
        data["stage_unit_ms"] = {str(s): u for s, u in self.stage_unit_ms.items()}
        data["energy_j"] = self.energy_j
        return data

    def brief(self) -> dict[str, Any]:
        """Steps, time and energy only (for lists of windows in the report)."""
        return {"iterations": self.iterations, "iteration_ms": self.iteration_ms, "energy_j": self.energy_j}


def merge_windows(windows: list[Window]) -> Window:
    """Several windows of one configuration as one: energy and times averaged by steps."""
    if len(windows) == 1:
        return windows[0]
    weights = [w.iterations for w in windows]

    def mean(values: list[float | None]) -> float | None:
        known = [(v, n) for v, n in zip(values, weights) if v is not None]
        if not known:
            return None
        return sum(v * n for v, n in known) / sum(n for _, n in known)

    units = windows[0].stage_unit_ms
    return Window(
        iterations=sum(weights),
        iteration_ms=mean([w.iteration_ms for w in windows]),
        iteration_ms_median=mean([w.iteration_ms_median for w in windows]),
        stage_energy_j={
            s: mean([w.stage_energy_j.get(s) for w in windows]) for s in windows[0].stage_energy_j
        },
        simulated=all(w.simulated for w in windows),
        losses=[x for w in windows for x in w.losses],
        stage_unit_ms={
            s: {k: mean([w.stage_unit_ms[s][k] for w in windows]) for k in units[s]} for s in units
        },
        span_iteration_ms=windows[0].span_iteration_ms,
        statistic=f"mean over {len(windows)} energy windows",
    )


def median_timeline(timelines: list[list[Any]]) -> list[Any]:
    """Per (stage, unit): the median start and the median end over several steps' timelines.

    Each step's end follows its start, so the order statistics do too: the result is a valid timeline.
    """
    from envpipe.sim import UnitSpan

    if len(timelines) == 1:
        return timelines[0]
    by_unit: dict[tuple[int, str], list[Any]] = {}
    for timeline in timelines:
        for span in timeline:
            by_unit.setdefault((span.stage, str(span.unit)), []).append(span)
    return [
        UnitSpan(
            stage,
            unit,
            statistics.median(s.start_ms for s in spans),
            statistics.median(s.end_ms for s in spans),
            spans[-1].clock_mhz,
        )
        for (stage, unit), spans in sorted(by_unit.items(), key=lambda kv: kv[1][0].start_ms)
    ]


def span_iteration_ms(spans: list[Any]) -> float:
    """First unit start to last unit end over every stage (the planner's iteration time)."""
    return max(s.end_ms for s in spans) - min(s.start_ms for s in spans)


def unit_ms_by_stage(timeline: list[Any]) -> dict[int, dict[str, float]]:
    """Mean forward (``F``) and backward (``B``) unit time per stage of one timeline."""
    out: dict[int, dict[str, list[float]]] = {}
    for span in timeline:
        kind = "F" if str(span.unit).startswith("F") else "B"
        out.setdefault(span.stage, {"F": [], "B": []})[kind].append(span.end_ms - span.start_ms)
    return {s: {k: statistics.fmean(v) for k, v in kinds.items() if v} for s, kinds in sorted(out.items())}


def span_dict(span: Any) -> dict[str, Any]:
    """A ``UnitSpan`` as JSON."""
    return {
        "stage": span.stage,
        "unit": str(span.unit),
        "start_ms": span.start_ms,
        "end_ms": span.end_ms,
        "clock_mhz": span.clock_mhz,
    }


def sum_by_stage(gathered: list[tuple[int, float | None]]) -> dict[int, float | None]:
    """Energy per stage over its replicas; None when any replica's window had no energy."""
    out: dict[int, float | None] = {}
    for stage, energy_j in gathered:
        known = out.get(stage, 0.0)
        out[stage] = None if energy_j is None or known is None else known + energy_j
    return dict(sorted(out.items()))
