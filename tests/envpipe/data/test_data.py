"""Data at scale: streaming tokenisation with bounded memory, nanoGPT/Megatron token files, resumable position."""

from __future__ import annotations

import json
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest

from envpipe.data import batches, check_source
from envpipe.data import text as text_module
from envpipe.data.text import tokenize_to_file
from envpipe.errors import ConfigError


def _take(iterator, n):
    return [next(iterator)[0] for _ in range(n)]


def test_nanogpt_flat_uint16_file_is_read_mapped_in_sequence_order(tmp_path):
    ids = np.arange(200, dtype=np.uint16) % 251
    ids.tofile(tmp_path / "train.bin")  # exactly what nanoGPT's prepare.py does
    stream = batches(tmp_path / "train.bin", vocab_size=256, micro_batch_size=2, seq_len=10)
    first, second = _take(stream, 2)
    assert first.tolist() == [list(range(0, 10)), list(range(10, 20))]
    assert second[0].tolist() == list(range(20, 30))
    # data parallel: pipeline 1 of 2 takes sequences 1, 3, 5, ...
    other = batches(tmp_path / "train.bin", vocab_size=256, micro_batch_size=2, seq_len=10, dp_index=1, dp_size=2)
    assert next(other)[0].tolist() == [list(range(10, 20)), list(range(30, 40))]


def test_start_continues_exactly_where_a_stream_stopped_across_epochs(tmp_path):
    (np.arange(95, dtype=np.uint16)).tofile(tmp_path / "t.bin")  # 9 sequences of 10: 4 batches/epoch
    args = {"vocab_size": 256, "micro_batch_size": 2, "seq_len": 10}
    whole = _take(batches(tmp_path / "t.bin", **args), 11)
    resumed = _take(batches(tmp_path / "t.bin", start=7, **args), 4)
    assert [t.tolist() for t in resumed] == [t.tolist() for t in whole[7:]]
    assert whole[4].tolist() == whole[0].tolist()  # second epoch, same order
    synthetic = _take(batches(None, **args), 5)
    assert [t.tolist() for t in _take(batches(None, start=3, **args), 2)] == [t.tolist() for t in synthetic[3:]]


def test_large_vocabulary_reads_uint32_and_megatron_idx_names_its_type(tmp_path):
    big = np.array([70000, 5, 99999, 7] * 10, dtype=np.uint32)
    big.tofile(tmp_path / "big.bin")
    ids = next(batches(tmp_path / "big.bin", vocab_size=128256, micro_batch_size=1, seq_len=4))[0]
    assert ids.tolist() == [[70000, 5, 99999, 7]]
    # Megatron: .bin with an .idx whose header says int32 (code 4), even for a small vocabulary
    np.arange(40, dtype=np.int32).tofile(tmp_path / "doc.bin")
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 1, 2)
    (tmp_path / "doc.idx").write_bytes(header + struct.pack("<i", 40) + struct.pack("<q", 0) + struct.pack("<qq", 0, 1))
    ids = next(batches(tmp_path / "doc.bin", vocab_size=256, micro_batch_size=1, seq_len=8))[0]
    assert ids.tolist() == [list(range(8))]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("odd.bin", b"\x01\x00\x02", "not a whole number of uint16 tokens"),
        ("empty.bin", b"", "the file is empty"),
        ("wide.bin", np.array([300, 2], dtype=np.uint16).tobytes(), "token id 300, outside the model's vocabulary 0..255"),
        ("fake.bin", b"x" * 10, None),  # an .idx that is not Megatron's is named (see below)
        ("blob.txt", b"\x00\x01\x02binary", "looks binary"),
        ("latin.txt", "caf\u00e9 ".encode("latin-1") * 10, "not UTF-8"),
        ("blank.txt", b"\n\n  \n", "the file is empty"),
        ("field.jsonl", b'{"body": "x"}\n', 'needs a string "text" field'),
        ("notjson.jsonl", b"{oops\n", "is not JSON"),
        ("data.parquet", b"PAR1", "must end in .txt, .jsonl or .bin"),
    ],
)
def test_bad_sources_are_one_clear_error_before_ranks_start(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    if name == "fake.bin":
        (tmp_path / "fake.idx").write_bytes(b"not an index at all")
        message = "not a Megatron index"
    with pytest.raises(ConfigError, match=message) as info:
        check_source(tmp_path / name, vocab_size=256, flag="ds.json: envpipe.data")
    assert str(info.value).startswith("ds.json: envpipe.data ")
    assert "\n" not in str(info.value)


def test_text_without_tokenizer_needs_a_byte_sized_vocabulary(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    check_source(tmp_path / "a.txt", vocab_size=256)  # bytes fit
    with pytest.raises(ConfigError, match="--data: the model is a preset without tokenizer.*vocab_size >= 256"):
        check_source(tmp_path / "a.txt", vocab_size=128)


def test_streaming_tokenisation_memory_is_bounded_by_the_chunk_not_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "CHUNK_CHARS", 1 << 14)
    line = "the quick brown fox jumps over the lazy dog 0123456789\n"
    path = tmp_path / "big.txt"
    with open(path, "w") as handle:
        for _ in range(80_000):  # ~4.4 MB
            handle.write(line)
    size = path.stat().st_size
    tracemalloc.start()
    count = tokenize_to_file(path, tmp_path / "big.bin", vocab_size=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == size
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte file"
    # the result is a flat uint16 token file nanoGPT reads back as is
    assert bytes(np.fromfile(tmp_path / "big.bin", dtype=np.uint16)[: len(line)].astype(np.uint8)) == line.encode()


def test_jsonl_records_stream_in_chunks_exactly_as_one_joined_text(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "CHUNK_CHARS", 64)
    texts = [f"record {i} " + "z" * (i % 50) for i in range(100)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    tokenize_to_file(path, tmp_path / "d.bin", vocab_size=256)
    got = bytes(np.fromfile(tmp_path / "d.bin", dtype=np.uint16).astype(np.uint8))
    assert got == "\n".join(texts).encode()


def test_tokenizer_chunks_match_whole_file_tokenisation_and_cache_is_reused(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "red": 1, "green": 2, "blue": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "model")
    text = "red green\nblue purple red\n" * 300
    (tmp_path / "c.txt").write_text(text)
    monkeypatch.setattr(text_module, "CHUNK_CHARS", 100)
    cache = tmp_path / "cache"
    args = {"vocab_size": 8, "micro_batch_size": 1, "seq_len": 5, "model_dir": tmp_path / "model", "cache_dir": cache}
    first = next(batches(tmp_path / "c.txt", **args))[0]
    assert first.tolist() == [fast(text)["input_ids"][:5]]
    (cached,) = cache.glob("*.bin")
    assert np.fromfile(cached, dtype=np.uint16).tolist() == fast(text)["input_ids"]
    stamp = cached.stat().st_mtime_ns
    next(batches(tmp_path / "c.txt", **args))
    assert cached.stat().st_mtime_ns == stamp  # not tokenised twice
    # without a cache folder nothing is left behind in the temporary folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert next(batches(tmp_path / "c.txt", **{**args, "cache_dir": None}))[0].tolist() == first.tolist()
    assert list((tmp_path / "tmp").iterdir()) == []
