"""What planning and the drift guard cost over a 10,000-step run (simulated; the goal: at most 2 % of steps).

The real controller (``envpipe.controller``) drives a simulated pipeline (``envpipe.controller.simulated``):
one thread per rank, every step simulated by ``envpipe.sim`` at the plan's clocks (what emulated DVFS does
to real units), energy from the card and DVFS model the sim agent uses (exact windows, as with the sim
agent). Two runs: a steady machine, and one whose stage 1 slows down by 30 % at step 5,000 (emulated drift),
which the drift guard must notice and re-plan for.

Counted: steps spent planning (warm-up, baseline window, profiling, reconfiguration), re-planning, and the
drift checks (each a gather of 3 steps' timelines, no extra step), as steps and as simulated time.

    python benchmarks/controller/drift_cost.py [--steps 10000] [--out benchmarks/controller/result.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from envpipe.controller import ControllerConfig
from envpipe.controller.simulated import run_pipeline

SHAPE = {
    "stages": 4,
    "micro_batches": 8,
    "fwd_ms": [10.0, 10.0, 10.0, 12.0],
    "bwd_ms": [20.0, 20.0, 20.0, 24.0],
}


def scenario(name: str, steps: int, **drift: object) -> dict:
    """One run: the step counts, the simulated time by state, the re-plans."""
    config = ControllerConfig(recheck_interval=500, drift_checks=3, drift_threshold=0.15, max_steps=steps)
    start = time.perf_counter()
    result, pipeline, _ = run_pipeline(config, steps, **SHAPE, **drift)
    wall_s = time.perf_counter() - start
    counts = result["controller"]["step_counts"]
    states, times = pipeline.step_states, pipeline.step_ms
    planning = states.index("at-plan")  # every step before the first one at the plan
    off_plan = [s != "at-plan" for s in states]
    replanning = sum(off_plan) - planning  # re-plan windows and their reconfiguration rounds
    overhead_ms = sum(t for t, off in zip(times, off_plan) if off)
    total_ms = sum(times)
    return {
        "scenario": name,
        "steps": steps,
        "step_counts": counts,
        "planning_steps": planning,
        "replan_steps": replanning,
        "drift_checks": result["drift"]["checks"],
        "replans": result["drift"]["replans"],
        "overhead_steps_share": (planning + replanning) / steps,
        "overhead_time_share_simulated": overhead_ms / total_ms,
        "predicted_saving": result["predicted"]["energy_saving"],
        "wall_s": wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
    args = parser.parse_args()
    runs = [
        scenario("steady", args.steps),
        scenario(
            "stage 1 +30% from step 5000",
            args.steps,
            slow_from_step=args.steps // 2,
            slow_stage=1,
            slow_factor=1.3,
        ),
    ]
    out = {"simulated": True, "shape": SHAPE, "machine": platform.platform(), "runs": runs}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for run in runs:
        print(
            f"{run['scenario']}: planning {run['planning_steps']} + re-plan {run['replan_steps']} steps of "
            f"{run['steps']} = {run['overhead_steps_share']:.2%} of steps, "
            f"{run['overhead_time_share_simulated']:.2%} of simulated time; "
            f"{run['drift_checks']} drift checks; "
            f"re-plans: {[r['reason'] for r in run['replans']]} ({run['wall_s']:.0f} s wall)"
        )


if __name__ == "__main__":
    main()
