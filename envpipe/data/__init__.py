"""Training batches for pipeline runs: synthetic tokens, a text file tokenised as a stream, or a token file.

DeepSpeed pipelines pull data on two stages (inputs on the first, labels on the last), each from its own
iterator; both must see the same micro-batches, so everything here is a pure function of the arguments and
the data-parallel index (never the global rank, which differs between the two stages). ``start`` skips
micro-batches already trained on (a resumed run continues where it stopped).

Sources: ``None``/``"synthetic"``; ``.txt``/``.jsonl`` (tokenised chunk by chunk into a flat token file,
:mod:`envpipe.data.text`); ``.bin`` token files as nanoGPT and Megatron write them, memory-mapped
(:mod:`envpipe.data.tokens`). A file is cut into consecutive sequences of ``seq_len`` tokens; data-parallel
pipeline ``i`` of ``n`` takes sequences ``i, i+n, …``; epochs repeat in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envpipe.data.text import TEXT_SUFFIXES, cached_token_file, check_byte_level, check_text_file
from envpipe.data.tokens import SUFFIX, check_ids, open_tokens
from envpipe.errors import ConfigError

SOURCE_KINDS = ("synthetic", *TEXT_SUFFIXES, SUFFIX)


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
    start: int = 0,
    cache_dir: str | Path | None = None,
    flag: str = "--data",
) -> Iterator[tuple[Any, Any]]:
    """An endless iterator of ``(input_ids, labels)`` micro-batches, both ``[micro_batch_size, seq_len]``.

    Args:
        source: ``None`` or ``"synthetic"`` for generated tokens, a ``.txt`` or ``.jsonl`` file (jsonl: one
            object per line with a ``"text"`` field), or a ``.bin`` token file.
        vocab_size: the model's vocabulary size; every token id must be below it.
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        dp_index: this pipeline's data-parallel index (same on the first and last stage).
        dp_size: number of data-parallel pipelines; each takes every dp_size-th sequence of a file.
        seed: base seed of the synthetic stream.
        model_dir: a local HF model directory whose tokenizer tokenises text (byte-level otherwise).
        start: micro-batches of this pipeline to skip (the data position of a resumed run).
        cache_dir: where text is tokenised to (reused by later runs); default a private temporary file.
        flag: where ``source`` came from, for errors.

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
        stream = synthetic_batches(vocab_size, micro_batch_size, seq_len, seed=seed, dp_index=dp_index)
        for _ in range(start):
            next(stream)
        return stream
    tokens = load_tokens(
        Path(source), vocab_size=vocab_size, model_dir=model_dir, cache_dir=cache_dir, flag=flag
    )
    return _file_batches(
        tokens, micro_batch_size, seq_len, dp_index, dp_size, start=start, source=f"{flag} {source}",
        vocab_size=vocab_size,
    )


def load_tokens(
    path: Path,
    *,
    vocab_size: int,
    model_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    flag: str = "--data",
) -> Any:
    """The file's token ids as a memory-mapped 1-D array (text is tokenised first, as a stream)."""
    if path.suffix == SUFFIX:
        return open_tokens(path, vocab_size=vocab_size, source=flag)
    token_file = cached_token_file(
        path, vocab_size=vocab_size, model_dir=model_dir, cache_dir=cache_dir, source=flag
    )
    tokens = open_tokens(token_file, vocab_size=vocab_size, source=flag) if token_file.stat().st_size else []
    if cache_dir is None:
        token_file.unlink()  # the mapping keeps the data; nothing is left behind
    return tokens


def check_source(
    source: str | Path | None, *, vocab_size: int, model_dir: str | Path | None = None, flag: str = "--data"
) -> None:
    """Everything about a data source that can be checked in well under a second, before ranks start.

    Raises:
        ConfigError: one line naming ``flag``, the file and the fix.
    """
    if source is None or str(source) == "synthetic":
        return
    path = Path(source)
    if path.suffix == SUFFIX:
        open_tokens(path, vocab_size=vocab_size, source=flag)
        return
    check_text_file(path, source=flag)
    check_byte_level(vocab_size, model_dir, source=flag)


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


def _file_batches(
    tokens: Any,
    micro_batch_size: int,
    seq_len: int,
    dp_index: int,
    dp_size: int,
    *,
    start: int,
    source: str,
    vocab_size: int,
) -> Iterator[tuple[Any, Any]]:
    """Micro-batch ``j`` (from ``start``) read straight from the mapped tokens: O(1) to skip, nothing loaded."""
    import numpy
    import torch

    sequences = len(tokens) // seq_len
    mine = len(range(dp_index, sequences, dp_size))
    per_epoch = mine // micro_batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"{source} gives {sequences} sequences of {seq_len} tokens, fewer than one micro-batch "
            f"({micro_batch_size}) per data-parallel pipeline; use a longer file or a shorter --seq-len"
        )
    offsets = numpy.arange(seq_len)
    index = start
    while True:  # epochs repeat in file order: first and last stage stay in step
        first = (index % per_epoch) * micro_batch_size
        rows = [(dp_index + (first + i) * dp_size) * seq_len for i in range(micro_batch_size)]
        ids = numpy.asarray(tokens[numpy.add.outer(rows, offsets)], dtype=numpy.int64)
        check_ids(ids, vocab_size, source=source)
        ids = torch.from_numpy(ids)
        yield ids, ids.clone()
        index += 1
