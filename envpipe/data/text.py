"""Text and jsonl files tokenised as a stream into a flat token file, with memory bounded by the chunk size.

A ``.txt`` file is read in chunks of about :data:`CHUNK_CHARS` characters cut at line ends; a ``.jsonl`` file
record by record (one object per line with a string ``"text"`` field; records are joined with a newline, as
one text). Each chunk is tokenised (the model folder's tokenizer, else UTF-8 bytes when the vocabulary has
room for 256 ids) and appended to a ``.bin`` token file (:mod:`envpipe.data.tokens`), which training then
maps. Memory is one chunk and its ids, whatever the file size.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envpipe.data.tokens import SUFFIX, TokenWriter, check_ids
from envpipe.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".jsonl")
CHUNK_CHARS = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_SNIFF_BYTES = 8192


def has_tokenizer(model_dir: str | Path | None) -> bool:
    """Whether a model folder carries tokenizer files."""
    return model_dir is not None and any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def local_tokenizer(model_dir: str | Path | None) -> Any:
    """The folder's tokenizer if it has one (never downloads), else None (byte-level ids)."""
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def check_byte_level(vocab_size: int, model_dir: str | Path | None, *, source: str) -> None:
    """Raise ``ConfigError`` when text must fall back to bytes but the vocabulary has fewer than 256 ids."""
    if not has_tokenizer(model_dir) and vocab_size < 256:
        where = f"model folder {model_dir} has no tokenizer" if model_dir else "model is a preset without tokenizer"
        raise ConfigError(
            f"{source}: the {where}, and byte-level tokens need vocab_size >= 256 (the model has "
            f"{vocab_size}); give a model folder with tokenizer.json, or a pre-tokenised {SUFFIX} file"
        )


def check_text_file(path: Path, *, source: str) -> None:
    """Cheap checks before any rank starts: suffix, not empty, UTF-8 text, and jsonl's first record.

    Raises:
        ConfigError: one line naming the file, what is wrong and the fix.
    """
    if path.suffix not in TEXT_SUFFIXES:
        raise ConfigError(
            f"{source} {path}: must end in .txt, .jsonl or {SUFFIX} (a pre-tokenised token file)"
        )
    if not path.is_file():
        raise ConfigError(f"{source} {path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if not head.strip():
        raise ConfigError(f"{source} {path}: the file is empty; give a file with text")
    if b"\x00" in head:
        raise ConfigError(f"{source} {path}: looks binary (NUL bytes), not text; a token file must end in {SUFFIX}")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a cut multi-byte character at the end is fine
            raise ConfigError(f"{source} {path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if path.suffix == ".jsonl":
        first = next(_records(path, source=source, limit=1), None)
        if first is None:
            raise ConfigError(f"{source} {path}: no JSON records; write one object per line")


def iter_text_chunks(path: Path, *, source: str = "--data") -> Iterator[str]:
    """The file's text in chunks of about :data:`CHUNK_CHARS` characters, cut at line ends."""
    if path.suffix == ".jsonl":
        batch: list[str] = []
        size = 0
        first = True
        for text in _records(path, source=source):
            batch.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                yield ("" if first else "\n") + "\n".join(batch)
                batch, size, first = [], 0, False
        if batch:
            yield ("" if first else "\n") + "\n".join(batch)
        return
    with open(path, encoding="utf-8", newline="") as handle:
        try:
            while True:
                chunk = handle.read(CHUNK_CHARS)
                if not chunk:
                    return
                yield chunk + handle.readline()  # finish the line so no word is cut in two
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source} {path}: not UTF-8 text ({exc.reason}); convert it to UTF-8") from None


def _records(path: Path, *, source: str, limit: int | None = None) -> Iterator[str]:
    count = 0
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{source} {path}:{number} is not JSON ({exc.msg}); write one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f'{source} {path}:{number} needs a string "text" field')
            yield record["text"]
            count += 1
            if limit is not None and count >= limit:
                return


def tokenize_to_file(
    path: Path, dest: Path, *, vocab_size: int, model_dir: str | Path | None = None, source: str = "--data"
) -> int:
    """Tokenise a ``.txt``/``.jsonl`` file chunk by chunk into the flat token file ``dest``.

    Returns:
        The number of tokens written.

    Raises:
        ConfigError: a bad file, or ids that do not fit the vocabulary.
    """
    check_text_file(path, source=source)
    import numpy

    check_byte_level(vocab_size, model_dir, source=source)
    tokenizer = local_tokenizer(model_dir)
    writer = TokenWriter(dest, vocab_size)
    try:
        for chunk in iter_text_chunks(path, source=source):
            if tokenizer is not None:
                ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            else:
                ids = chunk.encode("utf-8")
            array = numpy.frombuffer(ids, dtype="uint8") if isinstance(ids, bytes) else numpy.asarray(ids)
            check_ids(array, vocab_size, source=f"{source} {path}")
            writer.write(array)
    finally:
        writer.close()
    return writer.count


def cached_token_file(
    path: Path,
    *,
    vocab_size: int,
    model_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    source: str = "--data",
) -> Path:
    """The token file of a text file, tokenised once into ``cache_dir`` (reused while the inputs are unchanged).

    Without ``cache_dir`` the tokens go to a private temporary file: the caller maps it and may unlink it.
    Concurrent callers (the first and the last stage) each write their own temporary file and rename it:
    the result is complete whoever wins.
    """
    if cache_dir is None:
        handle, name = tempfile.mkstemp(prefix="envpipe-tokens-", suffix=SUFFIX)
        os.close(handle)
        tokenize_to_file(path, Path(name), vocab_size=vocab_size, model_dir=model_dir, source=source)
        return Path(name)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / f"{path.stem}-{_cache_key(path, vocab_size, model_dir)}{SUFFIX}"
    if not dest.is_file():
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            tokenize_to_file(path, tmp, vocab_size=vocab_size, model_dir=model_dir, source=source)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _cache_key(path: Path, vocab_size: int, model_dir: str | Path | None) -> str:
    """Changes when the text, the tokenizer or the vocabulary's token width changes."""
    parts = [str(path.resolve()), str(path.stat().st_size), str(path.stat().st_mtime_ns), str(vocab_size)]
    if has_tokenizer(model_dir):
        for name in TOKENIZER_FILES:
            file = Path(model_dir) / name
            if file.is_file():
                parts += [name, str(file.stat().st_size), str(file.stat().st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
