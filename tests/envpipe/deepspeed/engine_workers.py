"""Rank-side functions of the multi-rank engine tests (run by ``envpipe.deepspeed.launcher.run_ranks``).

Each returns plain JSON so the test process can assert on every rank's view.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MICRO_BATCH_SIZE = 2
SEQ_LEN = 16


def _ds_config(micro_batches: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "gradient_accumulation_steps": micro_batches,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
    }


def _data(vocab_size: int, dp_index: int = 0, dp_size: int = 1) -> Any:
    from envpipe.data import batches

    return batches(
        None,
        vocab_size=vocab_size,
        micro_batch_size=MICRO_BATCH_SIZE,
        seq_len=SEQ_LEN,
        seed=7,
        dp_index=dp_index,
        dp_size=dp_size,
    )


def _agent(endpoint: str | None) -> Any:
    if endpoint is None:
        return None
    from envpipe_agent.client import AgentClient

    return RecordingAgent(AgentClient(endpoint, job_id="engine-test", rank=int(os.environ["RANK"])))


class RecordingAgent:
    """The real client, with every phase event also recorded here (the order the engine sent them in)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent: list[tuple[str, str, int]] = []

    def phase(self, unit: str, event: str, clock_mhz: int = 0) -> None:
        self.sent.append((unit, event, clock_mhz))
        self.client.phase(unit, event, clock_mhz)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _train(
    model_dir: str,
    schedule: Any,
    steps: int,
    *,
    clocks: Any = None,
    agent: Any = None,
    emulate: bool = False,
    checkpoint_interval: int = 0,
) -> tuple[Any, list[float]]:
    from envpipe.deepspeed import build_engine
    from envpipe.models.llama import build_pipeline, load_config

    config = load_config(model_dir)
    module = build_pipeline(
        config, schedule.stages, model_dir=model_dir, activation_checkpoint_interval=checkpoint_interval
    )
    ds_config = _ds_config(schedule.micro_batches) | {"pipeline": {"use_reentrant": False}}
    engine = build_engine(module, ds_config, schedule, clocks, agent, emulate)
    data = _data(config.vocab_size, engine.grid.data_parallel_id, engine.grid.data_parallel_size)
    losses = [float(engine.train_batch(data)) for _ in range(steps)]
    return engine, losses


def _params(engine: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def _max_rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def _reference_loss(model_dir: str, micro_batches: int) -> float:
    """Mean loss of the unsplit HF model over the first batch (what the pipeline's first loss must equal)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True, attn_implementation="sdpa")
    data = _data(model.config.vocab_size)
    with torch.no_grad():
        losses = [
            model(input_ids=ids, labels=labels).loss
            for ids, labels in (next(data) for _ in range(micro_batches))
        ]
    return float(torch.stack(losses).mean())


def equivalence(
    model_dir: str, agent_endpoint: str, tied_model_dir: str, micro_batches: int = 4, steps: int = 3
) -> dict[str, Any]:
    """2 stages: 1f1b vs ours (same init) losses/params; pipeline vs unsplit loss; phase events to the agent;
    then a tied-embedding model with activation checkpointing (non-reentrant)."""
    from envpipe.deepspeed import setup_distributed
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=60)
    stage_count = int(os.environ["WORLD_SIZE"])
    base, base_losses = _train(model_dir, get_schedule("1f1b", stage_count, micro_batches), steps)
    base_params = _params(base)
    is_last = base.is_last_stage()
    ours = get_schedule("ours", stage_count, micro_batches, [2] + [0] * (stage_count - 1))
    stage = base.stage_id
    # A plan with a different clock per unit kind and a distinctive last unit, to see it at the agent.
    units = [a.unit for a in ours.units(stage)]
    clocks = {stage: {u: (1200 if u.startswith("F") else 1500) for u in units}}
    clocks[stage][units[-1]] = 990
    agent = _agent(agent_endpoint)
    engine, ours_losses = _train(model_dir, ours, steps, clocks=clocks, agent=agent, emulate=True)
    timeline = engine.gather_timeline()
    result = {
        "bad_input_errors": _bad_input_errors(engine, stage_count),
        "stage": stage,
        "base_losses": base_losses,
        "ours_losses": ours_losses,
        "param_rel_diff": _max_rel_diff(_params(engine), base_params),
        "units": units,
        "clocks": clocks[stage],
        "sent": agent.sent,
        "gpu_uuid": engine.gpu.uuid,
        "timeline_stages": sorted({s.stage for s in timeline}),
        "timeline_units": len(timeline),
        "stage_clock_in_spans": sorted({s.clock_mhz for s in timeline if s.stage == stage}),
    }
    if is_last:
        result["reference_loss"] = _reference_loss(model_dir, micro_batches)
    engine.close()
    agent.client.close()
    result.update(_tied_with_checkpointing(tied_model_dir, ours))
    return result


def _bad_input_errors(engine: Any, stage_count: int) -> list[str]:
    """The messages of a clock plan naming a unit the stage does not run, and of a mismatched schedule."""
    from envpipe.errors import ConfigError
    from envpipe.schedules import get_schedule

    messages = []
    for attempt in (
        lambda: engine.set_clocks({engine.stage_id: {"F99": 1200}}),
        lambda: engine.set_schedule(get_schedule("1f1b", stage_count, engine.micro_batches + 1)),
    ):
        try:
            attempt()
        except ConfigError as exc:
            messages.append(str(exc))
    return messages


def _tied_with_checkpointing(model_dir: str, schedule: Any) -> dict[str, Any]:
    """Embedding tied to the head across the first and last stage, checkpointed layers: loss and tied weight."""
    engine, losses = _train(model_dir, schedule, 2, checkpoint_interval=1)
    (tied,) = engine.module.tied_modules.values()  # stage 0 holds it as embedding, the last stage as head
    out = {"tied_losses": losses, "tied_weight_sum": float(tied.embed_tokens.weight.double().sum())}
    if engine.is_last_stage():
        out["tied_reference_loss"] = _reference_loss(model_dir, schedule.micro_batches)
    return out


def killed_rank(
    model_dir: str,
    agent_endpoint: str,
    progress_dir: str,
    victim: int,
    micro_batches: int = 8,
    steps_before: int = 2,
) -> dict[str, Any]:
    """2 stages x 2 data-parallel pipelines; then 4 stages of ours with a non-monotone r, after
    ``steps_before`` steps of which rank ``victim`` dies."""
    from envpipe.deepspeed import setup_distributed
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=20)
    rank = int(os.environ["RANK"])
    dp_engine, dp_losses = _train(model_dir, get_schedule("ours", 2, 4, [2, 0]), 2)
    grid = dp_engine.grid
    placement = {
        "stage": dp_engine.stage_id,
        "dp_index": grid.data_parallel_id,
        "dp_size": grid.data_parallel_size,
        "own_pipeline_loss": float(dp_engine.dp_group_loss),  # this pipeline's loss before the DP average
    }
    schedule = get_schedule("ours", int(os.environ["WORLD_SIZE"]), micro_batches, [1, 2, 0, 0])
    agent = _agent(agent_endpoint)
    engine, losses = _train(model_dir, schedule, steps_before, agent=agent)
    progress = {"uuid": engine.gpu.uuid, "losses": losses, "dp_losses": dp_losses, **placement}
    Path(progress_dir, f"rank{rank}.json").write_text(json.dumps(progress))
    if rank == victim:
        os._exit(3)  # no cleanup at all: as if the process were killed
    engine.train_batch(_data(256))  # must fail with a clear error: a neighbour is gone
    return {"unexpected": "finished an iteration without rank {victim}"}
