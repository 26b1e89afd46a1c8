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

from envpipe.controller.config import CONTROLLER_KEYS, ControllerConfig, choices_by_key
from envpipe.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")

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
        report: where to write the JSON report.
        plot: where to draw the measured Gantt chart of the last measured step.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        lr: learning rate of the default optimizer (SGD), used when the DeepSpeed config names none.
        seed: seed of the model initialisation and the synthetic data.
        job_id: names the run's leases at the agent (set by the launcher).

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
    report: str | None = None
    plot: str | None = None
    device: str = "auto"
    lr: float = 0.05
    seed: int = 1234
    job_id: str = ""

    @property
    def global_batch_size(self) -> int:
        """Sequences per iteration per data-parallel replica."""
        return self.micro_batches * self.micro_batch_size

    @property
    def tokens_per_iteration(self) -> int:
        """Tokens one pipeline replica trains on per iteration."""
        return self.global_batch_size * self.seq_len

    def controller_block(self) -> dict[str, Any]:
        """The ``"envpipe"`` block the ranks hand to ``envpipe.deepspeed.initialize`` (the controller's keys,
        with ``max_steps`` = ``steps`` so that paired rounds land at the end of the run)."""
        block = {name: getattr(self, name) for name in CONTROLLER_KEYS}
        block["max_steps"] = self.steps
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
_INTERNAL = {"deepspeed_config", "ds_config", "job_id", "mode", "max_steps"}
_INT_MIN = {
    "stages": 1,
    "micro_batches": 1,
    "micro_batch_size": 1,
    "seq_len": 2,
    "steps": 1,
    "num_gpus": 1,
    "num_nodes": 1,
}


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
    values: dict[str, Any] = _from_ds_batch_keys(ds_config)
    values.update(block)
    values.update({k: v for k, v in flags.items() if v is not None})
    if deepspeed_config is not None:
        values["deepspeed_config"] = str(deepspeed_config)
    config = TrainConfig(**values)
    _validate(config)
    return dataclasses.replace(config, ds_config=_engine_ds_config(ds_config, config))


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


def _normalise_block(block: dict[str, Any], path: Path) -> dict[str, Any]:
    """Accept ``micro-batches`` and ``micro_batches`` alike; refuse keys that are not options."""
    out = {}
    for key, value in block.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS or name in _INTERNAL:
            valid = ", ".join(sorted(_FIELDS - _INTERNAL))
            raise ConfigError(f'{path}: unknown key "{key}" in the "envpipe" block; valid keys: {valid}')
        out[name] = value
    return out


def _from_ds_batch_keys(ds_config: dict[str, Any]) -> dict[str, Any]:
    values = {}
    if "train_micro_batch_size_per_gpu" in ds_config:
        values["micro_batch_size"] = ds_config["train_micro_batch_size_per_gpu"]
    if "gradient_accumulation_steps" in ds_config:
        values["micro_batches"] = ds_config["gradient_accumulation_steps"]
    return values


def _engine_ds_config(ds_config: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """DeepSpeed's config with the batch keys EnvPipe resolved (train_batch_size is left to DeepSpeed)."""
    out = {k: v for k, v in ds_config.items() if k not in _DS_BATCH_KEYS}
    out["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    out["gradient_accumulation_steps"] = config.micro_batches
    out.setdefault("optimizer", {"type": "SGD", "params": {"lr": config.lr}})
    out.setdefault("steps_per_print", 10**9)  # our progress display replaces DeepSpeed's prints
    return out


def _validate(config: TrainConfig) -> None:
    for name, choices in {**choices_by_key(), "device": DEVICES}.items():
        value = getattr(config, name)
        if value not in choices:
            raise ConfigError(f"{name} = {value!r} is not one of {', '.join(choices)}; pick one of them")
    for name, low in _INT_MIN.items():
        value = getattr(config, name)
        if value is None and name in ("num_gpus", "num_nodes"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{_flag(name)} must be an integer >= {low}, got {value!r}")
    _validate_lr(config)
    _validate_paths(config)
    config.controller_config().validate(None, name_of=_flag)
    if config.micro_batches < config.stages and config.scheduling == "ours":
        # ours fills the warm-up bubble with extra forwards; with M < S there is none to fill.
        raise ConfigError(
            f"--scheduling ours needs --micro-batches >= --stages (got {config.micro_batches} < "
            f"{config.stages}); raise --micro-batches or use --scheduling 1f1b"
        )
    if config.hostfile is None and config.num_nodes not in (None, 1):
        raise ConfigError("--num-nodes > 1 needs --hostfile listing the nodes (DeepSpeed hostfile format)")


def _validate_lr(config: TrainConfig) -> None:
    value = config.lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 10.0:
        raise ConfigError(f"--lr must be a number in [0.0, 10.0], got {value!r}")


def _validate_paths(config: TrainConfig) -> None:
    if config.data is not None:
        data = Path(config.data)
        if not data.is_file():
            raise ConfigError(
                f"--data {data}: no such file; give a .txt or .jsonl file, or omit it for synthetic tokens"
            )
        if data.suffix not in (".txt", ".jsonl"):
            raise ConfigError(f"--data {data}: unsupported type {data.suffix!r}; use a .txt or .jsonl file")
    if config.hostfile is not None and not Path(config.hostfile).is_file():
        raise ConfigError(f"--hostfile {config.hostfile}: no such file; give a DeepSpeed hostfile")
    if config.plan is not None:
        _check_plan(config)
    for name in ("report", "plot", "plan_out"):
        value = getattr(config, name)
        if value is not None and not Path(value).resolve().parent.is_dir():
            raise ConfigError(f"{_flag(name)} {value}: its folder does not exist; create it first")
    if config.plot is not None and Path(config.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {config.plot}: use a .png, .svg or .pdf file name")
    if config.report is not None and Path(config.report).suffix.lower() != ".json":
        raise ConfigError(f"--report {config.report}: use a .json file name")
    _validate_model(config.model)


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


def _validate_model(model: str) -> None:
    """A model is a preset name or a local directory with a config.json; never a hub id."""
    from envpipe.models import llama  # no torch at import time

    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model {model}: the folder has no config.json; give a Hugging Face model folder"
            )
        return
    presets = set(llama.PRESETS) | set(getattr(llama, "_ALIASES", {}))
    if model not in presets:
        raise ConfigError(
            f"--model {model}: not a preset and not a local model folder (EnvPipe never downloads models); "
            f"give a preset ({', '.join(llama.PRESETS)}) or a local folder with config.json"
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
