"""Trainer-side cost of AgentClient.phase(): p50/p99 per call, back-to-back and sparse (goal p50 <= 5 us,
p99 <= 30 us). A sim agent runs as a subprocess; this process is the training rank.

    python benchmarks/agent/bench_send.py [--events 200000] [--sparse-events 5000] [--gap-us 200]
"""

from __future__ import annotations

import argparse
import json
import time

from common import machine, summary_us

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent


def _timed_sends(client: AgentClient, count: int, gap_us: float, spin: bool = False) -> list[int]:
    clocks = (1410, 1200, 990)
    timings: list[int] = []
    perf = time.perf_counter_ns
    for i in range(count):
        event, clock_mhz = ("begin", clocks[i % 3]) if i % 2 == 0 else ("end", 0)
        start_ns = perf()
        client.phase("F12", event, clock_mhz)
        timings.append(perf() - start_ns)
        if gap_us and spin:  # a busy rank thread: holds its core between events
            deadline_ns = perf() + gap_us * 1000
            while perf() < deadline_ns:
                pass
        elif gap_us:  # a rank thread that waits on the GPU between events
            time.sleep(gap_us / 1e6)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--sparse-events", type=int, default=5_000)
    parser.add_argument("--gap-us", type=float, default=200.0)
    args = parser.parse_args()
    with start_agent(gpus=1) as agent, AgentClient(agent.endpoint, job_id="bench", rank=0) as client:
        client.claim(client.hello().gpus[0].uuid)
        _timed_sends(client, 10_000, 0)  # warm-up
        burst = summary_us(_timed_sends(client, args.events, 0))
        dropped_burst = client.events_dropped
        sleeping = summary_us(_timed_sends(client, args.sparse_events, args.gap_us))
        spinning = summary_us(_timed_sends(client, args.sparse_events, args.gap_us, spin=True))
        dropped_sparse = client.events_dropped - dropped_burst
    print(
        json.dumps(
            {
                "benchmark": "event send (AgentClient.phase)",
                "back_to_back": burst,
                "back_to_back_dropped_at_hwm": dropped_burst,
                f"sparse_sleep_{args.gap_us:g}us": sleeping,
                f"sparse_spin_{args.gap_us:g}us": spinning,
                "sparse_dropped": dropped_sparse,
                "machine": machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
