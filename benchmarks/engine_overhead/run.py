"""EnvpipeEngine (1f1b, baseline clocks, agent attached) vs stock DeepSpeed PipelineEngine: step time.

Both engines live in the same ranks, train the same model shape on the same synthetic data, and take turns
step by step (so drift in machine load hits both alike). Every step starts after a barrier; rank 0 times
``train_batch`` wall clock. The result is the ratio of medians, goal <= 1.01.

    python benchmarks/engine_overhead/run.py --ranks 4 --steps 60 --out benchmarks/engine_overhead/result.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _ds_config(micro_batches: int, micro_batch_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
    }


def rank_main(
    model: str,
    micro_batches: int,
    micro_batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    agent_endpoint: str | None,
    compare_no_agent: bool = False,
) -> dict[str, Any]:
    """One rank: build the engines, rotate their steps, return the per-step times."""
    import deepspeed
    import torch.distributed as dist

    from envpipe.data import batches
    from envpipe.deepspeed import build_engine, setup_distributed
    from envpipe.models.llama import build_pipeline, load_config
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=120)
    stages = dist.get_world_size()
    config = load_config(model)
    ds_config = _ds_config(micro_batches, micro_batch_size)
    stock, _, _, _ = deepspeed.initialize(model=build_pipeline(config, stages, seed=1), config=ds_config)
    agent = None
    if agent_endpoint:
        from envpipe_agent.client import AgentClient

        agent = AgentClient(agent_endpoint, job_id="engine-overhead", rank=dist.get_rank())
    ours = build_engine(
        build_pipeline(config, stages, seed=1),
        ds_config,
        get_schedule("1f1b", stages, micro_batches),
        clocks=None,
        agent=agent,
    )

    def data():
        return batches(None, vocab_size=config.vocab_size, micro_batch_size=micro_batch_size, seq_len=seq_len)

    engines = {"stock": (stock, data()), "envpipe": (ours, data())}
    if compare_no_agent:  # the same engine without events: separates engine cost from event cost
        bare = build_engine(
            build_pipeline(config, stages, seed=1), ds_config, get_schedule("1f1b", stages, micro_batches)
        )
        engines["envpipe_no_agent"] = (bare, data())
    times: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for step in range(warmup + steps):
        order = names[step % len(names) :] + names[: step % len(names)]  # none always goes first
        for name in order:
            engine, iterator = engines[name]
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            engine.train_batch(iterator)
            if step >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    events_sent = getattr(agent, "events_sent", 0)
    ours.close()
    if agent is not None:
        agent.close()
    return {
        "times_ms": times,
        "cpu_ms": cpu,
        "events_sent": events_sent,
        "agent_attached": ours.agent is not None,
    }


def main(argv: list[str] | None = None) -> int:
    """Start a sim agent, run the ranks, print and save the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-agent", action="store_true", help="run without the sim agent")
    parser.add_argument(
        "--compare-no-agent", action="store_true", help="also rotate in EnvpipeEngine without an agent"
    )
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)

    from envpipe_agent.embedded import start_agent

    from envpipe.deepspeed.launcher import run_ranks

    agent = None if args.no_agent else start_agent("sim", gpus=args.ranks, log_path=os.devnull)
    try:
        kwargs = {
            "model": args.model,
            "micro_batches": args.micro_batches,
            "micro_batch_size": args.micro_batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "agent_endpoint": agent.endpoint if agent else None,
            "compare_no_agent": args.compare_no_agent,
        }
        results = run_ranks(args.ranks, f"{Path(__file__).resolve()}:rank_main", kwargs, timeout_s=1800)
    finally:
        if agent is not None:
            agent.stop()
    failed = [r for r in results if r.returncode != 0]
    if failed:
        print(failed[0].stderr_tail, file=sys.stderr)
        return 1
    summary = summarise([r.value for r in results], args)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def summarise(values: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians, spread and the ratios, with what was run and where.

    Wall time is rank 0's (every step ends with a loss broadcast, so it covers the whole pipeline); CPU time
    is each rank's process time per step, medians summed over ranks: it counts work, not waiting, and so is
    far less sensitive to how the OS shares few cores among the ranks and the agent.
    """
    value = values[0]
    times = value["times_ms"]
    med = {name: statistics.median(t) for name, t in times.items()}
    quartiles = {name: statistics.quantiles(t, n=4) for name, t in times.items()}
    cpu = {name: sum(statistics.median(v["cpu_ms"][name]) for v in values) for name in times}
    events = sum(v["events_sent"] for v in values)
    return {
        "benchmark": "engine_overhead",
        "ranks": args.ranks,
        "model": args.model,
        "micro_batches": args.micro_batches,
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "steps_each": len(times["stock"]),
        "agent_attached": value["agent_attached"],
        "phase_events_sent": events,
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "iqr_ms": {k: [round(q[0], 3), round(q[2], 3)] for k, q in quartiles.items()},
        "ratio_envpipe_over_stock": round(med["envpipe"] / med["stock"], 4),
        **(
            {"ratio_envpipe_no_agent_over_stock": round(med["envpipe_no_agent"] / med["stock"], 4)}
            if "envpipe_no_agent" in med
            else {}
        ),
        "cpu_ms_per_step_all_ranks": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_ratio_envpipe_over_stock": round(cpu["envpipe"] / cpu["stock"], 4),
        **(
            {"cpu_ratio_envpipe_no_agent_over_stock": round(cpu["envpipe_no_agent"] / cpu["stock"], 4)}
            if "envpipe_no_agent" in cpu
            else {}
        ),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
    }


if __name__ == "__main__":
    sys.exit(main())
