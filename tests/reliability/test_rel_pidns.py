"""A rank whose pid the agent cannot see (its own pid namespace, e.g. a container) keeps its lease."""

from __future__ import annotations

import time

from envpipe_agent.client import AgentClient

from benchmarks.reliability.common import agent_test_helpers, short_dir


def test_foreign_pid_lease_is_kept_by_heartbeats_and_ended_by_their_loss() -> None:
    with short_dir() as runtime_dir:
        agent = agent_test_helpers().ThreadAgent(runtime_dir, lease_timeout_s=0.5)
        client = AgentClient(agent.endpoint, job_id="container-rank", rank=0)
        try:
            client.pid = 4_000_000  # above pid_max: names no process on this node
            lease = client.claim(client.hello().gpus[0].uuid)
            time.sleep(1.0)  # ten lease ticks
            assert client.lease_id == lease and agent.agent.counters["leases_expired"] == 0
            client._stop.set()  # heartbeats stop, as when the container dies
            agent_test_helpers().wait_for(lambda: agent.agent.counters["leases_expired"] == 1, timeout_s=3.0)
        finally:
            client._lease_id = 0
            client.close()
            agent.stop()
