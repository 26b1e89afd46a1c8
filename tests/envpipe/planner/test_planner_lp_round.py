"""The optimal planner's LP path (HiGHS relaxation, rounded) and its fallback to the heuristic without scipy."""

from __future__ import annotations

import sys

import pytest

from envpipe.planner import optimal, plan_clocks
from envpipe.planner.build import build_dag
from envpipe.planner.descent import hulls_of, solve_heuristic
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, simulate

pytest.importorskip("scipy")
from envpipe.planner.lp_bound import solve_bound
from envpipe.planner.lp_round import solve_lp_rounded


def _problem(name: str, stages: int, micro_batches: int, model: str = "central"):
    costs = CostModel.build(stages, gpu="h100", model=model, fwd_ms=10, bwd_ms=20, clock_switch_ms=0.0,
                            idle_clock_drop=0.0)
    schedule = get_schedule(name, stages, micro_batches, costs=costs)
    base = simulate(get_schedule("1f1b", stages, micro_batches), costs)
    return build_dag(schedule, costs).dag, base


@pytest.mark.parametrize("name,model", [("ours", "central"), ("1f1b", "optimistic")])
def test_rounded_lp_reaches_99_percent_of_the_bound(name, model) -> None:
    dag, base = _problem(name, 4, 8, model)
    deadline = base.iteration_time_ms * 1.01
    choice = solve_lp_rounded(dag, deadline, [0] * len(dag))
    makespan, energy = dag.evaluate(choice)
    bound = solve_bound(dag, deadline).energy_j
    assert makespan <= deadline * (1 + 1e-9)
    assert base.energy_j - energy >= 0.99 * (base.energy_j - bound)


def test_hull_candidates_give_the_same_relaxation() -> None:
    dag, base = _problem("1f1b", 3, 4)
    deadline = base.iteration_time_ms * 1.01
    hulls = [hull.options for hull in hulls_of(dag)]
    full = solve_bound(dag, deadline)
    on_hull = solve_bound(dag, deadline, candidates=hulls)
    assert on_hull.energy_j == pytest.approx(full.energy_j, rel=1e-9)
    assert on_hull.prices is not None and max(on_hull.prices) > 0  # the deadline binds: some time has a price
    assert all(set(mix) <= set(h) for mix, h in zip(on_hull.mixtures, hulls))


def test_solver_is_named_and_falls_back_without_scipy(monkeypatch) -> None:
    dag, base = _problem("1f1b", 2, 3)
    deadline = base.iteration_time_ms * 1.01
    choice, solver = optimal.solve_named(dag, deadline)
    assert solver in ("lp-rounded", "heuristic")
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # as without scipy: the import raises
    fallback, solver = optimal.solve_named(dag, deadline)
    assert solver == "heuristic"
    assert fallback == solve_heuristic(dag, deadline, [0] * len(dag))
    assert dag.evaluate(fallback)[0] <= deadline * (1 + 1e-9)
    assert dag.evaluate(choice)[1] <= dag.evaluate(fallback)[1] + 1e-9  # with scipy: never worse


def test_an_lp_failure_falls_back_to_the_heuristic(monkeypatch) -> None:
    from envpipe.planner import lp_round

    def fail(*args, **kwargs):
        raise ValueError("no clock assignment meets the deadline")

    dag, base = _problem("1f1b", 2, 3)
    monkeypatch.setattr(lp_round, "solve_lp_rounded", fail)
    choice, solver = optimal.solve_named(dag, base.iteration_time_ms * 1.01)
    assert solver == "heuristic"
    assert dag.evaluate(choice)[0] <= base.iteration_time_ms * 1.01 * (1 + 1e-9)


def test_a_deadline_at_the_top_clocks_keeps_them_feasible() -> None:
    dag, _ = _problem("1f1b", 3, 4)
    top_ms = dag.makespan_ms(dag.durations([0] * len(dag)))
    choice = optimal.solve(dag, top_ms)
    assert dag.evaluate(choice)[0] <= top_ms * (1 + 1e-9)


def test_plan_result_names_the_solver() -> None:
    costs = CostModel.build(2, gpu="h100")
    schedule = get_schedule("1f1b", 2, 3)
    assert plan_clocks(schedule, costs, "optimal").solver in ("lp-rounded", "heuristic")
    assert plan_clocks(schedule, costs, "balanced").solver is None
