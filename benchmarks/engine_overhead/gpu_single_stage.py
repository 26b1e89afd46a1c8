"""One GPU, one stage: EnvpipeEngine's device path (CUDA-event timings, notifier thread, emulated DVFS spin)
against the stock PipelineEngine, with the sim agent attached.

Checks, on a real GPU: the same first loss as stock; every phase event reaches the agent; spans come from
CUDA events; a unit planned at a lower clock is stretched by the model's ratio (emulated DVFS, simulated);
and the step-time ratio to stock with events and timing on (medians, alternating steps).

    python benchmarks/engine_overhead/gpu_single_stage.py --model llama-160m --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


class _Recording:
    def __init__(self, client: Any) -> None:
        self.client, self.sent = client, 0

    def phase(self, unit: str, event: str, clock_mhz: int = 0) -> None:
        self.sent += 1
        self.client.phase(unit, event, clock_mhz)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():  # CPU runs of this script only check that it works
        torch.cuda.synchronize()


def _alternate(engines: dict[str, tuple[Any, Any]], steps: int, warmup: int) -> dict[str, list[float]]:

    times: dict[str, list[float]] = {name: [] for name in engines}
    for step in range(warmup + steps):
        for name in list(engines) if step % 2 == 0 else list(reversed(engines)):
            engine, data = engines[name]
            _sync()
            t0 = time.perf_counter()
            engine.train_batch(data)
            _sync()
            if step >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    """Run the checks and the timing; print and save a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-160m")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 (BF16_Optimizer) instead of fp32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from envpipe.deepspeed.launcher import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))

    import deepspeed
    import torch
    from envpipe_agent.client import AgentClient
    from envpipe_agent.dvfs import get_model
    from envpipe_agent.embedded import start_agent

    from envpipe.data import batches
    from envpipe.deepspeed import build_engine, setup_distributed
    from envpipe.models.llama import build_pipeline, load_config
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=120)
    config = load_config(args.model)
    m = args.micro_batches
    ds = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": m,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
    }
    if args.bf16:
        ds["bf16"] = {"enabled": True}

    def data():
        return batches(
            None, vocab_size=config.vocab_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len
        )

    agent_proc = start_agent("sim", gpus=1)
    try:
        client = AgentClient(agent_proc.endpoint, job_id="gpu-check", rank=0)
        rec = _Recording(client)
        stock, _, _, _ = deepspeed.initialize(model=build_pipeline(config, 1, seed=1), config=ds)
        ours = build_engine(build_pipeline(config, 1, seed=1), ds, get_schedule("1f1b", 1, m), None, rec)
        first = {"stock": float(stock.train_batch(data())), "envpipe": float(ours.train_batch(data()))}
        spans = ours.last_timeline()
        times = _alternate({"stock": (stock, data()), "envpipe": (ours, data())}, args.steps, warmup=3)
        ours.close()
        time.sleep(0.5)
        gpu = client.status()["gpus"][0]
        events_at_agent, events_sent = gpu["events"], rec.sent

        # emulated DVFS on the device: forwards planned at 1188 MHz (x=0.6), backwards at the top clock
        sched = get_schedule("1f1b", 1, m)
        clocks = {0: {a.unit: (1188 if a.unit.startswith("F") else 1980) for a in sched.units(0)}}
        emu = build_engine(
            build_pipeline(config, 1, seed=1),
            ds,
            sched,
            clocks,
            client,
            True,
            claim_gpu=False,
            max_clock_mhz=1980,
        )
        emu_data, fwd_ratio = data(), []
        for _ in range(4):
            emu.train_batch(emu_data)
            tl = emu.last_timeline()
            fwd = statistics.mean(s.end_ms - s.start_ms for s in tl if s.unit.startswith("F"))
            bwd = statistics.mean(s.end_ms - s.start_ms for s in tl if s.unit.startswith("B"))
            fwd_ratio.append(round(fwd, 3))
        emu.close()
        client.close()
    finally:
        agent_proc.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "model": args.model,
        "bf16": args.bf16,
        "micro_batches": m,
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "first_loss": first,
        "first_loss_equal": first["stock"] == first["envpipe"],
        "spans_first_iteration": [(s.unit, round(s.start_ms, 3), round(s.end_ms, 3)) for s in spans],
        "events_sent": events_sent,
        "events_at_agent": events_at_agent,
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "iqr_ms": {k: [round(q, 3) for q in statistics.quantiles(v, n=4)[::2]] for k, v in times.items()},
        "ratio_envpipe_over_stock": round(med["envpipe"] / med["stock"], 4),
        "emulated_fwd_mean_ms_per_iteration (simulated; stretch sized from iteration 2 on)": fwd_ratio,
        "emulated_last_bwd_mean_ms": round(bwd, 3),
        "model_time_ratio_at_1188": round(get_model("central").time_ratio(1188 / 1980), 4),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
