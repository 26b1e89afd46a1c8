"""The ``optimal`` planner's LP path: solve the LP relaxation (scipy HiGHS), then round it to real clocks.

On each unit's lower convex hull of (duration, reduced energy) the relaxation has the same optimum as on
all clocks, with a fraction of the variables; it gives a unit a mix of (usually) two adjacent hull clocks,
i.e. a duration between them. Several roundings start the same descent as the heuristic
(``envpipe.planner.descent``: marginal-rate descent and sweeps spend the leftover time), the cheapest wins:

* *fast*: every unit at the slowest hull clock no slower than its LP duration -- feasible by construction;
* *nearest*: every unit at its heavier hull clock, then repaired (below);
* *threshold*: a unit goes slow when its slow weight is at least a threshold, the lowest that is feasible;
* *priced*: the LP's dual time prices, scaled together until the plan just meets the deadline.

Repair raises clocks until the deadline holds: among the cheapest raises (J per ms the unit saves) on the
units every longest path passes through (else on one longest path), the one with the least energy per ms
the iteration actually shortens. Rounding cannot always keep up with the LP: on balanced stages many paths
are critical at once, and each must fit its time in whole clock steps (docs/results.md).
"""

from __future__ import annotations

from envpipe.planner.dag import ClockDag
from envpipe.planner.descent import INF, Rates, finish_descent, hulls_of, longest_path, scaled_plan

_EPS_MS = 1e-9
_REPAIR_TRIES = 8  # cheapest raises whose real effect on the makespan is measured


def solve_lp_rounded(dag: ClockDag, deadline_ms: float, floor: list[int]) -> list[int]:
    """Round the relaxation's optimum to one option per node, meeting ``deadline_ms``.

    Args:
        dag: the clock-assignment problem.
        deadline_ms: the iteration-time bound (ms); the ``floor`` plan must meet it.
        floor: the starting (feasible) choice; single-option nodes keep it.

    Returns:
        The option index chosen for every node.

    Raises:
        ImportError: scipy is not installed (the caller falls back to the heuristic).
    """
    from envpipe.planner.lp_bound import solve_bound

    hulls = hulls_of(dag)
    # Hull points past the least-energy one are slower and dearer: never in an optimum.
    candidates = [_useful(dag, u, h.options) for u, h in enumerate(hulls)]
    relaxed = solve_bound(dag, deadline_ms, candidates=candidates)
    rates = Rates(dag)
    succs = dag.succs()
    best: list[int] | None = None
    best_j = float("inf")
    starts = [_round_fast(dag, relaxed.mixtures, candidates, floor),
              _round_nearest(dag, relaxed.mixtures, candidates, floor),
              _round_threshold(dag, relaxed.mixtures, candidates, floor, deadline_ms)]
    if relaxed.prices is not None:
        weights = [p if p > 1e-12 else INF for p in relaxed.prices]
        starts.append(scaled_plan(dag, deadline_ms, hulls, weights, floor))
    for choice in starts:
        if choice is None or not _repair(dag, choice, deadline_ms, candidates):
            continue
        finish_descent(dag, choice, deadline_ms, rates, succs)
        energy = dag.evaluate(choice)[1]
        if energy < best_j - 1e-9:
            best, best_j = choice, energy
    return best if best is not None else list(floor)


def _useful(dag: ClockDag, u: int, hull: list[int]) -> list[int]:
    reduced = [dag.reduced_j(u, c) for c in hull]
    cheapest = min(range(len(hull)), key=lambda k: reduced[k])
    return hull[:cheapest + 1]


def _mean_ms(dag: ClockDag, u: int, mixture: dict[int, float]) -> float:
    total = sum(mixture.values())
    return sum(w * dag.options[u][c].duration_ms for c, w in mixture.items()) / total


def _round_fast(dag: ClockDag, mixtures, candidates, floor: list[int]) -> list[int]:
    """The slowest hull option no longer than the LP's duration (hull options ascend in duration)."""
    out = list(floor)
    for u, options in enumerate(candidates):
        if len(options) > 1:
            limit = _mean_ms(dag, u, mixtures[u]) + _EPS_MS
            out[u] = max((c for c in options if dag.options[u][c].duration_ms <= limit), default=options[0])
    return out


def _round_nearest(dag: ClockDag, mixtures, candidates, floor: list[int]) -> list[int]:
    out = list(floor)
    for u, options in enumerate(candidates):
        if len(options) > 1:
            out[u] = max(mixtures[u].items(), key=lambda cw: (cw[1], -cw[0]))[0]
    return out


def _round_threshold(dag: ClockDag, mixtures, candidates, floor: list[int],
                     deadline_ms: float) -> list[int] | None:
    """Fractional units take their slower clock when its weight is at least a threshold: the lowest threshold
    whose plan meets the deadline (bisection over the weights; 1 = the fast rounding)."""
    slow = {}
    for u, options in enumerate(candidates):
        if len(options) > 1 and len(mixtures[u]) > 1:
            c_slow = max(mixtures[u])  # the larger option index is the slower clock
            slow[u] = (mixtures[u][c_slow] / sum(mixtures[u].values()), c_slow)
    base = _round_fast(dag, mixtures, candidates, floor)
    levels = sorted({w for w, _ in slow.values()}, reverse=True)

    def plan(level: float) -> list[int]:
        out = list(base)
        for u, (w, c_slow) in slow.items():
            if w >= level:
                out[u] = c_slow
        return out

    lo, hi = -1, len(levels)  # levels[:k+1] taken slow; find the largest feasible k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if dag.makespan_ms(dag.durations(plan(levels[mid]))) <= deadline_ms * (1 + 1e-12):
            lo = mid
        else:
            hi = mid
    return plan(levels[lo]) if lo >= 0 else None


def _repair(dag: ClockDag, choice: list[int], deadline_ms: float, candidates) -> bool:
    """Raise clocks until the deadline holds, cheapest J per saved ms first.

    A unit that every longest path passes through (the first forward, the last backward, ...) shortens all
    of them at once, so those are raised first; otherwise the cheapest unit on one longest path.
    """

    succs = dag.succs()
    for _ in range(100 * len(choice) + 10):
        durations = dag.durations(choice)
        path, length = longest_path(dag, durations)
        if length <= deadline_ms * (1 + 1e-12):
            return True
        pool = _on_every_longest_path(dag, durations, length, succs) or path
        moves = sorted(m for u in pool if (m := _cheapest_raise(dag, u, choice[u], candidates[u])) is not None)
        if not moves and pool is not path:
            moves = sorted(m for u in path if (m := _cheapest_raise(dag, u, choice[u], candidates[u])) is not None)
        if not moves:
            return False
        choice[:] = _best_effect(dag, choice, moves[:_REPAIR_TRIES], length, length - deadline_ms)
    return False


def _best_effect(dag: ClockDag, choice: list[int], moves, length_ms: float, over_ms: float) -> list[int]:
    """Of a few cheap raises, the one with the least energy per ms the makespan actually falls (near-longest
    paths elsewhere can make a raise shorten the iteration by far less than the unit)."""
    best, best_rate = None, float("inf")
    for _, u, c in moves:
        trial = list(choice)
        trial[u] = c
        gain_ms = min(length_ms - dag.makespan_ms(dag.durations(trial)), over_ms)
        if gain_ms > _EPS_MS:
            rate = (dag.reduced_j(u, c) - dag.reduced_j(u, choice[u])) / gain_ms
            if rate < best_rate:
                best, best_rate = trial, rate
    if best is None:  # no single raise shortens the iteration: take the cheapest, the next round goes on
        best = list(choice)
        best[moves[0][1]] = moves[0][2]
    return best


def _on_every_longest_path(dag: ClockDag, durations: list[float], length_ms: float, succs) -> list[int]:
    """The nodes every longest path passes through (path counts through each node = all longest paths)."""
    head = dag.heads(durations)
    tail = dag.tails(durations, succs)
    tol = 1e-9 * length_ms
    crit = [h + d + t >= length_ms - tol for h, d, t in zip(head, durations, tail)]
    n = len(durations)
    before = [0.0] * n  # longest paths from a source to the node's start
    for j in range(n):
        if crit[j]:
            ins = [before[i] for i in dag.preds[j] if crit[i] and abs(head[i] + durations[i] - head[j]) <= tol]
            before[j] = sum(ins) if ins else (1.0 if head[j] <= tol else 0.0)
    after = [0.0] * n
    for i in range(n - 1, -1, -1):
        if crit[i]:
            outs = [after[j] for j in succs[i] if crit[j] and abs(tail[i] - tail[j] - durations[j]) <= tol]
            after[i] = sum(outs) if outs else (1.0 if tail[i] <= tol else 0.0)
    total = sum(before[u] * after[u] for u in range(n) if crit[u] and head[u] <= tol)
    return [u for u in range(n) if crit[u] and dag.stages[u] is not None
            and before[u] * after[u] >= total * (1 - 1e-9)]


def _cheapest_raise(dag: ClockDag, u: int, c: int, options: list[int]) -> tuple[float, int, int] | None:
    """(J per ms saved, node, option) of the best faster option of ``u`` (hull options, and the next faster
    clock for the smallest step), or None."""
    d_ms = dag.options[u][c].duration_ms
    reduced = dag.reduced_j(u, c)
    best = None
    for c2 in (*options, c - 1):
        if c2 < 0:
            continue
        saved_ms = d_ms - dag.options[u][c2].duration_ms
        if saved_ms > _EPS_MS:
            rate = (dag.reduced_j(u, c2) - reduced) / saved_ms
            if best is None or rate < best[0]:
                best = (rate, u, c2)
    return best
