"""Scenario 2: the agent itself dies or is stopped while GPUs are locked (DESIGN invariant 2).

Against the fake ``libnvidia-ml.so.1`` (whose state outlives the agent process, like a real driver's):

* ``SIGKILL`` with GPUs locked, then a fresh start: the crash leaves the locks behind (checked), and the
  next start clears them before it answers anything (0 locked when the first ``hello`` is answered);
  the training-side client claims its GPU again by itself (time measured);
* ``SIGTERM`` with GPUs locked: every GPU is unlocked when the process has exited, exit code 0;
* the unit's restart policy (systemd/envpipe-agent.service, ``Restart=`` / ``RestartSec=``), applied by a
  small supervisor that follows systemd.service(5): systemd is not PID 1 on the machines we test on, so the
  policy is read from the unit file and executed here, not by systemd.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent

from benchmarks.reliability.common import REPO, FakeNvml, fake_nvml, percentiles, poll_until, short_dir

UNIT = REPO / "systemd" / "envpipe-agent.service"
# systemd.service(5): signals that count as a clean exit for Restart=on-failure/on-abnormal.
_CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}


def unit_restart_policy(path: Path = UNIT) -> tuple[str, float]:
    """``(Restart=, RestartSec= in seconds)`` of the unit; systemd's defaults (``no``, 0.1 s) when unset."""
    restart, restart_sec = "no", 0.1
    for line in path.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key == "Restart":
            restart = value.strip()
        elif key == "RestartSec":
            text = value.strip()
            restart_sec = float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))
    return restart, restart_sec


def systemd_restarts(policy: str, returncode: int) -> bool:
    """Whether systemd restarts a service whose main process ended with ``returncode`` (Popen style)."""
    killed_by = signal.Signals(-returncode) if returncode < 0 else None
    clean = returncode == 0 or killed_by in _CLEAN_SIGNALS
    table = {"no": False, "always": True, "on-success": clean, "on-failure": not clean,
             "on-abnormal": killed_by is not None and killed_by not in _CLEAN_SIGNALS,
             "on-abort": killed_by is not None and killed_by not in _CLEAN_SIGNALS}
    return table[policy]


def _lock_gpu(client: AgentClient, nvml: FakeNvml, index: int) -> None:
    gpu = client.hello().gpus[index]
    client.claim(gpu.uuid)
    client.phase("F0", "begin", gpu.clocks_mhz[len(gpu.clocks_mhz) // 2])
    if poll_until(lambda: nvml.locked(index), 5.0) is None:
        raise RuntimeError(f"GPU {index} was never locked")


def _kill_round(nvml: FakeNvml, runtime_dir: str, gpus: int, lease_timeout_s: float,
                policy: tuple[str, float]) -> dict[str, Any]:
    args = ["--lease-timeout-s", str(lease_timeout_s)]
    agent = start_agent("nvml", runtime_dir=runtime_dir, env=nvml.env, extra_args=args)
    clients = [AgentClient(agent.endpoint, job_id="train", rank=i, timeout_s=0.5) for i in range(gpus)]
    try:
        for index, client in enumerate(clients):
            _lock_gpu(client, nvml, index)
        leases = [c.lease_id for c in clients]
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait()
        died_s = time.monotonic()
        left_by_crash = sum(nvml.locked(i) for i in range(gpus))
        restart, restart_sec = policy
        if not systemd_restarts(restart, agent.process.returncode):
            return {"left_by_crash": left_by_crash, "restarted": False}
        time.sleep(restart_sec)  # what systemd waits before the restart
        agent = start_agent("nvml", runtime_dir=runtime_dir, env=nvml.env, extra_args=args)
        ready_s = time.monotonic()
        locked_at_ready = sum(nvml.locked(i) for i in range(gpus))
        reclaimed_s = poll_until(lambda: all(c.lease_id not in (0, old) for c, old in zip(clients, leases)), 10.0,
                                 0.005)
        return {"left_by_crash": left_by_crash, "restarted": True, "locked_at_ready": locked_at_ready,
                "ready_after_crash_s": ready_s - died_s,
                "reclaim_after_ready_s": None if reclaimed_s is None else reclaimed_s - ready_s}
    finally:
        for client in clients:
            client.close()
        agent.stop()


def _term_round(nvml: FakeNvml, runtime_dir: str, gpus: int) -> dict[str, Any]:
    agent = start_agent("nvml", runtime_dir=runtime_dir, env=nvml.env)
    clients = [AgentClient(agent.endpoint, job_id="train", rank=i, timeout_s=0.5) for i in range(gpus)]
    try:
        for index, client in enumerate(clients):
            _lock_gpu(client, nvml, index)
        signalled_s = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(15)
        exit_s = time.monotonic() - signalled_s
        restart, _ = unit_restart_policy()
        return {"locked_after_exit": sum(nvml.locked(i) for i in range(gpus)), "exit_code": agent.process.returncode,
                "exit_s": exit_s, "systemd_would_restart": systemd_restarts(restart, agent.process.returncode)}
    finally:
        for client in clients:
            client._lease_id = 0  # the agent is gone: no release to send
            client.close()
        agent.stop()


def run(rounds: int = 20, gpus: int = 4, lease_timeout_s: float = 2.0,
        restart_sec_s: float | None = None) -> dict[str, Any]:
    """``rounds`` SIGKILL+restart rounds and ``rounds`` SIGTERM rounds with ``gpus`` locked GPUs each.

    ``restart_sec_s`` replaces the unit's RestartSec= (CI uses 0 to stay short); None keeps the unit's.
    """
    policy = unit_restart_policy()
    if restart_sec_s is not None:
        policy = (policy[0], restart_sec_s)
    kills, terms = [], []
    with fake_nvml(gpus) as nvml, short_dir() as runtime_dir:
        for _ in range(rounds):
            kills.append(_kill_round(nvml, runtime_dir, gpus, lease_timeout_s, policy))
        for _ in range(rounds):
            terms.append(_term_round(nvml, runtime_dir, gpus))
    reclaims = [k["reclaim_after_ready_s"] for k in kills if k.get("reclaim_after_ready_s") is not None]
    return {
        "scenario": "restart", "backend": "nvml (fake libnvidia-ml)", "rounds": rounds, "gpus": gpus,
        "unit_policy": {"Restart": policy[0], "RestartSec_s": policy[1], "applied_by": "supervisor emulation"},
        "sigkill": {
            "left_locked_by_crash": sum(k["left_by_crash"] for k in kills),
            "restarted": sum(k["restarted"] for k in kills),
            "locked_when_restarted_agent_answers": sum(k.get("locked_at_ready", 0) for k in kills),
            "ready_after_crash_s": percentiles([k["ready_after_crash_s"] for k in kills if k["restarted"]]),
            "clients_reclaimed": len(reclaims), "reclaim_after_ready_s": percentiles(reclaims),
        },
        "sigterm": {
            "locked_after_exit": sum(t["locked_after_exit"] for t in terms),
            "exit_codes": sorted({t["exit_code"] for t in terms}),
            "exit_s": percentiles([t["exit_s"] for t in terms]),
            "systemd_would_restart": sum(t["systemd_would_restart"] for t in terms),
        },
    }


def systemd_verify() -> str:
    """``systemd-analyze verify`` of the unit ("" when clean).

    The unit names /usr/local/bin/envpipe-agent; verify checks that it exists, so a copy whose ExecStart
    names this environment's envpipe-agent is verified instead (when there is one).
    """
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze not installed"
    script = shutil.which("envpipe-agent") or str(Path(sys.executable).with_name("envpipe-agent"))
    text = UNIT.read_text()
    if Path(script).exists():
        text = text.replace("ExecStart=/usr/local/bin/envpipe-agent", f"ExecStart={script}")
    with tempfile.TemporaryDirectory() as directory:
        unit = Path(directory) / UNIT.name
        unit.write_text(text)
        done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                              check=False)
    return (done.stdout + done.stderr).strip()
