"""Scenario 6: the training side when its agent dies, comes back, or hangs (DESIGN invariant 1).

A training loop sends phase events exactly as ``EnvpipeEngine`` does on CPU (``ImmediateNotifier``:
``client.phase(unit, "begin", clock)`` and ``"end"`` from the training thread around each unit) through
the real ``AgentClient``; the units are timed busy loops (``client`` mode, no torch), or real DeepSpeed
``train_batch`` steps of a 2-stage tiny Llama (``engine`` mode, ``_train_worker.py``). While it runs, the
agent goes through five timed phases:

    normal → SIGKILL (agent dead) → restarted (same sockets) → SIGSTOP (agent stuck) → SIGCONT (resumed)

Reported per phase: step times (p50/p99/max), events sent/dropped, and per run the warnings the client
logged, whether every rank claimed its GPU again without restarting (new lease id after the restart and
after the resume) and whether clocks were locked again afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent

from benchmarks.reliability.common import percentiles, short_dir

PHASES = ("normal", "killed", "restarted", "stopped", "resumed")


class Warnings(logging.Handler):
    """Counts the warnings of envpipe_agent.client (what a user sees in the training log)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:160])


class _AgentLife:
    """Runs the agent through PHASES, ``phase_s`` seconds each, in a background thread."""

    def __init__(self, runtime_dir: str, gpus: int, phase_s: float, lease_timeout_s: float) -> None:
        self.runtime_dir, self.gpus, self.phase_s = runtime_dir, gpus, phase_s
        self.args = ["--lease-timeout-s", str(lease_timeout_s)]
        self.agent = start_agent("sim", gpus=gpus, runtime_dir=runtime_dir, extra_args=self.args)
        self.phase = "normal"
        self.changed_s: dict[str, float] = {}
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.changed_s["normal"] = time.monotonic()
        self._thread.start()

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.changed_s[phase] = time.monotonic()

    def _run(self) -> None:
        time.sleep(self.phase_s)
        self.agent.process.send_signal(signal.SIGKILL)
        self.agent.process.wait()
        self._enter("killed")
        time.sleep(self.phase_s)
        self.agent = start_agent("sim", gpus=self.gpus, runtime_dir=self.runtime_dir, extra_args=self.args)
        self._enter("restarted")
        time.sleep(self.phase_s)
        self.agent.process.send_signal(signal.SIGSTOP)
        self._enter("stopped")
        time.sleep(self.phase_s)
        self.agent.process.send_signal(signal.SIGCONT)
        self._enter("resumed")
        time.sleep(self.phase_s)
        self.done.set()

    def stop(self) -> None:
        self._thread.join(5 * self.phase_s + 30)
        if self.agent.process.poll() is None:
            self.agent.process.send_signal(signal.SIGCONT)
        self.agent.stop()


def _busy_ms(duration_ms: float) -> None:
    end_s = time.perf_counter() + duration_ms / 1000
    while time.perf_counter() < end_s:
        pass


def _client_steps(client: AgentClient, life: _AgentLife, micro_batches: int, unit_ms: float,
                  clocks: list[int]) -> list[dict[str, Any]]:
    """The training loop of ``client`` mode: one row per step (phase, time, lease, event counters)."""
    steps = []
    clock = time.perf_counter
    while not life.done.is_set():
        phase = life.phase
        start_s = clock()
        in_phase_s = 0.0  # time spent inside client.phase(): what the agent can cost a step, free of noise
        for m in range(micro_batches):
            for kind, clock_mhz in (("F", clocks[m % len(clocks)]), ("B", clocks[-1 - m % len(clocks)])):
                t0 = clock()
                client.phase(f"{kind}{m}", "begin", clock_mhz)
                t1 = clock()
                _busy_ms(unit_ms)
                t2 = clock()
                client.phase(f"{kind}{m}", "end")
                in_phase_s += (t1 - t0) + (clock() - t2)
        steps.append({"phase": phase, "step_ms": (clock() - start_s) * 1000, "phase_call_us": in_phase_s * 1e6,
                      "lease": client.lease_id, "sent": client.events_sent, "dropped": client.events_dropped})
    return steps


def run(mode: str = "client", phase_s: float = 4.0, micro_batches: int = 4, unit_ms: float = 5.0,
        lease_timeout_s: float = 2.0) -> dict[str, Any]:
    """Run one training loop through the agent's five phases and report (see the module docstring)."""
    if mode == "engine":
        return run_engine(phase_s=phase_s, lease_timeout_s=lease_timeout_s)
    handler = Warnings()
    logger = logging.getLogger("envpipe_agent.client")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # what a training log shows, whatever the caller configured
    with short_dir() as runtime_dir:
        life = _AgentLife(runtime_dir, 1, phase_s, lease_timeout_s)
        client = AgentClient(life.agent.endpoint, job_id="train", rank=0)  # default timeout, as training uses
        try:
            gpu = client.hello().gpus[0]
            client.claim(gpu.uuid)
            clocks = [gpu.clocks_mhz[k] for k in (10, 30, 50)]
            life.start()
            steps = _client_steps(client, life, micro_batches, unit_ms, clocks)
            with AgentClient(life.agent.endpoint, job_id="observer", rank=-1) as observer:
                locked_at_end = observer.status()["gpus"][0]["target_mhz"]
        finally:
            client.close()
            life.stop()
            logger.removeHandler(handler)
            logger.setLevel(level)
    result = summarise(steps, handler.messages)
    result.update(scenario="training", mode="client", backend="sim", simulated=True, phase_s=phase_s,
                  unit_ms=unit_ms, micro_batches=micro_batches, clock_target_at_end_mhz=locked_at_end)
    return result


def summarise(steps: list[dict[str, Any]], warnings: list[str]) -> dict[str, Any]:
    """Per-phase step times and event counters, lease ids seen, warnings (shared by both modes)."""
    phases: dict[str, Any] = {}
    for name in PHASES:
        rows = [s for s in steps if s["phase"] == name]
        if not rows:
            continue
        phases[name] = {"steps": len(rows), "step_ms": percentiles([r["step_ms"] for r in rows]),
                        "phase_calls_us_per_step": percentiles([r["phase_call_us"] for r in rows if "phase_call_us" in r]),
                        "events_sent": rows[-1]["sent"] - rows[0]["sent"],
                        "events_dropped": rows[-1]["dropped"] - rows[0]["dropped"],
                        "leases": sorted({r["lease"] for r in rows} - {0})}
    normal = phases.get("normal", {}).get("step_ms", {})
    stopped = phases.get("stopped", {}).get("step_ms", {})
    leases = [phases.get(p, {}).get("leases", []) for p in PHASES]
    return {
        "steps": len(steps), "phases": phases, "warnings": len(warnings), "warning_messages": warnings,
        # After a restart the new agent knows no lease: a new one must appear. After a stuck agent resumes,
        # the client names the lease it lost and keeps it (same id) or gets a new one if it had expired.
        "reclaimed_after_restart": bool(leases[2]) and leases[2][-1] not in leases[0],
        "lease_after_resume": ("none" if not leases[4] else "kept" if leases[4][-1] in leases[2] else "new"),
        "stalled_step_ms": (stopped.get("max") or 0) - (normal.get("max") or 0),
    }


def run_engine(phase_s: float = 6.0, lease_timeout_s: float = 2.0, world_size: int = 2) -> dict[str, Any]:
    """``engine`` mode: real EnvpipeEngine ranks (envpipe.deepspeed.launcher) against the same agent life."""
    from envpipe.deepspeed.launcher import run_ranks

    worker = f"{Path(__file__).with_name('_train_worker.py')}:train_until"
    with short_dir() as runtime_dir:
        life = _AgentLife(runtime_dir, world_size, phase_s, lease_timeout_s)
        done_path = os.path.join(runtime_dir, "done")
        ready_dir = os.path.join(runtime_dir, "ready")
        os.mkdir(ready_dir)
        started = threading.Thread(target=_start_when_ready, args=(life, ready_dir, world_size, done_path),
                                   daemon=True)
        started.start()
        try:
            results = run_ranks(world_size, worker, {"endpoint": life.agent.endpoint, "ready_dir": ready_dir,
                                                     "done_path": done_path, "phase_path": runtime_dir + "/phase",
                                                     "phases": list(PHASES)},
                                timeout_s=5 * phase_s + 300)
        finally:
            life.done.set()
            life.stop()
    per_rank = []
    for result in results:
        if result.value is None:
            per_rank.append({"rank": result.rank, "returncode": result.returncode, "stderr": result.stderr_tail[-800:]})
            continue
        summary = summarise(result.value["steps"], result.value["warnings"])
        summary["rank"] = result.rank
        per_rank.append(summary)
    return {"scenario": "training", "mode": "engine", "backend": "sim", "simulated": True, "phase_s": phase_s,
            "ranks": per_rank}


def _start_when_ready(life: _AgentLife, ready_dir: str, world_size: int, done_path: str) -> None:
    """Start the agent's phases once every rank has trained its warm-up steps; publish the phase."""
    while len(os.listdir(ready_dir)) < world_size:
        time.sleep(0.05)
    life.start()
    phase_path = os.path.join(os.path.dirname(done_path), "phase")
    while not life.done.is_set():
        Path(phase_path + ".tmp").write_text(life.phase)
        os.replace(phase_path + ".tmp", phase_path)
        time.sleep(0.01)
    Path(done_path).write_text(json.dumps(life.changed_s))
