"""Simulated training ranks for the load scenario: several AgentClients in one process.

    python _ranks.py ENDPOINT FIRST_RANK COUNT EVENTS_PER_S DURATION_S CONTROL_PERIOD_S

Rank r claims simulated GPU r and, for DURATION_S, sends begin/end phase events at EVENTS_PER_S (a begin
carries the unit's clock, cycling through four clocks, an end carries none), and every CONTROL_PERIOD_S
closes one energy window and opens the next (two control round trips, besides the client's heartbeats).
Prints one JSON object with the per-process totals.
"""

from __future__ import annotations

import json
import sys
import time

from envpipe_agent.client import AgentClient
from envpipe_agent.errors import AgentError

TICK_S = 0.005


def main(endpoint: str, first_rank: int, count: int, events_per_s: float, duration_s: float,
         control_period_s: float) -> None:
    clients = [AgentClient(endpoint, job_id="load", rank=first_rank + i, timeout_s=2.0) for i in range(count)]
    info = clients[0].hello()
    leases = []
    for i, client in enumerate(clients):
        gpu = info.gpus[first_rank + i]
        leases.append(client.claim(gpu.uuid))
    clocks = [info.gpus[0].clocks_mhz[k] for k in (0, 20, 40, 60)]
    windows = [c.window_begin() for c in clients]
    control_ok, control_failed, control_ms, failures = 2 * count, 0, [], []
    attempted = 0
    started_s = time.monotonic()
    next_tick_s, next_control_s = started_s, started_s + control_period_s
    while (now_s := time.monotonic()) - started_s < duration_s:
        # Paced by elapsed time, not by ticks: a late tick sends more, so the rate holds on a busy machine.
        pairs = int(events_per_s * (now_s - started_s) // 2) - attempted // 2
        for k in range(pairs):
            unit_no = attempted // 2 + k
            for client in clients:
                unit = f"{'FB'[unit_no % 2]}{unit_no % 16}"
                client.phase(unit, "begin", clocks[unit_no % 4])
                client.phase(unit, "end")
        attempted += 2 * pairs
        if now_s >= next_control_s:
            next_control_s += control_period_s
            for i, client in enumerate(clients):
                start_s = time.perf_counter()
                try:
                    client.window_end(windows[i])
                    windows[i] = client.window_begin()
                    control_ok += 2
                except AgentError as exc:
                    control_failed += 1
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                control_ms.append((time.perf_counter() - start_s) * 1000 / 2)
        next_tick_s += TICK_S
        time.sleep(max(0.0, next_tick_s - time.monotonic()))
    elapsed_s = time.monotonic() - started_s
    result = {
        "ranks": count, "elapsed_s": elapsed_s, "events_attempted": attempted * count,
        "events_sent": sum(c.events_sent for c in clients), "events_dropped": sum(c.events_dropped for c in clients),
        "control_ok": control_ok, "control_failed": control_failed, "failures": failures[:5],
        "control_ms": control_ms, "leases_kept": sum(c.lease_id == lease for c, lease in zip(clients, leases)),
    }
    for client in clients:
        client.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
