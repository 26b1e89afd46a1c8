"""Energy against deadline per schedule family: what each schedule buys at each speed (all simulated).

For every family and deadline (the reference schedule's top-clock time x (1 + slowdown)), the family's
candidates (``envpipe.planner.joint.candidates``: its parameters, within the memory cap) are ordered by
the LP relaxation of their DAG and the best is planned by the ``optimal`` planner's LP-rounded solver
(``envpipe.planner.lp_round``; the pure-Python heuristic without scipy) on the same DAG model (the
simulator without clock-switch latency, idle power at the top clock): one solve per point, no online
rounds and no second solver, so a whole frontier stays cheap. Both numbers are reported: the planned energy and the LP
bound (no plan of that schedule can use less on that model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SLOWDOWNS = (-0.10, -0.05, 0.0, 0.01, 0.05)


@dataclass(frozen=True)
class FrontierPoint:
    """One family at one deadline (None values: no candidate of the family meets it)."""

    family: str
    slowdown: float  # the deadline against the reference's top-clock time
    deadline_ms: float
    label: str | None
    saving: float | None  # planned (optimal solver, DAG model) against the reference at the top clocks
    lp_saving: float | None  # the LP bound's saving: no plan of this candidate saves more
    peak_activations: float | None


@dataclass(frozen=True)
class Frontier:
    """Every family's points, and how the numbers were made."""

    reference: str
    reference_ms: float
    reference_energy_j: float
    memory_cap: float | None
    points: list[FrontierPoint]
    model: str
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (label, why): over the memory cap, etc.

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (every number simulated)."""
        return {"simulated": True, "model": self.model, "reference": self.reference,
                "reference_ms": self.reference_ms, "reference_energy_j": self.reference_energy_j,
                "memory_cap": self.memory_cap, "points": [vars(p) for p in self.points],
                "rejected": [{"label": label, "why": why} for label, why in self.rejected]}


def frontier(stages: int, micro_batches: int, costs: Any, *, reference: str = "1f1b",
             slowdowns: Sequence[float] = SLOWDOWNS, memory_cap: float | None = None,
             families: Sequence[str] | None = None) -> Frontier:
    """The energy-vs-deadline curve of each family (see the module docstring)."""
    from envpipe.planner.joint import candidates, lp_bound_j, reference_run

    dag_costs = _dag_costs(costs)
    _, _, ref = reference_run(reference, stages, micro_batches, dag_costs)
    found, rejected = candidates(stages, micro_batches, dag_costs, families=families, memory_cap=memory_cap)
    by_family: dict[str, list[Any]] = {}
    for cand in found:
        by_family.setdefault(cand.family, []).append(cand)
    points = []
    for family, cands in by_family.items():
        for slowdown in slowdowns:
            deadline = ref.iteration_time_ms * (1 + slowdown)
            fits = [c for c in cands if c.top_ms <= deadline * (1 + 1e-9)]
            bounds = {id(c): lp_bound_j(c, deadline) for c in fits}
            fits.sort(key=lambda c: (bounds[id(c)] is None, bounds[id(c)] or 0.0))
            if not fits:
                points.append(FrontierPoint(family, slowdown, deadline, None, None, None, None))
                continue
            best = fits[0]
            dag = best.planned_dag.dag
            choice = _solve(dag, deadline)
            bound = bounds[id(best)]
            points.append(FrontierPoint(
                family, slowdown, deadline, best.label, 1 - dag.evaluate(choice)[1] / ref.energy_j,
                None if bound is None else 1 - bound / ref.energy_j, max(best.peak_activations)))
    return Frontier(reference, ref.iteration_time_ms, ref.energy_j, memory_cap, points,
                    f"simulated: optimal planner and LP bound on the DAG model; {dag_costs.describe()}", rejected)


def _solve(dag: Any, deadline_ms: float) -> list[int]:
    """The optimal planner's LP-rounded plan from the top clocks (its heuristic where the LP cannot run)."""
    from envpipe.planner.optimal import solve_heuristic

    top = [0] * len(dag)
    try:
        from envpipe.planner.lp_round import solve_lp_rounded

        return solve_lp_rounded(dag, deadline_ms, top)
    except (ImportError, ValueError):
        return solve_heuristic(dag, deadline_ms, top)


def _dag_costs(costs: Any) -> Any:
    """The same costs as the planner's DAG sees them: no clock-switch latency, idle power independent of the
    clock (so reference and plans are measured on one model)."""
    from dataclasses import replace

    return replace(costs, clock_switch_ms=0.0, idle_clock_drop=0.0)


def plot_png(result: Frontier, path: Any) -> None:
    """Energy saving against deadline, one line per family (planned) with its LP bound dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = list(dict.fromkeys(p.family for p in result.points))
    for k, family in enumerate(families):
        pts = [p for p in result.points if p.family == family and p.saving is not None]
        if not pts:
            continue
        color = f"C{k % 10}"
        xs = [100 * p.slowdown for p in pts]
        ax.plot(xs, [100 * p.saving for p in pts], "o-", color=color, label=family)
        if all(p.lp_saving is not None for p in pts):
            ax.plot(xs, [100 * p.lp_saving for p in pts], ":", color=color)
    ax.set_xlabel(f"deadline: slowdown against {result.reference} at the top clocks (%)")
    ax.set_ylabel(f"energy saving against {result.reference} at the top clocks (%)")
    cap = "" if result.memory_cap is None else f", memory cap {result.memory_cap:g}"
    ax.set_title(f"simulated frontier per schedule family (dotted: LP bound){cap}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, result.model[:150], fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
