"""Event -> backend-apply latency with the fake NVML (goal p99 <= 1 ms): the time from AgentClient.phase()
in this process to the fake library's SetGpuLockedClocks in the agent subprocess, both on CLOCK_MONOTONIC.

Only the fake libnvidia-ml.so.1 (built from tests/agent/fake_nvml.c) is loaded; never run this where
LD_LIBRARY_PATH could fall through to a real driver.

    python benchmarks/agent/bench_apply.py [--changes 2000] [--gap-ms 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import FakeNvmlClock, build_fake_nvml, machine, summary_us

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    args = parser.parse_args()
    state = os.path.join(tempfile.mkdtemp(prefix="ep-bench-"), "nvml.state")
    env = dict(
        os.environ,
        LD_LIBRARY_PATH=build_fake_nvml(),
        ENVPIPE_FAKE_NVML_STATE=state,
        ENVPIPE_FAKE_NVML_GPUS="1",
    )
    clocks = (1410, 1200, 990, 1605)
    latencies_ns: list[int] = []
    with (
        start_agent("nvml", env=env, extra_args=["--lease-timeout-s", "10"]) as agent,
        AgentClient(agent.endpoint, job_id="bench", rank=0, timeout_s=10) as client,
    ):
        client.claim(client.hello().gpus[0].uuid)
        fake = FakeNvmlClock(state)
        for i in range(args.changes):
            previous_ns = fake.last_set_ns()
            sent_ns = time.monotonic_ns()
            client.phase("F12", "begin", clocks[i % len(clocks)])
            while (applied_ns := fake.last_set_ns()) == previous_ns:
                time.sleep(0.00002)  # yield the core: on small machines a spin here would slow the agent
            latencies_ns.append(applied_ns - sent_ns)
            client.phase("F12", "end", 0)
            time.sleep(args.gap_ms / 1000)
        agent_p99_ms = client.status()["gpus"][0]["apply_latency_p99_ms"]
    print(
        json.dumps(
            {
                "benchmark": "event -> SetGpuLockedClocks (fake NVML)",
                "latency": summary_us(latencies_ns),
                "agent_reported_recv_to_apply_p99_ms": agent_p99_ms,
                "dropped": client.events_dropped,
                "machine": machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
