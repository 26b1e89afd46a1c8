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

from envpipe.errors import ConfigError

TYPES = ("baseline", "uniform", "envelope")
SCHEDULINGS = ("1f1b", "ours")
RECONFIGS = ("default", "greedy", "balanced", "optimal", "paper")
DEVICES = ("auto", "cpu", "cuda")
DVFS_MODEL_NAMES = ("central", "conservative", "optimistic")

# DeepSpeed keys that EnvPipe derives from the resolved config; the user's values are read, then replaced.
_DS_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``envpipe train`` run needs; every rank receives the same instance as JSON.

    Attributes:
        type: clock type, ``baseline`` (all units at the top clock), ``uniform`` or ``envelope``.
        scheduling: pipeline schedule, ``1f1b`` or ``ours`` (forwards moved into the warm-up bubble).
        reconfig: online reconfiguration policy after profiling.
        stages: pipeline stages (one rank each per data-parallel replica).
        micro_batches: micro-batches per iteration (DeepSpeed's gradient accumulation steps).
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        steps: iterations of the steady phase (profiling and reconfiguration add their own).
        model: a preset name (``llama-tiny``, ...) or a local Hugging Face model directory.
        data: a ``.txt`` or ``.jsonl`` file; ``None`` means synthetic tokens.
        deepspeed_config: path of the DeepSpeed JSON it came from, if any.
        ds_config: the DeepSpeed config handed to the engine (the ``envpipe`` block removed, batch keys set).
        agent: agent control endpoint; ``None`` tries the default endpoints, then starts the sim agent.
        emulate_dvfs: stretch unit wall times by the clock's modelled slowdown; ``None`` = on with the sim
            agent.
        num_gpus: GPUs per node for the DeepSpeed launcher; ``None`` = all visible.
        hostfile: DeepSpeed hostfile for multi-node runs.
        num_nodes: nodes to use from the hostfile.
        report: where to write the JSON report.
        plot: where to draw the measured Gantt chart of the last iteration.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dvfs_model: the DVFS curve the sim agent and the DVFS emulation use.
        warmup_steps: unmeasured iterations before the baseline window.
        baseline_steps: iterations of the baseline window measured at the start.
        profile_steps: iterations per candidate clock in the profiling phase.
        profile_clocks: how many candidate clocks to profile (evenly spread over the window below).
        profile_min_ratio: lowest candidate clock as a share of the top clock.
        min_window_s: shortest energy window with a real agent. Its counter moves every ~100 ms and the agent
            samples it every 100 ms, so each window edge is uncertain by up to ~0.2 s of full power: on the
            H100, 2.5 s windows of the same work differed by 7 %, 10 s windows by 0.4 % (docs/validation.md).
        reconfig_max_rounds: cap on reconfiguration iterations; ``None`` = the policy's own cap.
        compare_rounds: rounds of the steady phase, each a baseline window and a window of the final plan
            side by side (same iterations, alternating order); the round with the median paired saving
            represents the run (0 = compare with the start's baseline window only). Five, not three: on
            shared CPU cores one burst of load can swing a window by 20 %.
        slowdown_bound: allowed iteration-time slowdown for the planner (0.01 = 1 %).
        lr: learning rate of the default optimizer (SGD), used when the DeepSpeed config names none.
        seed: seed of the model initialisation and the synthetic data.
        job_id: names the run's leases at the agent (set by the launcher).
        mode: ``train`` (every phase) or ``profile`` (baseline window and profiling only).

    """

    type: str = "envelope"
    scheduling: str = "ours"
    reconfig: str = "balanced"
    stages: int = 2
    micro_batches: int = 4
    micro_batch_size: int = 2
    seq_len: int = 64
    steps: int = 10
    model: str = "llama-tiny"
    data: str | None = None
    deepspeed_config: str | None = None
    ds_config: dict[str, Any] = field(default_factory=dict)
    agent: str | None = None
    emulate_dvfs: bool | None = None
    num_gpus: int | None = None
    hostfile: str | None = None
    num_nodes: int | None = None
    report: str | None = None
    plot: str | None = None
    device: str = "auto"
    dvfs_model: str = "central"
    warmup_steps: int = 3
    baseline_steps: int = 5
    profile_steps: int = 2
    profile_clocks: int = 4
    profile_min_ratio: float = 0.5
    min_window_s: float = 10.0
    reconfig_max_rounds: int | None = None
    compare_rounds: int = 5
    slowdown_bound: float = 0.01
    lr: float = 0.05
    seed: int = 1234
    job_id: str = ""
    mode: str = "train"

    @property
    def global_batch_size(self) -> int:
        """Sequences per iteration per data-parallel replica."""
        return self.micro_batches * self.micro_batch_size

    @property
    def tokens_per_iteration(self) -> int:
        """Tokens one pipeline replica trains on per iteration."""
        return self.global_batch_size * self.seq_len

    def to_json(self) -> str:
        """Serialise for the ranks (they rebuild it with :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Rebuild a config written by :meth:`to_json`."""
        return cls(**json.loads(text))


_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Keys that only the resolver sets; a user must not put them in the "envpipe" block.
_INTERNAL = {"deepspeed_config", "ds_config", "job_id", "mode"}
_INT_MIN = {
    "stages": 1,
    "micro_batches": 1,
    "micro_batch_size": 1,
    "seq_len": 2,
    "steps": 1,
    "warmup_steps": 1,
    "baseline_steps": 1,
    "profile_steps": 1,
    "profile_clocks": 1,
    "reconfig_max_rounds": 0,
    "compare_rounds": 0,
    "num_gpus": 1,
    "num_nodes": 1,
}
_CHOICES = {
    "type": TYPES,
    "scheduling": SCHEDULINGS,
    "reconfig": RECONFIGS,
    "device": DEVICES,
    "dvfs_model": DVFS_MODEL_NAMES,
    "mode": ("train", "profile"),
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
    for name, choices in _CHOICES.items():
        value = getattr(config, name)
        if value not in choices:
            raise ConfigError(f"{name} = {value!r} is not one of {', '.join(choices)}; pick one of them")
    for name, low in _INT_MIN.items():
        value = getattr(config, name)
        if value is None and name in ("num_gpus", "num_nodes", "reconfig_max_rounds"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{_flag(name)} must be an integer >= {low}, got {value!r}")
    _validate_floats(config)
    _validate_paths(config)
    if config.micro_batches < config.stages and config.scheduling == "ours":
        # ours fills the warm-up bubble with extra forwards; with M < S there is none to fill.
        raise ConfigError(
            f"--scheduling ours needs --micro-batches >= --stages (got {config.micro_batches} < "
            f"{config.stages}); raise --micro-batches or use --scheduling 1f1b"
        )
    if config.hostfile is None and config.num_nodes not in (None, 1):
        raise ConfigError("--num-nodes > 1 needs --hostfile listing the nodes (DeepSpeed hostfile format)")


def _validate_floats(config: TrainConfig) -> None:
    checks = {
        "profile_min_ratio": (0.05, 1.0),
        "min_window_s": (0.0, 3600.0),
        "slowdown_bound": (0.0, 1.0),
        "lr": (0.0, 10.0),
    }
    for name, (low, high) in checks.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"{_flag(name)} must be a number in [{low}, {high}], got {value!r}")
    if config.emulate_dvfs not in (None, True, False):
        raise ConfigError(f"emulate_dvfs must be true or false, got {config.emulate_dvfs!r}")


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
    for name in ("report", "plot"):
        value = getattr(config, name)
        if value is not None and not Path(value).resolve().parent.is_dir():
            raise ConfigError(f"{_flag(name)} {value}: its folder does not exist; create it first")
    if config.plot is not None and Path(config.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {config.plot}: use a .png, .svg or .pdf file name")
    if config.report is not None and Path(config.report).suffix.lower() != ".json":
        raise ConfigError(f"--report {config.report}: use a .json file name")
    _validate_model(config.model)


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
