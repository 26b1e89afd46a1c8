"""The sim agent times busy/idle and window marks on the rank's own timestamps, not on when it processes
them: a stalled agent must not move energy between busy and idle (protocol 3)."""

from __future__ import annotations

import time

import envpipe_agent.client as client_module
import envpipe_agent.sim as sim_module
import pytest
import zmq
from envpipe_agent.client import AgentClient
from envpipe_agent.dvfs import busy_power_w, idle_power_w
from envpipe_agent.protocol import EVENT_BEGIN, EVENT_END, MAX_STAMP_AGE_NS, encode_event, parse_event
from envpipe_agent.sim import SimBackend

STALL_S = 0.3  # one stall of the agent's event loop, as a loaded machine (or SIGSTOP) causes


def _model_energy_j(backend: SimBackend, window: tuple[int, int], busy: list[tuple[int, int]]) -> float:
    """The power model over the given monotonic-ns stamps: busy spans at the top clock, idle otherwise."""
    card = backend.card
    busy_w = busy_power_w(card, backend.model, card.max_clock_mhz)
    idle_w = idle_power_w(card, backend.model, card.max_clock_mhz)
    busy_s = sum(end_ns - begin_ns for begin_ns, end_ns in busy) / 1e9
    window_s = (window[1] - window[0]) / 1e9
    return busy_w * busy_s + idle_w * (window_s - busy_s)


def test_a_stalled_agent_integrates_the_ranks_timeline(sim_agent, monkeypatch) -> None:
    stamps_ns: list[int] = []  # every stamp the client put on the wire, in order

    def recorded_now_ns() -> int:
        stamps_ns.append(time.monotonic_ns())
        return stamps_ns[-1]

    monkeypatch.setattr(client_module, "_now_ns", recorded_now_ns)
    handled_ns: list[int] = []  # when the agent got round to each event (what protocol 2 timed on)
    handle_event = sim_agent.agent.handle_event

    def stalling_handle_event(frame: bytes, received_ns: int) -> None:
        if parse_event(frame)[0] == EVENT_END and not handled_ns[1:]:
            time.sleep(STALL_S)  # the loop stalls before the first end: it is handled 0.3 s late
        handled_ns.append(time.monotonic_ns())
        handle_event(frame, handled_ns[-1])

    monkeypatch.setattr(sim_agent.agent, "handle_event", stalling_handle_event)
    client = AgentClient(sim_agent.endpoint, job_id="stamps", rank=0)
    try:
        client.claim(client.hello().gpus[0].uuid)
        window_id = client.window_begin()
        for busy_s, idle_s in ((0.1, 0.2), (0.1, 0.05)):
            client.phase("F0", "begin")
            time.sleep(busy_s)
            client.phase("F0", "end")
            time.sleep(idle_s)
        time.sleep(STALL_S)  # the agent has caught up: the window end is not what is tested here
        window = client.window_end(window_id)
    finally:
        client.close()
    begin_ns, b1, e1, b2, e2, end_ns = stamps_ns[-6:]
    expected_j = _model_energy_j(sim_agent.backend, (begin_ns, end_ns), [(b1, e1), (b2, e2)])
    assert window.simulated and window.duration_s == pytest.approx((end_ns - begin_ns) / 1e9, abs=1e-6)
    assert window.energy_j == pytest.approx(expected_j, rel=0.01)
    # Timed on the agent's processing instead, the same run is off by far more than the tolerance.
    processed = [(handled_ns[0], handled_ns[1]), (handled_ns[2], handled_ns[3])]
    processing_j = _model_energy_j(sim_agent.backend, (begin_ns, end_ns), processed)
    assert abs(processing_j - expected_j) > 0.2 * expected_j


def test_late_phase_events_are_placed_before_an_earlier_applied_clock(monkeypatch) -> None:
    # The worker applies a clock at the agent's time; the events of a stalled agent then arrive stamped
    # earlier: the energies after them are integrated again, in the rank's order.
    now_s = [100.0]
    monkeypatch.setattr(sim_module.time, "monotonic", lambda: now_s[0])
    backend = SimBackend(gpus=1, card="h100")
    card, model = backend.card, backend.model
    now_s[0] = 103.0
    backend.set_locked_clock(0, 990)  # applied at 103 s
    backend.on_phase(0, True, 101.0)  # a late begin stamped 101 s, an end stamped 104 s
    backend.on_phase(0, False, 104.0)
    now_s[0] = 105.0
    top_busy_w = busy_power_w(card, model, card.max_clock_mhz)
    low_busy_w = busy_power_w(card, model, 990)
    top_idle_w, low_idle_w = idle_power_w(card, model, card.max_clock_mhz), idle_power_w(card, model, 990)
    expected_j = top_idle_w + 2 * top_busy_w + low_busy_w + low_idle_w  # 100..101..103..104..105 s
    assert backend.read_energy_mj(0) == pytest.approx(expected_j * 1000, abs=1)
    assert backend.energy_at_mj(0, 102.0) == pytest.approx((top_idle_w + top_busy_w) * 1000, abs=1)


def test_untrusted_stamps_fall_back_to_the_receive_time_and_are_counted(sim_agent) -> None:
    # A stamp from another node's clock (tcp) may be in the future or far in the past: timed on receipt.
    client = AgentClient(sim_agent.endpoint, job_id="stamps", rank=0)
    push = zmq.Context.instance().socket(zmq.PUSH)
    try:
        client.claim(client.hello().gpus[0].uuid)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(sim_agent.config.events_endpoint())
        now_ns = time.monotonic_ns()
        for sent_ns in (now_ns + 60 * 10**9, max(0, now_ns - MAX_STAMP_AGE_NS - 10**9), now_ns):
            push.send(encode_event(EVENT_BEGIN, client.lease_id, 0, b"F0", sent_ns=sent_ns))
        deadline_s = time.monotonic() + 3.0
        while sim_agent.agent.stats[0].events < 3 and time.monotonic() < deadline_s:
            time.sleep(0.005)
        assert sim_agent.agent.stats[0].events == 3
        assert sim_agent.agent.counters["events_stamp_fallback"] == 2
        # A window request with an untrusted stamp is marked on receipt too.
        begun = client.call("window_begin", {"lease_id": client.lease_id, "sent_ns": now_ns + 60 * 10**9})
        assert client.window_end(begun["window_id"]).duration_s >= 0
        assert sim_agent.agent.counters["events_stamp_fallback"] == 3
    finally:
        push.close(0)
        client.close()
