"""The end of a run: the summary (rich table and words), the ``--report`` JSON and the ``--plot`` Gantt.

Rank 0's result is the controller's (:func:`envpipe.controller.result.build_result`) plus the loss curve and
the engine's optimizer step count; this module only derives and renders. Every energy figure carries its
label: simulated (sim agent) or measured, and paired, unpaired or predicted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from envpipe.files import write_json_atomic
from envpipe.train.config import TrainConfig

REPORT_FORMAT = "envpipe-train-report/2"
# Config fields that describe the machine rather than the run; left out of the report.
_NOT_REPORTED = ("ds_config", "job_id")
_RESULT_KEYS = (
    "agent",
    "gpu",
    "placement",  # per rank: stage, host, GPU UUID from that host's agent
    "world_size",
    "schedule",
    "clocks",
    "phases",
    "profile",
    "plan_fingerprint",
    "compare",
    "predicted",
    "drift",
    "warnings",
    "controller",
    "losses",
    "last_iteration",
    "shutdown_warning",
    "optimizer_steps",
)


def build_report(config: TrainConfig, result: dict[str, Any]) -> dict[str, Any]:
    """The report: config, summary (steps, loss, windows, savings with their labels), and the result."""
    world = int(result.get("world_size", config.stages))
    tokens = config.tokens_per_iteration * max(1, world // config.stages)
    baseline = _window_summary(result.get("baseline"), tokens)
    at_plan = _window_summary(result.get("at_plan"), tokens)
    losses = result.get("losses") or []
    summary = {
        "energy_label": "simulated" if result["simulated"] else "measured",
        "tokens_per_iteration": tokens,
        "optimizer_steps": result.get("optimizer_steps"),
        "step_counts": result["controller"]["step_counts"],
        "planning_steps": result["controller"]["planning_steps"],
        "loss_first": losses[0]["loss"] if losses else None,
        "loss_last": losses[-1]["loss"] if losses else None,
        "baseline": baseline,
        "baseline_origin": result.get("baseline_origin"),
        "at_plan": at_plan,
        "unpaired": result.get("unpaired"),
        "paired": result.get("compare"),
        "predicted": result.get("predicted"),
        "verdict": (result.get("compare") or {}).get("verdict", []),
        "energy_unavailable_windows": int(result.get("energy_unavailable_windows", 0)),
    }
    config_dict = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_REPORTED}
    return {
        "format": REPORT_FORMAT,
        "simulated": bool(result["simulated"]),
        "energy_source": result["energy_source"],
        "config": config_dict,
        "summary": summary,
        **{k: result.get(k) for k in _RESULT_KEYS},
        "baseline": result.get("baseline"),
        "at_plan": result.get("at_plan"),
    }


def _window_summary(window: dict[str, Any] | None, tokens_per_iteration: int) -> dict[str, Any] | None:
    if window is None:
        return None
    iteration_ms = float(window["iteration_ms"])
    return {
        "iteration_ms": iteration_ms,
        "tokens_per_s": tokens_per_iteration / (iteration_ms / 1000.0) if iteration_ms > 0 else None,
        "energy_j_per_iteration": window["energy_j"],
        "stage_energy_j": {str(k): v for k, v in window["stage_energy_j"].items()},
        "iterations": int(window["iterations"]),
        "statistic": window.get("statistic", ""),
    }


def print_summary(report: dict[str, Any], console: Any) -> None:
    """The final words and table: steps, loss, baseline vs at-plan, paired and predicted savings."""
    summary, config = report["summary"], report["config"]
    label = summary["energy_label"]
    console.print(_steps_line(summary), highlight=False)
    base, plan = summary["baseline"], summary["at_plan"]
    if summary["loss_first"] is not None and (base is None or plan is None):  # else a row of the table
        console.print(f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}", highlight=False)
    if base is not None and plan is not None:
        console.print(_window_table(report, base, plan, label))
        unpaired = summary["unpaired"] or {}
        saving = unpaired.get("energy_saving")
        console.print(
            f"unpaired ({label}): {_pct(saving)} energy saving at {_pct(unpaired.get('slowdown'))} iteration "
            f"time against {_baseline_words(summary)} (not side by side: a change of load in between "
            "counts; `--compare` measures in pairs)",
            highlight=False,
        )
    elif base is not None:
        console.print(
            "the run ended before the plan was reached: raise --steps (planning took "
            f"{summary['planning_steps']} steps)",
            highlight=False,
        )
    paired = summary["paired"]
    if paired is not None:
        s, t = paired["energy_saving"], paired["slowdown"]
        saving = (
            "n/a"
            if s is None
            else f"{_pct(s['median'])} (95% interval {_pct(s['low'])} to {_pct(s['high'])})"
        )
        console.print(
            f"paired ({label}, {paired['rounds']} rounds): median saving {saving}; median slowdown "
            f"{_pct(t['median'])} (95% interval {_pct(t['low'])} to {_pct(t['high'])}), bound "
            f"{paired['slowdown_bound']:.0%}",
            highlight=False,
        )
        for line in paired["verdict"]:
            console.print(f"[bold]{line}[/]", highlight=False)
    predicted = summary["predicted"]
    if predicted is not None:
        console.print(
            f"{predicted['label']}: {_pct(predicted['energy_saving'])} energy saving at "
            f"{_pct(predicted['slowdown'])} iteration time",
            highlight=False,
        )
    missing = summary["energy_unavailable_windows"]
    if missing:
        console.print(
            f"energy unavailable for {missing} measurement window(s): the agent did not answer; "
            "those windows are left out (not counted as zero)",
            highlight=False,
        )
    for text in report.get("warnings") or []:
        console.print(f"[yellow]{text}[/]", highlight=False, markup=True)
    console.print(_plan_line(report), highlight=False)
    drift = report.get("drift") or {}
    if drift.get("replans"):
        for replan in drift["replans"]:
            console.print(
                f"drift guard re-planned at step {replan['step']}: {replan['reason']}", highlight=False
            )
    del config


def _baseline_words(summary: dict[str, Any]) -> str:
    origin = summary.get("baseline_origin") or {}
    if origin.get("stored"):
        return f"the {origin['label']}: {origin.get('plan')}, measured {origin.get('date')}"
    return "the baseline window at the start"


def _steps_line(summary: dict[str, Any]) -> str:
    counts = summary["step_counts"]
    parts = ", ".join(f"{name} {n}" for name, n in counts.items())
    return f"{summary['optimizer_steps']} optimizer steps ({parts})"


def _window_table(report: dict[str, Any], base: dict, plan: dict, label: str) -> Any:
    from rich.table import Table

    config = report["config"]
    table = Table(
        title=f"envpipe train: {config['type']} · {report['schedule']['name']} · "
        f"reconfig {config['reconfig']}",
        caption=f"energy ({label}): {report['energy_source']}\nat plan: {plan['statistic']}",
    )
    for name, justify in (
        ("", "left"),
        (
            "baseline (plan file)"
            if (report["summary"].get("baseline_origin") or {}).get("stored")
            else "baseline window",
            "right",
        ),
        ("at plan", "right"),
        ("change", "right"),
    ):
        table.add_column(name, justify=justify)
    table.add_row(
        "tokens/s",
        f"{base['tokens_per_s']:,.0f}",
        f"{plan['tokens_per_s']:,.0f}",
        _pct(plan["tokens_per_s"] / base["tokens_per_s"] - 1.0),
    )
    table.add_row(
        "iteration time (ms)",
        f"{base['iteration_ms']:.1f}",
        f"{plan['iteration_ms']:.1f}",
        _pct(plan["iteration_ms"] / base["iteration_ms"] - 1.0),
    )
    first, last = report["summary"]["loss_first"], report["summary"]["loss_last"]
    if first is not None:
        table.add_row(
            "loss (the run's first / last step)", f"{first:.3f}", f"{last:.3f}", f"{last - first:+.3f}"
        )
    for stage in sorted(base["stage_energy_j"], key=int):
        b, p = base["stage_energy_j"][stage], plan["stage_energy_j"].get(stage)
        table.add_row(
            f"stage {stage} energy/it (J, {label})",
            _j(b),
            _j(p),
            _pct(p / b - 1.0) if b and p is not None else "-",
        )
    b, p = base["energy_j_per_iteration"], plan["energy_j_per_iteration"]
    table.add_row(
        f"total energy/it (J, {label})",
        _j(b),
        _j(p),
        _pct(p / b - 1.0) if b and p is not None else "-",
        style="bold",
    )
    return table


def _plan_line(report: dict[str, Any]) -> str:
    """One line: the schedule's r and, per stage, how many units run at which clock."""
    stages = []
    for stage, units in sorted((report.get("clocks") or {}).items(), key=lambda kv: int(kv[0])):
        counts: dict[int, int] = {}
        for clock_mhz in units.values():
            counts[clock_mhz] = counts.get(clock_mhz, 0) + 1
        stages.append(f"s{stage} " + " ".join(f"{n}x{c}" for c, n in sorted(counts.items(), reverse=True)))
    r = report["schedule"].get("r")
    return f"schedule {report['schedule']['name']} r={r}; clocks (units x MHz): " + " | ".join(stages)


def _j(value: float | None) -> str:
    return "unavailable" if value is None else f"{value:.3f}"


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction * 100:+.1f}%"


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write JSON atomically: an existing file is replaced only by a complete one."""
    write_json_atomic(report, path)


def draw_plot(report: dict[str, Any], path: str | Path) -> None:
    """Draw the measured Gantt chart of the last gathered step with the simulator's plot code."""
    from types import SimpleNamespace

    from envpipe.render import gantt_png
    from envpipe.sim import UnitSpan

    config = report["config"]
    times = (
        "measured times, DVFS emulated (simulated stretch)" if config["emulate_dvfs"] else "measured times"
    )
    title = (
        f"envpipe train, last measured step ({times}): {config['type']} / {report['schedule']['name']} / "
        f"{config['reconfig']}"
    )
    spans = report["last_iteration"] or []
    timeline = [UnitSpan(s["stage"], s["unit"], s["start_ms"], s["end_ms"], s["clock_mhz"]) for s in spans]
    stages = 1 + max((s.stage for s in timeline), default=0)
    busy_ms = [sum(s.end_ms - s.start_ms for s in timeline if s.stage == stage) for stage in range(stages)]
    # gantt_png reads these SimResult fields; a measured step has no critical path of its own.
    measured = SimpleNamespace(
        timeline=timeline,
        stage_busy_ms=busy_ms,
        critical_path=[],
        model=title,
        simulated=False,
        iteration_time_ms=max((s.end_ms for s in timeline), default=1.0),
    )
    summary = report["summary"]
    clocks = (report.get("gpu") or {}).get("clocks_mhz") or []
    paired = (summary.get("paired") or {}).get("energy_saving") or {}
    saving = paired.get("median", (summary.get("unpaired") or {}).get("energy_saving"))
    gantt_png(
        measured,
        path,
        title=title,
        clock_range_mhz=(min(clocks), max(clocks)) if clocks else None,  # the card's: same colour, same clock
        energy_j=(summary.get("at_plan") or {}).get("energy_j_per_iteration"),
        saving=saving,
        energy_label=summary["energy_label"],
    )
