"""Scenario 1: lease holders killed at random moments while their GPU is locked (DESIGN invariant 2).

Each holder is a real process (``_holder.py``) that claims a GPU and streams phase events at random clocks.
Once its GPU is seen locked, it is killed after a random delay: SIGKILL (the pid disappears; the agent's
pid check ends the lease) or SIGSTOP (a hung holder whose process still exists; only the missed
heartbeats end the lease, which is also all a holder on another node, over tcp, can rely on). The reset
latency is measured from the signal to the moment the GPU is seen unlocked:

* ``nvml`` backend: the fake ``libnvidia-ml.so.1``'s shared state, polled every 1 ms (ground truth: what
  the driver would show);
* ``sim`` backend: the agent's own status (``locked``), polled every ~2 ms.

One lane per GPU runs holders one after another; lanes run in parallel.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent

from benchmarks.reliability.common import fake_nvml, percentiles, poll_until, short_dir

HOLDER = str(Path(__file__).with_name("_holder.py"))


class _Lane:
    """Holders for one GPU, one after another; results appended to shared lists."""

    def __init__(self, agent: Any, index: int, is_locked: Any, env: dict[str, str] | None) -> None:
        self.agent, self.index, self.is_locked, self.env = agent, index, is_locked, env
        self.latencies_s: list[float] = []
        self.never_reset = 0
        self.errors: list[str] = []

    def one(self, seed: int, hold_s: float, how: int, lease_timeout_s: float) -> None:
        proc = subprocess.Popen([sys.executable, HOLDER, self.agent.endpoint, str(self.index), f"holder-{seed}",
                                 str(seed)], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline().strip()
            if line != "locked":
                self.errors.append(f"holder {seed} did not lock: {line!r} {proc.stderr.read()[-300:]}")
                return
            if poll_until(lambda: self.is_locked(self.index), 5.0) is None:
                self.errors.append(f"holder {seed}: GPU {self.index} never seen locked")
                return
            time.sleep(hold_s)
            proc.send_signal(how)
            signalled_s = time.monotonic()
            unlocked_s = poll_until(lambda: not self.is_locked(self.index), lease_timeout_s + 5.0)
            if unlocked_s is None:
                self.never_reset += 1
            else:
                self.latencies_s.append(unlocked_s - signalled_s)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()

    def run(self, count: int, rng: random.Random, max_hold_s: float, how: int, lease_timeout_s: float) -> None:
        for _ in range(count):
            self.one(rng.randrange(1 << 30), rng.uniform(0.0, max_hold_s), how, lease_timeout_s)


def _status_locked(endpoint: str) -> Any:
    """``is_locked(index)`` from the agent's status, one client per caller thread."""
    local = threading.local()

    def is_locked(index: int) -> bool:
        if not hasattr(local, "client"):
            local.client = AgentClient(endpoint, job_id="observer", rank=-1, timeout_s=2.0)
        return bool(local.client.status()["gpus"][index]["locked"])

    return is_locked


def run(holders: int = 100, backend: str = "nvml", gpus: int = 4, lease_timeout_s: float = 2.0,
        max_hold_s: float = 0.5, how: str = "kill", seed: int = 0) -> dict[str, Any]:
    """Kill ``holders`` holders (spread over ``gpus`` lanes) and report the reset latencies.

    Args:
        holders: number of holder processes in all.
        backend: ``nvml`` (fake libnvidia-ml, needs gcc) or ``sim``.
        gpus: GPUs of the agent, i.e. holders in flight at once (at most 8 with the fake NVML).
        lease_timeout_s: the agent's lease timeout.
        max_hold_s: each holder is signalled a uniform random 0..max_hold_s after its GPU is seen locked.
        how: ``kill`` (SIGKILL) or ``hang`` (SIGSTOP: only heartbeats can end the lease).
        seed: random seed of the delays and clocks.
    """
    sig = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}[how]
    rng = random.Random(seed)
    with short_dir() as runtime_dir:
        if backend == "nvml":
            with fake_nvml(gpus) as nvml:
                agent = start_agent("nvml", runtime_dir=runtime_dir, env=nvml.env,
                                    extra_args=["--lease-timeout-s", str(lease_timeout_s)])
                with agent:
                    result = _run_lanes(agent, nvml.locked, nvml.env, holders, gpus, rng, max_hold_s, sig,
                                        lease_timeout_s)
                    result["left_locked_driver"] = sum(nvml.locked(i) for i in range(gpus))
        else:
            agent = start_agent("sim", gpus=gpus, runtime_dir=runtime_dir,
                                extra_args=["--lease-timeout-s", str(lease_timeout_s)])
            with agent:
                result = _run_lanes(agent, _status_locked(agent.endpoint), None, holders, gpus, rng, max_hold_s,
                                    sig, lease_timeout_s)
    goal_s = lease_timeout_s + 0.5
    result.update(scenario="holders", backend=backend, how=how, gpus=gpus, lease_timeout_s=lease_timeout_s,
                  goal_s=goal_s, simulated=backend == "sim")
    result["over_goal"] = sum(lat > goal_s for lat in result.pop("_latencies_s"))
    return result


def _run_lanes(agent: Any, is_locked: Any, env: dict[str, str] | None, holders: int, gpus: int,
               rng: random.Random, max_hold_s: float, sig: int, lease_timeout_s: float) -> dict[str, Any]:
    lanes = [_Lane(agent, index, is_locked, env) for index in range(gpus)]
    counts = [holders // gpus + (1 if i < holders % gpus else 0) for i in range(gpus)]
    threads = [threading.Thread(target=lane.run, args=(n, random.Random(rng.random()), max_hold_s, sig,
                                                       lease_timeout_s)) for lane, n in zip(lanes, counts)]
    started_s = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies_s = [lat for lane in lanes for lat in lane.latencies_s]
    with AgentClient(agent.endpoint, job_id="observer", rank=-1) as client:
        status = client.status()
    return {
        "holders": holders, "signalled": len(latencies_s) + sum(lane.never_reset for lane in lanes),
        "left_locked": sum(lane.never_reset for lane in lanes) + sum(g["locked"] for g in status["gpus"]),
        "reset_latency_s": percentiles(latencies_s), "_latencies_s": latencies_s,
        "leases_ended": status["counters"]["leases_expired"], "errors": [e for lane in lanes for e in lane.errors],
        "duration_s": round(time.monotonic() - started_s, 1),
    }
