"""Scenario 5: many ranks against one agent (sim backend: one simulated GPU per rank).

``ranks`` simulated ranks, ``procs`` processes (``_ranks.py``), each rank at ``events_per_s`` phase events
(begin with a clock, end without) plus an energy window closed and reopened every ``control_period_s`` and
the client's own heartbeats. Reported:

* lost control messages: control calls that failed (any error, timeouts included) and leases that did not
  survive the run (a lost heartbeat would end one);
* event drop rate: (attempted - counted by the agent) / attempted, split into drops in the client (PUSH
  queue full: ``zmq.Again``) and losses in transit (sent but never counted);
* apply latency: the agent's own p99 per GPU (from the event's receipt to the clock set returning);
* agent CPU: user+system seconds of the agent process per wall second (1.0 = one core), and its RSS.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent

from benchmarks.reliability.common import cpu_s, percentiles, rss_kib, short_dir

RANKS = str(Path(__file__).with_name("_ranks.py"))


def run(ranks: int = 64, events_per_s: float = 1000.0, duration_s: float = 60.0, procs: int = 8,
        control_period_s: float = 1.0, lease_timeout_s: float = 2.0) -> dict[str, Any]:
    """Run the load and return its figures (see the module docstring)."""
    procs = min(procs, ranks)
    split = [ranks // procs + (1 if i < ranks % procs else 0) for i in range(procs)]
    with (
        short_dir() as runtime_dir,
        start_agent("sim", gpus=ranks, runtime_dir=runtime_dir,
                    extra_args=["--lease-timeout-s", str(lease_timeout_s)]) as agent,
        AgentClient(agent.endpoint, job_id="observer", rank=-1) as observer,
    ):
        before = observer.status()["counters"]
        rss_before, cpu_before_s, started_s = rss_kib(agent.pid), cpu_s(agent.pid), time.monotonic()
        workers = []
        first = 0
        for count in split:
            workers.append(subprocess.Popen(
                [sys.executable, RANKS, agent.endpoint, str(first), str(count), str(events_per_s),
                 str(duration_s), str(control_period_s)], stdout=subprocess.PIPE, text=True))
            first += count
        outs = [json.loads(w.communicate(timeout=duration_s + 120)[0]) for w in workers]
        wall_s = time.monotonic() - started_s
        agent_cpu_s = cpu_s(agent.pid) - cpu_before_s
        time.sleep(0.5)  # let the last events drain
        status = observer.status()
        rss_after = rss_kib(agent.pid)
    return _summarise(outs, before, status, ranks, events_per_s, duration_s, wall_s, agent_cpu_s, rss_before,
                      rss_after)


def _summarise(outs: list[dict[str, Any]], before: dict[str, int], status: dict[str, Any], ranks: int,
               events_per_s: float, duration_s: float, wall_s: float, agent_cpu_s: float, rss_before: int,
               rss_kib_after: int) -> dict[str, Any]:
    attempted = sum(o["events_attempted"] for o in outs)
    sent = sum(o["events_sent"] for o in outs)
    received = status["counters"]["events_received"] - before["events_received"]
    p99s = [g["apply_latency_p99_ms"] for g in status["gpus"] if g["apply_latency_p99_ms"] is not None]
    control_ms = [ms for o in outs for ms in o["control_ms"]]
    achieved = received / max(min(o["elapsed_s"] for o in outs), 1e-9)
    return {
        "scenario": "load", "backend": "sim", "simulated": True, "ranks": ranks, "events_per_s_per_rank": events_per_s,
        "duration_s": duration_s, "wall_s": round(wall_s, 1),
        "events_attempted": attempted, "events_counted_by_agent": received,
        "event_drop_rate": round((attempted - received) / attempted, 6) if attempted else None,
        # Events still queued when the ranks exit (their PUSH sockets have LINGER=0, so these are discarded):
        # at the agent's achieved rate, how late the last of them would have been applied.
        "backlog_at_end": sent - received,
        "backlog_delay_s_est": round((sent - received) / max(achieved, 1e-9), 2),
        "dropped_in_client": sum(o["events_dropped"] for o in outs), "lost_in_transit": sent - received,
        "achieved_events_per_s": round(achieved),
        "control_ok": sum(o["control_ok"] for o in outs), "control_failed": sum(o["control_failed"] for o in outs),
        "control_failures": [f for o in outs for f in o["failures"]][:5],
        "control_round_trip_ms": percentiles(control_ms),
        "leases_lost": ranks - sum(o["leases_kept"] for o in outs),
        "leases_expired_by_agent": status["counters"]["leases_expired"] - before["leases_expired"],
        "apply_latency_p99_ms": {"median_gpu": round(statistics.median(p99s), 3) if p99s else None,
                                 "worst_gpu": max(p99s) if p99s else None},
        "clock_changes": sum(g["clock_changes"] for g in status["gpus"]),
        "agent_cpu_cores": round(agent_cpu_s / wall_s, 3), "agent_rss_kib_before": rss_before,
        "agent_rss_kib_after": rss_kib_after,
    }
