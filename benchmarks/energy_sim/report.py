"""Write docs/results.md (tables, goals, honest notes) and one Gantt PNG per case from results.json.

    python benchmarks/energy_sim/report.py [--no-plots]

Every number is simulated (DVFS model named in each table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from run import BOUND, CASES, MODELS, RESULTS, ROUND_POLICIES, SCHEDULINGS, TYPES, costs_for

DOC = ROOT / "docs" / "results.md"
IMG = ROOT / "docs" / "img"
GUARDED = ("greedy", "balanced", "optimal")


def load() -> dict[tuple, dict]:
    runs = json.loads(RESULTS.read_text())["runs"]
    return {(r["case"], r["model"], r["scheduling"], r["type"], r["policy"]): r for r in runs}


def saving(row: dict) -> float:
    return 1.0 - row["energy_j"] / row["baseline_energy_j"]


def slowdown(row: dict) -> float:
    return row["iteration_ms"] / row["baseline_ms"] - 1.0


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def grid_table(runs: dict, case: str, model: str) -> list[str]:
    lines = ["| schedule | type | reconfig | saving | slowdown | rounds |", "|---|---|---|---:|---:|---:|"]
    for scheduling in SCHEDULINGS:
        rows = [(t, p) for t in TYPES for p in ROUND_POLICIES] + [("any", "optimal")]
        for clock_type, policy in rows:
            row = runs.get((case, model, scheduling, clock_type, policy))
            if row is None:
                continue
            flag = " (over bound)" if slowdown(row) > BOUND + 1e-9 else ""
            lines.append(f"| {scheduling} | {clock_type} | {policy} | {pct(saving(row))} | "
                         f"{100 * slowdown(row):+.2f}%{flag} | {row['rounds']} |")
    return lines


def goals(runs: dict) -> tuple[list[str], list[str]]:
    """The goal table (one row per case x model) and the list of misses, for the 'ours' schedule."""
    lines = [("| case | model | schedule | LP bound saving | optimal (DAG) | optimal / LP | optimal (sim) "
             "| balanced (sim) | balanced / optimal | paper (sim): saving, slowdown | max guarded slowdown "
             "| optimal CPU s, solver | sanity: unconstrained max saving |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    misses: list[str] = []
    for model in MODELS:
        for case in CASES:
            bounds = runs.get((case, model, "-", "-", "bounds"))
            if bounds is None:
                continue
            for scheduling in SCHEDULINGS:
                lines.append(_goal_row(runs, bounds, case, model, scheduling, misses))
    return lines, misses


def _goal_row(runs: dict, bounds: dict, case: str, model: str, scheduling: str, misses: list[str]) -> str:
    b = bounds[scheduling]
    base = bounds["dag_baseline_energy_j"]
    lp_save = 1 - b["lp_energy_j"] / base
    opt_dag = 1 - b["optimal_dag_energy_j"] / base
    ratio = opt_dag / lp_save if lp_save > 0 else 1.0
    opt = runs.get((case, model, scheduling, "any", "optimal"))
    bal = runs.get((case, model, scheduling, "envelope", "balanced"))
    pap = runs.get((case, model, scheduling, "envelope", "paper"))
    here = [r for k, r in runs.items() if k[0] == case and k[1] == model and k[2] == scheduling]
    worst = max((slowdown(r) for r in here if r["policy"] in GUARDED), default=0.0)
    floor = bounds[scheduling]["sanity_floor_energy_j"]
    below = [r for r in here if r["energy_j"] < floor - 1e-6]
    bal_ratio = saving(bal) / saving(opt) if bal and opt and saving(opt) > 0 else float("nan")
    tag = f"{case} / {model} / {scheduling}"
    if ratio < 0.99:
        misses.append(f"{tag}: the optimal planner reaches {100 * ratio:.1f}% of the LP bound's saving (goal 99%).")
    if bal_ratio < 0.90:
        misses.append(f"{tag}: balanced reaches {100 * bal_ratio:.1f}% of the optimal planner's saving (goal 90%).")
    if opt and pap and saving(opt) <= saving(pap) and slowdown(pap) <= BOUND + 1e-9:
        misses.append(f"{tag}: the paper's algorithm saves as much as the optimal planner within the bound.")
    if worst > BOUND + 1e-9:
        misses.append(f"{tag}: a guarded policy ends {100 * worst:+.2f}% slower (bound {100 * BOUND:.0f}%).")
    if below:
        misses.append(f"{tag}: {len(below)} run(s) below the unconstrained floor -- a bug.")
    paper = f"{pct(saving(pap))}, {100 * slowdown(pap):+.2f}%" if pap else "-"
    return (f"| {case} | {model} | {scheduling} | {pct(lp_save)} | {pct(opt_dag)} | {100 * ratio:.1f}% | "
            f"{pct(saving(opt)) if opt else '-'} | {pct(saving(bal)) if bal else '-'} | {100 * bal_ratio:.1f}% | "
            f"{paper} | {100 * worst:+.2f}% | {b['optimal_cpu_s']:.2f}, {b.get('optimal_solver', 'heuristic')} | "
            f"{'ok' if not below else 'BUG'}: {pct(1 - floor / opt['baseline_energy_j']) if opt else '-'} |")


def plot(case: str) -> str:
    """Gantt of the ours schedule under the optimal plan (central model); returns the relative path."""
    from envpipe.planner import plan_clocks
    from envpipe.render import gantt_png
    from envpipe.schedules import get_schedule

    spec = CASES[case]
    costs = costs_for(case, "central")
    schedule = get_schedule("ours", spec["stages"], spec["micro_batches"], costs=costs)
    result = plan_clocks(schedule, costs, "optimal", slowdown_bound=BOUND)
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / f"energy_sim_{case}.png"
    gantt_png(
        result.sim,
        path,
        title=f"{case}, ours + optimal, r={list(schedule.r)}, central model",
        clock_range_mhz=(costs.min_clock_mhz, costs.max_clock_mhz),
        energy_j=result.sim.energy_j,
    )
    return path.relative_to(DOC.parent).as_posix()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    runs = load()
    goal_lines, misses = goals(runs)
    out = [
        "# Simulated energy results (benchmarks/energy_sim)",
        "",
        ("**Every number on this page is simulated** by `envpipe.sim.simulate` with a named DVFS model from "
        "shared DVFS-MODELS.md (central, conservative, optimistic) on the H100 card model (110 clocks, "
        "700 W busy, idle 18% of busy at the top clock, 25% lower idle power at the bottom clock, 1 ms "
        "clock-switch latency, 0.05 ms transfers). None is a measurement."),
        "",
        (f"Saving and slowdown are against the baseline of the same case and model: 1F1B with every unit at "
        f"the top clock. Bound: {100 * BOUND:.0f}% slowdown. Reproduce: `python benchmarks/energy_sim/run.py` "
        "then `python benchmarks/energy_sim/report.py`."),
        "",
        ("Columns of the goal table: *LP bound* = continuous-clock lower bound (LP relaxation "
        "of the same clock assignment, scipy HiGHS) on the DAG model (the simulator without clock-switch "
        "latency, idle power at the top clock); *optimal (DAG)* = the optimal planner on that same model; "
        "*(sim)* = the policy run on the full simulator (balanced and paper start from the envelope clock "
        "type); *optimal CPU s, solver* = the optimal planner's CPU time on the DAG model (this machine, shared; "
        "after scipy's one-time import) and whose plan it returned: *lp-rounded* = the LP relaxation solved by "
        "HiGHS and rounded to real clocks, *heuristic* = the pure-Python planner (the fallback without scipy; "
        "on DAGs of up to 500 nodes it runs as well and its plan is kept when cheaper); *sanity* = no simulated run may use less energy than the unconstrained optimum (no deadline, "
        "least idle power; its saving is shown) -- a run below it would be a bug."),
        "",
        *goal_lines,
        "",
        "## Where a goal is missed, and why",
        "",
    ]
    out += [_summary(runs), ""]
    out += [f"- {m}" for m in misses] or ["- Every goal is met in every case."]
    out += ["", _why(), ""]
    for case in CASES:
        out += [f"## {case} (simulated, central model)", "", _case_line(case), ""]
        if not args.no_plots:
            out += [f"![{case}]({plot(case)})", ""]
        out += grid_table(runs, case, "central") + [""]
    out += ["## Other DVFS models (simulated; envelope start)", ""]
    for model in MODELS[1:]:
        for case in CASES:
            lines = grid_table(runs, case, model)
            if len(lines) > 2:
                out += [f"### {case}, {model} model", "", *lines, ""]
    from families import section  # schedule families (issue 18): families.json, if it was run

    out += section()
    DOC.write_text("\n".join(out) + "\n")
    print(f"wrote {DOC}")


def _case_line(case: str) -> str:
    spec = CASES[case]
    return (f"S={spec['stages']}, M={spec['micro_batches']}, forward {spec['fwd_ms']} ms, backward "
            f"{spec['bwd_ms']} ms per unit at the top clock.")


def _summary(runs: dict) -> str:
    """Counts of the goals over every case x model x schedule, computed from the runs."""
    rows = [(c, m, sch) for (c, m, _, _, p) in runs if p == "bounds" for sch in SCHEDULINGS]
    lp_ok = bal_ok = beats = within = beats_within = 0
    for case, model, sch in rows:
        b = runs[(case, model, "-", "-", "bounds")]
        base = b["dag_baseline_energy_j"]
        lp = 1 - b[sch]["lp_energy_j"] / base
        lp_ok += (1 - b[sch]["optimal_dag_energy_j"] / base) >= 0.99 * lp
        opt = runs.get((case, model, sch, "any", "optimal"))
        bal = runs.get((case, model, sch, "envelope", "balanced"))
        pap = runs.get((case, model, sch, "envelope", "paper"))
        bal_ok += bool(opt and bal and saving(bal) >= 0.9 * saving(opt))
        beats += bool(opt and pap and saving(opt) > saving(pap))
        within += bool(pap and slowdown(pap) <= BOUND + 1e-9)
        beats_within += bool(opt and pap and slowdown(pap) <= BOUND + 1e-9 and saving(opt) > saving(pap))
    plans = [r for r in runs.values() if "energy_j" in r]
    guarded = [r for r in plans if r["policy"] in GUARDED]
    worst = max(slowdown(r) for r in guarded)
    most = max(r["rounds"] for r in plans)
    n = len(rows)
    return (f"Summary over {n} case x model x schedule rows and {len(plans)} simulated runs: the optimal planner "
            f"reaches >= 99% of the LP bound's saving in {lp_ok}/{n}; balanced reaches >= 90% of the optimal "
            f"planner's saving in {bal_ok}/{n}; the optimal planner saves more than the paper's algorithm in "
            f"{beats}/{n}, and in {beats_within}/{within} of the rows where the paper stays within the bound "
            f"(elsewhere the paper buys its saving with slowdowns of up to +15%); the worst slowdown "
            f"of any guarded policy (greedy, balanced, optimal) is {100 * worst:+.2f}% (bound "
            f"{100 * BOUND:.0f}%); every run terminated (most rounds: {most}, the caps included); no run is "
            f"below the sanity floor unless marked BUG above.")


def _why() -> str:
    return (
        "Why. (1) With scipy the optimal planner solves this same LP relaxation exactly (HiGHS, on each "
        "unit's convex-hull clocks) and rounds it to real clocks: four roundings (fast, nearest, threshold, "
        "dual-priced), each repaired to the deadline and then descended (marginal-rate descent and sweeps); "
        "the cheapest wins. The gap left is rounding, not the LP, and only on balanced stages under 1F1B "
        "(listed above): there the LP spends the 1% slack as a mix of two adjacent clocks on many "
        "steady-state units, and each of the many paths that are critical at once must fit its share in "
        "whole clock steps. Roundings close to the LP's durations (nearest; per stage in time order, tried "
        "and dropped) reach 98.9-99.8% of the saving before repair but run 0.07-1.6 ms over the deadline, "
        "and raising clocks to repair that costs 1-2 points, because time "
        "is dear at the margin (on S4-M16 / conservative / 1f1b an LP with 0.28 ms less deadline saves 1.8% "
        "less). Whether a discrete plan can reach 99% there is open: on that row HiGHS's exact MILP given "
        "400 s found no cheaper plan than the planner's (97.9% of the LP saving; the MILP's own bound caps "
        "the discrete optimum at 99.7%). Before the LP path (pure-Python heuristic only) 33/42 rows met the "
        "goal, worst 95.9%. Without scipy the heuristic still runs alone. On small cases the planner is "
        "within 2% of the exact MILP optimum (tests). "
        "(2) On the simulator the optimal planner pays the 1 ms clock-switch latency that its DAG model leaves "
        "out and steers its deadline over a few measured rounds; round-based balanced measures every round, "
        "so it can match or beat it there (ratios above 100%). (3) Greedy changes one unit per round: from the "
        "f_low clocks (uniform, envelope) on S=8, M=32 it does not reach the bound within its 400-round cap, "
        "and the cap then falls back to the latest plan within the bound or the top clocks (0% saving) -- the "
        "guard doing its job; balanced (every critical unit at the lowest clock per round) does not have "
        "this problem. "
        "(4) The paper's algorithm (reference) has no "
        "iteration-time guard; its slowdowns above the bound are its own, and it stops immediately when its "
        "threshold path equals the envelope (e.g. ours + envelope).")


if __name__ == "__main__":
    main()
