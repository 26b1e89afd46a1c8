"""Simulated energy of every schedule family (1F1B, ours, ours-w, interleaved, ZB-H1, ZB-H2, ZB-V) side by
side, each against its own LP bound, and how the planner's time grows with S and M (issue 18).

Every number here is SIMULATED (``envpipe.sim`` with a named DVFS model); none is a measurement.

    python benchmarks/energy_sim/families.py            # all cases x models + timing (resumes families.json)
    python benchmarks/energy_sim/families.py --only timing
    python benchmarks/energy_sim/report.py              # docs/results.md, section "Schedule families"

Per case (the GPU stages of run.py's CASES, cut into chunks for several stages per GPU) and DVFS model, the
deadline is 1F1B at the top clocks + 1% and savings are against that 1F1B run: each family at its default
parameters (``envpipe.planner.joint.candidates``, ours-w with ZB-H1's W lag, interleaved v=2) gets its
top-clock time, peak activations per GPU, the LP bound and the optimal planner's LP-rounded solver on the
DAG model (no clock-switch latency, idle power at the top clock), and for ``SIM_RUNS`` the optimal planner
on the full simulator (``plan_clocks``, 1 ms switch latency, idle power falling with the clock).
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
sys.path.insert(0, str(HERE))

from run import BOUND, CASES, MODELS, costs_for  # noqa: E402

RESULTS = HERE / "families.json"
FAMILY_CASES = ("S4-M16", "S8-M32", "first-heavy", "last-heavy", "llama-embed-head")
TIMING_SIZES = ((4, 8), (4, 16), (4, 32), (8, 16), (8, 32))
TIMING_FAMILIES = ("1f1b", "zb-h1", "interleaved", "zb-v")
SIM_RUNS = {("S4-M16", "central"), ("first-heavy", "central")}


def is_default(cand) -> bool:
    """Each family at its default parameters (the joint search also tries ours-w lags 0 and 2s, v=3)."""
    if cand.family == "ours-w":
        return cand.params["lag"] == list(range(len(cand.params["lag"])))
    return cand.family != "interleaved" or cand.params["virtual_stages"] == 2


def tasks(only: str | None) -> list[tuple[str, str]]:
    out = [(case, model) for model in MODELS for case in FAMILY_CASES]
    out += [("sanity", "S4-M16")]
    out += [("timing", f"S{s}-M{m}") for s, m in TIMING_SIZES] + [("timing", "joint-S4-M16"),
                                                                  ("timing", "joint-S8-M32")]
    return [t for t in out if only is None or t[0] == only or t[1] == only]


def run_task(task: tuple[str, str]) -> dict:
    case, model = task
    started = time.perf_counter()
    if case == "sanity":
        row = _sanity()
    else:
        row = _timing(model) if case == "timing" else _families(case, model)
    row.update({"case": case, "model": model, "wall_s": time.perf_counter() - started, "simulated": True})
    return row


def _families(case: str, model: str) -> dict:
    from envpipe.planner import plan_clocks
    from envpipe.planner.build import build_dag
    from envpipe.planner.joint import candidates, lp_bound_j
    from envpipe.planner.lp_round import solve_lp_rounded
    from envpipe.schedules import get_schedule
    from envpipe.sim import simulate

    spec = CASES[case]
    stages, micro_batches = spec["stages"], spec["micro_batches"]
    costs = costs_for(case, model)
    dag_costs = costs_for(case, model, clock_switch_ms=0.0, idle_clock_drop=0.0)
    one_f_one_b = get_schedule("1f1b", stages, micro_batches)
    base = simulate(one_f_one_b, costs)
    dag_base = simulate(one_f_one_b, dag_costs)
    deadline = dag_base.iteration_time_ms * (1 + BOUND)
    found, rejected = candidates(stages, micro_batches, dag_costs)
    found = [c for c in found if is_default(c)]
    sim_found = {c.label: c for c in candidates(stages, micro_batches, costs)[0]}
    rows = []
    for cand in found:
        dag = build_dag(cand.schedule, cand.costs).dag
        started = time.process_time()
        choice = solve_lp_rounded(dag, deadline, [0] * len(dag))
        cpu_s = time.process_time() - started
        bound = lp_bound_j(cand, deadline)
        sim_cand = sim_found[cand.label]
        plan = None
        if (case, model) in SIM_RUNS:  # the full simulator's plan: CPU budget of the shared VM
            plan = plan_clocks(sim_cand.schedule, sim_cand.costs, "optimal", slowdown_bound=BOUND,
                               reference=(one_f_one_b, costs))
        rows.append({"label": cand.label, "family": cand.family, "params": cand.params,
                     "peak_activations": max(cand.peak_activations), "top_ms": sim_cand.top_ms,
                     "lp_saving": 1 - bound / dag_base.energy_j, "optimal_dag_saving":
                     1 - dag.evaluate(choice)[1] / dag_base.energy_j, "optimal_cpu_s": cpu_s,
                     **({} if plan is None else {
                         "optimal_sim_saving": 1 - plan.sim.energy_j / base.energy_j,
                         "optimal_sim_slowdown": plan.sim.iteration_time_ms / base.iteration_time_ms - 1,
                         "met_bound": plan.met_bound})})
    return {"baseline_ms": base.iteration_time_ms, "rows": rows, "rejected": rejected}


# Issue 18's sanity target: LP bound savings on balanced S=4, M=16, central curve, idle 0.25 of busy power,
# deadline = 1F1B at the top clocks + 1% (the card model's own idle share is 0.18).
SANITY_TARGET = {"1f1b": 0.04, "ours": 0.115, "interleaved": 0.17, "zb-h1": 0.17, "zb-h2": 0.19, "zb-v": 0.20}


def _sanity() -> dict:
    from envpipe_agent.dvfs import get_model, model_from_params

    from envpipe.planner.build import build_dag
    from envpipe.planner.lp_bound import solve_bound
    from envpipe.schedules import VIRTUAL_STAGES, get_schedule
    from envpipe.sim import CostModel, simulate

    central = get_model("central")
    out = {}
    for idle in (central.idle_fraction, 0.25):
        model = model_from_params(f"a={central.a},p0={central.p0},g={central.g},idle={idle}")
        costs = CostModel.build(4, model=model, clock_switch_ms=0.0, idle_clock_drop=0.0)
        base = simulate(get_schedule("1f1b", 4, 16), costs)
        for name in SANITY_TARGET:
            v = VIRTUAL_STAGES.get(name) or 1
            chunked = costs.chunked(v)
            schedule = get_schedule(name, 4 * v, 16, costs=chunked, virtual_stages=v if v > 1 else None)
            bound = solve_bound(build_dag(schedule, chunked).dag, base.iteration_time_ms * (1 + BOUND))
            out[f"{name}@{idle:g}"] = 1 - bound.energy_j / base.energy_j
    return {"lp_saving": out, "idle_fractions": [central.idle_fraction, 0.25]}


def _timing(size: str) -> dict:
    """CPU seconds of the optimal planner's solver (DAG model, +1% deadline) per family, or of the joint
    search (LP bounds of every candidate, then the planning on the simulator)."""
    from envpipe.planner import joint
    from envpipe.planner.build import build_dag
    from envpipe.planner.optimal import solve_named
    from envpipe.sim import CostModel

    try:
        import scipy.optimize  # noqa: F401  (imported once, before timing, as a training process would)
    except ImportError:
        pass
    if size.startswith("joint-"):
        stages, micro_batches = (int(x[1:]) for x in size[len("joint-"):].split("-"))
        started = time.process_time()
        result = joint.search(stages, micro_batches, CostModel.build(stages))
        return {"cpu_s": time.process_time() - started, "best": result.best.candidate.label,
                "planned": len(result.ranked) + sum(why.startswith("planned") for _, why in result.rejected)}
    stages, micro_batches = (int(x[1:]) for x in size.split("-"))
    costs = CostModel.build(stages, clock_switch_ms=0.0, idle_clock_drop=0.0)
    _, _, ref = joint.reference_run("1f1b", stages, micro_batches, costs)
    found, _ = joint.candidates(stages, micro_batches, costs, families=TIMING_FAMILIES)
    out = {}
    for cand in found:
        if cand.label == "interleaved v=3":
            continue
        dag = build_dag(cand.schedule, cand.costs).dag
        started = time.process_time()
        solve_named(dag, ref.iteration_time_ms * (1 + BOUND))
        out[cand.label] = {"cpu_s": time.process_time() - started, "nodes": len(dag)}
    return {"families": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="a case, a model or 'timing'")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    done = {} if args.fresh or not RESULTS.exists() else {
        (r["case"], r["model"]): r for r in json.loads(RESULTS.read_text())["runs"]}
    todo = [t for t in tasks(args.only) if t not in done or args.only]
    print(f"{len(done)} cached, {len(todo)} to go (simulated)", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(run_task, todo):
            done[(row["case"], row["model"])] = row
            print(f"{row['case']} {row['model']} {row['wall_s']:.1f}s", flush=True)
            RESULTS.write_text(json.dumps({"simulated": True, "bound": BOUND,
                                           "runs": sorted(done.values(), key=lambda r: (r["case"], r["model"]))},
                                          indent=0))


def section() -> list[str]:
    """The "Schedule families" section of docs/results.md (empty when families.json is missing)."""
    if not RESULTS.exists():
        return []
    runs = {(r["case"], r["model"]): r for r in json.loads(RESULTS.read_text())["runs"]}
    out = [
        "## Schedule families side by side (simulated)", "",
        ("Reproduce: `python benchmarks/energy_sim/families.py` then `python benchmarks/energy_sim/report.py`. "
         "Same cases, card and models as above; S counts GPUs. Deadline: 1F1B at the top clocks + 1%; savings "
         "against that 1F1B run. Each family at its default parameters (ours-w: ZB-H1's W lag; interleaved: v=2; "
         "`envpipe simulate --scheduling best` also tries ours-w lags 0 and 2s and v=3): interleaved and ZB-V cut each GPU's layers into v contiguous chunks (`CostModel.chunked`), ZB "
         "schedules split each backward into I and W of half its time each (the zero-bubble paper's T_I = "
         "T_W; a profile's `input_ms` replaces it). *top ms* = iteration at the top clocks; *peak* = most "
         "micro-batch activations held per GPU (in GPU shares of the model; 1F1B holds S); *LP bound* = "
         "as above, on the DAG model; *optimal (DAG)* = the optimal planner's LP-rounded solver on that model; "
         "*optimal (sim)* = `plan_clocks(..., 'optimal')` on the full simulator, its slowdown in brackets "
         "(S4-M16 and first-heavy, central model only: CPU budget of the shared machine)."), "",
        FAMILY_NOTES, ""]
    for model in MODELS:
        for case in FAMILY_CASES:
            run = runs.get((case, model))
            if run is None:
                continue
            out += [f"### {case}, {model} model (simulated)", "",
                    "| schedule | top ms | peak | LP bound saving | optimal (DAG) | optimal / LP | optimal (sim) |",
                    "|---|---:|---:|---:|---:|---:|---:|"]
            for row in sorted(run["rows"], key=lambda r: -r["lp_saving"]):
                share = row["optimal_dag_saving"] / row["lp_saving"] if row["lp_saving"] > 0 else 1.0
                sim = "-" if "optimal_sim_saving" not in row else (
                    f"{100 * row['optimal_sim_saving']:.2f}% ({100 * row['optimal_sim_slowdown']:+.2f}%)")
                out.append(f"| {row['label']} | {row['top_ms']:.1f} | {row['peak_activations']:g} | "
                           f"{100 * row['lp_saving']:.2f}% | {100 * row['optimal_dag_saving']:.2f}% | "
                           f"{100 * share:.1f}% | {sim} |")
            out += [f"\nLeft out: {label} ({why})" for label, why in run["rejected"]] + [""]
    out += _sanity_lines(runs) + _timing_lines(runs)
    return out


def _sanity_lines(runs: dict) -> list[str]:
    row = runs.get(("sanity", "S4-M16"))
    if row is None:
        return []
    low, high = row["idle_fractions"]
    out = ["### Issue 18's sanity target: LP bound savings, balanced S=4, M=16, central curve (simulated)", "",
           f"`python benchmarks/energy_sim/families.py --only sanity`. Deadline 1F1B at the top clocks + 1%; DAG "
           f"model. The issue's independent bound used idle at {high:g} of busy power; the card model here "
           f"uses {low:g} (H100: 127 W idle, ~700 W busy).", "",
           f"| schedule | issue 18 (idle {high:g}) | here, idle {high:g} | here, idle {low:g} |", "|---|---:|---:|---:|"]
    for name, target in SANITY_TARGET.items():
        out.append(f"| {name}{' v=2' if name == 'interleaved' else ''} | ~{100 * target:g}% | "
                   f"{100 * row['lp_saving'][f'{name}@{high:g}']:.2f}% | "
                   f"{100 * row['lp_saving'][f'{name}@{low:g}']:.2f}% |")
    return out + ["", SANITY_NOTE, ""]


FAMILY_NOTES = (
    "What the tables say (all simulated). At the top clocks every split-backward schedule finishes about 11% "
    "sooner than 1F1B on balanced stages (S4-M16: 498-512 ms against 573 ms); held to the same deadline "
    "that time becomes clock slack. ZB-V has the largest LP bound in all 15 tables, at 1F1B's peak memory "
    "(S activations per GPU). On balanced stages the order is the same in all six tables: ZB-V > ZB-H2 > "
    "ours-w > ZB-H1 > interleaved v=2 > ours > 1F1B; ZB-H1 keeps 1F1B's memory, ZB-H2 needs 2S-1, ours and "
    "ours-w more. On the imbalanced cases interleaved comes second: cutting each GPU's layers into chunks "
    "spreads a heavy stage over two GPUs (first-heavy's 16 ms stage 0 becomes two 8 ms chunks on GPUs 0 and "
    "1). The LP-rounded solver alone reaches 98-100% of the LP bound on balanced stages but only 94.4-99.6% "
    "for ZB-V and interleaved on the imbalanced ones (worst: last-heavy, conservative, ZB-V): those DAGs have "
    "more than 500 nodes, where the optimal planner does not also run its heuristic (which, run by hand on "
    "last-heavy/conservative/ZB-V, stops at the same 17.31%). It is a rounding weakness, not an integrality "
    "gap: the exact MILP (`solve_bound(..., integral=True)`, HiGHS) reaches the LP bound on those DAGs in "
    "under a second (last-heavy/conservative/ZB-V 18.33%, first-heavy/optimistic ZB-V 27.44% and "
    "interleaved 26.56%, last-heavy/central ZB-V 23.84% and interleaved 22.49%; S4-M16 central: 5 s, "
    "no gain). Left to the planner: an exact MILP pass where it is this fast. On the full simulator "
    "(first-heavy, central) `plan_clocks` lands within 0.1 points of the bound's saving.")

SANITY_NOTE = (
    "With the issue's idle share every zero-bubble and interleaved number lands within 0.1-0.8 points of "
    "its target, ZB-H1 the farthest (+0.8: this ZB-H1 is torch's order, W deferred by s on stage s; the issue "
    "does not say which ZB-H1 order its bound used); 1F1B and ours come out 0.5 points higher than the issue's ~4% and ~11.5%, which are "
    "exactly this page's numbers at idle 0.18 (the issue quoted them from there). With idle 0.18 every "
    "family saves 0.2-0.9 points less: a schedule that removes bubbles saves idle energy, and idle power "
    "is smaller. 0.05 ms transfers change nothing here (checked with free transfers: within 0.25 points).")


def _timing_lines(runs: dict) -> list[str]:
    sizes = [f"S{s}-M{m}" for s, m in TIMING_SIZES if ("timing", f"S{s}-M{m}") in runs]
    if not sizes:
        return []
    labels = list(dict.fromkeys(k for size in sizes for k in runs[("timing", size)]["families"]))
    out = ["### Planner time against S and M (simulated DAGs; CPU seconds on this shared 2-core machine)", "",
           ("`python benchmarks/energy_sim/families.py --only timing`: the optimal planner's solver "
            "(`solve_named`: LP relaxation by HiGHS, rounded; plus the heuristic on DAGs up to 500 nodes) "
            "on one DAG at the +1% deadline, after scipy's one-time import; nodes = units and transfers."), "",
           "| S, M | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for size in sizes:
        fams = runs[("timing", size)]["families"]
        cells = [f"{fams[k]['cpu_s']:.2f} s ({fams[k]['nodes']} nodes)" if k in fams else "-" for k in labels]
        out.append(f"| {size} | " + " | ".join(cells) + " |")
    for key in ("joint-S4-M16", "joint-S8-M32"):
        if ("timing", key) in runs:
            row = runs[("timing", key)]
            out.append(f"\nJoint search {key[6:]} (`envpipe simulate --scheduling best`, central, every family): "
                       f"{row['cpu_s']:.1f} CPU s (LP bound of every candidate, {row['planned']} planned on "
                       f"the simulator); best: {row['best']}.")
    return out + [""]


if __name__ == "__main__":
    sys.exit(main())
