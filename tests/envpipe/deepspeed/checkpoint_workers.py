"""Rank-side functions of the checkpoint tests (run by ``envpipe.deepspeed.launcher.run_ranks``).

One run per schedule: A trains ``steps`` iterations straight; B trains ``stop_at``, saving after every
iteration with keep-last 2; C is a fresh engine (RNG deliberately scrambled) that loads B's latest checkpoint
and trains the rest. fp32, Adam with a warm-up LR schedule and attention dropout, so that the optimizer
state, the scheduler, the RNG and the data position all have to come back for C to match A bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MICRO_BATCH_SIZE = 2
SEQ_LEN = 16
# Adam (its moments must come back), a warm-up LR schedule (its position too), fp32.
OPTIMIZATION = {
    "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.002, "warmup_max_lr": 0.01, "warmup_num_steps": 4},
    },
    "pipeline": {"use_reentrant": False},
    "steps_per_print": 10**9,
}


def _engine(model_dir: str, schedule: Any) -> Any:
    from envpipe.deepspeed import build_engine
    from envpipe.models.llama import build_pipeline, load_config

    module = build_pipeline(load_config(model_dir), schedule.stages, model_dir=model_dir if Path(model_dir).is_dir() else None)
    batch = {"train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE, "gradient_accumulation_steps": schedule.micro_batches}
    return build_engine(module, batch | OPTIMIZATION, schedule)


def _data(engine: Any, data: str | None, start: int) -> Any:
    from envpipe.data import batches

    if engine.stage_id not in (0, engine.num_stages - 1):
        return None
    return batches(
        data,
        vocab_size=engine.module.llama_config.vocab_size,
        micro_batch_size=MICRO_BATCH_SIZE,
        seq_len=SEQ_LEN,
        dp_index=engine.grid.data_parallel_id,
        dp_size=engine.grid.data_parallel_size,
        seed=7,
        start=start,
    )


def _params(engine: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def resume_equivalence(
    model_dir: str, save_root: str, schedules: list[list[Any]], steps: int, stop_at: int, data: str | None = None
) -> dict[str, Any]:
    """For each ``[name, micro_batches, r]``: A (straight), B (stop + save), C (load + finish)."""
    import torch

    from envpipe.deepspeed import checkpoint, setup_distributed
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=120)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    out: dict[str, Any] = {}
    for name, micro_batches, r in schedules:
        stages = world // 2 if name.endswith("-dp") else world
        schedule = get_schedule(name.removesuffix("-dp"), stages, micro_batches, r)
        save_dir = Path(save_root) / name

        a = _engine(model_dir, schedule)
        torch.manual_seed(1000 + rank)
        a_iter = _data(a, data, 0)
        a_losses = [float(a.train_batch(a_iter)) for _ in range(steps)]
        a_params = _params(a)
        a.close()

        b = _engine(model_dir, schedule)
        torch.manual_seed(1000 + rank)
        b_iter = _data(b, data, 0)
        for step in range(stop_at):
            b.train_batch(b_iter)
            checkpoint.save(
                b, save_dir, data_position=(step + 1) * micro_batches, plan={"schedule": name}, keep_last=2
            )
        b.close()

        c = _engine(model_dir, schedule)
        torch.manual_seed(4242)  # anything: load must bring B's RNG back
        state = checkpoint.load(c, save_dir)
        c_iter = _data(c, data, state.data_position)
        c_losses = [float(c.train_batch(c_iter)) for _ in range(steps - stop_at)]
        c_params = _params(c)
        from envpipe.deepspeed.lifecycle import evaluate

        evaluation = evaluate(c, _data(c, data, 10_000), 2)  # middle stages pass no iterator
        out[name] = {
            "eval_loss": evaluation.loss,
            "a_losses": a_losses,
            "c_losses": c_losses,
            "max_param_diff": max(float((c_params[k] - a_params[k]).abs().max()) for k in a_params),
            "resumed_step": state.step,
            "global_steps": c.global_steps,
            "plan": state.plan,
            "tags": sorted(p.name for p in save_dir.iterdir()),
        }
        c.close()
    return out


def export_logits(model_dirs: list[str], save_root: str, micro_batches: int = 4) -> list[dict[str, Any]]:
    """Per model: train 2 iterations of ours, save, keep the pipeline's logits of an unseen micro-batch."""
    import torch

    from envpipe.deepspeed import checkpoint, setup_distributed
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=120)
    stages = int(os.environ["WORLD_SIZE"])
    out = []
    for index, model_dir in enumerate(model_dirs):
        save_dir = Path(save_root) / str(index)
        engine = _engine(model_dir, get_schedule("ours", stages, micro_batches, [1] + [0] * (stages - 1)))
        data = _data(engine, None, 0)
        for _ in range(2):
            engine.train_batch(data)
        checkpoint.save(engine, save_dir, data_position=2 * micro_batches, model_dir=model_dir)
        loss, logits = engine.eval_batch(_data(engine, None, 1000), return_logits=True, num_micro_batches=1)
        if engine.is_last_stage():
            ids = next(_data(engine, None, 1000))[0]
            torch.save({"input_ids": ids, "logits": logits, "loss": loss}, save_dir / "probe.pt")
        out.append({"stage": engine.stage_id, "eval_loss": float(loss)})
        engine.close()
    return out
