"""``envpipe simulate``: simulated iteration time and energy of a schedule vs. 1F1B at the max clock.

Every number it prints comes from a model (named in the output) and is labelled simulated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from envpipe.transports import DEFAULT_TRANSPORT, TRANSPORTS
from envpipe_cli._errors import user_errors
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from envpipe.ir import ClockPlan, Schedule
    from envpipe.sim import CostModel

RECONFIG_CHOICES = ("default", "greedy", "balanced", "optimal", "paper", "paper-greedy")  # envpipe.planner.POLICIES


def simulate(
    stages: Annotated[int, typer.Option("--stages", "-S", help="Pipeline stages S.", min=1)] = 4,
    micro_batches: Annotated[int, typer.Option("--micro-batches", "-M", help="Micro-batches M.", min=1)] = 16,
    clock_type: Annotated[
        str, typer.Option("--type", help="Clock type: baseline, uniform or envelope.")
    ] = "envelope",
    scheduling: Annotated[str, typer.Option("--scheduling", help="Schedule: 1f1b or ours.")] = "ours",
    reconfig: Annotated[
        str, typer.Option("--reconfig", help="Reconfiguration policy (default = none).")
    ] = "default",
    gpu: Annotated[str, typer.Option("--gpu", help="Card: h100, v100, rtx3090, a100.")] = "h100",
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="DVFS model: central (default), conservative, optimistic."),
    ] = None,
    model_params: Annotated[
        Optional[str],
        typer.Option("--model-params", help="Explicit model, e.g. a=0.6,p0=0.5,g=3.5,idle=0.18."),
    ] = None,
    profile: Annotated[
        Optional[Path], typer.Option("--profile", help="Measured profile JSON (envpipe profile writes it).")
    ] = None,
    fwd_ms: Annotated[
        Optional[str],
        typer.Option(
            "--fwd-ms", help="Forward time at the top clock: one value or one per stage, e.g. 10,10,10,14."
        ),
    ] = None,
    bwd_ms: Annotated[
        Optional[str],
        typer.Option("--bwd-ms", help="Backward time at the top clock: one value or one per stage."),
    ] = None,
    r: Annotated[
        Optional[str],
        typer.Option(
            "--r", help="ours only: extra warm-up forwards per stage, e.g. 4,3,1,0 (default: computed)."
        ),
    ] = None,
    p2p_transport: Annotated[
        str,
        typer.Option(
            "--p2p-transport",
            help=f"Refuse a schedule that can hang on this transport's NCCL streams: {', '.join(TRANSPORTS)}.",
        ),
    ] = DEFAULT_TRANSPORT,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a Gantt chart PNG here.")] = None,
) -> None:
    """Simulate one training iteration and compare it with 1F1B at the maximum clock (simulated)."""
    with user_errors():
        costs = _costs(stages, gpu, model, model_params, profile, fwd_ms, bwd_ms)
        report = run_simulation(
            costs,
            stages,
            micro_batches,
            scheduling,
            clock_type,
            reconfig,
            _int_list(r, "--r") if r else None,
            transport=p2p_transport,
        )
        if plot is not None:
            from envpipe.render import gantt_png

            gantt_png(report["_result"], plot, title=_plot_title(report))
        _print(report, as_json)


def run_simulation(
    costs: CostModel,
    stages: int,
    micro_batches: int,
    scheduling: str,
    clock_type: str,
    reconfig: str,
    r: list[int] | None,
    *,
    transport: str = DEFAULT_TRANSPORT,
) -> dict[str, Any]:
    """Build, verify (also on ``transport``'s GPU streams) and simulate the schedule and the 1F1B baseline;
    return the report (JSON-ready)."""
    from envpipe.clock_types import assign_clocks
    from envpipe.schedules import get_schedule
    from envpipe.sim import simulate as run
    from envpipe.verify import verify

    schedule = get_schedule(scheduling, stages, micro_batches, r, costs=costs)
    verify(schedule, transport=transport)
    clocks = reconfigure(reconfig, schedule, costs, assign_clocks(schedule, costs, clock_type))
    result = run(schedule, costs, clocks)
    baseline_schedule = get_schedule("1f1b", stages, micro_batches)
    baseline = run(baseline_schedule, costs, assign_clocks(baseline_schedule, costs, "baseline"))
    return {
        "simulated": True,
        "model": costs.describe(),
        "scheduling": scheduling,
        "type": clock_type,
        "reconfig": reconfig,
        "stages": stages,
        "micro_batches": micro_batches,
        "iteration_time_s": result.iteration_time_s,
        "energy_j": result.energy_j,
        "stage_energy_j": list(result.stage_energy_j),
        "stage_busy_ms": list(result.stage_busy_ms),
        "stage_idle_ms": list(result.stage_idle_ms),
        "baseline": {
            "scheduling": "1f1b",
            "type": "baseline",
            "iteration_time_s": baseline.iteration_time_s,
            "energy_j": baseline.energy_j,
        },
        "energy_saving": 1.0 - result.energy_j / baseline.energy_j,
        "slowdown": result.iteration_time_ms / baseline.iteration_time_ms - 1.0,
        "r": list(schedule.r),
        "f_low_mhz": [costs.f_low_mhz(s) for s in range(stages)],
        "order": [[u.unit for u in schedule.units(s)] for s in range(stages)],
        "clocks_mhz": [[clocks[s][u.unit] for u in schedule.units(s)] for s in range(stages)],
        "critical_path": [[s, u] for s, u in result.critical_path],
        "_result": result,
    }


def reconfigure(policy: str, schedule: Schedule, costs: CostModel, clocks: ClockPlan) -> ClockPlan:
    """Apply ``--reconfig`` to the clock type's plan: ``default`` keeps it, the others run the planner on it."""
    if policy not in RECONFIG_CHOICES:
        raise ValueError(
            f"--reconfig {policy!r} is not available; choose one of {', '.join(RECONFIG_CHOICES)}"
        )
    if policy == "default":
        return clocks
    from envpipe.planner import plan_clocks

    return plan_clocks(schedule, costs, policy, start=clocks).clocks


def _costs(
    stages: int,
    gpu: str,
    model: str | None,
    model_params: str | None,
    profile: Path | None,
    fwd_ms: str | None,
    bwd_ms: str | None,
) -> CostModel:
    from envpipe_agent.dvfs import model_from_params

    from envpipe.sim import CostModel, load_profile

    given = [
        name
        for name, value in (("--model", model), ("--model-params", model_params), ("--profile", profile))
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give only one of --model, --model-params, --profile (got {' and '.join(given)})")
    curve: Any = model_from_params(model_params) if model_params else (model or "central")
    return CostModel.build(
        stages,
        gpu=gpu,
        model=curve,
        profile=load_profile(profile) if profile else None,
        fwd_ms=_float_list(fwd_ms, "--fwd-ms") if fwd_ms else None,
        bwd_ms=_float_list(bwd_ms, "--bwd-ms") if bwd_ms else None,
    )


def _float_list(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"{option} takes numbers separated by commas, e.g. 10,10,10,14; got {text!r}"
        ) from None


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes integers separated by commas, e.g. 4,3,1,0; got {text!r}") from None


def _plot_title(report: dict[str, Any]) -> str:
    return (
        f"simulated: {report['scheduling']} / {report['type']} / reconfig {report['reconfig']}, "
        f"S={report['stages']} M={report['micro_batches']} r={report['r']}\n{report['model']}"
    )


def _print(report: dict[str, Any], as_json: bool) -> None:
    console = Console()
    if as_json:
        console.print_json(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}))
        return
    table = Table(title=f"envpipe simulate (simulated): S={report['stages']} M={report['micro_batches']}")
    for header in ("run", "iteration (ms)", "energy (J)", "saving", "slowdown"):
        table.add_column(header, justify="left" if header == "run" else "right", no_wrap=True)
    base = report["baseline"]
    table.add_row(
        "baseline (1f1b, max clock)",
        f"{base['iteration_time_s'] * 1e3:.2f}",
        f"{base['energy_j']:.1f}",
        "-",
        "-",
    )
    table.add_row(
        f"{report['scheduling']} / {report['type']} / {report['reconfig']}",
        f"{report['iteration_time_s'] * 1e3:.2f}",
        f"{report['energy_j']:.1f}",
        f"{report['energy_saving'] * 100:.1f}%",
        f"{report['slowdown'] * 100:+.1f}%",
    )
    console.print(table)
    console.print(_stage_table(report))
    console.print(f"r = {report['r']}", highlight=False)
    console.print(f"model (simulated): {report['model']}", highlight=False)


def _stage_table(report: dict[str, Any]) -> Table:
    """Per stage: busy and idle time, energy, f_low and how many units lie on the critical path."""
    table = Table(title="per stage (simulated)")
    for header in ("stage", "busy (ms)", "idle (ms)", "energy (J)", "f_low (MHz)", "critical units"):
        table.add_column(header, justify="right", no_wrap=True)
    on_path = [sum(1 for s, _ in report["critical_path"] if s == stage) for stage in range(report["stages"])]
    for stage in range(report["stages"]):
        table.add_row(
            str(stage),
            f"{report['stage_busy_ms'][stage]:.1f}",
            f"{report['stage_idle_ms'][stage]:.1f}",
            f"{report['stage_energy_j'][stage]:.1f}",
            str(report["f_low_mhz"][stage]),
            str(on_path[stage]),
        )
    return table
