"""``envpipe simulate --scheduling best`` and ``--frontier``: run the joint search or the frontier, render it.

Every number is simulated (the model is printed with the table and kept in the JSON).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envpipe_cli._console import stdout_console
from rich.table import Table


def run(frontier: bool, stages: int, micro_batches: int, costs: Any, *, reference: str, bound: float,
        deadline_ms: float | None, memory_cap: float | None, policy: str, as_json: bool,
        plot: Path | None) -> None:
    """Search (``--scheduling best``) or trace the frontier (``--frontier``) and print it."""
    from envpipe.planner import frontier as frontier_mod
    from envpipe.planner import joint

    console = stdout_console()
    if frontier:
        result = frontier_mod.frontier(stages, micro_batches, costs, reference=reference, memory_cap=memory_cap)
        if plot is not None:
            frontier_mod.plot_png(result, plot)
        if as_json:
            console.print_json(json.dumps(result.to_dict()))
        else:
            console.print(_frontier_table(result))
            for label, why in result.rejected:
                console.print(f"  left out: {label}: {why}", highlight=False)
            console.print(f"model ({result.model})", highlight=False)
        return
    if policy == "default":
        policy = "optimal"
    if policy not in joint.POLICIES:
        raise ValueError(f"--reconfig {policy!r} cannot drive the joint search; choose one of "
                         f"{', '.join(joint.POLICIES)}")
    if plot is not None:
        raise ValueError("--plot with --scheduling best is not supported; use --frontier --plot, or "
                         "simulate the chosen schedule with --plot")
    result = joint.search(stages, micro_batches, costs, reference=reference, slowdown_bound=bound,
                          deadline_ms=deadline_ms, memory_cap=memory_cap, policy=policy)
    if as_json:
        console.print_json(json.dumps(search_dict(result)))
        return
    console.print(_search_table(result))
    for label, why in result.rejected:
        console.print(f"  left out: {label}: {why}", highlight=False)
    console.print(f"model ({result.model})", highlight=False)


def search_dict(result: Any) -> dict[str, Any]:
    """The joint search's result as JSON (every number simulated)."""
    return {
        "simulated": True, "model": result.model, "reference": result.reference,
        "reference_ms": result.reference_ms, "reference_energy_j": result.reference_energy_j,
        "deadline_ms": result.deadline_ms, "memory_cap": result.memory_cap,
        "best": None if result.best is None else result.best.candidate.label,
        "ranked": [{"label": c.candidate.label, "family": c.candidate.family, "params": c.candidate.params,
                    "energy_j": c.energy_j, "iteration_ms": c.iteration_ms, "saving": c.saving,
                    "slowdown": c.slowdown, "peak_activations": list(c.candidate.peak_activations),
                    "lp_bound_j": c.lp_bound_j, "policy": c.policy, "solver": c.solver,
                    "clocks_mhz": {str(s): units for s, units in c.clocks.items()}} for c in result.ranked],
        "rejected": [{"label": label, "why": why} for label, why in result.rejected],
    }


def _search_table(result: Any) -> Table:
    cap = "none" if result.memory_cap is None else f"{result.memory_cap:g}"
    table = Table(title=f"joint search (simulated): deadline {result.deadline_ms:.1f} ms "
                        f"({result.reference} at the top clocks {result.reference_ms:.1f} ms), memory cap {cap}")
    for header in ("rank", "schedule", "iteration (ms)", "energy (J)", "saving", "slowdown", "peak act./GPU",
                   "LP bound saving"):
        table.add_column(header, justify="left" if header == "schedule" else "right", no_wrap=True)
    for k, c in enumerate(result.ranked, 1):
        lp = "-" if c.lp_bound_j is None else f"{(1 - c.lp_bound_j / result.reference_energy_j) * 100:.1f}%"
        table.add_row("best" if k == 1 else str(k), c.candidate.label, f"{c.iteration_ms:.2f}",
                      f"{c.energy_j:.1f}", f"{c.saving * 100:.1f}%", f"{c.slowdown * 100:+.1f}%",
                      f"{max(c.candidate.peak_activations):g}", lp)
    return table


def _frontier_table(result: Any) -> Table:
    slowdowns = sorted({p.slowdown for p in result.points})
    table = Table(title=f"energy saving against {result.reference} at the top clocks (simulated), per deadline "
                        f"= {result.reference} time x (1 + slowdown); planned / LP bound")
    table.add_column("family", no_wrap=True)
    for slowdown in slowdowns:
        table.add_column(f"{slowdown * 100:+g}%", justify="right", no_wrap=True)
    table.add_column("peak act./GPU", justify="right")
    for family in dict.fromkeys(p.family for p in result.points):
        row = [family]
        peak = None
        for slowdown in slowdowns:
            p = next(p for p in result.points if p.family == family and p.slowdown == slowdown)
            if p.saving is None:
                row.append("-")
                continue
            peak = p.peak_activations
            lp = "" if p.lp_saving is None else f" / {p.lp_saving * 100:.1f}"
            row.append(f"{p.saving * 100:.1f}{lp}")
        row.append("-" if peak is None else f"{peak:g}")
        table.add_row(*row)
    return table
