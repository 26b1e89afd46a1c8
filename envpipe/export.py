"""Assemble a pipeline checkpoint's stages into one Hugging Face Llama folder.

DeepSpeed writes one ``layer_XX-model_states.pt`` per pipe layer (embedding, decoder layers, norm, head), in
global layer order whatever the stage split; EnvPipe's checkpoint folder also holds the model's
``config.json`` and tokenizer files (:mod:`envpipe.checkpoints`). Export maps each layer's tensors back to
their Hugging Face names (:func:`envpipe.models.llama.hf_tensor_name`, the same map that loads a Hugging Face
folder into the pipeline), loads them into a ``LlamaForCausalLM`` built on the meta device (no second copy of
the weights, no random init) and lets transformers write it: ``config.json``, ``model.safetensors`` (sharded
when large), the tokenizer files. ``AutoModelForCausalLM.from_pretrained`` then loads the folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from envpipe import checkpoints
from envpipe.errors import ConfigError


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_hf` wrote: the folder, the step it came from and the files in it."""

    path: Path
    step: int
    source: Path
    files: tuple[str, ...]


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    overwrite: bool = False,
    source: str = "CHECKPOINT",
) -> ExportResult:
    """Write the checkpoint's model as a Hugging Face folder.

    Args:
        checkpoint: a save folder (its ``latest`` checkpoint, or ``tag``) or a tag folder.
        out_dir: the folder to write; created if missing.
        tag: a tag of the save folder.
        overwrite: write into a folder that already has files (same-named files are replaced).
        source: what to call ``checkpoint`` in errors.

    Raises:
        ConfigError: no complete checkpoint, a layer file missing, or a non-empty ``out_dir``.
    """
    info = checkpoints.find(checkpoint, tag=tag, source=source)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"DIR {out}: exists and is not a folder; give a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"DIR {out}: already has files; give an empty or new folder (or --overwrite)")
    config = _config(info.path, source)
    state = _hf_state_dict(info.path, config, source)
    model = _model(config, state, source=f"{source} {info.path}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in info.meta.get("model_files", []):
        shutil.copyfile(info.path / name, out / name)
    return ExportResult(out, info.step, info.path, tuple(sorted(p.name for p in out.iterdir())))


def _config(tag_path: Path, source: str):
    from transformers import LlamaConfig

    if not (tag_path / "config.json").is_file():
        raise ConfigError(f"{source} {tag_path}: no config.json; it was not saved by `envpipe train`")
    config = LlamaConfig.from_pretrained(str(tag_path), local_files_only=True)
    config.use_cache = True  # training switched it off; inference wants it
    return config


def _hf_state_dict(tag_path: Path, config, source: str) -> dict:
    """Every layer file's tensors under their Hugging Face names."""
    import torch

    from envpipe.models.llama import hf_tensor_name, layer_hf_prefixes

    prefixes = layer_hf_prefixes(config)
    state: dict = {}
    for layer_idx, prefix in enumerate(prefixes):
        files = sorted(tag_path.glob(f"layer_{layer_idx:02d}-*model_states.pt"))
        if prefix is None and not files:
            continue  # a tied head: DeepSpeed saves the shared embedding once, with the first stage
        if len(files) != 1:
            what = "missing" if not files else f"split in {len(files)} files (tensor parallel is not supported)"
            raise ConfigError(
                f"{source} {tag_path}: pipe layer {layer_idx} is {what}; the checkpoint is incomplete, "
                "export another tag"
            )
        for key, tensor in torch.load(files[0], map_location="cpu", weights_only=True).items():
            name = hf_tensor_name(prefixes, layer_idx, key)
            if name is not None:
                state[name] = tensor
    return state


def _model(config, state: dict, *, source: str):
    """A ``LlamaForCausalLM`` holding exactly ``state`` (built on the meta device, weights assigned)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of output per export, not a bar per shard
    dtype = next(iter(state.values())).dtype
    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{source}: the layers do not match config.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}); export with the config it was trained with"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)
