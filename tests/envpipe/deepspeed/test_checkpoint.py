"""Checkpoints through DeepSpeed's own save/load on the EnvPipe engine: a run stopped at step k and resumed
ends exactly where an uninterrupted run does (fp32, same seed), for 1f1b and ours, on 2 and 4 CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envpipe import checkpoints
from envpipe.deepspeed.harness import run_ranks
from envpipe.errors import ConfigError

WORKERS = str(Path(__file__).with_name("checkpoint_workers.py"))


def _save_tiny(path: Path, **overrides) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from envpipe.models.llama import load_config

    torch.manual_seed(0)
    config = load_config("llama-tiny")
    for key, value in overrides.items():
        setattr(config, key, value)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def _failures(results) -> str:
    return "\n".join(f"rank {r.rank} exit {r.returncode}:\n{r.stderr_tail}" for r in results if r.returncode)


def _assert_resumed_exactly(value: dict, steps: int, stop_at: int) -> None:
    for name, run in value.items():
        assert run["c_losses"] == run["a_losses"][stop_at:], name  # bit for bit
        assert run["max_param_diff"] == 0.0, name
        assert len(set(run["a_losses"])) == steps, name  # training moved
        assert run["resumed_step"] == stop_at and run["global_steps"] == steps, name
        assert run["plan"] == {"schedule": name}
        assert run["tags"] == [f"global_step{stop_at - 1}", f"global_step{stop_at}", "latest"], name  # keep-last 2


@pytest.mark.slow
def test_two_ranks_resume_equals_uninterrupted_run_1f1b_and_ours(tmp_path):
    model_dir = _save_tiny(tmp_path / "model", attention_dropout=0.1)  # the RNG matters
    schedules = [["1f1b", 4, None], ["ours", 4, [2, 0]]]
    kwargs = {"model_dir": model_dir, "save_root": str(tmp_path / "ckpt"), "schedules": schedules, "steps": 5, "stop_at": 3}
    results = run_ranks(2, f"{WORKERS}:resume_equivalence", kwargs, timeout_s=400)
    assert all(r.returncode == 0 for r in results), _failures(results)
    for r in results:
        _assert_resumed_exactly(r.value, 5, 3)


@pytest.mark.slow
def test_four_ranks_resume_equals_uninterrupted_run_with_data_parallel_and_a_file(tmp_path):
    import numpy as np

    model_dir = _save_tiny(tmp_path / "model", attention_dropout=0.1)
    (np.arange(4000, dtype=np.uint16) * 7 % 256).astype(np.uint16).tofile(tmp_path / "train.bin")
    schedules = [["1f1b", 8, None], ["ours", 8, [1, 2, 0, 0]], ["ours-dp", 4, [2, 0]]]
    kwargs = {
        "model_dir": model_dir,
        "save_root": str(tmp_path / "ckpt"),
        "schedules": schedules,
        "steps": 4,
        "stop_at": 2,
        "data": str(tmp_path / "train.bin"),
    }
    results = run_ranks(4, f"{WORKERS}:resume_equivalence", kwargs, timeout_s=600)
    assert all(r.returncode == 0 for r in results), _failures(results)
    for r in results:
        _assert_resumed_exactly(r.value, 4, 2)
    for name in ("1f1b", "ours"):  # eval_batch through 4 stages: every stage gets the same loss
        assert len({r.value[name]["eval_loss"] for r in results}) == 1, name


def _fake_tag(save_dir: Path, step: int, **meta) -> Path:
    path = save_dir / checkpoints.tag_for_step(step)
    path.mkdir(parents=True)
    checkpoints.write_meta(path, {"step": step, "data_position": step * 4, **meta})
    return path


def test_latest_names_only_complete_checkpoints_and_keep_last_prunes_older_ones(tmp_path):
    for step in (5, 10, 15):
        _fake_tag(tmp_path, step)
    (tmp_path / "global_step20").mkdir()  # a save cut off before envpipe.json: never chosen, never pruned
    checkpoints.mark_latest(tmp_path, "global_step15")
    info = checkpoints.find(tmp_path)
    assert (info.step, info.tag, info.meta["data_position"]) == (15, "global_step15", 60)
    assert checkpoints.find(tmp_path / "global_step5").step == 5  # a tag folder itself
    assert checkpoints.find(tmp_path, tag="global_step10").step == 10
    removed = checkpoints.prune(tmp_path, 2)
    assert [p.name for p in removed] == ["global_step5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step15", "global_step20", "latest"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no 'latest' file, so no complete EnvPipe checkpoint"),
        (lambda d: (d / "latest").write_text("global_step3"), "tag 'global_step3' has no envpipe.json"),
        (
            lambda d: (_fake_tag(d, 1) / "envpipe.json").write_text(json.dumps({"format": "other/9"})),
            "has format 'other/9'",
        ),
    ],
)
def test_bad_checkpoint_folders_are_one_clear_error(tmp_path, setup, message):
    setup(tmp_path)
    if (tmp_path / "global_step1").is_dir():
        checkpoints.mark_latest(tmp_path, "global_step1")
    with pytest.raises(ConfigError, match=message) as info:
        checkpoints.find(tmp_path, source="--resume")
    assert str(info.value).startswith(f"--resume {tmp_path}")
    with pytest.raises(ConfigError, match="no such folder"):
        checkpoints.find(tmp_path / "nope", source="--resume")


def test_resume_with_another_topology_names_the_field():
    from envpipe.deepspeed.checkpoint import check_topology

    meta = {"stages": 2, "data_parallel": 1, "micro_batches": 4, "world_size": 2}
    check_topology(meta, {"stages": 2, "data_parallel": 1, "micro_batches": 4}, 2, source="--resume d")
    with pytest.raises(ConfigError, match="saved with stages=2, this run has stages=4; resume with the same stages"):
        check_topology(meta, {"stages": 4, "data_parallel": 1, "micro_batches": 4}, 4, source="--resume d")
