"""The controller's states after planning: at-plan (with the drift guard) and the opt-in paired rounds.

At the plan nothing runs per step but the step itself. The at-plan energy is one agent window per stretch
between drift checks (closed and reopened at each check, and closed by ``Controller.finish``); a drift check
gathers the timelines of the :data:`CHECK_SAMPLES` steps before it (one collective every
``recheck_interval`` steps).
"""

from __future__ import annotations

import time
from typing import Any

from envpipe.controller.core import Context, Program, measure
from envpipe.controller.windows import (
    Window,
    median_timeline,
    span_iteration_ms,
    sum_by_stage,
    unit_ms_by_stage,
)

# A stage's unit times must have moved on this many checks in a row: one check sees the median of a few
# steps, and on a loaded machine a burst of load moves that median by several times for a while (2 CPU ranks
# on 2 shared cores: +704 % on one check, back on the next); a real slowdown persists.
MOVE_CONFIRMATIONS = 2
# Checks at a plan before its unit times are judged (their median is the reference; fewer let one burst of
# load set it: with 1-2 checks, 2 CPU ranks on a loaded 2-core machine re-planned on noise 3 times in 400
# steps).
MIN_HISTORY = 3
# Steps whose per-unit median timeline a drift check looks at (the last ones before it).
CHECK_SAMPLES = 5


def at_plan(ctx: Context) -> Program:
    """Every step at the plan; drift checks every ``recheck_interval`` steps; paired rounds if asked for."""
    from envpipe.controller.planning import replan
    from envpipe.controller.states import window_steps

    config = ctx.config
    side_steps = window_steps(ctx, config.compare_steps)
    tail = _compare_tail(ctx, side_steps)
    guard = config.recheck_interval > 0 and ctx.planned and config.type != "baseline"
    _enter(ctx)
    open_segment(ctx)
    since_check = since_compare = 0
    records: list[Any] = []
    while True:
        if tail and config.max_steps - ctx.steps_done <= tail:
            close_segment(ctx)
            yield from compare(ctx, tail // (2 * (1 + side_steps)), side_steps)
            tail = 0
            _enter(ctx)
            open_segment(ctx)
            continue
        yield
        since_check += 1
        since_compare += 1
        if guard and since_check > config.recheck_interval - CHECK_SAMPLES:
            records.append(ctx.port.timeline_record())
        if guard and since_check >= config.recheck_interval:
            started = time.perf_counter()
            close_segment(ctx)
            reason = check_drift(ctx, records)
            records, since_check = [], 0
            if reason is not None:
                yield from replan(ctx, reason)
                _enter(ctx)
            open_segment(ctx)
            if reason is None:  # the check's own cost: window marks, barriers, one gather, the decision
                ctx.drift["check_s"] = ctx.drift.get("check_s", 0.0) + time.perf_counter() - started
        if config.compare_every and since_compare >= config.compare_every:
            close_segment(ctx)
            yield from compare(ctx, 1, side_steps)
            since_compare = 0
            _enter(ctx)
            open_segment(ctx)


def _enter(ctx: Context) -> None:
    remaining = None if ctx.config.max_steps is None else max(ctx.config.max_steps - ctx.steps_done, 0)
    if remaining == 0:
        ctx.state = "at-plan"  # the run ends here: no progress bar for zero steps
        return
    ctx.enter("at-plan", f"at plan ({ctx.schedule.name}, {ctx.config.type})", remaining)


def _compare_tail(ctx: Context, side_steps: int) -> int:
    """Steps the paired rounds at the end of the run take; fewer rounds (warned) if they do not fit."""
    config = ctx.config
    if not config.compare_rounds or config.compare_every is not None or config.max_steps is None:
        return 0
    per_round = 2 * (1 + side_steps)
    remaining = config.max_steps - ctx.steps_done
    rounds = min(config.compare_rounds, remaining // per_round)
    if rounds < config.compare_rounds:
        ctx.warn(
            f"warning: {config.compare_rounds} paired rounds need {config.compare_rounds * per_round} steps "
            f"after planning, {remaining} remain: {rounds} round(s) run; raise --steps for all of them"
        )
    return rounds * per_round


def open_segment(ctx: Context) -> None:
    """Open this rank's at-plan energy window (every rank, in lockstep)."""
    ctx.comm.barrier()
    ctx.open_segment = (ctx.meter.begin(), time.perf_counter(), ctx.step_counts["at-plan"])


def close_segment(ctx: Context) -> None:
    """Close the at-plan window if one is open and keep it (when it held a step) for the summary."""
    if ctx.open_segment is None:
        return
    window_id, start, first = ctx.open_segment
    ctx.open_segment = None
    ctx.comm.barrier()
    wall_ms = (time.perf_counter() - start) * 1e3
    energy = ctx.meter.end(window_id)
    steps = ctx.step_counts["at-plan"] - first
    energy_j = None if energy is None or not steps else energy.energy_j / steps
    gathered = ctx.comm.all_gather(
        (ctx.port.stage, energy_j, ctx.simulated if energy is None else energy.simulated)
    )
    if not steps:
        return
    window = Window(
        iterations=steps,
        iteration_ms=wall_ms / steps,
        iteration_ms_median=wall_ms / steps,
        stage_energy_j=sum_by_stage([(g[0], g[1]) for g in gathered]),
        simulated=all(g[2] for g in gathered),
        losses=[],
        statistic="at-plan steps, one energy window between drift checks",
    )
    if window.energy_j is None:
        ctx.unavailable_windows += 1
    ctx.at_plan.append(window)


def check_drift(ctx: Context, records: list[Any]) -> str | None:
    """One drift check on every rank: the reason to re-plan (rank 0 decides), or None.

    Re-plans when the iteration (first unit start to last unit end, median of the last steps) is over the
    target for ``drift_checks`` checks in a row, or when a stage's forward or backward unit time moved by
    more than ``drift_threshold`` from the median of the earlier checks at this plan, on
    :data:`MOVE_CONFIRMATIONS` checks in a row.
    """
    timelines = ctx.port.gather_timelines(records)
    reason = None
    if ctx.is_rank0 and timelines:
        config, drift = ctx.config, ctx.drift
        timeline = median_timeline(timelines)
        ctx.last_timeline = timeline
        iteration_ms = span_iteration_ms(timeline)
        units = unit_ms_by_stage(timeline)
        drift["checks"] += 1
        over = ctx.target_ms is not None and iteration_ms > ctx.target_ms
        drift["over_bound"] = drift["over_bound"] + 1 if over else 0
        drift["last"] = {"step": ctx.steps_done, "iteration_ms": iteration_ms, "target_ms": ctx.target_ms}
        enough = len(ctx.unit_history) >= MIN_HISTORY
        moved = _moved(_median_units(ctx.unit_history), units) if enough else None
        ctx.unit_history = [*ctx.unit_history[-15:], units]  # the reference: up to 16 checks
        beyond = moved is not None and abs(moved[2]) > config.drift_threshold
        drift["moved"] = drift.get("moved", 0) + 1 if beyond else 0
        if beyond and drift["moved"] >= MOVE_CONFIRMATIONS:
            stage, kind, change = moved
            reason = (
                f"stage {stage} {'forward' if kind == 'F' else 'backward'} units {change:+.0%} against the "
                f"earlier checks at this plan, {drift['moved']} checks in a row (threshold "
                f"{config.drift_threshold:.0%})"
            )
        elif drift["over_bound"] >= config.drift_checks:
            reason = (
                f"iteration {iteration_ms:.1f} ms over the target {ctx.target_ms:.1f} ms for "
                f"{drift['over_bound']} checks in a row"
            )
    return ctx.comm.broadcast(reason)


def _median_units(history: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Per stage and kind, the median unit time over earlier checks (one burst of load does not set it)."""
    import statistics

    out: dict[int, dict[str, float]] = {}
    for stage in history[-1]:
        for kind in history[-1][stage]:
            values = [h[stage][kind] for h in history if kind in h.get(stage, {})]
            out.setdefault(stage, {})[kind] = statistics.median(values)
    return out


def _moved(reference: dict[int, dict[str, float]], now: dict[int, dict[str, float]]) -> tuple | None:
    """The (stage, kind, relative change) with the largest absolute change of unit time."""
    worst = None
    for stage, kinds in now.items():
        for kind, ms in kinds.items():
            before = reference.get(stage, {}).get(kind)
            if before:
                change = ms / before - 1.0
                if worst is None or abs(change) > abs(worst[2]):
                    worst = (stage, kind, change)
    return worst


def compare(ctx: Context, rounds: int, side_steps: int) -> Program:
    """Paired rounds: a baseline window and a plan window side by side, in alternating order per round, so
    that a drift of the machine (a busy neighbour, temperature) hits both sides alike."""
    final = (ctx.schedule, ctx.clocks)
    total = rounds * 2 * side_steps
    ctx.enter("compare", f"paired rounds ({rounds} x baseline + plan)", total)
    done = 0
    for _ in range(rounds):
        index = len(ctx.rounds)
        sides = ("plan", "baseline") if index % 2 else ("baseline", "plan")
        got: dict[str, Window] = {}
        for side in sides:
            if side == "baseline":
                ctx.use_baseline()
            else:
                ctx.use(*final)
            ctx.state = f"compare: {side}"
            got[side] = yield from measure(
                ctx,
                side_steps,
                phase="compare",
                spans=True,
                settle=True,
                info=f"{side} · ",
                offset=done,
                total=total,
            )
            done += side_steps
            if side == "plan":
                plan_timeline = ctx.last_timeline
        ctx.last_timeline = plan_timeline
        ctx.rounds.append((got["baseline"], got["plan"]))
    ctx.use(*final)
    ctx.state = "compare"
    ctx.done("compare", f"{len(ctx.rounds)} paired round(s)")
