"""Clock moves shared by the round-based policies: step a unit up or down, lower clocks into shared slack."""

from __future__ import annotations

from collections.abc import Collection

from envpipe.planner.dag import ClockDag, mover_counts, slack_ms

SLACK_MARGIN = 0.9  # use at most 90% of a unit's predicted slack: measured timings are noisy


def faster(dag: ClockDag, node: int, option: int, step_mhz: int) -> int:
    """The option at least ``step_mhz`` above ``option`` (options are by descending clock), else the top."""
    opts = dag.options[node]
    target = opts[option].clock_mhz + step_mhz
    for c in range(option - 1, -1, -1):
        if opts[c].clock_mhz >= target:
            return c
    return 0


def slower(dag: ClockDag, node: int, option: int, step_mhz: int) -> int:
    """The option at least ``step_mhz`` below ``option``, else the lowest."""
    opts = dag.options[node]
    target = opts[option].clock_mhz - step_mhz
    for c in range(option + 1, len(opts)):
        if opts[c].clock_mhz <= target:
            return c
    return len(opts) - 1


def critical_nodes(dag: ClockDag, choice: list[int], succs: list[list[int]], units: Collection[int]) -> list[int]:
    """Units on a longest path of the current plan (no slack against its own makespan)."""
    durations = dag.durations(choice)
    makespan = dag.makespan_ms(durations)
    _, _, slack = slack_ms(dag, durations, makespan, succs)
    tol = 1e-6 * makespan + 1e-9
    return [u for u in units if slack[u] <= tol]


def lower_into_slack(dag: ClockDag, choice: list[int], deadline_ms: float, units: Collection[int],
                     step_mhz: int, *, frozen: Collection[int] = (), min_rate: float = 0.0,
                     single: bool = False) -> list[int]:
    """Lower units that have slack by ``step_mhz`` where that saves energy; returns the units moved.

    Every mover grows by at most ``SLACK_MARGIN * slack / k`` (``k`` = movers on its busiest path), so the
    plan still meets ``deadline_ms`` (bolder shares are taken when the model says they also do). With ``single`` only the one move with the largest saving is made
    (the greedy policy). ``min_rate`` (J per ms added) skips moves that buy too little.
    """
    succs = dag.succs()
    durations = dag.durations(choice)
    _, _, slack = slack_ms(dag, durations, deadline_ms, succs)
    moves: dict[int, tuple[int, float, float]] = {}
    for u in units:
        if u in frozen or slack[u] <= 0:
            continue
        c2 = slower(dag, u, choice[u], step_mhz)
        grow_ms = dag.options[u][c2].duration_ms - durations[u]
        saving_j = dag.reduced_j(u, choice[u]) - dag.reduced_j(u, c2)
        if c2 != choice[u] and saving_j > 0 and grow_ms <= SLACK_MARGIN * slack[u] \
                and saving_j >= min_rate * max(grow_ms, 0.0):
            moves[u] = (c2, grow_ms, saving_j)
    if single and moves:
        u = max(moves, key=lambda k: moves[k][2])
        choice[u] = moves[u][0]
        return [u]
    counts = mover_counts(dag, [u in moves for u in range(len(dag))], succs)
    # Bolder shares first (slack / k**b), kept only if the model predicts the deadline still holds: k counts
    # movers on any path, also on long paths with plenty of slack, so slack / k is often far too cautious.
    for boldness in (0.25, 0.5, 1.0):
        moved = [u for u, (_, grow_ms, _) in moves.items()
                 if grow_ms <= SLACK_MARGIN * slack[u] / counts[u] ** boldness]
        trial = list(choice)
        for u in moved:
            trial[u] = moves[u][0]
        if moved and (boldness == 1.0 or dag.makespan_ms(dag.durations(trial)) <= deadline_ms):
            choice[:] = trial
            return moved
    return _one_by_one(dag, choice, deadline_ms, moves)


_CHECKS_PER_ROUND = 48


def _one_by_one(dag: ClockDag, choice: list[int], deadline_ms: float,
                moves: dict[int, tuple[int, float, float]]) -> list[int]:
    """When slack is spread too thin to share, take single moves by saving rate, each checked on the model."""
    moved: list[int] = []
    ranked = sorted(moves, key=lambda u: -moves[u][2] / max(moves[u][1], 1e-12))
    for u in ranked[:_CHECKS_PER_ROUND]:
        trial = list(choice)
        trial[u] = moves[u][0]
        # Keep the same noise margin as the shared moves: (1 - SLACK_MARGIN) of the growth stays unused.
        if dag.makespan_ms(dag.durations(trial)) <= deadline_ms - (1 - SLACK_MARGIN) * moves[u][1]:
            choice[:] = trial
            moved.append(u)
    return moved
