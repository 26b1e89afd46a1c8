"""examples/own_script/train.py, a user's own DeepSpeed pipeline script (an MLP stack), started by torchrun on
2 and 4 CPU ranks against a sim agent: every train_batch is one optimizer step, the controller plans during
the first steps, and the model trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "own_script" / "train.py"


@pytest.fixture
def sim_agent(tmp_path: Path):
    from envpipe_agent.embedded import start_agent

    agent = start_agent(backend="sim", gpus=4, runtime_dir=str(tmp_path))
    yield agent
    agent.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("ranks", [2, 4])
def test_own_script_trains_through_the_controller(ranks: int, tmp_path: Path, sim_agent):
    from envpipe.train.ranks import free_port

    report = tmp_path / "result.json"
    steps = 70
    env = {
        **os.environ,
        "ENVPIPE_AGENT": sim_agent.endpoint,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}",
            str(SCRIPT),
            "--steps",
            str(steps),
            "--report",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["optimizer_steps"] == steps == sum(result["controller"]["step_counts"].values())
    assert result["controller"]["state"] == "at-plan" and result["controller"]["planned"]
    counts = result["controller"]["step_counts"]
    assert counts["profiling"] > 0 and counts["at-plan"] > 0
    assert [s["stage"] for s in result["profile"]["stages"]] == list(range(ranks))
    assert result["simulated"] and result["at_plan"]["energy_j"] > 0
    assert result["losses"][-1] < result["losses"][0]  # it trains
    # The plan's fingerprint names this model and its input (32 features per sample), not a Llama.
    fingerprint = result["plan_fingerprint"]
    assert (
        fingerprint["stages"] == ranks
        and fingerprint["seq_len"] == [32]
        and fingerprint["micro_batch_size"] == 8
    )
    assert "parameters" in fingerprint["model"]
