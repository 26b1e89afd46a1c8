"""Training batches for pipeline runs: synthetic tokens, or a .txt / .jsonl file tokenised locally.

DeepSpeed pipelines pull data on two stages (inputs on the first, labels on the last), each from its own
iterator; both must see the same micro-batches, so everything here is a pure function of the arguments and
the data-parallel index (never the global rank, which differs between the two stages).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError


def batches(
    source: str | Path | None,
    *,
    vocab_size: int,
    micro_batch_size: int,
    seq_len: int,
    dp_index: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    model_dir: str | Path | None = None,
) -> Iterator[tuple[Any, Any]]:
    """An endless iterator of ``(input_ids, labels)`` micro-batches, both ``[micro_batch_size, seq_len]``.

    Args:
        source: ``None`` or ``"synthetic"`` for generated tokens, else a ``.txt`` or ``.jsonl`` file
            (jsonl: one object per line with a ``"text"`` field).
        vocab_size: the model's vocabulary size; every token id must be below it.
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        dp_index: this pipeline's data-parallel index (same on the first and last stage).
        dp_size: number of data-parallel pipelines; each takes every dp_size-th sequence of a file.
        seed: base seed of the synthetic stream.
        model_dir: a local HF model directory whose tokenizer tokenises the file (byte-level otherwise).

    Raises:
        ConfigError: bad sizes, unknown file type, or a file too short for one micro-batch.
    """
    if micro_batch_size < 1 or seq_len < 2:
        raise ConfigError(
            f"need micro_batch_size >= 1 and seq_len >= 2, got {micro_batch_size} and {seq_len}"
        )
    if not 0 <= dp_index < dp_size:
        raise ConfigError(f"data-parallel index {dp_index} is outside 0..{dp_size - 1}")
    if source is None or str(source) == "synthetic":
        return synthetic_batches(vocab_size, micro_batch_size, seq_len, seed=seed, dp_index=dp_index)
    tokens = tokenize_file(Path(source), vocab_size=vocab_size, model_dir=model_dir)
    return _file_batches(tokens, micro_batch_size, seq_len, dp_index, dp_size, source=str(source))


def synthetic_batches(
    vocab_size: int, micro_batch_size: int, seq_len: int, *, seed: int = 0, dp_index: int = 0
) -> Iterator[tuple[Any, Any]]:
    """Arithmetic token sequences ``(start + step * t) mod vocab`` with random start and step.

    Learnable (the loss falls within a few steps, which makes a demo run meaningful) and deterministic per
    ``(seed, dp_index)``.
    """
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + dp_index)
    positions = torch.arange(seq_len)
    while True:
        start = torch.randint(0, vocab_size, (micro_batch_size, 1), generator=generator)
        step = torch.randint(1, 8, (micro_batch_size, 1), generator=generator)
        ids = (start + step * positions) % vocab_size
        yield ids, ids.clone()


def tokenize_file(path: Path, *, vocab_size: int, model_dir: str | Path | None = None) -> list[int]:
    """Token ids of a .txt or .jsonl file, with the model directory's tokenizer or byte-level ids.

    Raises:
        ConfigError: missing file, unknown suffix, bad jsonl line, or ids that do not fit the vocabulary.
    """
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    text = _read_text(path)
    tokenizer = _local_tokenizer(model_dir)
    if tokenizer is not None:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        if vocab_size < 256:
            raise ConfigError(
                f"byte-level tokens need vocab_size >= 256, the model has {vocab_size}; "
                "give a model directory with a tokenizer"
            )
        tokens = list(text.encode("utf-8"))
    if tokens and max(tokens) >= vocab_size:
        raise ConfigError(
            f"{path} tokenises to id {max(tokens)} >= vocab_size {vocab_size}; use the model's tokenizer"
        )
    return tokens


def _read_text(path: Path) -> str:
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        raise ConfigError(f"data file {path} must end in .txt or .jsonl")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number} is not JSON ({exc.msg}); write one object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f'{path}:{number} needs a string "text" field')
        texts.append(record["text"])
    return "\n".join(texts)


def _local_tokenizer(model_dir: str | Path | None) -> Any:
    """The directory's tokenizer if it has one (never downloads), else None for the byte-level fallback."""
    if model_dir is None:
        return None
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((Path(model_dir) / name).is_file() for name in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def _file_batches(
    tokens: list[int], micro_batch_size: int, seq_len: int, dp_index: int, dp_size: int, *, source: str
) -> Iterator[tuple[Any, Any]]:
    import torch

    sequences = [tokens[i : i + seq_len] for i in range(0, len(tokens) - seq_len + 1, seq_len)]
    mine = sequences[dp_index::dp_size]
    if len(mine) < micro_batch_size:
        raise ConfigError(
            f"{source} gives {len(sequences)} sequences of {seq_len} tokens, fewer than one micro-batch "
            f"({micro_batch_size}) per data-parallel pipeline; use a longer file or a shorter --seq-len"
        )
    data = torch.tensor(mine, dtype=torch.long)
    while True:  # epochs repeat in file order: first and last stage stay in step
        for start in range(0, len(mine) - micro_batch_size + 1, micro_batch_size):
            ids = data[start : start + micro_batch_size]
            yield ids, ids.clone()
