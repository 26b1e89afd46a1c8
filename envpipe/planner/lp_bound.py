"""Lower bounds and exact optima of the clock-assignment problem, with scipy's HiGHS (benchmark and tests only).

The continuous relaxation lets every unit mix its discrete clocks (``x[u, c]`` in [0, 1], summing to 1);
that is the continuous-clock lower bound the benchmark holds the planners against. With ``integral=True``
the same model is the exact mixed-integer optimum (small cases only). The ``optimal`` planner solves the
relaxation on each unit's convex-hull options (the same optimum, far fewer variables) and rounds it
(``envpipe.planner.lp_round``). scipy is imported inside the functions: importing the planner never loads
it, and without it the planner falls back to its pure-Python heuristic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from envpipe.planner.dag import ClockDag


@dataclass(frozen=True, slots=True)
class BoundResult:
    """Solution of the relaxed (or integral) problem: energy (J), makespan (ms) and per-node mixtures."""

    energy_j: float
    makespan_ms: float
    mixtures: list[dict[int, float]]  # node -> {option index: weight}
    integral: bool
    prices: list[float] | None = None  # relaxation only: per node, the dual's time price (J/ms) through it


def solve_bound(dag: ClockDag, deadline_ms: float | None, *, integral: bool = False,
                time_limit_s: float = 60.0, candidates: Sequence[Sequence[int]] | None = None) -> BoundResult:
    """Minimise the iteration energy of ``dag`` with makespan <= ``deadline_ms`` (None = no deadline).

    Args:
        dag: the clock-assignment problem.
        deadline_ms: the iteration-time bound, or None for the unconstrained optimum (any slowdown).
        integral: solve the exact discrete problem (MILP) instead of the continuous relaxation.
        time_limit_s: HiGHS time limit.
        candidates: per node, the option indices it may use (default: all). The lower convex hull of each
            node's (duration, reduced energy) points gives the same relaxed optimum with fewer variables.

    Returns:
        The optimum; for the relaxation its energy is a lower bound on every discrete plan's energy.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp
    from scipy.sparse import coo_matrix

    n = len(dag)
    # Variable layout: [x for every (node, option) of multi-option nodes] + [start time per node] + [makespan].
    x_index: list[list[int]] = []
    cost: list[float] = []
    fixed_d = [0.0] * n
    allowed = [list(range(len(o))) for o in dag.options] if candidates is None else [list(c) for c in candidates]
    for u in range(n):
        if len(allowed[u]) == 1:
            x_index.append([])
            fixed_d[u] = dag.options[u][allowed[u][0]].duration_ms
            continue
        x_index.append(list(range(len(cost), len(cost) + len(allowed[u]))))
        cost.extend(dag.reduced_j(u, c) for c in allowed[u])
    n_x = len(cost)
    t0 = n_x
    m_var = n_x + n
    n_var = m_var + 1
    fixed_reduced = sum(dag.reduced_j(u, allowed[u][0]) for u in range(n) if not x_index[u])
    c_vec = np.zeros(n_var)
    c_vec[:n_x] = cost
    c_vec[m_var] = sum(dag.idle_power_w) / 1000.0

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lo: list[float] = []
    hi: list[float] = []

    def duration_terms(row: int, u: int) -> float:
        # Adds -d(u) to the row; returns the constant part for fixed nodes.
        for c, k in zip(allowed[u], x_index[u]):
            rows.append(row)
            cols.append(k)
            vals.append(-dag.options[u][c].duration_ms)
        return fixed_d[u]

    row = 0
    for u in range(n):  # one-hot choice
        if x_index[u]:
            for k in x_index[u]:
                rows.append(row)
                cols.append(k)
                vals.append(1.0)
            lo.append(1.0)
            hi.append(1.0)
            row += 1
    choice_rows = row
    owner: list[int] = []  # the node whose duration each path row carries
    succs = dag.succs()
    for u in range(n):  # t_v - t_u - d_u >= 0, and M - t_u - d_u >= 0 for sinks
        targets = [t0 + v for v in succs[u]] or [m_var]
        for target in targets:
            rows.extend((row, row))
            cols.extend((target, t0 + u))
            vals.extend((1.0, -1.0))
            const = duration_terms(row, u)
            lo.append(const)
            hi.append(math.inf)
            owner.append(u)
            row += 1
    a_mat = coo_matrix((vals, (rows, cols)), shape=(row, n_var)).tocsr()
    upper = np.full(n_var, np.inf)
    upper[:n_x] = 1.0
    if deadline_ms is not None:
        upper[m_var] = deadline_ms
    if not integral:  # linprog: faster than milp's MIP path, and it returns the duals
        return _relaxed(dag, linprog, np, a_mat, choice_rows, lo, c_vec, upper, owner, allowed, x_index,
                        fixed_reduced, m_var, deadline_ms)
    integrality = np.zeros(n_var)
    integrality[:n_x] = 1
    res = milp(c_vec, constraints=LinearConstraint(a_mat, lo, hi), bounds=Bounds(np.zeros(n_var), upper),
               integrality=integrality, options={"time_limit": time_limit_s, "disp": False})
    if res.x is None:
        raise ValueError(f"no clock assignment meets the deadline {deadline_ms} ms (HiGHS: {res.message}); "
                         "raise the deadline to at least the all-max-clock makespan")
    mixtures = [{c: float(res.x[k]) for c, k in zip(allowed[u], x_index[u]) if res.x[k] > 1e-9}
                or {allowed[u][0]: 1.0} for u in range(n)]
    return BoundResult(float(res.fun) + fixed_reduced, float(res.x[m_var]), mixtures, integral)


def _relaxed(dag, linprog, np, a_mat, choice_rows, lo, c_vec, upper, owner, allowed, x_index, fixed_reduced,
             m_var, deadline_ms) -> BoundResult:
    """The relaxation by linprog (HiGHS), with every node's time price from the path rows' duals."""
    lo_vec = np.asarray(lo)
    res = linprog(c_vec, A_ub=-a_mat[choice_rows:], b_ub=-lo_vec[choice_rows:], A_eq=a_mat[:choice_rows],
                  b_eq=lo_vec[:choice_rows], bounds=list(zip(np.zeros(len(c_vec)), upper)), method="highs")
    if res.x is None:
        raise ValueError(f"no clock assignment meets the deadline {deadline_ms} ms (HiGHS: {res.message}); "
                         "raise the deadline to at least the all-max-clock makespan")
    prices = [0.0] * len(dag)
    for u, marginal in zip(owner, res.ineqlin.marginals):
        prices[u] -= float(marginal)  # marginals are <= 0: energy saved per ms the row is relaxed
    mixtures = [{c: float(res.x[k]) for c, k in zip(allowed[u], x_index[u]) if res.x[k] > 1e-9}
                or {allowed[u][0]: 1.0} for u in range(len(dag))]
    return BoundResult(float(res.fun) + fixed_reduced, float(res.x[m_var]), mixtures, False, prices)
