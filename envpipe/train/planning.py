"""Rank 0's planning steps of a run, on the plain-Python core: profile → costs → schedule → clocks.

Thin glue between measured windows and :mod:`envpipe.profiling`, :mod:`envpipe.schedules`,
:mod:`envpipe.clock_types` and :mod:`envpipe.planner`; no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envpipe.train.config import TrainConfig

PROFILE_FORMAT = "envpipe-profile/1"


def candidate_clocks(clocks_mhz: Sequence[int], count: int, min_ratio: float) -> list[int]:
    """``count`` supported clocks spread evenly from the top clock down to ``min_ratio`` of it, descending.

    Args:
        clocks_mhz: the GPU's supported SM clocks.
        count: how many candidates (the top clock is always one).
        min_ratio: lowest candidate as a share of the top clock.
    """
    supported = sorted(set(int(c) for c in clocks_mhz), reverse=True)
    top = supported[0]
    window = [c for c in supported if c >= top * min_ratio] or [top]
    if count <= 1 or len(window) == 1:
        return [top]
    picks = []
    for k in range(count):
        target = top - (top - window[-1]) * k / (count - 1)
        picks.append(min(window, key=lambda c: abs(c - target)))
    return sorted(set(picks), reverse=True)


def build_profile(points: list[tuple[int, Any]], *, gpu_name: str, clocks_mhz: Sequence[int], idle_power_w: float,
                  micro_batches: int, simulated: bool, source: str) -> dict[str, Any]:
    """The profile JSON (docs/architecture.md, "Profile JSON") from the profiling windows.

    Each stage also gets ``f_low_mhz``, the argmin of its energy per iteration (the energy valley).

    Args:
        points: ``(clock_mhz, Window)`` per candidate clock (see :class:`envpipe.train.phases.Window`).
        gpu_name: the GPU model the agent reports.
        clocks_mhz: the GPU's supported clocks.
        idle_power_w: the measured power of an idle GPU.
        micro_batches: micro-batches per iteration (busy time = M x (fwd + bwd)).
        simulated: True with the sim agent.
        source: where the energy came from.
    """
    stages = sorted({stage for _, window in points for stage in window.stage_energy_j})
    out_stages = []
    for stage in stages:
        stage_points = []
        for clock_mhz, window in points:
            units = window.stage_unit_ms.get(stage, {})
            stage_points.append({
                "clock_mhz": int(clock_mhz), "fwd_ms": units.get("F", 0.0), "bwd_ms": units.get("B", 0.0),
                "iteration_ms": window.iteration_ms, "energy_j": window.stage_energy_j[stage],
            })
        f_low = min(stage_points, key=lambda p: p["energy_j"])["clock_mhz"]
        out_stages.append({"stage": stage, "f_low_mhz": f_low, "points": stage_points})
    return {
        "format": PROFILE_FORMAT, "simulated": simulated, "source": source,
        "gpu": {"name": gpu_name, "clocks_mhz": sorted((int(c) for c in clocks_mhz), reverse=True)},
        "idle_power_w": idle_power_w, "micro_batches": micro_batches, "stages": out_stages,
    }


def initial_plan(profile: dict[str, Any] | None, config: TrainConfig) -> tuple[Any, Any, dict[int, dict[str, int]]]:
    """Costs from the profile, the schedule (``ours`` gets r from the costs) and the clock type's plan.

    With no profile (type ``baseline``) the schedule uses its default r and every unit runs at the top clock.
    """
    from envpipe.schedules import get_schedule

    if profile is None:
        schedule = get_schedule(config.scheduling, config.stages, config.micro_batches)
        return None, schedule, None
    from envpipe.clock_types import assign_clocks

    costs = costs_from_profile(profile)
    schedule = get_schedule(config.scheduling, config.stages, config.micro_batches, costs=costs)
    return costs, schedule, assign_clocks(schedule, costs, config.type)


def costs_from_profile(profile: dict[str, Any]) -> Any:
    """The simulator's CostModel on a run's own profile (measured, or from the sim agent: labelled so).

    The card is described by the profile itself (its clocks and idle power), so any GPU the agent reports
    works, not only the cards the simulator knows by name.
    """
    from envpipe.sim import CostModel, profile_from_dict
    from envpipe_agent.dvfs import Card

    measured = profile_from_dict(profile, origin="profiling phase")
    card = Card(str(profile["gpu"]["name"]), tuple(profile["gpu"]["clocks_mhz"]), busy_power_w=0.0,
                idle_power_w=float(profile["idle_power_w"]), source=measured.describe())
    top_mhz = measured.clocks_mhz[0]
    stages = len(profile["stages"])
    return CostModel(
        tuple(measured.unit_ms(s, True, top_mhz) for s in range(stages)),
        tuple(measured.unit_ms(s, False, top_mhz) for s in range(stages)), card, measured,
    )


def make_reconfigurer(schedule: Any, costs: Any, config: TrainConfig, *, max_rounds: int,
                      baseline_ms: float | None) -> Any:
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

    return Reconfigurer(schedule, costs, config.reconfig, slowdown_bound=config.slowdown_bound,
                        max_rounds=max_rounds, baseline_ms=baseline_ms)


def plot_timeline(spans: list[dict[str, Any]], path: str, *, title: str) -> None:
    """Draw measured spans (dicts of :class:`envpipe.sim.UnitSpan` fields) with the simulator's Gantt code."""
    from types import SimpleNamespace

    from envpipe.render import gantt_png
    from envpipe.sim import UnitSpan

    timeline = [UnitSpan(s["stage"], s["unit"], s["start_ms"], s["end_ms"], s["clock_mhz"]) for s in spans]
    stages = 1 + max((s.stage for s in timeline), default=0)
    busy_ms = [sum(s.end_ms - s.start_ms for s in timeline if s.stage == stage) for stage in range(stages)]
    # gantt_png reads these SimResult fields; a measured iteration has no critical path of its own.
    measured = SimpleNamespace(timeline=timeline, stage_busy_ms=busy_ms, critical_path=[], model=title,
                               iteration_time_ms=max((s.end_ms for s in timeline), default=1.0))
    gantt_png(measured, path, title=title)
