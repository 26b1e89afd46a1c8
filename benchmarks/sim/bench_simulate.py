"""Benchmark of the schedule core: simulate speed, verify speed, and a simulated savings table.

Run: ``python benchmarks/sim/bench_simulate.py`` (prints Markdown; the numbers recorded in
docs/performance.md "## Simulator" come from it). Everything it reports about energy is simulated.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from envpipe.clock_types import assign_clocks
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, simulate
from envpipe.verify import verify


def _timed(fn, repeats: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3, max(samples) * 1e3


def speed(repeats: int) -> list[str]:
    """Median / max wall time of simulate and verify for a few sizes."""
    rows = ["| case | simulate median (ms) | simulate max (ms) | verify median (ms) |", "|---|---|---|---|"]
    for stages, micro_batches in [(4, 16), (8, 32), (8, 64), (16, 128)]:
        costs = CostModel.build(stages)
        schedule = get_schedule("ours", stages, micro_batches, costs=costs)
        clocks = assign_clocks(schedule, costs, "envelope")
        sim_med, sim_max = _timed(lambda s=schedule, c=costs, k=clocks: simulate(s, c, k), repeats)
        ver_med, _ = _timed(lambda s=schedule: verify(s), max(3, repeats // 4))
        rows.append(
            f"| ours S={stages} M={micro_batches} envelope | {sim_med:.1f} | {sim_max:.1f} | {ver_med:.1f} |"
        )
    return rows


def savings() -> list[str]:
    """Simulated saving and slowdown vs 1f1b at the top clock (H100 card, S=4, M=16), reconfig default."""
    cases = {
        "balanced 10/20 ms": ([10] * 4, [20] * 4),
        "heavy last 10/20, 14/28": ([10, 10, 10, 14], [20, 20, 20, 28]),
    }
    rows = ["| stages | model | schedule (r) | clock type | saving | slowdown |", "|---|---|---|---|---|---|"]
    for label, (fwd, bwd) in cases.items():
        for model in ("central", "conservative", "optimistic"):
            costs = CostModel.build(4, model=model, fwd_ms=fwd, bwd_ms=bwd)
            base = simulate(get_schedule("1f1b", 4, 16), costs)
            for name in ("1f1b", "ours"):
                schedule = get_schedule(name, 4, 16, costs=costs)
                for clock_type in ("uniform", "envelope"):
                    result = simulate(schedule, costs, assign_clocks(schedule, costs, clock_type))
                    saving = 1 - result.energy_j / base.energy_j
                    slowdown = result.iteration_time_ms / base.iteration_time_ms - 1
                    rows.append(
                        f"| {label} | {model} | {name} {list(schedule.r)} | {clock_type} | "
                        f"{saving * 100:.1f}% | {slowdown * 100:+.1f}% |"
                    )
    return rows


def main() -> None:
    """Print both tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {args.repeats} repeats\n")
    print("\n".join(speed(args.repeats)))
    print("\nSimulated (every number below comes from the named DVFS model on the H100 card):\n")
    print("\n".join(savings()))


if __name__ == "__main__":
    main()
