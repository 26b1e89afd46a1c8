"""``envpipe simulate``: simulated iteration time and energy of a schedule vs. 1F1B at the max clock.

Every number it prints comes from a model (named in the output) and is labelled simulated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from envpipe_agent.dvfs import CARDS, MODELS
from envpipe_cli._choices import choice_enum, deprecated, value_of
from envpipe_cli._console import stdout_console
from envpipe_cli._errors import err_console, user_errors
from rich.table import Table

from envpipe.clock_types import CLOCK_TYPES
from envpipe.controller.config import ControllerConfig
from envpipe.planner import POLICIES
from envpipe.schedules import SCHEDULES
from envpipe.transports import DEFAULT_TRANSPORT, TRANSPORTS

if TYPE_CHECKING:
    from envpipe.ir import ClockPlan, Schedule
    from envpipe.sim import CostModel

_DEFAULTS = ControllerConfig()  # the same defaults as `envpipe train`
# Every list of choices comes from its registry (docs/registries.md).
ClockTypeChoice = choice_enum("ClockTypeChoice", CLOCK_TYPES)
ScheduleChoice = choice_enum("ScheduleChoice", [*SCHEDULES, "best"])
ReferenceChoice = choice_enum("ReferenceChoice", SCHEDULES)
PolicyChoice = choice_enum("PolicyChoice", POLICIES)
CardChoice = choice_enum("CardChoice", CARDS)
DvfsModelChoice = choice_enum("DvfsModelChoice", MODELS)
TransportChoice = choice_enum("TransportChoice", TRANSPORTS)


def simulate(
    stages: Annotated[
        int,
        typer.Option("--stages", "-S", help="Pipeline GPUs S (one stage each; interleaved, zb-v: v each).", min=1),
    ] = 4,
    micro_batches: Annotated[int, typer.Option("--micro-batches", "-M", help="Micro-batches M.", min=1)] = 16,
    clock_type: Annotated[
        ClockTypeChoice, typer.Option("--type", help="Clock type: " + CLOCK_TYPES.help() + ".")
    ] = _DEFAULTS.type,
    scheduling: Annotated[
        ScheduleChoice,
        typer.Option(
            "--scheduling",
            help="Schedule: " + SCHEDULES.help() + "; or best: the joint search over all of them "
            "(family, parameters and clocks; --reconfig picks its planner, default optimal).",
        ),
    ] = _DEFAULTS.scheduling,
    reconfig: Annotated[
        Optional[PolicyChoice],
        typer.Option(
            "--reconfig",
            help="Reconfiguration policy: " + POLICIES.help() + f". [default: {_DEFAULTS.reconfig}; "
            "optimal for best and --frontier]",
        ),
    ] = None,
    card: Annotated[Optional[CardChoice], typer.Option("--card", help="Card model. [default: h100]")] = None,
    dvfs_model: Annotated[
        Optional[DvfsModelChoice],
        typer.Option("--dvfs-model", help=f"DVFS curve. [default: {_DEFAULTS.dvfs_model}]"),
    ] = None,
    model_params: Annotated[
        Optional[str],
        typer.Option("--model-params", help="Explicit DVFS curve, e.g. a=0.6,p0=0.5,g=3.5,idle=0.18."),
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
    virtual_stages: Annotated[
        Optional[int],
        typer.Option("--virtual-stages", help="interleaved only: stages per GPU v (default 2).", min=1),
    ] = None,
    reference: Annotated[
        ReferenceChoice,
        typer.Option(
            "--reference",
            help="The schedule (at the top clocks) that savings, slowdowns and the deadline are measured "
            "against.",
        ),
    ] = "1f1b",
    slowdown_bound: Annotated[
        float,
        typer.Option("--slowdown-bound", help="Deadline = reference time x (1 + this); e.g. 0.01 for 1%."),
    ] = 0.01,
    deadline_ms: Annotated[
        Optional[float],
        typer.Option("--deadline-ms", help="An absolute deadline (ms, simulated) instead of --slowdown-bound.",
                     min=0.001),
    ] = None,
    memory_cap: Annotated[
        Optional[float],
        typer.Option(
            "--memory-cap",
            help="Most activations per GPU, in micro-batches of a GPU's share of the model (1F1B holds S).",
        ),
    ] = None,
    frontier: Annotated[
        bool,
        typer.Option("--frontier", help="Energy against deadline for every schedule family (table, --json, --plot)."),
    ] = False,
    p2p_transport: Annotated[
        TransportChoice,
        typer.Option("--p2p-transport", help="Refuse a schedule that can hang on this transport's NCCL streams."),
    ] = DEFAULT_TRANSPORT,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a Gantt chart PNG here.")] = None,
    old_gpu: Annotated[Optional[str], typer.Option("--gpu", hidden=True, help="Old spelling of --card.")] = None,
    old_model: Annotated[
        Optional[str], typer.Option("--model", hidden=True, help="Old spelling of --dvfs-model.")
    ] = None,
) -> None:
    """Simulate one training iteration and compare it with the reference (1F1B) at the top clock (simulated)."""
    with user_errors():
        card_name = deprecated("--gpu", "--card", old_gpu, value_of(card)) or "h100"
        curve = deprecated("--model", "--dvfs-model", old_model, value_of(dvfs_model))
        clock_type, scheduling, reconfig = value_of(clock_type), value_of(scheduling), value_of(reconfig)
        reference, p2p_transport = value_of(reference), value_of(p2p_transport)
        if reconfig is None:
            reconfig = "optimal" if frontier or scheduling == "best" else _DEFAULTS.reconfig
        costs = _costs(stages, card_name, curve, model_params, profile, fwd_ms, bwd_ms)
        if frontier and deadline_ms is not None:
            raise ValueError("--deadline-ms does not apply to --frontier, which sweeps deadlines; drop one")
        if frontier or scheduling == "best":
            from envpipe_cli import _search

            _search.run(frontier, stages, micro_batches, costs, reference=reference, bound=slowdown_bound,
                        deadline_ms=deadline_ms, memory_cap=memory_cap, policy=reconfig, as_json=as_json,
                        plot=plot)
            return
        report = run_simulation(
            costs,
            stages,
            micro_batches,
            scheduling,
            clock_type,
            reconfig,
            _int_list(r, "--r") if r else None,
            transport=p2p_transport,
            virtual_stages=virtual_stages,
            reference=reference,
            slowdown_bound=slowdown_bound,
            memory_cap=memory_cap,
            deadline_ms=deadline_ms,
        )
        if plot is not None:
            from envpipe.render import gantt_png

            gantt_png(
                report["_result"],
                plot,
                title=_plot_title(report),
                clock_range_mhz=(costs.min_clock_mhz, costs.max_clock_mhz),  # the card's range: same colour, same clock
                energy_j=report["energy_j"],
                saving=report["energy_saving"],
            )
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
    virtual_stages: int | None = None,
    reference: str = "1f1b",
    slowdown_bound: float = 0.01,
    memory_cap: float | None = None,
    deadline_ms: float | None = None,
) -> dict[str, Any]:
    """Build, verify (also on ``transport``'s GPU streams) and simulate the schedule and the reference;
    return the report (JSON-ready). ``stages`` counts GPUs; a schedule with v stages per GPU runs on
    ``costs.chunked(v)``."""
    from envpipe.clock_types import assign_clocks
    from envpipe.planner.joint import reference_run
    from envpipe.schedules import get_schedule
    from envpipe.sim import simulate as run
    from envpipe.verify import verify

    v = virtual_stages or SCHEDULES.lookup(scheduling, source="--scheduling").virtual_stages
    chunked = costs.chunked(v)
    schedule = get_schedule(scheduling, stages * v, micro_batches, r, costs=chunked, virtual_stages=virtual_stages)
    peak = [n / v for n in verify(schedule, transport=transport).max_in_flight]
    if memory_cap is not None and max(peak) > memory_cap + 1e-9:
        raise ValueError(f"--memory-cap {memory_cap:g}: {scheduling} holds {max(peak):g} activations on a GPU; "
                         "raise the cap or try --scheduling best --memory-cap to find a schedule that fits")
    ref_schedule, ref_costs, baseline = reference_run(reference, stages, micro_batches, costs)
    plan_reference: dict[str, Any] = {"reference": (ref_schedule, ref_costs), "slowdown_bound": slowdown_bound}
    if deadline_ms is not None:  # the schedule itself is the frame; the target is the deadline
        top_ms = run(schedule, chunked).iteration_time_ms
        if top_ms > deadline_ms:
            raise ValueError(f"--deadline-ms {deadline_ms:g}: {scheduling} takes {top_ms:.1f} ms even at the top "
                             "clocks (simulated); raise the deadline or try --scheduling best")
        plan_reference = {"reference": (schedule, chunked), "slowdown_bound": 0.0, "baseline_ms": deadline_ms}
    clocks = reconfigure(reconfig, schedule, chunked, assign_clocks(schedule, chunked, clock_type),
                         **plan_reference)
    result = run(schedule, chunked, clocks)
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
        "reference": reference,
        "deadline_ms": deadline_ms,
        "virtual_stages": v,
        "peak_activations": peak,
        "baseline": {
            "scheduling": reference,
            "type": "baseline",
            "iteration_time_s": baseline.iteration_time_s,
            "energy_j": baseline.energy_j,
        },
        "energy_saving": 1.0 - result.energy_j / baseline.energy_j,
        "slowdown": result.iteration_time_ms / baseline.iteration_time_ms - 1.0,
        "r": list(schedule.r),
        "f_low_mhz": [costs.f_low_mhz(s) for s in range(stages)],
        "order": [[u.unit if v == 1 else f"{u.stage}{u.unit}" for u in schedule.units(g)] for g in range(stages)],
        "clocks_mhz": [[clocks[u.stage][u.unit] for u in schedule.units(g)] for g in range(stages)],
        "critical_path": [[s, u] for s, u in result.critical_path],
        "critical_units": [sum(1 for s, _ in result.critical_path if schedule.stage_rank[s] == g)
                           for g in range(stages)],
        "_result": result,
    }


def reconfigure(policy: str, schedule: Schedule, costs: CostModel, clocks: ClockPlan, *,
                reference: tuple[Schedule, CostModel] | None = None, slowdown_bound: float = 0.01,
                baseline_ms: float | None = None) -> ClockPlan:
    """Apply ``--reconfig`` to the clock type's plan: ``default`` keeps it, the others run the planner on it."""
    from envpipe.planner import plan_clocks

    POLICIES.lookup(policy, source="--reconfig")  # `default` makes no rounds: the plan stays as it is

    return plan_clocks(schedule, costs, policy, start=clocks, reference=reference,
                       slowdown_bound=slowdown_bound, baseline_ms=baseline_ms).clocks


def _costs(
    stages: int,
    card: str,
    dvfs_model: str | None,
    model_params: str | None,
    profile: Path | None,
    fwd_ms: str | None,
    bwd_ms: str | None,
) -> CostModel:
    from envpipe_agent.dvfs import model_from_params

    from envpipe.sim import CostModel, load_profile

    given = [
        name
        for name, value in (
            ("--dvfs-model", dvfs_model),
            ("--model-params", model_params),
            ("--profile", profile),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"give only one of --dvfs-model, --model-params, --profile (got {' and '.join(given)})"
        )
    curve: Any = model_from_params(model_params) if model_params else (dvfs_model or _DEFAULTS.dvfs_model)
    return CostModel.build(
        stages,
        gpu=card,
        model=curve,
        profile=load_profile(profile, warn=_warn) if profile else None,
        fwd_ms=_float_list(fwd_ms, "--fwd-ms") if fwd_ms else None,
        bwd_ms=_float_list(bwd_ms, "--bwd-ms") if bwd_ms else None,
    )


def _warn(text: str) -> None:
    """One warning line on stderr (never wrapped; stdout stays the table or the JSON)."""
    err_console.print(text, markup=False, highlight=False)


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
        f"{report['scheduling']} / {report['type']} / reconfig {report['reconfig']}, "
        f"S={report['stages']} M={report['micro_batches']} r={report['r']}\n{report['model']}"
    )


def _print(report: dict[str, Any], as_json: bool) -> None:
    console = stdout_console()
    if as_json:
        console.print_json(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}))
        return
    table = Table(title=f"envpipe simulate (simulated): S={report['stages']} M={report['micro_batches']}")
    for header in ("run", "iteration (ms)", "energy (J)", "saving", "slowdown"):
        table.add_column(header, justify="left" if header == "run" else "right", no_wrap=True)
    base = report["baseline"]
    table.add_row(
        f"baseline ({report['reference']}, max clock)",
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
    console.print(f"peak activations per GPU = {[round(x, 2) for x in report['peak_activations']]}",
                  highlight=False)
    console.print(f"model (simulated): {report['model']}", highlight=False)


def _stage_table(report: dict[str, Any]) -> Table:
    """Per GPU: busy and idle time, energy, f_low and how many units lie on the critical path."""
    table = Table(title="per stage (simulated)" if report["virtual_stages"] == 1 else "per GPU (simulated)")
    first = "stage" if report["virtual_stages"] == 1 else "GPU"
    for header in (first, "busy (ms)", "idle (ms)", "energy (J)", "f_low (MHz)", "critical units"):
        table.add_column(header, justify="right", no_wrap=True)
    on_path = report["critical_units"]
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
