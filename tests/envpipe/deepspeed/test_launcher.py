"""The one local launcher: N ranks with torchrun's environment, results back, a failure stops the rest."""

from __future__ import annotations

import os
import time

from envpipe.deepspeed.launcher import rank_env, run_ranks

HERE = os.path.abspath(__file__)


def rank_info() -> dict:
    """Run in every rank: what the launcher set."""
    return {
        key: os.environ[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "OMP_NUM_THREADS")
    }


def fail_on_rank_one() -> int:
    """Rank 1 fails at once; rank 0 would wait far longer than the grace period."""
    if os.environ["RANK"] == "1":
        raise SystemExit(3)
    time.sleep(600)
    return 0


def test_every_rank_gets_its_environment_and_returns_its_value() -> None:
    results = run_ranks(2, f"{HERE}:rank_info", timeout_s=120)
    assert [r.returncode for r in results] == [0, 0]
    assert [r.value["RANK"] for r in results] == ["0", "1"]
    assert {r.value["WORLD_SIZE"] for r in results} == {"2"} and {
        r.value["OMP_NUM_THREADS"] for r in results
    } == {"1"}
    assert len({r.value["MASTER_PORT"] for r in results}) == 1


def test_a_failed_rank_stops_the_others_after_the_grace_period() -> None:
    started = time.monotonic()
    results = run_ranks(2, f"{HERE}:fail_on_rank_one", timeout_s=300, grace_s=1.0)
    assert results[1].returncode == 3 and results[0].returncode != 0 and results[0].value is None
    assert time.monotonic() - started < 250  # stopped, not waited for (generous: loaded CI machines)


def test_rank_env_is_what_torchrun_sets() -> None:
    env = rank_env(1, 4, 12345, agent="ipc:///tmp/x", extra={"X": "1"})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "1", "4", "12345")
    assert env["ENVPIPE_AGENT"] == "ipc:///tmp/x" and env["X"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
