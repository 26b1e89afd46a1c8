"""Profiling logic: candidate clocks, cost estimate, aggregation into the profile JSON, f_low, round trip."""

from __future__ import annotations

import pytest
from envpipe_agent.dvfs import get_card

from envpipe.errors import ConfigError
from envpipe.profile import ClockSample, build_profile, f_low_mhz
from envpipe.profiling import candidate_clocks, cost_model_from_profile, iterations_per_clock, profiling_cost
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, simulate

H100 = get_card("h100").clocks_mhz


def test_candidate_clocks() -> None:
    assert candidate_clocks(H100) == list(H100)
    assert candidate_clocks(H100, count=3, min_mhz=990) == [1980, 1485, 990]
    assert candidate_clocks(H100, step_mhz=90, min_mhz=1500)[:3] == [1980, 1890, 1800]
    assert candidate_clocks([1000, 2000, 1500], count=1) == [2000]
    with pytest.raises(ConfigError, match="widen"):
        candidate_clocks(H100, min_mhz=2500)
    with pytest.raises(ConfigError, match="count"):
        candidate_clocks(H100, count=0)


def test_cost_estimate_keeps_energy_windows_at_least_one_second() -> None:
    assert iterations_per_clock(2, 100.0) == 10  # 2 x 100 ms is too short for the ~100 ms energy counter
    assert iterations_per_clock(20, 100.0) == 20
    cost = profiling_cost([1980, 990], 2, 100.0, warmup_iterations=0)
    assert (cost.clocks, cost.iterations_per_clock, cost.iterations) == (2, 10, 20)
    assert cost.estimated_s == pytest.approx(1.0 + 2.0)  # 990 MHz at most twice as slow
    assert "20 iterations" in cost.describe()
    with pytest.raises(ConfigError):
        profiling_cost([], 2, 100.0)


def _samples_from_sim(costs: CostModel, clocks: list[int], micro_batches: int) -> list[ClockSample]:
    schedule = get_schedule("1f1b", costs.stages, micro_batches)
    samples = []
    for clock in clocks:
        plan = {s: {a.unit: clock for a in schedule.units(s)} for s in range(costs.stages)}
        sim = simulate(schedule, costs, plan)
        for stage in range(costs.stages):
            fwd = [t.end_ms - t.start_ms for t in sim.timeline if t.stage == stage and t.unit[0] == "F"]
            bwd = [t.end_ms - t.start_ms for t in sim.timeline if t.stage == stage and t.unit[0] == "B"]
            samples.append(ClockSample(stage, clock, fwd, bwd, [sim.iteration_time_ms] * 3,
                                       3 * sim.stage_energy_j[stage], 3))
    return samples


def test_profile_json_and_f_low_round_trip_through_the_simulator() -> None:
    costs = CostModel.build(2, fwd_ms=[10, 14], bwd_ms=[20, 28], clock_switch_ms=0.0, idle_clock_drop=0.0)
    clocks = candidate_clocks(H100, count=12, min_mhz=900)
    profile = build_profile(_samples_from_sim(costs, clocks, 4), gpu_name="NVIDIA H100 80GB HBM3",
                            supported_mhz=H100, idle_power_w=costs.idle_power_w(0, 1980), micro_batches=4,
                            simulated=True, source="simulator, central model")
    assert profile["format"] == "envpipe-profile/1" and profile["simulated"] is True
    assert [s["stage"] for s in profile["stages"]] == [0, 1]
    for stage in profile["stages"]:
        assert stage["f_low_mhz"] == f_low_mhz(stage["points"])
        energies = [p["energy_j"] for p in stage["points"]]
        assert min(energies) < energies[0]  # a valley below the top clock
    measured = cost_model_from_profile(profile, clock_switch_ms=0.0, idle_clock_drop=0.0)
    schedule = get_schedule("1f1b", 2, 4)
    for clock in (1980, clocks[5]):
        plan = {s: {a.unit: clock for a in schedule.units(s)} for s in range(2)}
        assert simulate(schedule, measured, plan).iteration_time_ms == pytest.approx(
            simulate(schedule, costs, plan).iteration_time_ms)


def test_inconsistent_samples_are_refused() -> None:
    good = ClockSample(0, 1980, [10.0], [20.0], [100.0], 50.0, 1)
    other = ClockSample(1, 1500, [10.0], [20.0], [100.0], 50.0, 1)
    with pytest.raises(ConfigError, match="different clocks"):
        build_profile([good, other], gpu_name="x", supported_mhz=[1980], idle_power_w=1.0, micro_batches=1,
                      simulated=True, source="test")
    with pytest.raises(ConfigError, match="no measurements"):
        build_profile([ClockSample(0, 1980, [], [20.0], [1.0], 1.0, 1)], gpu_name="x", supported_mhz=[1980],
                      idle_power_w=1.0, micro_batches=1, simulated=True, source="test")


def test_planner_runs_on_a_profile_and_uses_only_profiled_clocks() -> None:
    from envpipe.planner import plan_clocks

    costs = CostModel.build(2, fwd_ms=[10, 14], bwd_ms=[20, 28], clock_switch_ms=0.0, idle_clock_drop=0.0)
    clocks = candidate_clocks(H100, count=10, min_mhz=1100)
    profile = build_profile(_samples_from_sim(costs, clocks, 4), gpu_name="NVIDIA H100 80GB HBM3",
                            supported_mhz=H100, idle_power_w=costs.idle_power_w(0, 1980), micro_batches=4,
                            simulated=True, source="simulator, central model")
    measured = cost_model_from_profile(profile)
    schedule = get_schedule("ours", 2, 6, costs=measured)
    for policy in ("optimal", "balanced"):
        result = plan_clocks(schedule, measured, policy)
        assert result.met_bound
        assert {c for stage in result.clocks.values() for c in stage.values()} <= set(clocks)


def test_profiling_cost_counts_the_settling_steps_in_its_line():
    # The controller profiles each clock down and up, one settling step before each window: 2 per clock.
    cost = profiling_cost([1980, 1650, 1320], 4, 100.0, warmup_iterations=2, min_window_s=0.0)
    assert cost.iterations == 3 * (4 + 2) and "3 clocks x 6 iterations = 18 iterations" in cost.describe()
