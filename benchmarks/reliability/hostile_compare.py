"""Run benchmarks/reliability/hostile.py against a root agent of a given source tree (before/after a fix).

As root, on a machine without NVIDIA GPUs (the agent runs on the fake libnvidia-ml of tests/agent)::

    git archive <commit> agent | tar -x -C /tmp/before && mv /tmp/before/agent /tmp/before/envpipe_agent
    python -m benchmarks.reliability.hostile_compare --agent-path /tmp/before --user envpipe-peer --out before.json
    python -m benchmarks.reliability.hostile_compare --user envpipe-peer --out after.json    # this checkout

The attacker is ``--user`` (a real second user, not root), in the agent's socket group; each attack runs
against a fresh agent (one that died in an attack would hide the next). Results: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.reliability.common import fake_nvml

ATTACKS = ("claim_for_pid_1", "catch_up_stall", "window_flood", "unread_replies", "never_ending_message",
           "connect_flood")


class _Prober:
    """Another user's requests during an attack: ``hello`` every 0.2 s (2 s timeout), from this process
    (root: never capped or shed, so it sees whether the agent serves, not the attacker's own limits)."""

    def __init__(self, endpoint: str) -> None:
        import threading

        self.endpoint, self.answered, self.sent, self.worst_s = endpoint, 0, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from benchmarks.reliability.hostile import Dealer

        while not self._stop.wait(0.2):
            client = Dealer(self.endpoint)
            start_s = time.monotonic()
            ok = isinstance(client.call("hello", 2.0), dict)
            client.close()
            self.sent += 1
            self.answered += ok
            self.worst_s = max(self.worst_s, time.monotonic() - start_s)

    def stop(self) -> dict[str, object]:
        self._stop.set()
        self._thread.join(5)
        return {"answered": f"{self.answered}/{self.sent}", "worst_ms": round(1000 * self.worst_s, 1)}


def run_one(attack: str, agent_path: str, user: pwd.struct_passwd, nvml_env: dict[str, str]) -> object:
    import grp

    directory = tempfile.mkdtemp(prefix="ep-hostile-")
    group = grp.getgrgid(user.pw_gid).gr_name
    env = dict(nvml_env, PYTHONPATH=agent_path) if agent_path else dict(nvml_env)
    agent = subprocess.Popen(
        [sys.executable, "-m", "envpipe_agent", "--config", "", "--backend", "nvml", "--runtime-dir", directory,
         "--socket-group", group, "--log-level", "warning"],
        env=env, cwd="/", stderr=subprocess.PIPE, text=True,
    )
    endpoint = f"ipc://{directory}/control.sock"
    try:
        deadline_s = time.monotonic() + 20
        while not os.path.exists(f"{directory}/control.sock") and time.monotonic() < deadline_s:
            time.sleep(0.05)
        time.sleep(0.5)
        probe = _Prober(endpoint)
        command = ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), "--clear-groups",
                   sys.executable, "-m", "benchmarks.reliability.hostile", "--endpoint", endpoint, "--only", attack,
                   "--agent-pid", str(agent.pid)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             cwd=str(Path(__file__).resolve().parents[2]),
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        lines = out.stdout.strip().splitlines()
        result = json.loads(lines[-1])[attack] if lines else f"attacker failed: {out.stderr[-500:]}"
        exit_code = agent.poll()
        return {"result": result, "agent_exit": exit_code, "other_user": probe.stop(),
                "agent_stderr_tail": agent.stderr.read()[-300:] if exit_code is not None else ""}
    finally:
        if agent.poll() is None:
            agent.terminate()
            agent.wait(15)
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-path", default="", help="directory holding an envpipe_agent package ('' = this one)")
    parser.add_argument("--user", default="envpipe-peer")
    parser.add_argument("--only", default=",".join(ATTACKS))
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    user = pwd.getpwnam(args.user)
    results = {}
    with fake_nvml(gpus=2) as nvml:
        for attack in args.only.split(","):
            print(f"{time.strftime('%H:%M:%S')} {attack}", file=sys.stderr, flush=True)
            results[attack] = run_one(attack, args.agent_path, user, nvml.env)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
