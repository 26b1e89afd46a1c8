"""Pre-tokenised token files, read memory-mapped: the flat arrays nanoGPT and Megatron-style pipelines write.

* Flat ``.bin`` (nanoGPT's ``prepare.py``: ``np.array(ids, dtype=np.uint16).tofile("train.bin")``): raw
  little-endian token ids, no header. The width follows nanoGPT's rule: ``uint16`` when the vocabulary fits
  (``vocab_size <= 65536``), else ``uint32``.
* Megatron's ``.bin`` + ``.idx`` pair (``MMapIndexedDataset``): the ``.idx`` header names the integer type
  (codes from Megatron's ``DType`` enum); documents are read back to back, as one stream.

EnvPipe writes its own tokenised text (:mod:`envpipe.data.text`) in the flat format, so a cached file is
also a file nanoGPT can read. Memory stays bounded whatever the file size: the array is mapped, never loaded.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError

SUFFIX = ".bin"
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
# Megatron-LM megatron/core/datasets/indexed_dataset.py, class DType (integer codes only).
MEGATRON_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 8: "uint16"}
# Tokens checked against the vocabulary before the ranks start (the rest is checked batch by batch).
CHECK_PREFIX_TOKENS = 1 << 22


def flat_dtype(vocab_size: int) -> str:
    """nanoGPT's width for a vocabulary: ``uint16`` when every id fits, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def megatron_dtype(idx_path: Path, *, source: str) -> str:
    """The token type named in a Megatron ``.idx`` header.

    Raises:
        ConfigError: not a Megatron index, or a non-integer type.
    """
    with open(idx_path, "rb") as handle:
        header = handle.read(len(MEGATRON_MAGIC) + 9)
    if len(header) < len(MEGATRON_MAGIC) + 9 or not header.startswith(MEGATRON_MAGIC):
        raise ConfigError(
            f"{source} {idx_path}: not a Megatron index (no MMIDIDX header); remove it to read "
            f"{idx_path.with_suffix(SUFFIX).name} as a flat token array"
        )
    code = struct.unpack("<B", header[len(MEGATRON_MAGIC) + 8 :][:1])[0]
    if code not in MEGATRON_DTYPES:
        raise ConfigError(f"{source} {idx_path}: stores type code {code}, not token ids; tokenise the text again")
    return MEGATRON_DTYPES[code]


def open_tokens(path: str | Path, *, vocab_size: int, source: str = "--data") -> Any:
    """Map a token file read-only as a 1-D NumPy array, after checking it fits the model.

    Args:
        path: a ``.bin`` file (flat, or with a Megatron ``.idx`` beside it).
        vocab_size: the model's vocabulary; ids at or above it are refused.
        source: where the path came from, for errors (``--data``, ``ds.json: envpipe.data``).

    Raises:
        ConfigError: missing or empty file, a size that is not a whole number of tokens, or ids that do not
            fit the vocabulary (checked on the first :data:`CHECK_PREFIX_TOKENS` tokens).
    """
    import numpy

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{source} {path}: no such file")
    idx = path.with_suffix(".idx")
    dtype = megatron_dtype(idx, source=source) if idx.is_file() else flat_dtype(vocab_size)
    itemsize = numpy.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"{source} {path}: the file is empty; give a token file with data")
    if size % itemsize:
        raise ConfigError(
            f"{source} {path}: {size} bytes is not a whole number of {dtype} tokens; a flat token file for a "
            f"vocabulary of {vocab_size} holds {dtype} ids (nanoGPT's convention)"
        )
    tokens = numpy.memmap(path, dtype=dtype, mode="r")
    check_ids(tokens[:CHECK_PREFIX_TOKENS], vocab_size, source=f"{source} {path}")
    return tokens


def check_ids(ids: Any, vocab_size: int, *, source: str) -> None:
    """Raise ``ConfigError`` when an id is negative or not below ``vocab_size``."""
    if len(ids) == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ConfigError(
            f"{source} holds token id {high if high >= vocab_size else low}, outside the model's vocabulary "
            f"0..{vocab_size - 1}; tokenise with the model's own tokenizer"
        )


class TokenWriter:
    """Append token ids to a flat ``.bin`` file in nanoGPT's format (``uint16``/``uint32`` by vocabulary)."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        import numpy

        self._numpy = numpy
        self.dtype = flat_dtype(vocab_size)
        self.count = 0
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in close()

    def write(self, ids: Any) -> None:
        """Append a sequence of ids (a list or an array)."""
        array = self._numpy.asarray(ids, dtype=self.dtype)
        array.tofile(self._handle)
        self.count += len(array)

    def close(self) -> None:
        """Flush and close the file."""
        self._handle.close()
