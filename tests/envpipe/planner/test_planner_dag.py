"""The DAG core and the schedule -> DAG builder, with the simulator as the oracle."""

from __future__ import annotations

import random

import pytest

from envpipe.planner.build import build_dag
from envpipe.planner.dag import ClockDag, ClockOption, mover_counts, slack_ms
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, simulate


def _diamond() -> ClockDag:
    dag = ClockDag(idle_power_w=[100.0, 50.0])
    dag.add_node("a", 0, [ClockOption(2000, 10.0, 5.0), ClockOption(1000, 20.0, 4.0)])
    dag.add_node("x", None, [ClockOption(0, 1.0, 0.0)])
    dag.add_node("b", 1, [ClockOption(2000, 5.0, 2.0)])
    dag.add_node("c", 0, [ClockOption(2000, 3.0, 1.0)])
    dag.add_edge("a", "x")
    dag.add_edge("x", "b")
    dag.add_edge("a", "c")
    return dag


def test_makespan_and_energy_by_hand() -> None:
    dag = _diamond()
    # a (10) -> x (1) -> b (5) = 16 ms; a -> c = 13 ms.
    makespan, energy = dag.evaluate([0, 0, 0, 0])
    assert makespan == pytest.approx(16.0)
    # active 5 + 2 + 1 J; idle: stage 0 busy 13 of 16 ms at 100 W, stage 1 busy 5 of 16 ms at 50 W.
    assert energy == pytest.approx(8.0 + 100 * 3e-3 + 50 * 11e-3)
    makespan, energy = dag.evaluate([1, 0, 0, 0])
    assert makespan == pytest.approx(26.0)
    assert energy == pytest.approx(7.0 + 100 * 3e-3 + 50 * 21e-3)


def test_slack_and_mover_counts() -> None:
    dag = _diamond()
    durations = dag.durations([0, 0, 0, 0])
    _, _, slack = slack_ms(dag, durations, 20.0, dag.succs())
    assert slack == pytest.approx([4.0, 4.0, 4.0, 7.0])
    assert mover_counts(dag, [True, False, True, True], dag.succs()) == [2, 2, 2, 2]


def test_bad_input_is_refused() -> None:
    dag = _diamond()
    with pytest.raises(ValueError, match="added twice"):
        dag.add_node("a", 0, [ClockOption(1, 1.0, 1.0)])
    with pytest.raises(ValueError, match="backwards"):
        dag.add_edge("c", "a")
    with pytest.raises(ValueError, match="idle power"):
        dag.add_node("z", 5, [ClockOption(1, 1.0, 1.0)])


@pytest.mark.parametrize("name,stages,micro_batches", [("1f1b", 4, 8), ("ours", 4, 8), ("ours", 3, 5)])
def test_dag_matches_the_simulator(name: str, stages: int, micro_batches: int) -> None:
    # With no clock-switch latency and idle power independent of the held clock, the DAG is the simulator.
    costs = CostModel.build(stages, fwd_ms=[10, 12, 9, 11][:stages], bwd_ms=[20, 25, 18, 22][:stages],
                            clock_switch_ms=0.0, idle_clock_drop=0.0, message_mb=2.0)
    schedule = get_schedule(name, stages, micro_batches, costs=costs)
    pdag = build_dag(schedule, costs, prune=False)
    rng = random.Random(7)
    for _ in range(3):
        clocks = {s: {a.unit: rng.choice(costs.clocks_mhz) for a in schedule.units(s)} for s in range(stages)}
        sim = simulate(schedule, costs, clocks)
        makespan, energy = pdag.dag.evaluate(pdag.choice(clocks))
        assert makespan == pytest.approx(sim.iteration_time_ms, rel=1e-12)
        assert energy == pytest.approx(sim.energy_j, rel=1e-12)
        assert pdag.plan(pdag.choice(clocks)) == clocks


def test_planner_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = ("import sys, envpipe.planner, envpipe.profiling; "
            "print(sorted(m for m in ('torch', 'scipy', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
