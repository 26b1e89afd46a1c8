"""Simulator: makespan and energy worked out by hand, critical path, comm and clock-switch costs, speed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from envpipe_agent.dvfs import get_model
from hypothesis import given, settings
from hypothesis import strategies as st

from envpipe.clock_types import assign_clocks
from envpipe.errors import SimulationError
from envpipe.ir import ActionKind, Schedule, schedule_from_text
from envpipe.render import timeline_text
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, SimResult, simulate
from envpipe.sim.energy import unit_cost
from envpipe.verify import verify

GOLDEN = Path(__file__).parent / "golden"


def _costs(stages: int, **kw: object) -> CostModel:
    return CostModel.build(stages, fwd_ms=10, bwd_ms=20, **kw)  # type: ignore[arg-type]


def test_two_stage_one_microbatch_by_hand() -> None:
    # s0: F0 [0,10], SA0 meets RA0 -> 10.05; s1: F0 [10.05,20.05], B0 [20.05,40.05]; SG0/RG0 -> 40.1;
    # s0: B0 [40.1,60.1]. Busy 700 W at the top clock, idle 0.18 * 700 = 126 W.
    result = simulate(get_schedule("1f1b", 2, 1), _costs(2, p2p_latency_ms=0.05))
    assert result.simulated is True and result.model.startswith("simulated: central")
    assert result.iteration_time_ms == pytest.approx(60.1)
    assert [(u.stage, u.unit, round(u.start_ms, 6), round(u.end_ms, 6)) for u in result.timeline] == [
        (0, "F0", 0, 10),
        (0, "B0", 40.1, 60.1),
        (1, "F0", 10.05, 20.05),
        (1, "B0", 20.05, 40.05),
    ]
    assert result.stage_busy_ms == pytest.approx((30, 30))
    assert result.stage_idle_ms == pytest.approx((30.1, 30.1))
    per_stage = 700 * 0.030 + 126 * 0.0301
    assert result.stage_energy_j == pytest.approx((per_stage, per_stage))
    assert result.energy_j == pytest.approx(2 * per_stage)
    assert result.critical_path == [(0, "F0"), (1, "F0"), (1, "B0"), (0, "B0")]


def test_balanced_1f1b_makespan_is_the_textbook_formula() -> None:
    # (M + S - 1) * (f + b) plus one transfer per pipeline hop on the fill and drain paths.
    for stages, micro_batches in [(2, 4), (4, 8), (8, 16)]:
        result = simulate(get_schedule("1f1b", stages, micro_batches), _costs(stages, p2p_latency_ms=0.0))
        assert result.iteration_time_ms == pytest.approx((micro_batches + stages - 1) * 30)


def test_ours_at_top_clock_is_never_slower_than_1f1b() -> None:
    for fwd, bwd in [
        ((10,) * 4, (20,) * 4),
        ((10, 10, 10, 14), (20, 20, 20, 28)),
        ((14, 10, 10, 10), (28, 20, 20, 20)),
    ]:
        costs = CostModel.build(4, fwd_ms=fwd, bwd_ms=bwd)
        base = simulate(get_schedule("1f1b", 4, 16), costs).iteration_time_ms
        for r in [(0, 0, 0, 0), (4, 3, 1, 0), (12, 12, 2, 0)]:
            assert simulate(get_schedule("ours", 4, 16, r), costs).iteration_time_ms <= base + 1e-9


def _assert_path_is_contiguous(result: SimResult, transfer_ms: float) -> None:
    spans = {(u.stage, u.unit): u for u in result.timeline}
    path = [spans[key] for key in result.critical_path]
    assert path[0].start_ms == pytest.approx(0.0)
    # Between two path units only transfers (a blocking send after a receive makes two), never slack.
    gaps = [after.start_ms - before.end_ms for before, after in zip(path, path[1:])]
    gaps.append(result.iteration_time_ms - path[-1].end_ms)
    for gap in gaps:
        hops = round(gap / transfer_ms)
        assert 0 <= hops <= 2 and gap == pytest.approx(hops * transfer_ms, abs=1e-9), gaps


@pytest.mark.parametrize("clock_type", ["baseline", "uniform", "envelope"])
@pytest.mark.parametrize(("name", "r"), [("1f1b", None), ("ours", (4, 3, 1, 0)), ("ours", (8, 8, 3, 0))])
def test_critical_path_explains_the_makespan(clock_type: str, name: str, r: tuple[int, ...] | None) -> None:
    costs = CostModel.build(4, fwd_ms=[10, 12, 10, 14], bwd_ms=[20, 24, 20, 28], p2p_latency_ms=0.3)
    schedule = get_schedule(name, 4, 8, r)
    result = simulate(schedule, costs, assign_clocks(schedule, costs, clock_type))
    _assert_path_is_contiguous(result, 0.3)


def test_critical_path_follows_the_heavy_last_stage() -> None:
    costs = CostModel.build(4, fwd_ms=[10, 10, 10, 20], bwd_ms=[20, 20, 20, 40])
    result = simulate(get_schedule("ours", 4, 8), costs)
    last_stage_units = [u for s, u in result.critical_path if s == 3]
    assert len(last_stage_units) == 16  # every unit of the bottleneck stage


def test_p2p_bandwidth_adds_message_time() -> None:
    costs = _costs(2, p2p_latency_ms=0.1, message_mb=50.0, p2p_bandwidth_gb_s=25.0)
    assert costs.transfer_ms(0, 1) == pytest.approx(2.1)
    result = simulate(get_schedule("1f1b", 2, 1), costs)
    assert result.iteration_time_ms == pytest.approx(60 + 2 * 2.1)


def test_clock_switch_runs_the_start_of_a_unit_at_the_old_clock() -> None:
    costs = _costs(1, clock_switch_ms=2.0)
    model = get_model("central")
    slow = 10 * model.time_ratio(1350 / 1980)
    duration, energy = unit_cost(costs, 0, "F", 1350, 1980)
    share_old = 2.0 / 10
    assert duration == pytest.approx(share_old * 10 + (1 - share_old) * slow)
    expected_j = (700 * share_old * 10 + 700 * model.power_ratio(1350 / 1980) * (1 - share_old) * slow) / 1e3
    assert energy == pytest.approx(expected_j)
    assert unit_cost(costs, 0, "F", 1350, 1350) == pytest.approx(
        (slow, 700 * model.power_ratio(1350 / 1980) * slow / 1e3)
    )
    # A unit shorter than the switch runs entirely at the old clock.
    assert unit_cost(_costs(1, clock_switch_ms=50.0), 0, "F", 1350, 1980) == pytest.approx((10, 7.0))


def test_idle_gaps_are_charged_at_the_held_clock() -> None:
    schedule = schedule_from_text("r0: 0F0 0SA0 0RG0 0B0\nr1: 1RA0 1F0 1B0 1SG0")
    costs = _costs(2, p2p_latency_ms=0.0, clock_switch_ms=0.0)
    low = {0: {"F0": 345, "B0": 1980}, 1: {"F0": 1980, "B0": 1980}}
    result = simulate(schedule, costs, low)
    f0 = next(u for u in result.timeline if (u.stage, u.unit) == (0, "F0"))
    # Stage 0 idles between F0 and B0 holding 345 MHz: idle power 126 W * (1 - 0.25).
    gap = result.timeline[1].start_ms - f0.end_ms
    expected = (costs.unit_power_w(0, "F", 345) * f0.end_ms + 126 * 0.75 * gap + 700 * 20) / 1e3
    assert result.stage_energy_j[0] == pytest.approx(expected)


def test_balanced_savings_stay_below_the_per_unit_optimum() -> None:
    # DVFS-MODELS.md: with balanced stages, far more than the per-unit saving at the optimum is a bug.
    for name in ("central", "conservative", "optimistic"):
        costs = CostModel.build(4, model=name)
        best_unit_saving = 1 - min(get_model(name).energy_ratio(f / 1980) for f in costs.clocks_mhz)
        base = simulate(get_schedule("1f1b", 4, 16), costs)
        for clock_type in ("uniform", "envelope"):
            schedule = get_schedule("ours", 4, 16, costs=costs)
            result = simulate(schedule, costs, assign_clocks(schedule, costs, clock_type))
            assert 0 < 1 - result.energy_j / base.energy_j < best_unit_saving + 0.05


def test_simulation_errors() -> None:
    with pytest.raises(SimulationError, match="costs describe 2 stages but the schedule has 4"):
        simulate(get_schedule("1f1b", 4, 4), _costs(2))
    with pytest.raises(SimulationError, match="outside 345-1980 MHz"):
        simulate(get_schedule("1f1b", 2, 2), _costs(2), {0: {"F0": 2100}})
    deadlocked = schedule_from_text("r0: 0F0 0F1 0SA0 0SA1 0RG0 0B0 0RG1 0B1\nr1: 1RA0 1F0 1B0 1SG0 1RA1 1F1 1B1 1SG1")
    with pytest.raises(SimulationError, match="deadlocks"):
        simulate(deadlocked, _costs(2))


def test_s8_m64_simulates_every_unit() -> None:
    # Its speed (< 0.2 s) is measured by benchmarks/sim/bench_simulate.py, not asserted here.
    costs = _costs(8)
    schedule = get_schedule("ours", 8, 64, costs=costs)
    clocks = assign_clocks(schedule, costs, "envelope")
    result = simulate(schedule, costs, clocks)
    assert len(result.timeline) == 8 * 64 * 2


def test_timeline_text_marks_low_clocks_in_lower_case() -> None:
    costs = _costs(2, p2p_latency_ms=0.0, clock_switch_ms=0.0)
    schedule = get_schedule("1f1b", 2, 1)
    result = simulate(schedule, costs, {0: {"F0": 1980, "B0": 1350}, 1: {"F0": 1980, "B0": 1980}})
    rows = timeline_text(result, resolution_ms=5.0).splitlines()
    assert rows[0].startswith("s0: FF....") and "b" in rows[0] and "B" not in rows[0]
    assert rows[1] == "s1: ..FFBBBB" + "." * (len(rows[1]) - 12)


def _dataflow_makespan(schedule: Schedule, costs: CostModel, clocks: dict[int, dict[str, int]]) -> float:
    """Longest path of the unit DAG: stage order plus F(m,s-1)->F(m,s), B(m,s+1)->B(m,s).

    A blocking receive right before its unit posts when the stage is free, and a rendezvous transfer starts
    when both sides are there: a received unit starts at max(stage free, producer end) + one transfer.
    """
    xfer, end = costs.transfer_ms(0, 1), {}
    pending = {s: list(schedule.units(s)) for s in range(schedule.stages)}
    stage_free = [0.0] * schedule.stages
    while any(pending.values()):
        for s, units in pending.items():
            while units:
                unit = units[0]
                peer = s - 1 if unit.kind is ActionKind.F else s + 1
                if 0 <= peer < schedule.stages and (peer, unit.unit) not in end:
                    break
                start = stage_free[s]
                if 0 <= peer < schedule.stages:
                    start = max(start, end[(peer, unit.unit)]) + xfer
                stage_free[s] = end[(s, unit.unit)] = start + costs.unit_duration_ms(
                    s, unit.kind, clocks[s][unit.unit]
                )
                units.pop(0)
    return max(end.values())


@pytest.mark.parametrize("r", [(0, 0, 0, 0), (4, 3, 1, 0), (8, 8, 2, 0), (6, 7, 2, 0)])
@pytest.mark.parametrize("clock_type", ["baseline", "envelope"])
def test_ours_adds_no_gating_to_the_critical_path(r: tuple[int, ...], clock_type: str) -> None:
    """ours' makespan is exactly the longest path of its unit DAG: communication never delays a unit."""
    for fwd, bwd in [((10, 10, 10, 14), (20, 20, 20, 28)), ((16, 10, 8, 10), (40, 20, 16, 20))]:
        costs = CostModel.build(4, fwd_ms=fwd, bwd_ms=bwd, p2p_latency_ms=0.4, clock_switch_ms=0.0)
        schedule = get_schedule("ours", 4, 8, r)
        clocks = assign_clocks(schedule, costs, clock_type)
        result = simulate(schedule, costs, clocks)
        assert result.iteration_time_ms == pytest.approx(_dataflow_makespan(schedule, costs, clocks))
    # DeepSpeed's 1F1B order sends an activation only after the next gradient arrives: it can be later.
    one_f_one_b = get_schedule("1f1b", 4, 8)
    clocks = assign_clocks(one_f_one_b, costs, "baseline")
    assert simulate(one_f_one_b, costs, clocks).iteration_time_ms >= _dataflow_makespan(
        one_f_one_b, costs, clocks
    )


def test_golden_timeline() -> None:
    """A small simulated timeline, unit by unit (regenerate with ENVPIPE_UPDATE_GOLDEN=1 when intended)."""
    costs = CostModel.build(3, fwd_ms=[10, 10, 14], bwd_ms=[20, 20, 28], p2p_latency_ms=0.1)
    schedule = get_schedule("ours", 3, 4, (2, 1, 0))
    result = simulate(schedule, costs, assign_clocks(schedule, costs, "envelope"))
    rows = ["stage,unit,start_ms,end_ms,clock_mhz"]
    rows += [f"{u.stage},{u.unit},{u.start_ms:.4f},{u.end_ms:.4f},{u.clock_mhz}" for u in result.timeline]
    rows.append(
        f"# iteration_time_ms={result.iteration_time_ms:.4f} energy_j={result.energy_j:.4f} (simulated)"
    )
    path = GOLDEN / "sim_ours_S3_M4_r2-1-0_envelope.csv"
    if os.environ.get("ENVPIPE_UPDATE_GOLDEN"):
        path.write_text("\n".join(rows) + "\n")
    assert "\n".join(rows) + "\n" == path.read_text()


@settings(max_examples=40, deadline=None)
@given(
    stages=st.integers(2, 5),
    extra=st.integers(0, 4),
    data=st.data(),
)
def test_random_pipelines_run_without_gating(stages: int, extra: int, data: st.DataObject) -> None:
    """Any admissible r, any stage times: ours verifies and its makespan is its DAG's longest path."""
    micro_batches = stages + extra
    warm = [1]
    for s in range(stages - 2, -1, -1):  # warm-up counts non-increasing from stage 0 to the last stage
        warm.insert(0, data.draw(st.integers(max(warm[0], min(micro_batches, stages - s)), micro_batches)))
    r = tuple(max(0, warm[s] - (stages - s)) for s in range(stages))
    fwd = data.draw(st.lists(st.floats(1, 30), min_size=stages, max_size=stages))
    bwd = [f * data.draw(st.floats(1, 3)) for f in fwd]
    costs = CostModel.build(stages, fwd_ms=fwd, bwd_ms=bwd, p2p_latency_ms=0.2, clock_switch_ms=0.0)
    schedule = get_schedule("ours", stages, micro_batches, r)
    verify(schedule)
    clocks = assign_clocks(schedule, costs, data.draw(st.sampled_from(["baseline", "uniform", "envelope"])))
    result = simulate(schedule, costs, clocks)
    assert result.iteration_time_ms == pytest.approx(_dataflow_makespan(schedule, costs, clocks))
