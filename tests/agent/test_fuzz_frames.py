"""Hypothesis fuzz of both sockets: a bad frame gets an error reply or a counted drop; the agent stays up."""

from __future__ import annotations

import json
import time

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envpipe_agent.protocol import (
    MAX_CONTROL_BYTES,
    OPS,
    PROTOCOL_VERSION,
    ErrorCode,
    encode_event,
    encode_request,
)

_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}
_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
requests = st.fixed_dictionaries(
    {
        "v": st.sampled_from([2, 2, 2, 0, 1, 3, "2", None]),
        "id": st.integers(0, 2**31) | st.text(max_size=4),
        "op": st.sampled_from(OPS) | st.text(max_size=12),
        "args": st.dictionaries(st.text(max_size=10), json_values),
    },
)
control_frames = st.one_of(
    st.binary(max_size=300),
    requests.map(lambda r: json.dumps(r).encode()),
    st.tuples(requests, st.integers(1, 40)).map(lambda t: json.dumps(t[0]).encode()[: -t[1]]),  # truncated
    st.integers(1, 5000).map(
        lambda n: b'{"v": 1, "pad": "' + b"x" * (MAX_CONTROL_BYTES + n) + b'"}'
    ),  # oversized
    json_values.map(lambda v: json.dumps(v).encode()),
)


def _roundtrip(sock: zmq.Socket, frames: list[bytes]) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(2000, zmq.POLLIN), "the agent did not answer a malformed frame"
    return json.loads(sock.recv_multipart()[-1])


@_FUZZ
@given(frame=control_frames)
def test_control_frames_get_a_reply(module_sim_agent, frame: bytes) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(module_sim_agent.endpoint)
    try:
        reply = _roundtrip(sock, [b"", frame])
        assert reply["v"] == PROTOCOL_VERSION
        assert reply["ok"] or reply["error"]["code"] in _CODES
        assert "Traceback" not in json.dumps(reply)
        assert _roundtrip(sock, [b"", encode_request(1, "hello")])["ok"]  # still up
    finally:
        sock.close(0)


def test_multi_frame_payload_is_a_bad_request(module_sim_agent) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(module_sim_agent.endpoint)
    try:
        reply = _roundtrip(sock, [b"", encode_request(1, "hello"), b"extra"])
        assert reply["error"]["code"] == ErrorCode.BAD_REQUEST
    finally:
        sock.close(0)


@_FUZZ
@given(
    frames=st.lists(
        st.binary(max_size=64)
        | st.builds(
            lambda k, c, u: encode_event(k, 0xDEAD, c, u),
            st.integers(0, 1),
            st.integers(0, 65535),
            st.binary(max_size=40),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_event_frames_are_counted_drops(module_sim_agent, frames: list[bytes]) -> None:
    counters = module_sim_agent.agent.counters
    before = counters["events_received"]
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(module_sim_agent.config.events_endpoint())
    for frame in frames:
        sock.send(frame)
    sock.close()
    deadline_s = time.monotonic() + 3
    while counters["events_received"] < before + len(frames) and time.monotonic() < deadline_s:
        time.sleep(0.002)
    assert counters["events_received"] == before + len(frames)
    accepted = sum(s.events for s in module_sim_agent.agent.stats.values())
    assert accepted == 0  # nothing without a lease reaches a GPU
    assert counters["events_malformed"] + counters["events_no_lease"] == counters["events_received"]


def test_frames_over_the_zmq_cap_show_as_peer_disconnects(sim_agent) -> None:
    # libzmq drops a frame over MAXMSGSIZE by closing the sender's connection, with no reason given: the
    # agent counts disconnects (docs/protocol.md says why oversize frames cannot be counted apart).
    from envpipe_agent.protocol import MAX_FRAME_BYTES

    from tests.agent.conftest import wait_for

    counters = sim_agent.agent.counters
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(sim_agent.config.events_endpoint())
    try:
        push.send(encode_event(0, 7, 0, b"F0"))
        wait_for(lambda: counters["events_received"] == 1)
        push.send(b"\xe7" * (MAX_FRAME_BYTES + 1))
        wait_for(lambda: counters["peer_disconnects"] == 1)
        push.send(encode_event(0, 7, 0, b"F0"))  # zmq reconnects: the agent goes on serving this peer
        wait_for(lambda: counters["events_received"] == 2)
        assert counters["events_malformed"] == 0  # the oversize frame never reached the agent
    finally:
        push.close()
