"""Simulated energy benchmark: every clock type x schedule x reconfiguration policy, the paper's algorithm,
the optimal planner, and the continuous-clock (LP) lower bound, for each case and DVFS model.

Every number here is SIMULATED (``envpipe.sim.simulate`` with a named DVFS model); none is a measurement.

    python benchmarks/energy_sim/run.py            # all cases, all models (resumes from results.json)
    python benchmarks/energy_sim/run.py --quick    # S=4 cases, central model only
    python benchmarks/energy_sim/run.py --rerun optimal bounds   # after a planner change
    python benchmarks/energy_sim/report.py         # docs/results.md and docs/img/*.png from results.json

Saving and slowdown are against the baseline: 1F1B with every unit at the top clock, same case and model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
BOUND = 0.01
MODELS = ("central", "conservative", "optimistic")
SCHEDULINGS = ("1f1b", "ours")
TYPES = ("baseline", "uniform", "envelope")
ROUND_POLICIES = ("default", "greedy", "balanced", "paper", "paper-greedy")
PAPER_GREEDY_ROUNDS = 600  # the artifact has no cap; one +90 MHz step per round is slow to settle

# Llama-3-8B-like partition (an assumption, not a measurement): 32 decoder layers, 8 per stage, 3 ms forward
# and 6 ms backward per layer at the top clock; the embedding adds 0.5/1 ms to stage 0, the 128k-vocabulary
# head with its loss ~2.2 layers' worth to the last stage.
_LLAMA_FWD = [24.5, 24.0, 24.0, 30.6]

CASES: dict[str, dict] = {
    "S4-M16": {"stages": 4, "micro_batches": 16, "fwd_ms": 10.0, "bwd_ms": 20.0},
    "S8-M32": {"stages": 8, "micro_batches": 32, "fwd_ms": 10.0, "bwd_ms": 20.0},
    "S4-M4": {"stages": 4, "micro_batches": 4, "fwd_ms": 10.0, "bwd_ms": 20.0},
    "S4-M8": {"stages": 4, "micro_batches": 8, "fwd_ms": 10.0, "bwd_ms": 20.0},
    "first-heavy": {"stages": 4, "micro_batches": 16, "fwd_ms": [16, 10, 10, 10], "bwd_ms": [32, 20, 20, 20]},
    "last-heavy": {"stages": 4, "micro_batches": 16, "fwd_ms": [10, 10, 10, 16], "bwd_ms": [20, 20, 20, 32]},
    "llama-embed-head": {"stages": 4, "micro_batches": 16, "fwd_ms": _LLAMA_FWD,
                         "bwd_ms": [2 * f for f in _LLAMA_FWD]},
}


def costs_for(case: str, model: str, **options):
    from envpipe.sim import CostModel

    spec = CASES[case]
    return CostModel.build(spec["stages"], model=model, fwd_ms=spec["fwd_ms"], bwd_ms=spec["bwd_ms"], **options)


def tasks(quick: bool) -> list[tuple]:
    """(case, model, scheduling, type, policy) runs; the full grid for the central model."""
    out = []
    cases = [c for c in CASES if not quick or CASES[c]["stages"] == 4]
    for model in MODELS[:1] if quick else MODELS:
        for case in cases:
            out.append((case, model, "-", "-", "bounds"))
            for scheduling in SCHEDULINGS:
                out.append((case, model, scheduling, "any", "optimal"))
                for clock_type in TYPES:
                    for policy in ROUND_POLICIES:
                        if model != "central" and policy != "default" and clock_type != "envelope":
                            continue  # other models: the paper's starting point (envelope) only
                        out.append((case, model, scheduling, clock_type, policy))
    return out


def run_task(task: tuple) -> dict:
    """One run: a plan on the simulator, or the bounds of a case (LP relaxation, MILP-free)."""
    case, model, scheduling, clock_type, policy = task
    from envpipe.clock_types import assign_clocks
    from envpipe.planner import plan_clocks
    from envpipe.schedules import get_schedule
    from envpipe.sim import simulate

    costs = costs_for(case, model)
    spec = CASES[case]
    baseline = simulate(get_schedule("1f1b", spec["stages"], spec["micro_batches"]), costs)
    started = time.perf_counter()
    if policy == "bounds":
        row = _bounds(case, model)
    else:
        schedule = get_schedule(scheduling, spec["stages"], spec["micro_batches"], costs=costs)
        start = assign_clocks(schedule, costs, "envelope" if clock_type == "any" else clock_type)
        max_rounds = PAPER_GREEDY_ROUNDS if policy == "paper-greedy" else None
        result = plan_clocks(schedule, costs, policy, slowdown_bound=BOUND, start=start, max_rounds=max_rounds)
        row = {"energy_j": result.sim.energy_j, "iteration_ms": result.sim.iteration_time_ms,
               "rounds": result.rounds, "r": list(schedule.r)}
        if result.solver:
            row["solver"] = result.solver
    row.update({"case": case, "model": model, "scheduling": scheduling, "type": clock_type, "policy": policy,
                "baseline_energy_j": baseline.energy_j, "baseline_ms": baseline.iteration_time_ms,
                "wall_s": time.perf_counter() - started, "simulated": True})
    return row


def _bounds(case: str, model: str) -> dict:
    """Per schedule: the LP bound and the optimal planner on the same DAG model, and the sanity bound.

    The DAG model is the simulator without clock-switch latency and with idle power at the top clock, so the
    LP relaxation there is a true lower bound for the planner's problem. The sanity bound (no deadline, idle
    power at the lowest clock, switch mixtures inside the relaxation) is below any simulated energy.
    """
    from envpipe.planner import optimal
    from envpipe.planner.build import build_dag
    from envpipe.planner.lp_bound import solve_bound
    from envpipe.schedules import get_schedule
    from envpipe.sim import simulate

    spec = CASES[case]
    exact = costs_for(case, model, clock_switch_ms=0.0, idle_clock_drop=0.0)
    base = simulate(get_schedule("1f1b", spec["stages"], spec["micro_batches"]), exact)
    deadline = base.iteration_time_ms * (1 + BOUND)
    out: dict = {"dag_baseline_energy_j": base.energy_j}
    _warm_imports()
    for scheduling in SCHEDULINGS:
        schedule = get_schedule(scheduling, spec["stages"], spec["micro_batches"], costs=exact)
        dag = build_dag(schedule, exact).dag
        started = time.process_time()
        choice, solver = optimal.solve_named(dag, deadline)
        solve_s = time.process_time() - started
        lp = solve_bound(dag, deadline)
        free = solve_bound(dag, None)
        sim_costs = costs_for(case, model)
        floor_dag = build_dag(get_schedule(scheduling, spec["stages"], spec["micro_batches"], costs=sim_costs),
                              sim_costs, idle_clock_mhz=sim_costs.min_clock_mhz).dag
        sanity = solve_bound(floor_dag, None)
        out[scheduling] = {"optimal_dag_energy_j": dag.evaluate(choice)[1], "optimal_cpu_s": solve_s,
                           "optimal_solver": solver,
                           "lp_energy_j": lp.energy_j, "unconstrained_energy_j": free.energy_j,
                           "unconstrained_ms": free.makespan_ms, "sanity_floor_energy_j": sanity.energy_j}
    return out


def _warm_imports() -> None:
    """Import scipy's optimiser before the planner is timed: a training process pays that once (about half
    a second), not per plan."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S=4 cases, central model only")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--fresh", action="store_true", help="ignore results.json and rerun everything")
    parser.add_argument("--rerun", nargs="*", default=[], metavar="POLICY",
                        help="rerun these policies (or 'bounds') even if cached, e.g. after a planner change")
    args = parser.parse_args()
    done: dict[str, dict] = {}
    if RESULTS.exists() and not args.fresh:
        done = {_key(r): r for r in json.loads(RESULTS.read_text())["runs"]}
    todo = [t for t in tasks(args.quick) if "|".join(t) not in done or t[4] in args.rerun]
    # Longest first, so that the slow S=8 runs do not end up alone at the end.
    todo.sort(key=lambda t: (CASES[t[0]]["stages"], t[4] in ("greedy", "paper-greedy")), reverse=True)
    print(f"{len(done)} runs cached, {len(todo)} to go (simulated)", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for k, row in enumerate(pool.map(run_task, todo), 1):
            done[_key(row)] = row
            print(f"[{k}/{len(todo)}] {_key(row)} {row['wall_s']:.1f}s", flush=True)
            if k % 10 == 0 or k == len(todo):
                _save(done)
    _save(done)


def _key(row: dict | tuple) -> str:
    if isinstance(row, tuple):
        return "|".join(row)
    return "|".join((row["case"], row["model"], row["scheduling"], row["type"], row["policy"]))


def _save(done: dict[str, dict]) -> None:
    RESULTS.write_text(json.dumps({"simulated": True, "bound": BOUND, "runs": sorted(done.values(), key=_key)},
                                  indent=0))


if __name__ == "__main__":
    sys.exit(main())
