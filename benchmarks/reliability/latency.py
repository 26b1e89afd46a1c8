"""Part of scenario 5: end-to-end apply latency (event sent → clock set by NVML) on a loaded full node.

The agent runs the real nvml backend against the fake ``libnvidia-ml.so.1``, whose shared state records
``last_set_ns`` (CLOCK_MONOTONIC, the clock of ``time.monotonic_ns`` here) of every successful lock. Seven
ranks (``_ranks.py``) load the agent at ``events_per_s`` each; the eighth, run here, sends the same load and
every ``probe_period_s`` a begin event with a marker clock no other event uses, then sends only clock-less
events until the fake driver shows the marker: latency = ``last_set_ns`` − send time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent

from benchmarks.reliability.common import fake_nvml, percentiles, short_dir
from benchmarks.reliability.load import RANKS


def _probe(client: AgentClient, nvml: Any, index: int, clocks: list[int], markers: list[int],
           events_per_s: float, duration_s: float, probe_period_s: float) -> tuple[list[float], int, int]:
    latencies_ms, missed, sent, dropped = [], 0, 0, 0
    started_s = time.monotonic()
    next_probe_s = started_s + probe_period_s
    while (now_s := time.monotonic()) - started_s < duration_s:
        due = int(events_per_s * (now_s - started_s)) - sent
        for _ in range(max(0, due) // 2):
            client.phase("F1", "begin", clocks[sent // 2 % len(clocks)])
            client.phase("F1", "end")
            sent += 2
        if now_s >= next_probe_s:
            next_probe_s += probe_period_s
            marker = markers[len(latencies_ms) % 2]
            sent_ns, dropped_before = time.monotonic_ns(), client.events_dropped
            client.phase("P0", "begin", marker)
            if client.events_dropped > dropped_before:  # the agent fell behind: a counted drop, not a miss
                dropped += 1
                continue
            deadline_s = time.monotonic() + 2.0
            while nvml.state.gpu(index)["max_mhz"] != marker:
                if time.monotonic() > deadline_s:
                    missed += 1
                    break
                client.phase("P0", "end")  # keep this rank's event rate up without moving the clock
                sent += 1
                time.sleep(0.001)
            else:
                latencies_ms.append((nvml.state.gpu(index)["last_set_ns"] - sent_ns) / 1e6)
        time.sleep(0.002)
    return latencies_ms, missed, dropped


def run(events_per_s: float = 1000.0, duration_s: float = 30.0, probe_period_s: float = 0.1) -> dict[str, Any]:
    """8 GPUs, 7 loading ranks + 1 probing rank; the probe's latency distribution."""
    gpus = 8
    with (
        fake_nvml(gpus) as nvml,
        short_dir() as runtime_dir,
        start_agent("nvml", runtime_dir=runtime_dir, env=nvml.env) as agent,
    ):
        workers = [subprocess.Popen([sys.executable, RANKS, agent.endpoint, str(first), "1", str(events_per_s),
                                     str(duration_s), "1.0"], stdout=subprocess.PIPE, text=True, env=nvml.env)
                   for first in range(gpus - 1)]
        with AgentClient(agent.endpoint, job_id="probe", rank=gpus - 1) as client:
            gpu = client.hello().gpus[gpus - 1]
            client.claim(gpu.uuid)
            clocks = [gpu.clocks_mhz[k] for k in (0, 20, 40, 60)]
            markers = [gpu.clocks_mhz[80], gpu.clocks_mhz[90]]
            latencies_ms, missed, dropped = _probe(client, nvml, gpus - 1, clocks, markers, events_per_s,
                                                   duration_s, probe_period_s)
        outs = [json.loads(w.communicate(timeout=duration_s + 60)[0]) for w in workers]
    return {"scenario": "latency", "backend": "nvml (fake libnvidia-ml)", "ranks": gpus,
            "events_per_s_per_rank": events_per_s, "duration_s": duration_s, "probes": len(latencies_ms),
            "probes_missed": missed, "probes_dropped_at_sender": dropped,
            "send_to_set_ms": percentiles(latencies_ms),
            "load_control_failed": sum(o["control_failed"] for o in outs),
            "load_events_dropped": sum(o["events_dropped"] for o in outs)}
