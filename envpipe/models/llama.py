"""HF Llama as a DeepSpeed ``PipelineModule``: embedding / decoder layers / norm + head.

Only hidden states cross stages (a single tensor, the one thing DeepSpeed pipelines carry without tricks):
every decoder layer computes its own rotary ``(cos, sin)`` from the sequence length, cached per shape, so
positions never travel. Attention is sdpa with ``mask=None``, which transformers runs causally (eager
attention with no mask would silently train a non-causal model).

Weights come from a seeded init (each layer seeded by its index, so the same model is built whatever the
stage split) or from a local HF directory (``config.json`` + ``*.safetensors``); the hub is never used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError

# Shapes from public Llama configs; vocab of the tiny preset is byte-level so it trains on raw text too.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 256,
        "max_position_embeddings": 2048,
    },
    "llama-160m": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "llama-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}
_ALIASES = {"tiny": "llama-tiny", "160m": "llama-160m", "1b": "llama-1b", "7b": "llama-7b"}


def preset_name(name: str) -> str | None:
    """The preset a name means (``tiny`` -> ``llama-tiny``), or None when it names no preset."""
    name = _ALIASES.get(name, name)
    return name if name in PRESETS else None


def load_config(preset_or_dir: str) -> Any:
    """A ``LlamaConfig`` from a preset name or a local HF model directory, set up for sdpa.

    Args:
        preset_or_dir: ``llama-tiny``, ``llama-160m``, ``llama-1b``, ``llama-7b`` (or ``tiny``/``160m``/…),
            or a directory holding ``config.json``.

    Raises:
        ConfigError: unknown preset, missing directory or a config that is not a Llama config.
    """
    from transformers import LlamaConfig

    name = _ALIASES.get(preset_or_dir, preset_or_dir)
    if name in PRESETS:
        config = LlamaConfig(**PRESETS[name], tie_word_embeddings=False)
    else:
        config_path = Path(preset_or_dir) / "config.json"
        if not config_path.is_file():
            raise ConfigError(
                f"model {preset_or_dir!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with "
                "config.json; pass a preset name or a local HF model directory"
            )
        raw = json.loads(config_path.read_text())
        if raw.get("model_type", "llama") != "llama":
            raise ConfigError(
                f"{config_path} has model_type {raw.get('model_type')!r}; only Llama models are supported"
            )
        config = LlamaConfig.from_pretrained(str(config_path.parent), local_files_only=True)
    config._attn_implementation = "sdpa"  # causal with mask=None; eager would not be
    config.use_cache = False
    return config


def _init_weights(module: Any, std: float) -> None:
    """HF Llama's init (normal(0, initializer_range) weights, zero biases, unit norms)."""
    from torch import nn

    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif type(sub).__name__ == "LlamaRMSNorm":
            nn.init.ones_(sub.weight)


def _layer_classes():
    """The pipe layer classes, built on demand so that importing this module does not import torch."""
    import torch
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    class EmbeddingPipe(nn.Module):
        """Token ids → hidden states (stage 0); also the tied head when embeddings are tied."""

        def __init__(self, config):
            super().__init__()
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            _init_weights(self, config.initializer_range)

        def forward(self, input_ids):
            return self.embed_tokens(input_ids)

    class DecoderPipe(nn.Module):
        """One ``LlamaDecoderLayer`` with its own rotary module, so only hidden states cross stages."""

        def __init__(self, config, layer_idx: int):
            super().__init__()
            self.layer = LlamaDecoderLayer(config, layer_idx)
            self.rotary_emb = LlamaRotaryEmbedding(config)
            self._rope_cache: dict[tuple, tuple] = {}
            _init_weights(self, config.initializer_range)

        def _position_embeddings(self, hidden):
            key = (hidden.shape[1], hidden.dtype, hidden.device)
            if key not in self._rope_cache:  # positions are 0..seq-1 for every micro-batch: compute once
                position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
                with torch.no_grad():
                    self._rope_cache[key] = self.rotary_emb(hidden, position_ids)
            return self._rope_cache[key]

        def forward(self, hidden):
            out = self.layer(
                hidden, attention_mask=None, position_embeddings=self._position_embeddings(hidden)
            )
            return out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple

    class NormPipe(nn.Module):
        """The final RMSNorm (its own layer so that a tied head can reuse the embedding module)."""

        def __init__(self, config):
            super().__init__()
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        def forward(self, hidden):
            return self.norm(hidden)

    class HeadPipe(nn.Module):
        """Hidden states → logits (untied head)."""

        def __init__(self, config):
            super().__init__()
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            _init_weights(self, config.initializer_range)

        def forward(self, hidden):
            return self.lm_head(hidden)

    return EmbeddingPipe, DecoderPipe, NormPipe, HeadPipe


def causal_lm_loss(logits: Any, labels: Any) -> Any:
    """HF's causal-LM loss: token t predicts label t+1; mean over labels that are not -100."""
    import torch.nn.functional as F

    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )


def _tied_head(embedding: Any, hidden: Any) -> Any:
    import torch.nn.functional as F

    return F.linear(hidden, embedding.embed_tokens.weight)


def layer_hf_prefixes(config: Any) -> list[str | None]:
    """The HF state-dict prefix of every pipe layer, in pipe order (None: a tied head, loaded as embedding)."""
    prefixes: list[str | None] = ["model."]
    prefixes += [f"model.layers.{i}." for i in range(config.num_hidden_layers)]
    prefixes += ["model.", None if config.tie_word_embeddings else ""]
    return prefixes


def hf_tensor_name(prefixes: list[str | None], layer_idx: int, key: str) -> str | None:
    """The HF name of tensor ``key`` of pipe layer ``layer_idx`` (None: a per-layer rotary cache, not a weight).

    ``prefixes`` is :func:`layer_hf_prefixes`; a tied head (prefix None) holds the embedding's weight.
    """
    hf_key = key.removeprefix("layer.")
    if hf_key.startswith("rotary_emb."):
        return None
    prefix = prefixes[layer_idx]
    return "model." + hf_key if prefix is None else prefix + hf_key


def balanced_parts(num_decoder_layers: int, num_stages: int) -> list[int]:
    """Layer boundaries for [embedding, decoder × L, norm, head]: decoder layers split as evenly as possible.

    Earlier stages get the extra decoder layer when L is not a multiple of the stage count, because the last
    stage already carries the norm, the head and the loss.

    Raises:
        ConfigError: fewer decoder layers than stages.
    """
    if num_decoder_layers < num_stages:
        raise ConfigError(
            f"{num_decoder_layers} decoder layers cannot fill {num_stages} stages; use fewer stages or a deeper model"
        )
    base, extra = divmod(num_decoder_layers, num_stages)
    parts = [0]
    for stage in range(num_stages):
        parts.append(parts[-1] + base + (1 if stage < extra else 0) + (1 if stage == 0 else 0))
    parts[-1] += 2  # norm and head
    return parts


def build_pipeline(
    config: Any,
    num_stages: int | None = None,
    *,
    model_dir: str | Path | None = None,
    seed: int = 0,
    activation_checkpoint_interval: int = 0,
    topology: Any = None,
) -> Any:
    """Build this rank's part of the Llama pipeline (call after ``torch.distributed`` is initialised).

    Args:
        config: a ``LlamaConfig`` (see :func:`load_config`) or a preset name / model directory.
        num_stages: pipeline stages (or give ``topology``).
        model_dir: load weights from this local HF directory (``*.safetensors``); else seeded init.
        seed: base seed; layer i is initialised from ``seed + i`` whatever the split.
        activation_checkpoint_interval: layers per checkpoint (0 = off); use ``use_reentrant: false``.
        topology: a DeepSpeed ``ProcessTopology`` for pipeline × data parallel layouts.

    Returns:
        The ``PipelineModule`` holding this stage's layers, with ``causal_lm_loss`` as its loss.
    """
    from envpipe.deepspeed.pipeline import layer_spec, pipeline_module, tied_layer_spec

    if isinstance(config, (str, Path)):
        if model_dir is None and Path(config).is_dir():
            model_dir = config
        config = load_config(str(config))
    embedding_pipe, decoder_pipe, norm_pipe, head_pipe = _layer_classes()
    if config.tie_word_embeddings:
        first = tied_layer_spec("embed", embedding_pipe, config, tied_weight_attr="embed_tokens.weight")
        last = tied_layer_spec(
            "embed", embedding_pipe, config, forward_fn=_tied_head, tied_weight_attr="embed_tokens.weight"
        )
    else:
        first, last = layer_spec(embedding_pipe, config), layer_spec(head_pipe, config)
    layers = [first] + [layer_spec(decoder_pipe, config, i) for i in range(config.num_hidden_layers)]
    layers += [layer_spec(norm_pipe, config), last]
    module = pipeline_module(
        layers,
        # [embedding, decoder x L, norm, head]: the decoder layers spread evenly (balanced_parts).
        bounds=lambda num_specs, stages: balanced_parts(num_specs - 3, stages),
        num_stages=num_stages,
        topology=topology,
        loss_fn=causal_lm_loss,
        seed=seed,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["DecoderPipe"],
    )
    module.llama_config = config
    if model_dir is not None:
        load_hf_weights(module, config, model_dir)
    return module


def load_hf_weights(module: Any, config: Any, model_dir: str | Path) -> None:
    """Copy this stage's tensors from a local HF directory's safetensors files into the pipe module.

    Raises:
        ConfigError: no safetensors files, or a tensor this stage needs is missing or has the wrong shape.
    """
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"no *.safetensors in {model_dir}; save the model with save_pretrained(safe_serialization=True)"
        )
    wanted = _wanted_tensors(module, config)
    found: dict[str, Any] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in set(handle.keys()) & set(wanted):
                found[name] = handle.get_tensor(name)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ConfigError(f"{model_dir} lacks {len(missing)} tensors this stage needs, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, param in wanted.items():
            if tuple(found[name].shape) != tuple(param.shape):
                raise ConfigError(
                    f"{name} in {model_dir} has shape {tuple(found[name].shape)}, "
                    f"the model expects {tuple(param.shape)}; check config.json"
                )
            param.copy_(found[name].to(param.dtype))


def _wanted_tensors(module: Any, config: Any) -> dict[str, Any]:
    """HF tensor name → local parameter/buffer for every layer this stage holds."""
    from envpipe.deepspeed.pipeline import local_layers

    prefixes = layer_hf_prefixes(config)
    wanted: dict[str, Any] = {}
    for layer_idx in local_layers(module):
        layer = getattr(module, str(layer_idx), None)
        if layer is None:  # a tied layer lives in module.tied_modules
            continue
        for key, tensor in layer.state_dict(keep_vars=True).items():
            name = hf_tensor_name(prefixes, layer_idx, key)
            if name is not None:
                wanted[name] = tensor
    for tied in module.tied_modules.values():
        wanted["model.embed_tokens.weight"] = tied.embed_tokens.weight
    return wanted
