"""The controller's result (rank 0): what ran, what it cost, and what it saved, in honest words.

Savings come in up to three kinds, each labelled: *paired* (``compare_rounds``: baseline and plan windows
side by side; the median with a 95 % interval over the rounds), *unpaired* (the at-plan steps against the
baseline window at the start, or against the baseline stored in a reused plan file, measured by an earlier
run: the only measured figure of a production run) and *predicted* (the simulator on the measured per-unit
profile).
"""

from __future__ import annotations

from typing import Any

from envpipe.controller.core import Context
from envpipe.controller.stats import median_interval
from envpipe.controller.windows import merge_windows, span_dict

PLANNING_STATES = ("warm-up", "baseline", "profiling", "reconfiguration", "re-plan")


def build_result(ctx: Context) -> dict[str, Any]:
    """The result dict (JSON-ready) of a run so far."""
    from envpipe.controller.states import energy_source

    at_plan = merge_windows(ctx.at_plan) if ctx.at_plan else None
    if at_plan is not None:
        at_plan.statistic = f"all {at_plan.iterations} at-plan steps ({len(ctx.at_plan)} energy window(s))"
    compare = compare_summary(ctx)
    unpaired = _unpaired(ctx.baseline, at_plan, stored=ctx.baseline_source is not None)
    r = getattr(ctx.schedule, "r", None)
    return {
        "simulated": ctx.simulated,
        "energy_source": energy_source(ctx),
        "gpu": {"name": ctx.gpu.name, "clocks_mhz": list(ctx.gpu.clocks_mhz)},
        "world_size": ctx.comm.world_size,
        "controller": {
            "state": ctx.state,
            "steps": ctx.steps_done,
            "step_counts": dict(ctx.step_counts),
            "planning_steps": sum(ctx.step_counts[s] for s in PLANNING_STATES),
            "planned": ctx.planned,
            "target_ms": ctx.target_ms,
            "baseline_ms": ctx.baseline_ms,
        },
        "schedule": {
            "name": ctx.schedule.name,
            "r": None if r is None else list(r),
            "text": ctx.schedule.render(),
        },
        "clocks": {str(s): units for s, units in (ctx.clocks or {}).items()},
        "phases": ctx.phases,
        "profile": ctx.profile,
        "plan_fingerprint": None if ctx.plan is None else ctx.plan["fingerprint"],
        "baseline": None if ctx.baseline is None else ctx.baseline.to_dict(),
        "baseline_origin": baseline_origin(ctx),
        "at_plan": None if at_plan is None else at_plan.to_dict(),
        "unpaired": unpaired,
        "compare": compare,
        "predicted": ctx.predicted,
        "drift": ctx.drift,
        "warnings": list(ctx.warnings),
        "energy_unavailable_windows": ctx.unavailable_windows,
        "last_iteration": [span_dict(s) for s in ctx.last_timeline],
    }


def baseline_origin(ctx: Context) -> dict[str, Any] | None:
    """Where the run's baseline comes from: its own window at the start, or the plan file's stored one."""
    from envpipe.controller.planfile import STORED_BASELINE_LABEL

    if ctx.baseline is None:
        return None
    stored = ctx.baseline_source
    if stored is None:
        return {"stored": False, "label": "the baseline window at the start of this run"}
    return {
        "stored": True,
        "label": STORED_BASELINE_LABEL,
        "plan": ctx.config.plan,
        "date": stored.get("date"),
    }


def _unpaired(baseline: Any, at_plan: Any, *, stored: bool) -> dict[str, Any] | None:
    """The at-plan steps against the start's baseline window or the plan file's stored baseline (not side by
    side: load changes count)."""
    from envpipe.controller.planfile import STORED_BASELINE_LABEL

    if baseline is None or at_plan is None:
        return None
    base_j, plan_j = baseline.energy_j, at_plan.energy_j
    against = f"the {STORED_BASELINE_LABEL}" if stored else "the baseline window at the start"
    return {
        "label": f"unpaired (at-plan steps vs {against})",
        "energy_saving": 1.0 - plan_j / base_j if base_j and plan_j is not None else None,
        "slowdown": at_plan.iteration_ms / baseline.iteration_ms - 1.0,
    }


def compare_summary(ctx: Context) -> dict[str, Any] | None:
    """Paired savings and slowdowns of the rounds: median, 95 % interval, and the verdict in words."""
    if not ctx.rounds:
        return None
    pairs = [(b, p) for b, p in ctx.rounds]
    savings = [1.0 - p.energy_j / b.energy_j for b, p in pairs if b.energy_j and p.energy_j is not None]
    slowdowns = [p.iteration_ms / b.iteration_ms - 1.0 for b, p in pairs]
    saving = median_interval(savings) if savings else None
    slowdown = median_interval(slowdowns)
    bound = ctx.config.slowdown_bound
    return {
        "label": "paired rounds (baseline and plan windows side by side, alternating order)",
        "rounds": len(pairs),
        "paired_savings": savings,
        "paired_slowdowns": slowdowns,
        "energy_saving": None if saving is None else saving.to_dict(),
        "slowdown": slowdown.to_dict(),
        "slowdown_bound": bound,
        "baseline_windows": [b.brief() for b, _ in pairs],
        "plan_windows": [p.brief() for _, p in pairs],
        "verdict": verdict(saving, slowdown, bound),
    }


def verdict(saving: Any, slowdown: Any, bound: float) -> list[str]:
    """What the paired rounds show, in sentences that stay true on a noisy machine."""
    lines = []
    if saving is None:
        lines.append("no paired saving: the agent measured no energy in the rounds")
    elif saving.contains_zero:
        lines.append(
            f"the measured saving is not distinguishable from zero on this machine: its 95% interval "
            f"({_pct(saving.low)} to {_pct(saving.high)}) contains 0"
        )
    else:
        word = "saves" if saving.median > 0 else "costs"
        lines.append(
            f"the plan {word} energy: median paired saving {_pct(saving.median)}, 95% interval "
            f"{_pct(saving.low)} to {_pct(saving.high)}"
        )
    if slowdown.median > bound:
        lines.append(
            f"the plan ran {_pct(slowdown.median)} slower than the baseline (median of the rounds), "
            f"which breaks the {bound:.0%} bound"
        )
    elif slowdown.high is not None and slowdown.high > bound:
        lines.append(
            f"median slowdown {_pct(slowdown.median)} is within the {bound:.0%} bound, but its 95% "
            f"interval reaches {_pct(slowdown.high)}: the bound is not shown to hold"
        )
    else:
        lines.append(f"slowdown {_pct(slowdown.median)} (median) is within the {bound:.0%} bound")
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"
