"""Rank side of the training scenario's ``engine`` mode (run by ``envpipe.deepspeed.launcher.run_ranks``).

Each rank trains a 2-stage tiny Llama with EnvpipeEngine (1f1b, F units at a lower clock than B units so
every begin event carries a clock), talking to the agent through the real AgentClient. After three warm-up
steps it signals readiness; rank 0 then reads the agent's current phase (written by the benchmark) before
every step and broadcasts it with a stop flag, so every rank labels and ends its steps alike.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the harness loads this file by path

from benchmarks.reliability.training import Warnings


def _phase_and_stop(phase_path: str, done_path: str, phases: list[str]) -> tuple[int, bool]:
    import torch
    import torch.distributed as dist

    flags = torch.zeros(2, dtype=torch.int64)
    if dist.get_rank() == 0:
        try:
            flags[0] = phases.index(Path(phase_path).read_text())
        except (OSError, ValueError):
            flags[0] = 0
        flags[1] = int(os.path.exists(done_path))
    dist.broadcast(flags, 0)
    return int(flags[0]), bool(flags[1])


def train_until(endpoint: str, ready_dir: str, done_path: str, phase_path: str, phases: list[str]) -> dict[str, Any]:
    """Train until the benchmark writes ``done_path``; one row per step."""
    from envpipe_agent.client import AgentClient

    from envpipe.data import batches
    from envpipe.deepspeed import build_engine, setup_distributed
    from envpipe.models.llama import build_pipeline, load_config
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=120)
    warnings = Warnings()
    logging.getLogger("envpipe_agent.client").addHandler(warnings)
    rank = int(os.environ["RANK"])
    config = load_config("llama-tiny")
    schedule = get_schedule("1f1b", 2, 4)
    client = AgentClient(endpoint, job_id="train-reliability", rank=rank)
    clocks_mhz = client.hello().gpus[0].clocks_mhz
    plan = {s: {u.unit: clocks_mhz[30] if u.unit.startswith("F") else clocks_mhz[0] for u in schedule.units(s)}
            for s in range(2)}
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**9,
                 "optimizer": {"type": "SGD", "params": {"lr": 0.01}}}
    engine = build_engine(build_pipeline(config, 2, seed=1), ds_config, schedule, plan, agent=client)
    data = batches(None, vocab_size=config.vocab_size, micro_batch_size=2, seq_len=16, seed=7)
    for _ in range(3):
        engine.train_batch(data)
    Path(ready_dir, str(rank)).touch()
    steps = []
    while True:
        phase, stop = _phase_and_stop(phase_path, done_path, phases)
        if stop:
            break
        start_s = time.perf_counter()
        engine.train_batch(data)
        steps.append({"phase": phases[phase], "step_ms": (time.perf_counter() - start_s) * 1000,
                      "lease": client.lease_id, "sent": client.events_sent, "dropped": client.events_dropped})
    engine.close()
    client.close()
    return {"steps": steps, "warnings": warnings.messages}
