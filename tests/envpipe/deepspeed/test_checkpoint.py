"""Checkpoints through DeepSpeed's own save/load on the EnvPipe engine: a run stopped at step k and resumed
ends exactly where an uninterrupted run does (fp32, same seed), for 1f1b and ours, on 2 and 4 CPU ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from envpipe.deepspeed.launcher import run_ranks
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


def test_resume_with_another_topology_names_the_field():
    from envpipe.deepspeed.checkpoint import check_topology

    meta = {"stages": 2, "data_parallel": 1, "micro_batches": 4, "world_size": 2}
    check_topology(meta, {"stages": 2, "data_parallel": 1, "micro_batches": 4}, 2, source="--resume d")
    with pytest.raises(ConfigError, match="saved with stages=2, this run has stages=4; resume with the same stages"):
        check_topology(meta, {"stages": 4, "data_parallel": 1, "micro_batches": 4}, 4, source="--resume d")
