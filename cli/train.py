"""``envpipe train``: train a model through an EnvPipe pipeline while the node agent moves clocks per unit.

``--steps N`` optimizer steps, planning included; the controller inside the engine plans during the first
steps and runs every later one at the plan. Every option defaults to ``None`` here so that the resolver can
tell a flag from a default: flags win over the ``"envpipe"`` block of ``--deepspeed-config``, which wins over
the defaults of :class:`envpipe.train.config.TrainConfig` (shown in brackets in ``--help``).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from envpipe_cli._errors import user_errors
from typer.core import TyperCommand

from envpipe.controller.config import choices_by_key

_CHOICES = choices_by_key()
# Choices come from their registries (clock types, schedules, planner policies).
ClockType = Enum("ClockType", {name: name for name in _CHOICES["type"]}, type=str)
Scheduling = Enum("Scheduling", {name: name for name in _CHOICES["scheduling"]}, type=str)
Reconfig = Enum("Reconfig", {name: name for name in _CHOICES["reconfig"]}, type=str)
DvfsModel = Enum("DvfsModel", {name: name for name in _CHOICES["dvfs_model"]}, type=str)
# Paired rounds of a bare `--compare` (6: the fewest for a distribution-free 95 % interval of the median).
DEFAULT_COMPARE_ROUNDS = 6


class Device(str, Enum):
    """Where the ranks run."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


_RUN = "Run"
_PIPE = "Pipeline"
_LAUNCH = "Launcher (forwarded to the DeepSpeed launcher on GPUs)"
_OUT = "Output"


def _opt(*names: str, help: str, panel: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kwargs)


# Shared by `envpipe train` and `envpipe profile` (cli/profile.py).
TypeOpt = Annotated[
    Optional[ClockType],
    _opt(
        "--type",
        help="Clock type: baseline (top clock), uniform or envelope. \\[default: envelope]",
        panel=_RUN,
    ),
]
SchedulingOpt = Annotated[Optional[Scheduling], _opt(help="Pipeline schedule. \\[default: ours]", panel=_RUN)]
ReconfigOpt = Annotated[
    Optional[Reconfig], _opt(help="Reconfiguration policy after profiling. \\[default: balanced]", panel=_RUN)
]
StagesOpt = Annotated[Optional[int], _opt(min=1, help="Pipeline stages. \\[default: 2]", panel=_PIPE)]
MicroBatchesOpt = Annotated[
    Optional[int], _opt(min=1, help="Micro-batches per iteration. \\[default: 4]", panel=_PIPE)
]
MicroBatchSizeOpt = Annotated[
    Optional[int], _opt(min=1, help="Sequences per micro-batch. \\[default: 2]", panel=_PIPE)
]
SeqLenOpt = Annotated[Optional[int], _opt(min=2, help="Tokens per sequence. \\[default: 64]", panel=_PIPE)]
StepsOpt = Annotated[
    Optional[int],
    _opt(min=1, help="Optimizer steps of the whole run, planning included. \\[default: 200]", panel=_RUN),
]
ModelOpt = Annotated[
    Optional[str],
    _opt(
        help="Preset (llama-tiny, llama-160m, llama-1b, llama-7b) or a local HF model folder. "
        "\\[default: llama-tiny]",
        panel=_RUN,
    ),
]
DataOpt = Annotated[
    Optional[Path],
    _opt(
        help="Training data: .txt, .jsonl or a .bin token file (nanoGPT/Megatron); synthetic tokens when "
        "omitted.",
        panel=_RUN,
    ),
]
DeepspeedConfigOpt = Annotated[
    Optional[Path],
    _opt(
        "--deepspeed-config",
        help='DeepSpeed JSON; its "envpipe" block sets defaults (flags win).',
        panel=_RUN,
    ),
]
AgentOpt = Annotated[
    Optional[str],
    _opt(
        help="Agent control endpoint; a named one that does not answer is an error. Without it: $ENVPIPE_AGENT, "
        "then the user's and the system socket, else an embedded sim agent.",
        panel=_RUN,
    ),
]
EmulateDvfsOpt = Annotated[
    Optional[bool],
    _opt(
        "--emulate-dvfs/--no-emulate-dvfs",
        help="Stretch unit times by the clock's modelled slowdown. \\[default: on with the sim agent]",
        panel=_RUN,
    ),
]
DeviceOpt = Annotated[Optional[Device], _opt(help="Where ranks run. \\[default: auto]", panel=_LAUNCH)]
NumGpusOpt = Annotated[Optional[int], _opt(min=1, help="GPUs per node. \\[default: all]", panel=_LAUNCH)]
HostfileOpt = Annotated[Optional[Path], _opt(help="DeepSpeed hostfile for multi-node runs.", panel=_LAUNCH)]
NumNodesOpt = Annotated[Optional[int], _opt(min=1, help="Nodes to use from the hostfile.", panel=_LAUNCH)]
NodeRankOpt = Annotated[
    Optional[int],
    _opt(
        min=0,
        help="Without ssh: this node's line in the hostfile (from 0); run envpipe train on every node "
        "(DeepSpeed's --no_ssh --node_rank). \\[default: the launcher reaches the nodes by ssh]",
        panel=_LAUNCH,
    ),
]
ReportOpt = Annotated[Optional[Path], _opt(help="Write the summary and the phases as JSON here.", panel=_OUT)]
PlotOpt = Annotated[
    Optional[Path],
    _opt(help="Draw the measured Gantt chart of the last iteration here (.png, .svg or .pdf).", panel=_OUT),
]


CompareOpt = Annotated[
    Optional[int],
    _opt(
        "--compare",
        min=0,
        metavar="[ROUNDS]",
        help="Measure the saving at the end of the run: ROUNDS paired rounds (a baseline window and a plan "
        f"window side by side), median and 95% interval. Bare --compare: {DEFAULT_COMPARE_ROUNDS} rounds. "
        "\\[default: off: no baseline step after planning]",
        panel=_RUN,
    ),
]
CompareEveryOpt = Annotated[
    Optional[int],
    _opt(
        "--compare-every",
        min=1,
        metavar="K",
        help="With --compare: one paired round every K steps at the plan, instead of all rounds at the end "
        "(for runs whose end is far or unknown). \\[default: at the end]",
        panel=_RUN,
    ),
]
PlanOpt = Annotated[
    Optional[Path],
    _opt(help="Reuse this plan file (skips profiling; its fingerprint must match).", panel=_RUN),
]
PlanOutOpt = Annotated[Optional[Path], _opt(help="Write the plan (with its fingerprint) here.", panel=_OUT)]
RecheckOpt = Annotated[
    Optional[int],
    _opt(
        min=0, help="Steps between drift checks at the plan (0: no drift guard). \\[default: 500]", panel=_RUN
    ),
]


_LIFE = "Checkpoints, evaluation, logs"
LrOpt = Annotated[
    Optional[float],
    _opt(help="Learning rate (replaces the DeepSpeed config's optimizer lr; default SGD 0.05).", panel=_RUN),
]
SeedOpt = Annotated[
    Optional[int], _opt(help="Seed of the initialisation and synthetic data. \\[default: 1234]", panel=_RUN)
]
Bf16Opt = Annotated[bool, _opt("--bf16", help="Train in bf16 (DeepSpeed's bf16 block).", panel=_RUN)]
Fp16Opt = Annotated[
    bool, _opt("--fp16", help="Train in fp16 with loss scaling (DeepSpeed's fp16 block).", panel=_RUN)
]
SlowdownOpt = Annotated[
    Optional[float],
    _opt(
        min=0.0,
        max=1.0,
        help="Allowed iteration-time slowdown of the plan (0.01 = 1%). \\[default: 0.01]",
        panel=_RUN,
    ),
]
DvfsModelOpt = Annotated[
    Optional[DvfsModel],
    _opt("--dvfs-model", help="DVFS curve of the sim agent and emulation. \\[default: central]", panel=_RUN),
]
LogIntervalOpt = Annotated[
    Optional[int], _opt(min=1, help="Steps between log lines. \\[default: 10]", panel=_LIFE)
]
LogDirOpt = Annotated[
    Optional[Path],
    _opt(
        help="Ranks' logs. \\[default: SAVE_DIR/logs or next to --report, else kept only on failure]",
        panel=_LIFE,
    ),
]
SaveDirOpt = Annotated[
    Optional[Path], _opt(help="Save DeepSpeed checkpoints here (with plan, data position, RNG).", panel=_LIFE)
]
SaveIntervalOpt = Annotated[
    Optional[int],
    _opt(
        min=0,
        help="Steps between checkpoints (0: at the end and on SIGTERM/SIGINT only). \\[default: 0]",
        panel=_LIFE,
    ),
]
ResumeOpt = Annotated[
    Optional[str],
    _opt(
        metavar="[DIR]",
        help="Continue from a checkpoint folder (bare --resume: --save-dir's latest); skips profiling.",
        panel=_LIFE,
    ),
]
KeepLastOpt = Annotated[Optional[int], _opt(min=1, help="Keep only the newest K checkpoints.", panel=_LIFE)]
ExportHfOpt = Annotated[
    Optional[Path],
    _opt("--export-hf", help="Write the trained model as a Hugging Face folder here.", panel=_LIFE),
]
EvalDataOpt = Annotated[
    Optional[Path],
    _opt(help="Held-out data (.txt, .jsonl or .bin) for eval loss and perplexity.", panel=_LIFE),
]
EvalIntervalOpt = Annotated[
    Optional[int],
    _opt(min=0, help="Steps between evaluations (0: at the end only). \\[default: 0]", panel=_LIFE),
]


class TrainCommand(TyperCommand):
    """``envpipe train``'s command: ``--compare`` and ``--resume`` take optional values (typer has none)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Give a bare ``--compare`` its default rounds and a bare ``--resume`` "" (= --save-dir)."""
        args = optional_value(
            args, "--compare", str(DEFAULT_COMPARE_ROUNDS), lambda v: v.lstrip("-").isdigit()
        )
        return super().parse_args(ctx, optional_value(args, "--resume", "", lambda v: not v.startswith("-")))


def optional_value(args: list[str], flag: str, default: str, is_value: Any = None) -> list[str]:
    """``args`` with ``default`` inserted after each ``flag`` not followed by a value (default: a number)."""
    is_value = is_value or (lambda v: v.lstrip("-").isdigit())
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == flag and (i + 1 == len(args) or not is_value(args[i + 1])):
            out.append(default)
    return out


def train(
    type: TypeOpt = None,
    scheduling: SchedulingOpt = None,
    reconfig: ReconfigOpt = None,
    stages: StagesOpt = None,
    micro_batches: MicroBatchesOpt = None,
    micro_batch_size: MicroBatchSizeOpt = None,
    seq_len: SeqLenOpt = None,
    steps: StepsOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    deepspeed_config: DeepspeedConfigOpt = None,
    agent: AgentOpt = None,
    emulate_dvfs: EmulateDvfsOpt = None,
    device: DeviceOpt = None,
    num_gpus: NumGpusOpt = None,
    hostfile: HostfileOpt = None,
    num_nodes: NumNodesOpt = None,
    node_rank: NodeRankOpt = None,
    report: ReportOpt = None,
    plot: PlotOpt = None,
    compare: CompareOpt = None,
    compare_every: CompareEveryOpt = None,
    plan: PlanOpt = None,
    plan_out: PlanOutOpt = None,
    recheck_interval: RecheckOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    bf16: Bf16Opt = False,
    fp16: Fp16Opt = False,
    slowdown_bound: SlowdownOpt = None,
    dvfs_model: DvfsModelOpt = None,
    save_dir: SaveDirOpt = None,
    save_interval: SaveIntervalOpt = None,
    resume: ResumeOpt = None,
    keep_last: KeepLastOpt = None,
    export_hf: ExportHfOpt = None,
    eval_data: EvalDataOpt = None,
    eval_interval: EvalIntervalOpt = None,
    log_interval: LogIntervalOpt = None,
    log_dir: LogDirOpt = None,
) -> None:
    """Train --steps optimizer steps: the first plan the clocks, every later one runs at the plan.

    Planning is warm-up, baseline window, profiling and reconfiguration; --compare measures the saving in pairs.
    """
    flags = collect_flags(locals())  # first statement: locals() is exactly the options here
    flags["compare_rounds"] = flags.pop("compare")
    flags["precision"] = precision_flag(flags.pop("bf16"), flags.pop("fp16"))
    from rich.console import Console

    from envpipe.train.launch import train as run_train
    from envpipe.train.ranks import RunStopped

    with user_errors():
        config = resolve_flags(flags, deepspeed_config)
        console = Console(soft_wrap=True)  # off a terminal rich would wrap at 80 columns: lines stay whole
        if not console.is_terminal:
            console.width = max(console.width, 200)
        try:
            run_train(config, console=console)
        except RunStopped as stopped:  # SIGTERM / SIGINT: one line, exit 143 / 130
            typer.echo(str(stopped), err=True)
            raise typer.Exit(code=stopped.exit_code) from None


def precision_flag(bf16: bool, fp16: bool) -> str | None:
    """``--bf16``/``--fp16`` as the ``precision`` option (None: neither flag, the block or fp32 decides)."""
    if bf16 and fp16:
        from envpipe.errors import ConfigError

        with user_errors():
            raise ConfigError("--bf16 and --fp16 exclude each other; give one of them")
    return "bf16" if bf16 else "fp16" if fp16 else None


def collect_flags(values: dict[str, Any]) -> dict[str, Any]:
    """Command-line values keyed by TrainConfig field: enums to their values, paths to strings."""
    flags = {}
    for name, value in values.items():
        if name == "deepspeed_config":
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        flags[name] = value
    return flags


def resolve_flags(flags: dict[str, Any], deepspeed_config: Path | None) -> Any:
    """Resolve the run's TrainConfig (flags > "envpipe" block > defaults)."""
    from envpipe.train.config import resolve

    return resolve(flags, deepspeed_config)
