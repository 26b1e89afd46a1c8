"""Rank 0's planning steps of a run, on the plain-Python core: profile → costs → schedule → clocks.

Thin glue between measured windows and :mod:`envpipe.profiling`, :mod:`envpipe.schedules`,
:mod:`envpipe.clock_types` and :mod:`envpipe.planner`; no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envpipe.train.config import TrainConfig


def candidate_clocks(clocks_mhz: Sequence[int], count: int, min_ratio: float) -> list[int]:
    """``count`` supported clocks spread from the top clock down to ``min_ratio`` of it, descending."""
    from envpipe.profiling import candidate_clocks as pick

    top = max(clocks_mhz)
    return pick(clocks_mhz, count=count, min_mhz=int(top * min_ratio))


def build_profile(
    points: list[tuple[int, Any]],
    *,
    gpu_name: str,
    clocks_mhz: Sequence[int],
    idle_power_w: float,
    micro_batches: int,
    simulated: bool,
    source: str,
) -> dict[str, Any]:
    """The profile JSON (docs/architecture.md, "Profile JSON") from the profiling windows, f_low per stage.

    Args:
        points: ``(clock_mhz, Window)`` per candidate clock (see :class:`envpipe.train.phases.Window`).
        gpu_name: the GPU model the agent reports.
        clocks_mhz: the GPU's supported clocks.
        idle_power_w: the measured power of an idle GPU.
        micro_batches: micro-batches per iteration (busy time = M x (fwd + bwd)).
        simulated: True with the sim agent.
        source: where the energy came from.

    """
    from envpipe.profiling import ClockSample
    from envpipe.profiling import build_profile as aggregate

    samples = [
        ClockSample(
            stage=stage,
            clock_mhz=int(clock_mhz),
            fwd_ms=[window.stage_unit_ms[stage]["F"]],
            bwd_ms=[window.stage_unit_ms[stage]["B"]],
            iteration_ms=[window.iteration_ms_median],
            energy_j=energy_j * window.iterations,
            iterations=window.iterations,
        )
        for clock_mhz, window in points
        for stage, energy_j in window.stage_energy_j.items()
    ]
    return aggregate(
        samples,
        gpu_name=gpu_name,
        supported_mhz=clocks_mhz,
        idle_power_w=idle_power_w,
        micro_batches=micro_batches,
        simulated=simulated,
        source=source,
    )


def initial_plan(
    profile: dict[str, Any] | None, config: TrainConfig
) -> tuple[Any, Any, dict[int, dict[str, int]]]:
    """Costs from the profile, the schedule (``ours`` gets r from the costs) and the clock type's plan.

    With no profile (type ``baseline``) the schedule uses its default r and every unit runs at the top clock.
    """
    from envpipe.schedules import get_schedule

    if profile is None:
        schedule = get_schedule(config.scheduling, config.stages, config.micro_batches)
        return None, schedule, None
    from envpipe.clock_types import assign_clocks
    from envpipe.profiling import cost_model_from_profile

    costs = cost_model_from_profile(profile)
    schedule = get_schedule(config.scheduling, config.stages, config.micro_batches, costs=costs)
    return costs, schedule, assign_clocks(schedule, costs, config.type)


def make_reconfigurer(
    schedule: Any, costs: Any, config: TrainConfig, *, max_rounds: int, baseline_ms: float | None
) -> Any:
    """The planner's online reconfigurer for the run's policy.

    Args:
        schedule: the schedule being run.
        costs: the cost model from the run's profile.
        config: the run's config (policy, slowdown bound).
        max_rounds: cap on updates.
        baseline_ms: the baseline window's iteration time in the planner's frame (first unit start to last
            unit end, all stages); the bound is checked against it.

    """
    from envpipe.planner import Reconfigurer

    return Reconfigurer(
        schedule,
        costs,
        config.reconfig,
        slowdown_bound=config.slowdown_bound,
        max_rounds=max_rounds,
        baseline_ms=baseline_ms,
    )


def plot_timeline(spans: list[dict[str, Any]], path: str, *, title: str) -> None:
    """Draw measured spans (dicts of :class:`envpipe.sim.UnitSpan` fields) with the simulator's Gantt code."""
    from types import SimpleNamespace

    from envpipe.render import gantt_png
    from envpipe.sim import UnitSpan

    timeline = [UnitSpan(s["stage"], s["unit"], s["start_ms"], s["end_ms"], s["clock_mhz"]) for s in spans]
    stages = 1 + max((s.stage for s in timeline), default=0)
    busy_ms = [sum(s.end_ms - s.start_ms for s in timeline if s.stage == stage) for stage in range(stages)]
    # gantt_png reads these SimResult fields; a measured iteration has no critical path of its own.
    measured = SimpleNamespace(
        timeline=timeline,
        stage_busy_ms=busy_ms,
        critical_path=[],
        model=title,
        simulated=False,
        iteration_time_ms=max((s.end_ms for s in timeline), default=1.0),
    )
    gantt_png(measured, path, title=title)
