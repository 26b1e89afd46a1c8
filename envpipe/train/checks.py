"""Checks of a run's inputs that need to look inside files, done before any rank starts (no torch).

Each failure is one ``ConfigError`` naming where the value came from (the flag, or ``ds.json: envpipe.KEY``),
what is wrong and the fix. Everything here reads a few KiB at most: the whole set runs well under a second.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError

# DeepSpeed monitor blocks and the package each one imports when enabled (deepspeed/monitor/*.py).
MONITOR_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet": "comet_ml", "csv_monitor": None}
_HF_BIN_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know of a model: vocabulary, decoder layers, its folder (None for a preset)."""

    vocab_size: int
    num_hidden_layers: int
    model_dir: Path | None


def model_shape(model: str, *, source: str = "--model") -> ModelShape:
    """Read a preset or a local Hugging Face folder's ``config.json`` (never the hub, never torch).

    Raises:
        ConfigError: not a preset nor a folder, no or unreadable ``config.json``, not a Llama model, or a
            folder without ``*.safetensors`` weights.
    """
    from envpipe.models import llama

    name = llama.preset_name(model)
    path = Path(model)
    if name is not None and not path.is_dir():
        preset = llama.PRESETS[name]
        return ModelShape(preset["vocab_size"], preset["num_hidden_layers"], None)
    if not path.is_dir():
        raise ConfigError(
            f"{source} {model}: not a preset and not a local model folder (EnvPipe never downloads models); "
            f"give a preset ({', '.join(llama.PRESETS)}) or a local folder with config.json"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{source} {model}: the folder has no config.json; give a Hugging Face model folder")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source} {config_path}: not valid JSON ({exc}); fix or re-save the config") from None
    if not isinstance(raw, dict) or raw.get("model_type", "llama") != "llama":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(
            f"{source} {model}: model_type is {found!r}; EnvPipe's pipeline builds Llama models only "
            "(model_type \"llama\")"
        )
    _check_weights(path, source)
    for key in ("vocab_size", "num_hidden_layers"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] < 1:
            raise ConfigError(f"{source} {config_path}: {key} must be a positive integer, got {raw.get(key)!r}")
    return ModelShape(raw["vocab_size"], raw["num_hidden_layers"], path)


def _check_weights(path: Path, source: str) -> None:
    if any(path.glob("*.safetensors")):
        return
    if any((path / name).is_file() for name in _HF_BIN_WEIGHTS) or any(path.glob("pytorch_model-*.bin")):
        raise ConfigError(
            f"{source} {path}: the weights are PyTorch .bin files; EnvPipe reads safetensors only (no pickle): "
            "convert once with AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
            "safe_serialization=True)"
        )
    raise ConfigError(
        f"{source} {path}: config.json but no *.safetensors weights; save the model with "
        "save_pretrained(DIR, safe_serialization=True), or give a preset name for a seeded random init"
    )


def check_stages(shape: ModelShape, stages: int, *, model_source: str = "--model", stages_source: str = "--stages") -> None:
    """Every stage needs at least one decoder layer."""
    if stages > shape.num_hidden_layers:
        raise ConfigError(
            f"{stages_source} {stages}: the model ({model_source}) has {shape.num_hidden_layers} decoder layers, "
            f"fewer than the stages; use at most {shape.num_hidden_layers} stages or a deeper model"
        )


def check_monitors(ds_config: dict[str, Any], *, source: str) -> list[str]:
    """The DeepSpeed monitors the config enables; refuse one whose package is missing.

    Args:
        ds_config: the DeepSpeed JSON.
        source: the file's name for errors.

    Returns:
        The enabled monitors' block names (``tensorboard``, ``wandb``, ``comet``, ``csv_monitor``).
    """
    enabled = []
    for block, package in MONITOR_PACKAGES.items():
        value = ds_config.get(block)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f'{source}: "{block}" must be an object like {{"enabled": true, ...}}')
        if not value.get("enabled", False):
            continue
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f'{source}: "{block}" is enabled but the {package} package is not installed; install it '
                f'(pip install {package.replace("_", "-")}) or set "{block}": {{"enabled": false}}'
            )
        enabled.append(block)
    return enabled


def validate_lifecycle(config: Any, sources: Any) -> None:
    """Checkpoint, resume, export, evaluation and log settings that fit together (``config``: a TrainConfig).

    Raises:
        ConfigError: naming the flag or block key that was given (``sources``) and the fix.
    """
    from envpipe import checkpoints

    for name in ("save_interval", "keep_last"):
        if getattr(config, name) and config.save_dir is None:
            raise ConfigError(f"{sources[name]} needs --save-dir (where to save); add --save-dir DIR")
    if config.eval_interval and config.eval_data is None:
        raise ConfigError(f"{sources['eval_interval']} needs --eval-data (what to evaluate); add --eval-data FILE")
    for name in ("save_dir", "log_dir", "export_hf"):
        value = getattr(config, name)
        if value is None:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{sources[name]} {value}: exists and is not a folder; give a folder path")
        if not path.resolve().parent.is_dir():
            raise ConfigError(f"{sources[name]} {value}: its parent folder does not exist; create it first")
    if config.export_hf is not None and Path(config.export_hf).is_dir() and any(Path(config.export_hf).iterdir()):
        raise ConfigError(
            f"{sources['export_hf']} {config.export_hf}: already has files; give an empty or new folder "
            "(nothing is overwritten)"
        )
    if config.resume is None:
        return
    where = config.resume_dir
    if where is None:
        raise ConfigError(f"{sources['resume']} without a folder resumes from --save-dir; add --save-dir DIR")
    info = checkpoints.find(where, source=sources["resume"])
    saved = info.meta.get("settings", {})
    for name in ("stages", "micro_batches", "micro_batch_size", "seq_len", "model", "data"):
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"{sources['resume']} {info.path} was trained with {name}={saved[name]!r}, this run has "
                f"{sources[name]} {getattr(config, name)!r}; resume with the same value"
            )
    if info.step >= config.steps:
        raise ConfigError(
            f"{sources['resume']} {info.path} is at step {info.step}, --steps is {config.steps}: nothing left to "
            f"train; raise {sources['steps']} (the total, as in Hugging Face's max_steps)"
        )
