"""One training rank (one stage, one GPU) for part 4 of the GPU validation: event lag, overhead, syncs.

Started by ``run.py`` as its own process (its own CUDA context): builds a stock DeepSpeed ``PipelineEngine``
and an ``EnvpipeEngine`` (1f1b, every unit at the top clock, i.e. type baseline, agent attached) of the same
model, then

1. lag: a few EnvpipeEngine iterations, each started on an idle device with the origin event's host time
   taken, so every unit boundary (a CUDA event) has a host time on CLOCK_MONOTONIC; the agent stamps each
   received event on the same clock (recording_agent.py);
2. overhead: alternating steps of both engines (the order flips every step), each timed from an idle
   device to an idle device; while it runs, every ``torch.cuda.synchronize`` / ``Stream.synchronize`` /
   ``Event.synchronize`` call is counted per thread;
3. profiler: a few steps of each engine under torch.profiler; synchronising CUDA API calls per thread.

    python engine_rank.py --agent ipc:///tmp/x/control.sock --out engine.json [--model llama-1b ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analysis import DEVICE_WIDE_SYNC_CALLS, stats, sync_calls_by_thread


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_rank_env() -> None:
    """What a launcher would set for a world of one."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)


class SyncCounter:
    """Counts Python-level synchronise calls per (thread name, call) while active (a context manager)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.counts: Counter = Counter()
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        counts = self.counts

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[(threading.current_thread().name, label)] += 1
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self) -> SyncCounter:  # noqa: PYI034 - Python 3.10 has no typing.Self
        cuda = self.torch.cuda
        self._wrap(cuda, "synchronize", "torch.cuda.synchronize (device-wide)")
        self._wrap(cuda.Event, "synchronize", "Event.synchronize (one event)")
        self._wrap(cuda.Stream, "synchronize", "Stream.synchronize (one stream)")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []

    def as_rows(self) -> list[dict[str, Any]]:
        """``[{"thread", "call", "count"}]`` sorted by thread."""
        return [{"thread": t, "call": c, "count": n} for (t, c), n in sorted(self.counts.items())]


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Both engines, their data, the agent client and the device helpers."""
    import deepspeed
    import torch
    from envpipe_agent.client import AgentClient

    from envpipe.data import batches
    from envpipe.deepspeed import build_engine, setup_distributed
    from envpipe.ir import uniform_plan
    from envpipe.models.llama import build_pipeline, load_config
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=300)
    config = load_config(args.model)
    ds_config = {"train_micro_batch_size_per_gpu": args.micro_batch_size,
                 "gradient_accumulation_steps": args.micro_batches, "steps_per_print": 10**9,
                 "optimizer": {"type": "SGD", "params": {"lr": 0.01}}}
    stock, _, _, _ = deepspeed.initialize(model=build_pipeline(config, 1, seed=1), config=dict(ds_config))
    client = AgentClient(args.agent, job_id="gpu-validation-engine", rank=0)
    schedule = get_schedule("1f1b", 1, args.micro_batches)
    info = client.hello()
    top_mhz = max(info.gpus[0].clocks_mhz) if info.gpus else 1980
    ours = build_engine(build_pipeline(config, 1, seed=1), dict(ds_config), schedule,
                        uniform_plan(schedule, top_mhz), agent=client)

    def data() -> Any:
        return batches(None, vocab_size=config.vocab_size, micro_batch_size=args.micro_batch_size,
                       seq_len=args.seq_len)

    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    return {"stock": stock, "envpipe": ours, "data": {"stock": data(), "envpipe": data()}, "client": client,
            "sync": sync, "on_gpu": on_gpu, "torch": torch, "top_mhz": top_mhz,
            "agent_backend": info.backend, "agent_simulated": bool(info.simulated)}


def timed_step(env: dict[str, Any], name: str) -> float:
    """One ``train_batch`` from an idle device to an idle device, in ms (these syncs are not counted)."""
    sync = env["sync"]
    sync()
    start = time.perf_counter()
    env[name].train_batch(env["data"][name])
    sync()
    return (time.perf_counter() - start) * 1e3


def lag_phase(env: dict[str, Any], iterations: int) -> dict[str, Any]:
    """EnvpipeEngine iterations whose unit boundaries get host times (CLOCK_MONOTONIC, ns)."""
    engine, client, sync = env["envpipe"], env["client"], env["sync"]
    timer = engine._timer
    original_start = timer.start_iteration
    calibration: list[tuple[int, int]] = []

    def start_iteration() -> None:
        # Idle device: the origin event completes as soon as it is recorded, so the host time taken just
        # before recording bounds its device time from below (lags come out high by at most the width).
        sync()
        before_ns = time.monotonic_ns()
        original_start()
        origin = getattr(timer, "_origin", None)
        if origin is not None:
            origin.synchronize()
        calibration.append((before_ns, time.monotonic_ns()))

    sent_before = client.events_sent
    spans: list[list[tuple[str, float, float]]] = []
    timer.start_iteration = start_iteration
    try:
        for _ in range(iterations):
            engine.train_batch(env["data"]["envpipe"])
            spans.append([(str(s.unit), s.start_ms, s.end_ms) for s in engine.last_timeline()])
    finally:
        del timer.start_iteration
    sync()
    time.sleep(0.3)  # the notifier sends the last end event after the device passed it
    return {"iterations": iterations, "calibration_ns": calibration, "spans": spans,
            "events_sent_before": sent_before, "events_sent_after": client.events_sent,
            "calibration_width_us": stats((b - a) / 1e3 for a, b in calibration)}


def overhead_phase(env: dict[str, Any], steps: int) -> dict[str, Any]:
    """Alternating timed steps (order flips every step); synchronise calls counted while they run."""
    times: dict[str, list[float]] = {"stock": [], "envpipe": []}
    with SyncCounter(env["torch"]) as counter:
        for step in range(steps):
            order = ("stock", "envpipe") if step % 2 == 0 else ("envpipe", "stock")
            for name in order:
                times[name].append(timed_step(env, name))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"steps_each": steps, "times_ms": times, "median_ms": medians,
            "stats_ms": {name: stats(t) for name, t in times.items()},
            "ratio_envpipe_over_stock": medians["envpipe"] / medians["stock"],
            "sync_calls": counter.as_rows()}


def _thread_ids(thread: threading.Thread) -> list[int]:
    return sorted({thread.native_id, thread.ident, thread.ident & 0xFFFFFFFF})


def profiler_phase(env: dict[str, Any], steps: int) -> dict[str, Any]:
    """Synchronising CUDA API calls per thread id under torch.profiler, for each engine."""
    from torch.profiler import ProfilerActivity, profile

    notifier = getattr(env["envpipe"]._notifier, "_thread", None)
    # Kineto names a thread by its kernel id or by its pthread id cut to 32 bits: keep every form.
    out: dict[str, Any] = {"main_tids": _thread_ids(threading.current_thread()),
                           "notifier_tids": _thread_ids(notifier) if notifier is not None else []}
    for name in ("stock", "envpipe"):
        env["sync"]()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                env[name].train_batch(env["data"][name])
            env["sync"]()
            time.sleep(0.2)  # the notifier's last event syncs fall inside the trace
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            counts = sync_calls_by_thread(json.loads(path.read_text()))
        out[name] = {str(tid): calls for tid, calls in counts.items()}
        out[f"{name}_device_wide"] = sum(n for calls in counts.values() for c, n in calls.items()
                                         if c in DEVICE_WIDE_SYNC_CALLS)
    out["steps_each"] = steps
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All phases; each failure is recorded and the next phase still runs."""
    _single_rank_env()
    env = build(args)
    torch = env["torch"]
    result: dict[str, Any] = {"on_gpu": env["on_gpu"], "top_mhz": env["top_mhz"],
                              "agent_backend": env["agent_backend"],
                              "agent_simulated": env["agent_simulated"],
                              "torch": torch.__version__,
                              "tf32_override_env": os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", ""),
                              "model": args.model, "micro_batches": args.micro_batches,
                              "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len}
    if env["on_gpu"]:
        result["device_name"] = torch.cuda.get_device_name(0)
        result["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    for step in range(args.warmup):
        for name in ("stock", "envpipe") if step % 2 == 0 else ("envpipe", "stock"):
            timed_step(env, name)
    phases = (("lag", lambda: lag_phase(env, args.lag_iterations)),
              ("overhead", lambda: overhead_phase(env, args.steps)),
              ("profiler", lambda: profiler_phase(env, args.profile_steps) if env["on_gpu"] else
               {"skipped": "no CUDA GPU: torch.profiler sync counts need one"}))
    for name, phase in phases:
        try:
            result[name] = phase()
        except Exception as exc:  # noqa: BLE001 - record, go on: one device call brings back all it can
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"engine_rank: {name} done", flush=True)
    client = env["client"]
    result["client"] = {"lease_id": client._lease_id, "events_sent": client.events_sent,
                        "events_dropped": client.events_dropped}
    if env["on_gpu"]:
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    env["envpipe"].close()
    client.close()
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", required=True, help="the agent's control endpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lag-iterations", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of EACH engine")
    parser.add_argument("--profile-steps", type=int, default=2)
    args = parser.parse_args(argv)
    result = run(args)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
