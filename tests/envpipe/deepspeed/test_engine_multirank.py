"""Multi-rank EnvpipeEngine runs on CPU (gloo over loopback), 2 and 4 ranks, against the embedded sim agent.

Assertions are grouped into two jobs to keep CI time low (each rank imports torch + deepspeed):
* 2 ranks: 1f1b vs ours give identical losses and parameters; the pipeline's loss equals an unsplit
  LlamaForCausalLM; phase events reach the agent in order with the planned clocks.
* 4 ranks: ours with a non-monotone r finishes; a killed rank ends the job with a clear error and the agent
  resets that rank's GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from envpipe.deepspeed.launcher import run_ranks

WORKERS = str(Path(__file__).with_name("engine_workers.py"))
pytestmark = pytest.mark.slow


def _save_tiny(path: Path, *, tied: bool) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from envpipe.models.llama import load_config

    torch.manual_seed(0)
    config = load_config("llama-tiny")
    config.tie_word_embeddings = tied
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """llama-tiny saved as a local HF directory (config + safetensors) with a fixed seed."""
    return _save_tiny(tmp_path_factory.mktemp("llama-tiny"), tied=False)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same with the head tied to the embedding (as Llama-3.2-1B)."""
    return _save_tiny(tmp_path_factory.mktemp("llama-tiny-tied"), tied=True)


@pytest.fixture()
def sim_agent(tmp_path: Path):
    from envpipe_agent.client import AgentClient
    from envpipe_agent.embedded import start_agent

    agent = start_agent(
        "sim", gpus=4, extra_args=["--lease-timeout-s", "1.0"], log_path=str(tmp_path / "agent.log")
    )
    client = AgentClient(agent.endpoint, job_id="observer", rank=-1)
    try:
        yield agent, client
    finally:
        client.close()
        agent.stop()


def _failures(results) -> str:
    return "\n".join(f"rank {r.rank} exit {r.returncode}:\n{r.stderr_tail}" for r in results if r.returncode)


def test_two_stages_ours_matches_1f1b_and_unsplit_model_and_reaches_agent(
    model_dir, tied_model_dir, sim_agent
):
    agent, observer = sim_agent
    kwargs = {"model_dir": model_dir, "agent_endpoint": agent.endpoint, "tied_model_dir": tied_model_dir}
    results = run_ranks(2, f"{WORKERS}:equivalence", kwargs, timeout_s=150)
    assert all(r.returncode == 0 for r in results), _failures(results)
    values = [r.value for r in results]
    for v in values:
        # identical losses and parameters: fp32, SGD, 3 steps, same backward order per micro-batch
        for ours, base in zip(v["ours_losses"], v["base_losses"], strict=True):
            assert abs(ours - base) <= 1e-6 * abs(base)
        assert v["param_rel_diff"] <= 1e-6
        assert v["base_losses"] == values[0]["base_losses"]  # every stage reports the same loss
    for v in values:
        plan_error, schedule_error = v["bad_input_errors"]
        assert "names units ['F99']" in plan_error and "its units are" in plan_error
        assert "gradient_accumulation_steps" in schedule_error
    last = values[-1]
    assert abs(last["base_losses"][0] - last["reference_loss"]) <= 1e-5 * last["reference_loss"]
    # tied embedding/head on two stages, checkpointed layers: same loss as unsplit, tied copies stay equal
    assert abs(last["tied_losses"][0] - last["tied_reference_loss"]) <= 1e-5 * last["tied_reference_loss"]
    assert values[0]["tied_losses"] == last["tied_losses"]
    assert values[0]["tied_weight_sum"] == pytest.approx(last["tied_weight_sum"], rel=1e-9)

    status = {g["uuid"]: g for g in observer.status()["gpus"]}
    for v in values:
        # the engine sent begin/end for every unit, in the schedule's unit order, with the planned clock
        expected = [(u, e, v["clocks"][u]) for _ in range(3) for u in v["units"] for e in ("begin", "end")]
        assert [tuple(s) for s in v["sent"]] == expected
        gpu = status[v["gpu_uuid"]]
        assert gpu["events"] == len(expected)  # all of them reached the agent
        assert gpu["snapped"] == 0
        assert gpu["holder"] is None and gpu["target_mhz"] is None  # lease released at close: reset
        assert gpu["clock_changes"] >= 1
        assert v["timeline_stages"] == [0, 1] and v["timeline_units"] == 2 * 2 * 4
        assert v["stage_clock_in_spans"] == sorted(set(v["clocks"].values()))


def test_four_stages_non_monotone_r_then_killed_rank(model_dir, sim_agent, tmp_path):
    agent, observer = sim_agent
    victim = 2
    results = run_ranks(
        4,
        f"{WORKERS}:killed_rank",
        {
            "model_dir": model_dir,
            "agent_endpoint": agent.endpoint,
            "progress_dir": str(tmp_path),
            "victim": victim,
        },
        timeout_s=150,
        grace_s=60,
    )
    files = {r.rank: tmp_path / f"rank{r.rank}.json" for r in results}
    progress = {rank: json.loads(f.read_text()) for rank, f in files.items() if f.is_file()}
    assert len(progress) == 4, _failures(results)  # every rank finished the ours steps with r=[1,2,0,0]
    assert len({tuple(p["losses"]) for p in progress.values()}) == 1
    # 2 stages x 2 data-parallel pipelines: each pipeline its own data, one averaged loss everywhere
    placements = sorted((p["stage"], p["dp_index"], p["dp_size"]) for p in progress.values())
    assert placements == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert len({tuple(p["dp_losses"]) for p in progress.values()}) == 1
    own = {p["dp_index"]: p["own_pipeline_loss"] for p in progress.values()}
    assert own[0] != own[1]  # different data per data-parallel index
    assert (own[0] + own[1]) / 2 == pytest.approx(progress[0]["dp_losses"][-1], rel=1e-6)
    assert results[victim].returncode == 3
    for r in results:
        if r.rank != victim:
            assert r.returncode not in (0, None), f"rank {r.rank} did not fail"
    for neighbour in (victim - 1, victim + 1):
        assert (
            "PeerLostError" in results[neighbour].stderr_tail
            and f"lost stage {victim}" in results[neighbour].stderr_tail
        )
    victim_uuid = progress[victim]["uuid"]
    deadline = time.monotonic() + 10
    while True:  # the agent notices the dead pid / missed heartbeats and resets that GPU
        gpu = next(g for g in observer.status()["gpus"] if g["uuid"] == victim_uuid)
        if gpu["holder"] is None and gpu["resets"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert gpu["holder"] is None and gpu["resets"] >= 1 and not gpu["locked"]
