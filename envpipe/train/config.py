"""The one frozen configuration of an ``envpipe train`` run, resolved once and passed down.

Precedence, highest first: command-line flags > the ``"envpipe"`` block of ``--deepspeed-config`` >
DeepSpeed's own batch keys in that file (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``)
> the defaults below. No torch import here: the CLI validates a run before any rank starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envpipe.controller.config import CONTROLLER_KEYS, ControllerConfig, check_fields
from envpipe.data import check_source
from envpipe.errors import ConfigError
from envpipe.train.checks import check_monitors, check_stages, model_shape, validate_lifecycle
from envpipe.train.sources import Sources, block_source, check_types, flag_name

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")

# DeepSpeed keys that EnvPipe derives from the resolved config; the user's values are read, then replaced.
_DS_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class TrainConfig(ControllerConfig):
    """Everything one ``envpipe train`` run needs; every rank receives the same instance as JSON.

    The controller's settings (clock type, schedule, policy, profiling, drift guard, ``compare_rounds``,
    ``plan``...) are inherited from :class:`envpipe.controller.ControllerConfig`; ``max_steps`` is set from
    ``steps``. The run's own:

    Attributes:
        stages: pipeline stages (one rank each per data-parallel replica).
        micro_batches: micro-batches per iteration (DeepSpeed's gradient accumulation steps).
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        steps: optimizer steps of the whole run, planning included (as ``max_steps`` in HF's Trainer).
        model: a preset name (``llama-tiny``, ...) or a local Hugging Face model directory.
        data: a ``.txt`` or ``.jsonl`` file; ``None`` means synthetic tokens.
        deepspeed_config: path of the DeepSpeed JSON it came from, if any.
        ds_config: the DeepSpeed config handed to the engine (the ``envpipe`` block removed, batch keys set).
        num_gpus: GPUs per node for the DeepSpeed launcher; ``None`` = all visible.
        hostfile: DeepSpeed hostfile for multi-node runs.
        num_nodes: nodes to use from the hostfile.
        node_rank: this node's line (from 0) in the hostfile when every node runs its own ``envpipe train``
            without ssh (DeepSpeed's ``--no_ssh --node_rank``); ``None``: the launcher uses ssh.
        report: where to write the JSON report.
        plot: where to draw the measured Gantt chart of the last measured step.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        lr: learning rate: of the default optimizer (SGD) when the DeepSpeed config names none, else it
            replaces the config's optimizer ``lr`` when given as a flag or in the block.
        seed: seed of the model initialisation and the synthetic data.
        precision: ``fp32``, ``bf16`` or ``fp16`` (DeepSpeed's ``bf16``/``fp16`` blocks; ``--bf16``/``--fp16``).
        save_dir: checkpoint folder (DeepSpeed's layout plus EnvPipe's files, :mod:`envpipe.checkpoints`).
        save_interval: save every this many steps (0: only at the end and when stopped by a signal).
        keep_last: keep only the newest K checkpoints (None: all).
        resume: a save folder (its ``latest``) or a tag folder to continue from; ``""`` = ``save_dir``.
        export_hf: write the trained model as a Hugging Face folder here at the end.
        log_interval: one log record every this many steps (a plain line off a terminal).
        log_dir: where the ranks' logs go (default: ``<save_dir or report folder>/logs``, else a temporary
            folder removed after a successful run).
        eval_data: held-out text or token file, evaluated through the engine's ``eval_batch``.
        eval_interval: evaluate every this many steps (0: only at the end).
        eval_micro_batches: micro-batches per evaluation (None: as many as a training step).
        grace_s: after SIGTERM/SIGINT, how long the ranks get to save and exit before they are killed.
        job_id: names the run's leases at the agent (set by the launcher).
        start_step: the step a resumed run starts at (set by the launcher from the checkpoint).

    """

    stages: int = 2
    micro_batches: int = 4
    micro_batch_size: int = 2
    seq_len: int = 64
    steps: int = 200
    model: str = "llama-tiny"
    data: str | None = None
    deepspeed_config: str | None = None
    ds_config: dict[str, Any] = field(default_factory=dict)
    num_gpus: int | None = None
    hostfile: str | None = None
    num_nodes: int | None = None
    node_rank: int | None = None
    report: str | None = None
    plot: str | None = None
    device: str = "auto"
    lr: float = 0.05
    seed: int = 1234
    precision: str = "fp32"
    save_dir: str | None = None
    save_interval: int = 0
    keep_last: int | None = None
    resume: str | None = None
    export_hf: str | None = None
    log_interval: int = 10
    log_dir: str | None = None
    eval_data: str | None = None
    eval_interval: int = 0
    eval_micro_batches: int | None = None
    grace_s: float = 30.0
    job_id: str = ""
    start_step: int = 0

    @property
    def global_batch_size(self) -> int:
        """Sequences per iteration per data-parallel replica."""
        return self.micro_batches * self.micro_batch_size

    @property
    def tokens_per_iteration(self) -> int:
        """Tokens one pipeline replica trains on per iteration."""
        return self.global_batch_size * self.seq_len

    @property
    def resume_dir(self) -> str | None:
        """The checkpoint to resume from (a bare ``--resume`` means ``--save-dir``), or None."""
        if self.resume is None:
            return None
        return self.resume or self.save_dir

    def controller_block(self) -> dict[str, Any]:
        """The ``"envpipe"`` block the ranks hand to ``envpipe.deepspeed.initialize`` (the controller's keys,
        with ``max_steps`` = ``steps`` so that paired rounds land at the end of the run)."""
        block = {name: getattr(self, name) for name in CONTROLLER_KEYS}
        block["max_steps"] = self.steps - self.start_step
        return block

    def controller_config(self) -> ControllerConfig:
        """The controller's settings of this run."""
        return ControllerConfig(**self.controller_block())

    def to_json(self) -> str:
        """Serialise for the ranks (they rebuild it with :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Rebuild a config written by :meth:`to_json`."""
        return cls(**json.loads(text))


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Keys that only the resolver sets; a user must not put them in the "envpipe" block.
_INTERNAL = {"deepspeed_config", "ds_config", "job_id", "mode", "max_steps", "start_step"}
_INT_MIN = {
    "stages": 1,
    "micro_batches": 1,
    "micro_batch_size": 1,
    "seq_len": 2,
    "steps": 1,
    "num_gpus": 1,
    "num_nodes": 1,
    "save_interval": 0,
    "keep_last": 1,
    "log_interval": 1,
    "eval_interval": 0,
    "eval_micro_batches": 1,
    "node_rank": 0,
}
_OPTIONAL_INTS = {"num_gpus", "num_nodes", "keep_last", "eval_micro_batches", "node_rank"}


def resolve(flags: dict[str, Any], deepspeed_config: str | Path | None = None) -> TrainConfig:
    """Build the run's config: flags (``None`` = not given) > ``envpipe`` block > DeepSpeed keys > defaults.

    Args:
        flags: values from the command line keyed by field name; ``None`` means the flag was not given.
        deepspeed_config: a DeepSpeed JSON file, possibly with an ``"envpipe"`` block.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: a bad key, value or file, with how to fix it.

    """
    unknown = set(flags) - _FIELDS
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(_FIELDS - _INTERNAL)}")
    ds_config, block = _load_deepspeed_config(deepspeed_config)
    sources = Sources()
    values: dict[str, Any] = _from_ds_batch_keys(ds_config, deepspeed_config, sources)
    for key, (name, value) in block.items():
        values[name] = value
        sources[name] = block_source(Path(deepspeed_config), key)
    for name, value in flags.items():
        if value is not None:
            values[name] = value
            sources[name] = flag_name(name)
    if deepspeed_config is not None:
        values["deepspeed_config"] = str(deepspeed_config)
    check_types(TrainConfig, values, sources)
    config = TrainConfig(**values)
    _validate(config, sources)
    if deepspeed_config is not None:
        check_monitors(ds_config, source=str(deepspeed_config))
    return dataclasses.replace(config, ds_config=_engine_ds_config(ds_config, config, sources))


def _load_deepspeed_config(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if path is None:
        return {}, {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed-config {path}: no such file; give the path of a DeepSpeed JSON file")
    try:
        ds_config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed-config {path}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(ds_config, dict):
        raise ConfigError(f"--deepspeed-config {path}: the top level must be a JSON object")
    block = ds_config.pop("envpipe", {}) or {}
    if not isinstance(block, dict):
        raise ConfigError(f'--deepspeed-config {path}: "envpipe" must be an object of train options')
    return ds_config, _normalise_block(block, path)


def _normalise_block(block: dict[str, Any], path: Path) -> dict[str, tuple[str, Any]]:
    """Accept ``micro-batches`` and ``micro_batches`` alike; refuse keys that are not options.

    Returns:
        The block's key as written -> (field name, value).
    """
    out = {}
    for key, value in block.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS or name in _INTERNAL:
            valid = ", ".join(sorted(_FIELDS - _INTERNAL))
            raise ConfigError(f'{path}: unknown key "{key}" in the "envpipe" block; valid keys: {valid}')
        out[str(key)] = (name, value)
    return out


def _from_ds_batch_keys(ds_config: dict[str, Any], path: Any, sources: Sources) -> dict[str, Any]:
    values = {}
    for ds_key, name in (("train_micro_batch_size_per_gpu", "micro_batch_size"), ("gradient_accumulation_steps", "micro_batches")):
        if ds_key in ds_config:
            values[name] = ds_config[ds_key]
            sources[name] = f"{Path(path).name}: {ds_key}"
    return values


def _engine_ds_config(ds_config: dict[str, Any], config: TrainConfig, sources: Sources) -> dict[str, Any]:
    """DeepSpeed's config with the batch keys, precision and learning rate EnvPipe resolved.

    ``train_batch_size`` is left to DeepSpeed. A given ``lr`` (flag or block) replaces the optimizer's; the
    default SGD is used when the file names no optimizer.
    """
    out = {k: v for k, v in ds_config.items() if k not in _DS_BATCH_KEYS}
    out["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    out["gradient_accumulation_steps"] = config.micro_batches
    optimizer = out.setdefault("optimizer", {"type": "SGD", "params": {"lr": config.lr}})
    if "lr" in sources and isinstance(optimizer, dict):
        out["optimizer"] = {**optimizer, "params": {**(optimizer.get("params") or {}), "lr": config.lr}}
    if config.precision != "fp32" or "precision" in sources:
        for kind in ("bf16", "fp16"):
            out[kind] = {**(out.get(kind) or {}), "enabled": config.precision == kind}
    out.setdefault("steps_per_print", 10**9)  # our progress display replaces DeepSpeed's prints
    return out


def _validate(config: TrainConfig, sources: Sources) -> None:
    check_fields(
        config, sources.name_of, choices={"device": DEVICES, "precision": PRECISIONS}, int_min=_INT_MIN,
        optional=_OPTIONAL_INTS, float_range={"lr": (0.0, 10.0), "grace_s": (0.0, 3600.0)},
    )
    config.controller_config().validate(None, name_of=sources.name_of)
    _validate_paths(config, sources)
    validate_lifecycle(config, sources)
    if config.micro_batches < config.stages and config.scheduling == "ours":
        # ours fills the warm-up bubble with extra forwards; with M < S there is none to fill.
        raise ConfigError(
            f"--scheduling ours needs --micro-batches >= --stages (got {config.micro_batches} < "
            f"{config.stages}); raise --micro-batches or use --scheduling 1f1b"
        )
    if config.hostfile is None and config.num_nodes not in (None, 1):
        raise ConfigError("--num-nodes > 1 needs --hostfile listing the nodes (DeepSpeed hostfile format)")
    if config.node_rank is not None and config.hostfile is None:
        raise ConfigError("--node-rank needs --hostfile: it is this node's line in the hostfile (from 0)")


def _validate_paths(config: TrainConfig, sources: Sources) -> None:
    """Files and folders the run reads, looked into (a few KiB each): model, data, hostfile, plan, outputs."""
    shape = model_shape(config.model, source=sources["model"])
    check_stages(shape, config.stages, model_source=sources["model"], stages_source=sources["stages"])
    for name in ("data", "eval_data"):
        check_source(
            getattr(config, name), vocab_size=shape.vocab_size, model_dir=shape.model_dir, flag=sources[name]
        )
    if config.agent is not None:
        from envpipe_agent.client import check_endpoint

        check_endpoint(config.agent, source=sources["agent"])
    if config.hostfile is not None and not Path(config.hostfile).is_file():
        raise ConfigError(f"{sources['hostfile']} {config.hostfile}: no such file; give a DeepSpeed hostfile")
    if config.plan is not None:
        _check_plan(config)
    for name in ("report", "plot", "plan_out"):
        value = getattr(config, name)
        if value is not None and not Path(value).resolve().parent.is_dir():
            raise ConfigError(f"{sources[name]} {value}: its folder does not exist; create it first")
    if config.plot is not None and Path(config.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"{sources['plot']} {config.plot}: use a .png, .svg or .pdf file name")
    if config.report is not None and Path(config.report).suffix.lower() != ".json":
        raise ConfigError(f"{sources['report']} {config.report}: use a .json file name")


def _check_plan(config: TrainConfig) -> None:
    """Refuse a plan made for another pipeline before any rank starts (the ranks check the rest)."""
    import envpipe
    from envpipe.controller.planfile import check_fingerprint, read_plan

    plan = read_plan(config.plan, source="--plan")
    known = {
        "stages": config.stages,
        "micro_batches": config.micro_batches,
        "micro_batch_size": config.micro_batch_size,
        "seq_len": [config.seq_len],
        "dvfs_model": config.dvfs_model,
        "envpipe_version": envpipe.__version__,
    }
    check_fingerprint(plan, known, source=f"--plan {config.plan}")
