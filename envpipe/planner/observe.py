"""What one iteration's timeline tells the planner: unit durations, the iteration time, the critical path.

The same code reads simulated timelines and timelines measured in training: a list of ``UnitSpan(stage,
unit, start_ms, end_ms, clock_mhz)`` (objects or dicts with those fields) gathered from all stages.
Measured durations replace the cost model's prediction at the clock the unit ran at; other clocks are
predicted by scaling the model's curve, so a stage that runs slower than modelled is planned as slower.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from envpipe.errors import ConfigError
from envpipe.ir import ClockPlan, Schedule
from envpipe.planner.build import PipelineDag, UnitKey, build_dag
from envpipe.spans import UnitSpan


def read_spans(timeline: Iterable[Any], schedule: Schedule) -> dict[UnitKey, UnitSpan]:
    """Index a timeline by (stage, unit), checking that it covers every unit of the schedule once."""
    spans: dict[UnitKey, UnitSpan] = {}
    for item in timeline:
        span = UnitSpan.of(item)
        if span.clock_mhz is None:
            raise ConfigError(f"unit {span.unit} on stage {span.stage} has no clock; the planner needs the clock "
                              "each unit ran at (start the engine with max_clock_mhz)")
        if span.end_ms < span.start_ms:
            raise ConfigError(f"unit {span.unit} on stage {span.stage} ends before it starts "
                              f"({span.start_ms} > {span.end_ms} ms); send start/end from one clock")
        spans[(span.stage, span.unit)] = span
    missing = [(a.stage, a.unit) for r in range(schedule.ranks) for a in schedule.units(r)
               if (a.stage, a.unit) not in spans]
    if missing:
        raise ConfigError(f"the timeline lacks {len(missing)} unit(s), e.g. stage {missing[0][0]} "
                          f"{missing[0][1]}; gather the spans of every stage for one whole iteration")
    return spans


@dataclass(frozen=True)
class Observation:
    """One iteration as the planner sees it.

    Attributes:
        spans: the units by (stage, unit).
        iteration_ms: measured (or simulated) iteration time, first start to last end.
        pdag: the DAG whose durations are the measured ones at the clocks they ran at.
        choice: the option index every DAG node ran at.
        frame: the DAG's predicted iteration time over ``iteration_ms``, to turn a time bound into the DAG's
            frame (measured gaps such as Python overhead are not in the DAG).
    """

    spans: dict[UnitKey, UnitSpan]
    iteration_ms: float
    pdag: PipelineDag
    choice: list[int]
    frame: float

    def dag_deadline_ms(self, target_ms: float) -> float:
        """The DAG-frame deadline that corresponds to a measured iteration time of ``target_ms``."""
        return target_ms * self.frame


def observe(schedule: Schedule, costs, clocks: ClockPlan | None, timeline: Iterable[Any], *,
            prune: bool = False) -> Observation:
    """Build the planner's view of one iteration from its timeline."""
    spans = read_spans(timeline, schedule)
    scale: dict[UnitKey, float] = {}
    for (stage, unit), span in spans.items():
        predicted = costs.unit_duration_ms(stage, unit[0], span.clock_mhz)
        measured = span.end_ms - span.start_ms
        scale[(stage, unit)] = measured / predicted if predicted > 0 and measured > 0 else 1.0
    pdag = build_dag(schedule, costs, unit_scale=scale, prune=prune)
    ran_at = {s: {u: sp.clock_mhz for (st, u), sp in spans.items() if st == s} for s in range(schedule.stages)}
    choice = pdag.choice(ran_at)
    first = min(sp.start_ms for sp in spans.values())
    iteration_ms = max(sp.end_ms for sp in spans.values()) - first
    predicted_ms = pdag.dag.makespan_ms(pdag.dag.durations(choice))
    frame = predicted_ms / iteration_ms if iteration_ms > 0 else 1.0
    return Observation(spans, iteration_ms, pdag, choice, frame)


def critical_path(schedule: Schedule, costs, timeline: Iterable[Any]) -> list[UnitKey]:
    """The units that set the iteration time, read from start/end times (not from a wait threshold).

    Walks back from the unit that ends last; at each unit, steps to whichever dependency (previous unit on
    the stage, or the producer on the neighbouring stage, through its transfer) ended latest.
    """
    return observed_critical_path(observe(schedule, costs, None, timeline))


def observed_critical_path(obs: Observation) -> list[UnitKey]:
    """:func:`critical_path` of an observation already built."""
    dag = obs.pdag.dag
    node_of = {n: key for key, n in obs.pdag.unit_nodes.items()}
    ends = [0.0] * len(dag)
    for n in range(len(dag)):  # topological order: transfers end after their latest input
        if n in node_of:
            ends[n] = obs.spans[node_of[n]].end_ms
        else:
            ends[n] = max((ends[p] for p in dag.preds[n]), default=0.0) + dag.options[n][0].duration_ms
    node = max(node_of, key=lambda n: ends[n])
    path: list[UnitKey] = []
    while True:
        if node in node_of:
            path.append(node_of[node])
        if not dag.preds[node]:
            break
        node = max(dag.preds[node], key=lambda p: ends[p])
    path.reverse()
    return path
