"""Scenario 4: who may touch a GPU's clock (DESIGN invariant 3).

* another uid cannot connect: a client run as uid 65534 (``setpriv``; needs root) is refused by the
  socket directory's mode; the same uid with the socket group as a supplementary group gets in;
* a non-holder cannot change a clock: forged lease ids on ``set_clock``/``heartbeat``/``release`` and on
  the event socket are refused or dropped, and the sim backend's call log shows no set from them;
* a lease cannot be stolen: claims of a held GPU, as another job or copying the holder's public job, rank
  and pid (``status`` shows them), are refused, and the holder keeps its lease id;
* a clock outside the allow-list is never applied: random requested clocks (control and events) against an
  agent with ``min_mhz``/``max_mhz`` set; every clock in the backend's call log is an allowed one.

The agent runs in this process (tests/agent's ``ThreadAgent``) so its backend's call log can be read;
only the uid check uses a separate agent process.
"""

from __future__ import annotations

import grp
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from typing import Any

import zmq
from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent
from envpipe_agent.errors import LeaseError
from envpipe_agent.protocol import encode_event

from benchmarks.reliability.common import agent_test_helpers, poll_until, short_dir

_PROBE = """
import sys
from envpipe_agent.client import AgentClient
from envpipe_agent.errors import AgentUnavailable
try:
    AgentClient(sys.argv[1], job_id="probe", rank=0, timeout_s=1.0).hello()
    print("connected")
except AgentUnavailable:
    print("refused")
"""
NOBODY = 65534


def _as_uid(endpoint: str, uid: int, groups: list[int]) -> str:
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    command = ["setpriv", "--reuid", str(uid), "--regid", str(uid), *group_args, sys.executable, "-c", _PROBE, endpoint]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/", check=False).stdout.strip()


def other_uid() -> dict[str, Any]:
    """Connect as uid 65534 without and with the socket group; report the socket's modes."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return {"skipped": "needs root and setpriv (util-linux) to run a client as another uid"}
    group = grp.getgrgid(os.getegid()).gr_name
    with short_dir() as runtime_dir:
        os.chmod(runtime_dir, 0o755)  # the agent must tighten this itself
        with start_agent("sim", gpus=1, runtime_dir=runtime_dir, extra_args=["--socket-group", group]) as agent:
            sock_path = agent.endpoint[len("ipc://"):]
            dir_stat, sock_stat = os.stat(runtime_dir), os.stat(sock_path)
            return {
                "dir_mode": oct(stat.S_IMODE(dir_stat.st_mode)), "socket_mode": oct(stat.S_IMODE(sock_stat.st_mode)),
                "socket_group": grp.getgrgid(sock_stat.st_gid).gr_name,
                "other_uid": _as_uid(agent.endpoint, NOBODY, []),
                "other_uid_in_socket_group": _as_uid(agent.endpoint, NOBODY, [os.getegid()]),
            }


def _forged_ids(rng: random.Random, real: int, count: int) -> list[int]:
    ids = [rng.randrange(1, 1 << 32) for _ in range(count)]
    return [i for i in ids if i != real]


def non_holder_and_steal(attempts: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Forged lease ids and lease-taking claims against a held GPU (sim, agent in this process)."""
    rng = random.Random(seed)
    refused = {"set_clock": 0, "heartbeat": 0, "release": 0, "claim_other_job": 0, "claim_copied_holder": 0,
               "claim_copied_holder_forged_id": 0}
    with short_dir() as runtime_dir:
        thread_agent = agent_test_helpers().ThreadAgent(runtime_dir, lease_timeout_s=2.0)
        holder = AgentClient(thread_agent.endpoint, job_id="victim", rank=0)
        thief = AgentClient(thread_agent.endpoint, job_id="thief", rank=7)
        try:
            uuid = holder.hello().gpus[0].uuid
            lease = holder.claim(uuid)
            holder.set_clock(900)
            poll_until(lambda: thread_agent.backend.read_clock_mhz(0) == 900, 5.0)
            thread_agent.backend.calls.clear()  # from here on, only what the attack caused
            forged = _forged_ids(rng, lease, attempts)
            for lease_id in forged:
                for op in ("set_clock", "heartbeat", "release"):
                    refused[op] += _refused(thief, op, {"lease_id": lease_id, "clock_mhz": 1500})
            public = thief.status()["gpus"][0]["holder"]
            for _ in range(attempts // 10 or 1):
                refused["claim_other_job"] += _refused(thief, "claim", {"gpu_uuid": uuid, "job_id": "thief",
                                                                        "rank": 7, "pid": os.getpid()})
                refused["claim_copied_holder"] += _refused(thief, "claim", {"gpu_uuid": uuid, **public})
                refused["claim_copied_holder_forged_id"] += _refused(
                    thief, "claim", {"gpu_uuid": uuid, **public, "lease_id": _forged_ids(rng, lease, 1)[0]})
            events_dropped = _forged_events(thread_agent, forged * 10)
            own = holder.claim(uuid)  # the rightful holder's repeated claim still works (it names its lease)
            status = thief.status()["gpus"][0]
            return {
                "forged_ids": len(forged), "refused": refused, "claims_each": attempts // 10 or 1,
                "forged_events": len(forged) * 10, "forged_events_dropped": events_dropped,
                "sets_after_attack": [c for c in thread_agent.backend.calls if c[0] == "set"],
                "clock_mhz_after": thread_agent.backend.read_clock_mhz(0),
                "holder_kept_lease": own == lease and status["holder"] == public,
            }
        finally:
            thief.close()
            holder.close()
            thread_agent.stop()


def _refused(client: AgentClient, op: str, args: dict[str, Any]) -> int:
    try:
        client.call(op, args)
    except LeaseError:
        return 1
    return 0


def _forged_events(thread_agent: Any, lease_ids: list[int]) -> int:
    counters = thread_agent.agent.counters
    before = counters["events_no_lease"]
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(thread_agent.config.events_endpoint())
    for lease_id in lease_ids:
        push.send(encode_event(0, lease_id, 1500, b"F0"))
    # Close only once counted: the agent's small receive queue leaves frames in flight, which a closing
    # sender discards.
    poll_until(lambda: counters["events_no_lease"] - before >= len(lease_ids), 10.0)
    push.close()
    return counters["events_no_lease"] - before


def allow_list(requests: int = 2000, min_mhz: int = 900, max_mhz: int = 1500, seed: int = 0) -> dict[str, Any]:
    """Random clocks from the holder, by control and by event; every applied clock must be allowed."""
    rng = random.Random(seed)
    with short_dir() as runtime_dir:
        thread_agent = agent_test_helpers().ThreadAgent(runtime_dir, min_mhz=min_mhz, max_mhz=max_mhz)
        backend = thread_agent.backend
        allowed = {c for c in backend.card.clocks_mhz if min_mhz <= c <= max_mhz}
        with AgentClient(thread_agent.endpoint, job_id="j", rank=0) as client:
            client.claim(client.hello().gpus[0].uuid)
            for _ in range(requests):
                client.set_clock(rng.choice([rng.randrange(-10**6, 10**6), rng.randrange(0, 3000), 2**40, -2**40]))
            for i in range(requests):
                client.phase(f"F{i % 8}", "begin", rng.randrange(0, 65536))
            poll_until(lambda: thread_agent.agent.stats[0].events >= requests, 10.0)
            time.sleep(0.2)  # let the worker apply the last target
        thread_agent.stop()
        applied = [c[2] for c in backend.calls if c[0] == "set"]
        return {"requests": 2 * requests, "allowed_range_mhz": [min_mhz, max_mhz], "clocks_applied": len(applied),
                "distinct_applied": len(set(applied)), "outside_allow_list": sum(c not in allowed for c in applied)}


def run(attempts: int = 1000, requests: int = 2000, seed: int = 0) -> dict[str, Any]:
    """All four checks."""
    return {"scenario": "authz", "backend": "sim", "uid": other_uid(),
            "non_holder": non_holder_and_steal(attempts, seed), "allow_list": allow_list(requests, seed=seed)}
