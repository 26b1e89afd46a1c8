"""The optimal planner against the exact MILP optimum and the LP lower bound (scipy HiGHS)."""

from __future__ import annotations

import pytest

from envpipe.planner import optimal
from envpipe.planner.build import build_dag
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, simulate

pytest.importorskip("scipy")
from envpipe.planner.lp_bound import solve_bound


def _problem(name, stages, micro_batches, fwd, bwd, model="central", gpu="v100"):
    costs = CostModel.build(stages, gpu=gpu, model=model, fwd_ms=fwd, bwd_ms=bwd, clock_switch_ms=0.0,
                            idle_clock_drop=0.0)
    schedule = get_schedule(name, stages, micro_batches, costs=costs)
    base = simulate(get_schedule("1f1b", stages, micro_batches), costs)
    return build_dag(schedule, costs).dag, base


@pytest.mark.parametrize("name,stages,micro_batches,fwd,bwd,model", [
    ("1f1b", 2, 3, 10, 20, "central"),
    ("1f1b", 3, 3, [14, 10, 10], [28, 20, 20], "central"),
    ("ours", 3, 4, [10, 10, 15], [20, 20, 30], "optimistic"),
    ("1f1b", 3, 4, 10, 20, "conservative"),
])
def test_within_two_percent_of_the_exact_optimum(name, stages, micro_batches, fwd, bwd, model) -> None:
    dag, base = _problem(name, stages, micro_batches, fwd, bwd, model)
    deadline = base.iteration_time_ms * 1.01
    choice = optimal.solve(dag, deadline)
    makespan, energy = dag.evaluate(choice)
    exact = solve_bound(dag, deadline, integral=True, time_limit_s=20)
    relaxed = solve_bound(dag, deadline)
    assert makespan <= deadline * (1 + 1e-9)
    assert relaxed.energy_j <= exact.energy_j + 1e-6 <= energy + 2e-6  # bound <= optimum <= ours
    assert energy <= exact.energy_j * 1.02  # the criterion: within 2% of the optimum's energy


def test_no_saving_beyond_the_unconstrained_optimum() -> None:
    dag, base = _problem("ours", 4, 8, 10, 20, gpu="h100")
    energy = dag.evaluate(optimal.solve(dag, base.iteration_time_ms * 1.01))[1]
    assert solve_bound(dag, None).energy_j <= energy


def test_s8_m32_with_110_clocks_meets_the_deadline() -> None:
    # Speed is a benchmark goal (benchmarks/energy_sim, docs/results.md), not a timed assertion here.
    costs = CostModel.build(8, gpu="h100", clock_switch_ms=0.0)
    schedule = get_schedule("ours", 8, 32, costs=costs)
    dag = build_dag(schedule, costs).dag
    deadline = simulate(get_schedule("1f1b", 8, 32), costs).iteration_time_ms * 1.01
    choice = optimal.solve(dag, deadline)
    assert dag.evaluate(choice)[0] <= deadline * (1 + 1e-9)


def test_start_over_the_deadline_is_refused() -> None:
    dag, base = _problem("1f1b", 2, 3, 10, 20)
    with pytest.raises(ValueError, match="over the deadline"):
        optimal.solve(dag, base.iteration_time_ms * 0.5)
