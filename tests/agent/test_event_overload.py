"""Overload on the event path becomes counted drops at the sender, never a backlog of stale clocks."""

from __future__ import annotations

import threading
import time

from envpipe_agent.client import AgentClient
from envpipe_agent.protocol import EVENT_RECV_HWM, EVENT_SEND_HWM, EVENT_SOCKET_BUFFER_BYTES

from tests.agent.conftest import wait_for


def _stall_event_loop(agent) -> threading.Event:
    """Make the agent's loop stop taking events until the returned gate is set (an overloaded agent)."""
    gate = threading.Event()
    handle = agent.agent.handle_event

    def stalled(frame: bytes, received_ns: int) -> None:
        gate.wait(10)
        handle(frame, received_ns)

    agent.agent.handle_event = stalled
    return gate


def test_a_stalled_agent_makes_the_sender_drop_and_count(sim_agent) -> None:
    attempted = 20_000
    with AgentClient(sim_agent.endpoint, job_id="flood", rank=0) as client:
        client.claim(client.hello().gpus[0].uuid)
        gate = _stall_event_loop(sim_agent)
        try:
            for i in range(attempted):
                client.phase("F0", "begin" if i % 2 == 0 else "end", 990 if i % 2 == 0 else 0)
                if i % 1000 == 0:
                    time.sleep(0.005)  # let zmq's I/O threads fill every queue on the way
        finally:
            gate.set()
        assert client.events_sent + client.events_dropped == attempted
        # What queued is bounded by the HWMs and the two kernel buffers (~150 frames each), not 110 000.
        bound = EVENT_SEND_HWM + EVENT_RECV_HWM + 2 * EVENT_SOCKET_BUFFER_BYTES // 24 + 1000
        assert 0 < client.events_sent <= bound, (client.events_sent, client.events_dropped)
        # Nothing that was sent is lost silently: every queued event reaches the agent.
        wait_for(lambda: sim_agent.agent.counters["events_received"] == client.events_sent)


def test_only_the_latest_clock_of_a_batch_is_queued(sim_agent) -> None:
    with AgentClient(sim_agent.endpoint, job_id="batch", rank=0) as client:
        client.claim(client.hello().gpus[0].uuid)
        gate = _stall_event_loop(sim_agent)
        for clock_mhz in (990, 1200, 1410, 900, 1005):
            client.phase("F0", "begin", clock_mhz)
        time.sleep(0.2)  # all five wait in the agent's queue, to be drained as one batch
        gate.set()
        wait_for(lambda: sim_agent.agent.counters["events_received"] == 5)
        wait_for(lambda: sim_agent.backend.read_clock_mhz(0) == 1005)
        gpu = client.status()["gpus"][0]
        assert gpu["superseded"] >= 3 and gpu["clock_changes"] <= 2
