"""Part of scenario 3: a socket-group member opens many idle connections to the control socket.

Every connection is a file descriptor of the agent, and libzmq aborts the process when accept() on an ipc
socket fails with EMFILE (an assert in ipc_listener.cpp) — no Python ``finally`` runs, so locked GPUs
stay locked until the next start. The agent now raises its soft open-files limit to the hard one at start
(systemd: 1024 → 524288), so the flood needs the hard limit's worth of connections. Both cases are run
under ``prlimit`` against the fake NVML with one GPU locked by a legitimate holder:

* soft < hard (systemd's default shape): the agent must survive ``connections`` idle connections and keep
  serving its holder and new clients;
* soft = hard (what the fix cannot raise): the agent is expected to die, and the GPU stays locked.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from typing import Any

import zmq
from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import agent_command
from envpipe_agent.errors import AgentError

from benchmarks.reliability.common import fake_nvml, short_dir


def _start(runtime_dir: str, env: dict[str, str], soft: int, hard: int) -> tuple[subprocess.Popen, str]:
    command = ["prlimit", f"--nofile={soft}:{hard}", "--", *agent_command("nvml", 1, runtime_dir, [])]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    endpoint = f"ipc://{runtime_dir}/control.sock"
    with AgentClient(endpoint, job_id="probe", rank=-1, timeout_s=0.5) as probe:
        deadline_s = time.monotonic() + 15
        while True:
            try:
                probe.hello()
                return process, endpoint
            except AgentError:
                if process.poll() is not None or time.monotonic() > deadline_s:
                    raise RuntimeError(f"agent did not start: {process.stderr.read()[-300:]}") from None


def _case(connections: int, soft: int, hard: int) -> dict[str, Any]:
    with fake_nvml(1) as nvml, short_dir() as runtime_dir:
        process, endpoint = _start(runtime_dir, nvml.env, soft, hard)
        holder = AgentClient(endpoint, job_id="legit", rank=0, timeout_s=1.0)
        context = zmq.Context()
        context.set(zmq.MAX_SOCKETS, connections + 64)
        sockets = []
        try:
            gpu = holder.hello().gpus[0]
            holder.claim(gpu.uuid)
            holder.set_clock(gpu.clocks_mhz[40])
            for _ in range(connections):
                sock = context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
                sockets.append(sock)
            time.sleep(2.0)  # let the agent's I/O thread accept them all
            alive = process.poll() is None
            try:
                with AgentClient(endpoint, job_id="newcomer", rank=1, timeout_s=1.0) as newcomer:
                    newcomer_ok = bool(newcomer.hello().gpus)
            except AgentError:
                newcomer_ok = False
            holder_ok = alive and holder.lease_id != 0 and bool(holder.status())
            locked_after = nvml.locked(0)
        finally:
            for sock in sockets:
                sock.close(0)
            context.term()
            holder._lease_id = 0 if process.poll() is not None else holder._lease_id
            holder.close()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.wait(15)
        stderr_tail = process.stderr.read().strip().splitlines()[-1:] if process.returncode else []
        process.stderr.close()
        return {"connections": connections, "nofile_soft": soft, "nofile_hard": hard, "agent_alive": alive,
                "holder_served": holder_ok, "newcomer_served": newcomer_ok, "gpu_locked_after": bool(locked_after),
                "exit_code": process.returncode, "stderr_last": stderr_tail}


def run(connections: int = 2000, soft: int = 1024, hard: int = 8192) -> dict[str, Any]:
    """The survivable case (soft < hard ≥ connections) and the one at the hard limit (soft = hard = soft)."""
    if shutil.which("prlimit") is None:
        return {"scenario": "flood", "skipped": "needs prlimit (util-linux)"}
    return {"scenario": "flood", "backend": "nvml (fake libnvidia-ml)",
            "below_hard_limit": _case(connections, soft, hard), "at_hard_limit": _case(connections, soft, soft)}
