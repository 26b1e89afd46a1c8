"""The pure-Python heuristic of the ``optimal`` policy (and the descent that finishes LP-rounded plans).

How the heuristic works:

* Prices. In the relaxation's optimum every unit pays a *time price* (J/ms) and runs at the clock that
  minimises ``reduced energy + price * duration``; the prices are the dual's flow through the critical
  units. Starts are built from estimated prices, scaled together (bisection) until the plan just meets the
  deadline; units without a price keep the top clock. Estimates: (1) the dual by Frank-Wolfe (the flow is an
  average of the longest paths under the durations the prices pick; the common scale follows the
  makespan); (2) ``1 / (critical units running alongside)`` -- every instant carries the same total price,
  so a unit alone on the critical path (first forward, last backward) is worth more time than one of S
  units side by side -- as it is and flattened; (3) from the slow side: every unit at its cheapest clock,
  the slowest critical units raised until the deadline holds.
* Descent (a batched marginal-rate greedy, exact for one shared slack budget). A price ``theta`` falls in
  steps; every unit whose next slower clock saves at least ``theta`` J per ms it adds is a *mover*. A mover
  may grow by ``float_u / k_u`` (its slack against the deadline over the largest number of movers on any
  path through it): on every path the growth sums to at most that path's slack, so the deadline holds
  without re-checking; bolder shares are taken when the makespan check passes.
* Sweeps hand out what remains: backward (each unit may end when its successors must start) and forward.

Every start is descended; the cheapest plan wins.
"""

from __future__ import annotations

import math

from envpipe.planner.dag import ClockDag, mover_counts, slack_ms

_EPS_MS = 1e-9
_PRICE_STEPS = 16  # geometric price levels from the best rate down to ~0.5% of it
_PRICE_FACTOR = 0.72
_ROUNDS_PER_PRICE = 4
_WEIGHT_POWERS = (1.0, 0.5)
_CORE_STARTS = 3
_EXTRA_DUALS = ((1000, 10.0), (400, 10.0), (400, 40.0), (1000, 20.0), (1000, 5.0), (1000, 40.0))
_WORK_BUDGET = 2800  # node-starts: S=8, M=32 (960 nodes) gets the core starts only
_BOLDNESS = (0.25, 0.5)  # first try shares of slack / k**b, checked against the deadline
INF = float("inf")


def solve_heuristic(dag: ClockDag, deadline_ms: float, first: list[int]) -> list[int]:
    """The pure-Python heuristic (module docstring), from the feasible choice ``first``."""
    rates = Rates(dag)
    hulls = hulls_of(dag)
    succs = dag.succs()
    best, best_j = first, dag.evaluate(first)[1]
    # Starts, best first: the dual's prices; the 1/parallelism prices as they are and flatter; then, as the
    # work budget allows, more tries of the dual and the slow side.
    weights = _parallel_weights(dag, first, deadline_ms, succs)
    starts = [
        lambda: scaled_plan(dag, deadline_ms, hulls, _dual_flow(dag, hulls, deadline_ms), first),
        *(lambda p=power: scaled_plan(dag, deadline_ms, hulls, [w if w == INF else w**p for w in weights], first)
          for power in _WEIGHT_POWERS),
    ]
    # Smaller DAGs can afford more tries of the dual (its step rules are not robust): a fixed work budget in
    # node-starts keeps the result deterministic and S=8, M=32 within its time.
    for iterations, gain in _EXTRA_DUALS:
        starts.append(lambda i=iterations, g=gain: scaled_plan(dag, deadline_ms, hulls,
                                                           _dual_flow(dag, hulls, deadline_ms, i, g), first))
    starts.append(lambda: _raised_from_valley(dag, deadline_ms, hulls, succs, first))
    for k, make in enumerate(starts):
        if k >= _CORE_STARTS and len(dag) * k > _WORK_BUDGET:
            break
        choice = make()
        if choice is None:
            continue
        finish_descent(dag, choice, deadline_ms, rates, succs)
        energy = dag.evaluate(choice)[1]
        if energy < best_j - 1e-9:
            best, best_j = list(choice), energy
    return best


def finish_descent(dag: ClockDag, choice: list[int], deadline_ms: float, rates: Rates, succs) -> None:
    """Spend the slack of a feasible ``choice`` in place: price descent, then backward and forward sweeps."""
    _price_descent(dag, choice, deadline_ms, rates, succs)
    _sweep_backward(dag, choice, deadline_ms, rates, succs)
    _sweep_forward(dag, choice, deadline_ms, rates, succs)


class Rates:
    """Per node, the best slower move from each option: (target option, saving rate J/ms, growth ms)."""

    def __init__(self, dag: ClockDag) -> None:
        self.moves: list[list[tuple[int, float, float] | None]] = []
        seen: dict[tuple, list] = {}  # units of one stage and kind share their options: compute them once
        for u, opts in enumerate(dag.options):
            key = _shape_key(dag, u)
            if key not in seen:
                reduced = [dag.reduced_j(u, c) for c in range(len(opts))]
                seen[key] = [_best_move(opts, reduced, c) for c in range(len(opts))]
            self.moves.append(seen[key])

    def max_rate(self) -> float:
        return max((m[1] for per in self.moves for m in per if m is not None), default=0.0)


def _shape_key(dag: ClockDag, u: int) -> tuple:
    """Nodes with equal keys have equal (duration, reduced energy) options."""
    stage = dag.stages[u]
    return id(dag.options[u]), None if stage is None else dag.idle_power_w[stage]


def hulls_of(dag: ClockDag) -> list[_Hull]:
    """Every node's hull, computed once per distinct option set."""
    seen: dict[tuple, _Hull] = {}
    out = []
    for u in range(len(dag)):
        key = _shape_key(dag, u)
        if key not in seen:
            seen[key] = _Hull(dag, u)
        out.append(seen[key])
    return out


def _best_move(opts, reduced: list[float], c: int) -> tuple[int, float, float] | None:
    best: tuple[int, float, float] | None = None
    for c2 in range(c + 1, len(opts)):
        grow_ms = opts[c2].duration_ms - opts[c].duration_ms
        saving_j = reduced[c] - reduced[c2]
        if grow_ms <= _EPS_MS or saving_j <= 0:
            continue
        rate = saving_j / grow_ms
        if best is None or rate > best[1] + 1e-12:
            best = (c2, rate, grow_ms)
    return best


def _advance(rates: Rates, u: int, c: int, allowance_ms: float, price: float) -> tuple[int, float]:
    """Take moves worth at least ``price`` while they fit in ``allowance_ms``; returns (option, growth)."""
    grown = 0.0
    while True:
        move = rates.moves[u][c]
        if move is None or move[1] < price or grown + move[2] > allowance_ms + _EPS_MS:
            return c, grown
        c, grown = move[0], grown + move[2]


def _price_descent(dag: ClockDag, choice: list[int], deadline_ms: float, rates: Rates, succs) -> None:
    price = rates.max_rate()
    for _ in range(_PRICE_STEPS):
        for _round in range(_ROUNDS_PER_PRICE):
            if not _descent_round(dag, choice, deadline_ms, rates, succs, price):
                break
        price *= _PRICE_FACTOR


def _descent_round(dag: ClockDag, choice: list[int], deadline_ms: float, rates: Rates, succs,
                   price: float) -> bool:
    """One round of moves worth >= ``price``; True if anything moved.

    The safe share ``slack / k`` is tried first with a bolder share ``slack / sqrt(k)``: long paths
    with few tight spots make ``k`` far too cautious. The bold round is kept only if the deadline holds.
    """
    durations = dag.durations(choice)
    _, _, slack = slack_ms(dag, durations, deadline_ms, succs)
    movers = []
    for u, c in enumerate(choice):
        move = rates.moves[u][c]
        movers.append(move is not None and move[1] >= price and move[2] <= slack[u] + _EPS_MS)
    if not any(movers):
        return False
    counts = mover_counts(dag, movers, succs)
    for boldness in (*_BOLDNESS, 1.0):
        trial = list(choice)
        for u in range(len(choice)):
            if movers[u]:
                trial[u], _ = _advance(rates, u, choice[u], slack[u] / counts[u] ** boldness, price)
        if trial == choice:
            continue
        if boldness == 1.0 or dag.makespan_ms(dag.durations(trial)) <= deadline_ms * (1 + 1e-12):
            choice[:] = trial
            return True
    return False


def _sweep_backward(dag: ClockDag, choice: list[int], deadline_ms: float, rates: Rates, succs) -> None:
    """Latest-first: each node may finish as late as its successors' (already final) latest starts."""
    durations = dag.durations(choice)
    head = dag.heads(durations)
    latest_start = [0.0] * len(choice)
    for u in range(len(choice) - 1, -1, -1):
        finish = min((latest_start[v] for v in succs[u]), default=deadline_ms)
        c, grown = _advance(rates, u, choice[u], finish - head[u] - durations[u], 0.0)
        choice[u] = c
        latest_start[u] = finish - durations[u] - grown


def _sweep_forward(dag: ClockDag, choice: list[int], deadline_ms: float, rates: Rates, succs) -> None:
    """Earliest-first: each node may grow up to the latest finish its (unchanged) successors allow."""
    durations = dag.durations(choice)
    tail = dag.tails(durations, succs)
    finish_at = [0.0] * len(choice)
    for u in range(len(choice)):
        start = max((finish_at[p] for p in dag.preds[u]), default=0.0)
        c, grown = _advance(rates, u, choice[u], deadline_ms - tail[u] - start - durations[u], 0.0)
        choice[u] = c
        finish_at[u] = start + durations[u] + grown


class _Hull:
    """A node's lower convex hull of (duration, reduced energy): the option it picks at each time price."""

    __slots__ = ("options", "prices")

    def __init__(self, dag: ClockDag, u: int) -> None:
        opts = dag.options[u]
        hull: list[int] = []
        for c in range(len(opts)):  # options by ascending duration
            while len(hull) >= 2 and _cross(dag, u, hull[-2], hull[-1], c) <= 0:
                hull.pop()
            hull.append(c)
        self.options = hull
        # Price at which the pick moves from hull[k] (slower side k+1) -> picking hull[k] needs price >= prices[k].
        self.prices = [_slope(dag, u, hull[k], hull[k + 1]) for k in range(len(hull) - 1)]

    def pick(self, price: float) -> int:
        """The hull option minimising ``reduced + price * duration``."""
        k = len(self.prices)
        for i, p in enumerate(self.prices):  # prices decrease along the hull
            if price >= p:
                k = i
                break
        return self.options[k]


def _slope(dag: ClockDag, u: int, a: int, b: int) -> float:
    da = dag.options[u][b].duration_ms - dag.options[u][a].duration_ms
    return (dag.reduced_j(u, a) - dag.reduced_j(u, b)) / da if da > _EPS_MS else float("inf")


def _cross(dag: ClockDag, u: int, a: int, b: int, c: int) -> float:
    oa, ob, oc = dag.options[u][a], dag.options[u][b], dag.options[u][c]
    ra, rb, rc = dag.reduced_j(u, a), dag.reduced_j(u, b), dag.reduced_j(u, c)
    return (ob.duration_ms - oa.duration_ms) * (rc - ra) - (rb - ra) * (oc.duration_ms - oa.duration_ms)


def scaled_plan(dag: ClockDag, deadline_ms: float, hulls: list[_Hull], weights: list[float],
            floor: list[int]) -> list[int] | None:
    """The lowest common scale of per-node time prices whose plan meets the deadline (None: none does)."""
    def pick(scale: float) -> list[int]:
        return [kept if w == INF else h.pick(scale * w) for h, w, kept in zip(hulls, weights, floor)]

    lo, hi = 0.0, 1.0
    while dag.makespan_ms(dag.durations(pick(hi))) > deadline_ms:
        hi *= 4
        if hi > 1e12:
            return None
    for _ in range(30):
        mid = (lo + hi) / 2
        if dag.makespan_ms(dag.durations(pick(mid))) > deadline_ms:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def _raised_from_valley(dag: ClockDag, deadline_ms: float, hulls: list[_Hull], succs,
                        floor: list[int]) -> list[int] | None:
    """Every unit at its cheapest clock, then the slowest critical units raised a step at a time until the
    deadline holds (the paper's balanced raise, done on the model): the start from the slow side."""
    choice = [h.pick(0.0) if len(dag.options[u]) > 1 else floor[u] for u, h in enumerate(hulls)]
    for _ in range(100_000):
        durations = dag.durations(choice)
        makespan = dag.makespan_ms(durations)
        if makespan <= deadline_ms:
            return choice
        _, _, slack = slack_ms(dag, durations, makespan, succs)
        crit = [u for u in range(len(choice)) if slack[u] <= 1e-9 * makespan and choice[u] > floor[u]]
        if not crit:
            return None
        lowest = min(dag.options[u][choice[u]].clock_mhz for u in crit)
        for u in crit:
            if dag.options[u][choice[u]].clock_mhz == lowest:
                choice[u] -= 1
    return None


def _dual_flow(dag: ClockDag, hulls: list[_Hull], deadline_ms: float, iterations: int = 400,
               gain: float = 20.0) -> list[float]:
    """Time prices from the relaxation's dual, by Frank-Wolfe: the dual's variables are a flow through the
    DAG, its best direction is the longest path under the durations the current prices pick, so the flow
    is an average of longest paths. The common scale follows the makespan (too long: prices up)."""
    n = len(dag)
    flow = [0.0] * n
    scale = max((h.prices[0] for h in hulls if h.prices), default=1.0)
    for k in range(iterations):
        durations = dag.durations([h.pick(scale * f) for h, f in zip(hulls, flow)])
        path, length = longest_path(dag, durations)
        step = 2.0 / (k + 2)
        flow = [(1 - step) * f for f in flow]
        for u in path:
            flow[u] += step
        scale *= math.exp(gain * (length / deadline_ms - 1))
    return [f if f > 0 else INF for f in flow]


def longest_path(dag: ClockDag, durations: list[float]) -> tuple[list[int], float]:
    n = len(durations)
    head = [0.0] * n
    via = [-1] * n
    for j, ps in enumerate(dag.preds):
        for i in ps:
            if head[i] + durations[i] > head[j]:
                head[j], via[j] = head[i] + durations[i], i
    end = max(range(n), key=lambda u: head[u] + durations[u])
    path, u = [], end
    while u != -1:
        path.append(u)
        u = via[u]
    return path, head[end] + durations[end]


def _parallel_weights(dag: ClockDag, choice: list[int], deadline_ms: float, succs) -> list[float]:
    """Time-price weight of every unit: 1 / (critical nodes running alongside), infinite off the critical set.

    Critical here means: on a path that the deadline's extra time can make critical (slack < that time).
    """
    d = dag.durations(choice)
    head = dag.heads(d)
    tail = dag.tails(d, succs)
    span = max(h + x + t for h, x, t in zip(head, d, tail))
    tol = max(deadline_ms - span, 0.0) + 1e-6 * span
    crit = [x > 0 and h + x + t >= span - tol for h, x, t in zip(head, d, tail)]
    start = [round(h, 9) for h in head]
    end = [round(h + x, 9) for h, x in zip(head, d)]
    events = sorted({t for u in range(len(d)) if crit[u] for t in (start[u], end[u])})
    where = {t: k for k, t in enumerate(events)}
    count = [0] * (len(events) + 1)
    for u in range(len(d)):
        if crit[u]:
            count[where[start[u]]] += 1
            count[where[end[u]]] -= 1
    prefix, running = [0.0], 0
    for k in range(len(events) - 1):
        running += count[k]
        prefix.append(prefix[-1] + (events[k + 1] - events[k]) / max(1, running))
    weights = [INF] * len(d)
    for u in range(len(d)):
        if crit[u] and dag.stages[u] is not None:
            weights[u] = (prefix[where[end[u]]] - prefix[where[start[u]]]) / d[u]
    return weights
