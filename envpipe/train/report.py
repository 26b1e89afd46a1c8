"""The end of a run: summary numbers, the rich summary table, the ``--report`` JSON and the ``--plot`` Gantt.

Rank 0's result (see :func:`envpipe.train.phases.run_phases`) holds the measured windows; this module only
derives and renders. Energy from the sim agent is labelled "simulated" in the table, the JSON and the plot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from envpipe.train.config import TrainConfig

REPORT_FORMAT = "envpipe-train-report/1"
# Config fields that describe the machine rather than the run; left out of the report.
_NOT_REPORTED = ("ds_config", "job_id")


def build_report(config: TrainConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Build the report: config, summary (throughput, time, energy, saving), phases, plan, last iteration."""
    tokens = config.tokens_per_iteration * int(result.get("dp_size", 1))
    baseline = _window_summary(result["baseline"], tokens)
    steady = _window_summary(result["steady"], tokens)
    base_j, steady_j = baseline["energy_j_per_iteration"], steady["energy_j_per_iteration"]
    # None (agent unavailable) is not zero: no saving can be stated then.
    saving = 1.0 - steady_j / base_j if base_j and steady_j is not None else None
    summary = {
        "energy_label": "simulated" if result["simulated"] else "measured",
        "tokens_per_iteration": tokens,
        "baseline": baseline,
        "steady": steady,
        "energy_saving": saving,
        "slowdown": steady["iteration_ms"] / baseline["iteration_ms"] - 1.0,
        "energy_unavailable_windows": int(result.get("energy_unavailable_windows", 0)),
    }
    config_dict = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_REPORTED}
    return {
        "format": REPORT_FORMAT,
        "simulated": bool(result["simulated"]),
        "energy_source": result["energy_source"],
        "config": config_dict,
        "summary": summary,
        **{
            k: result.get(k)
            for k in (
                "agent",
                "gpu",
                "world_size",
                "dp_size",
                "schedule",
                "clocks",
                "phases",
                "profile",
                "last_iteration",
                "shutdown_warning",
            )
        },
    }


def _window_summary(window: dict[str, Any], tokens_per_iteration: int) -> dict[str, Any]:
    iteration_ms = float(window["iteration_ms"])
    return {
        "iteration_ms": iteration_ms,
        "iteration_ms_median": float(window["iteration_ms_median"]),
        "tokens_per_s": tokens_per_iteration / (iteration_ms / 1000.0) if iteration_ms > 0 else None,
        "energy_j_per_iteration": _joules_or_none(window["energy_j"]),
        "stage_energy_j": {str(k): _joules_or_none(v) for k, v in window["stage_energy_j"].items()},
        "iterations": int(window["iterations"]),
        "statistic": window.get("statistic", "mean over one energy window"),
        "loss_last": window["losses"][-1] if window.get("losses") else None,
    }


def _joules_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def print_summary(report: dict[str, Any], console: Any) -> None:
    """The final table: tokens/s, iteration time, energy per iteration per stage and in total, saving."""
    from rich.table import Table

    summary = report["summary"]
    label = summary["energy_label"]
    base, steady = summary["baseline"], summary["steady"]
    config = report["config"]
    reconfig = f" · reconfig {config['reconfig']}" if config["type"] != "baseline" else ""
    table = Table(
        title=f"envpipe train: {config['type']} · {report['schedule']['name']}{reconfig}",
        caption=f"energy ({label}): {report['energy_source']}\nper iteration: {steady['statistic']}",
    )
    table.add_column("")
    table.add_column("baseline", justify="right")
    table.add_column(f"{config['type']}", justify="right")
    table.add_column("change", justify="right")
    table.add_row(
        "tokens/s",
        f"{base['tokens_per_s']:,.0f}",
        f"{steady['tokens_per_s']:,.0f}",
        _pct(steady["tokens_per_s"] / base["tokens_per_s"] - 1.0),
    )
    table.add_row(
        "iteration time (ms)",
        f"{base['iteration_ms']:.1f}",
        f"{steady['iteration_ms']:.1f}",
        _pct(summary["slowdown"]),
    )
    for stage in sorted(base["stage_energy_j"], key=int):
        b, s = base["stage_energy_j"][stage], steady["stage_energy_j"].get(stage)
        table.add_row(
            f"stage {stage} energy/it (J, {label})",
            _j(b),
            _j(s),
            _pct(s / b - 1.0) if b and s is not None else "-",
        )
    saving = summary["energy_saving"]
    table.add_row(
        f"total energy/it (J, {label})",
        _j(base["energy_j_per_iteration"]),
        _j(steady["energy_j_per_iteration"]),
        _pct(-saving) if saving is not None else "-",
        style="bold",
        end_section=True,
    )
    table.add_row(
        f"energy saving ({label})",
        "",
        "",
        f"{saving * 100:.1f}%" if saving is not None else "-",
        style="bold",
    )
    console.print(table)
    missing = summary.get("energy_unavailable_windows", 0)
    if missing:
        console.print(
            f"energy unavailable for {missing} measurement window(s): the agent did not answer; "
            "those windows are left out (not counted as zero)",
            highlight=False,
        )
    console.print(_plan_line(report), highlight=False)


def _plan_line(report: dict[str, Any]) -> str:
    """One line: the schedule's r and, per stage, how many units run at which clock."""
    stages = []
    for stage, units in sorted(report.get("clocks", {}).items(), key=lambda kv: int(kv[0])):
        counts: dict[int, int] = {}
        for clock_mhz in units.values():
            counts[clock_mhz] = counts.get(clock_mhz, 0) + 1
        stages.append(f"s{stage} " + " ".join(f"{n}x{c}" for c, n in sorted(counts.items(), reverse=True)))
    r = report["schedule"].get("r")
    return f"schedule {report['schedule']['name']} r={r}; clocks (units x MHz): " + " | ".join(stages)


def _j(value: float | None) -> str:
    return "unavailable" if value is None else f"{value:.3f}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:+.1f}%"


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """Write JSON atomically: an existing file is replaced only by a complete one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(report, out, indent=2, sort_keys=False)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def draw_plot(report: dict[str, Any], path: str | Path) -> None:
    """Draw the measured Gantt chart of the last iteration with the simulator's plot code."""
    from envpipe.train.planning import plot_timeline

    config = report["config"]
    times = (
        "measured times, DVFS emulated (simulated stretch)" if config["emulate_dvfs"] else "measured times"
    )
    title = (
        f"envpipe train, last iteration ({times}): {config['type']} / {report['schedule']['name']} / "
        f"{config['reconfig']}"
    )
    plot_timeline(report["last_iteration"], path, title=title)
