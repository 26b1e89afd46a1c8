"""Frames round-trip; every malformed frame maps to a named error code."""

from __future__ import annotations

import json

import pytest

from envpipe_agent.protocol import (
    EVENT_BEGIN,
    EVENT_END,
    EVENT_MAGIC,
    EVENT_STRUCT,
    MAX_CONTROL_BYTES,
    MAX_STAMP_AGE_NS,
    PROTOCOL_VERSION,
    ErrorCode,
    ProtocolError,
    decode_event,
    decode_request,
    encode_event,
    encode_request,
    request_id_of,
    stamp_or_now_ns,
)


def test_request_round_trip() -> None:
    request = decode_request(encode_request(7, "claim", {"gpu_uuid": "GPU-1"}))
    assert (request.id, request.op, request.args) == (7, "claim", {"gpu_uuid": "GPU-1"})


def test_event_round_trip_and_size() -> None:
    lease_id = (1 << 127) + 123456  # 128-bit lease ids travel whole
    frame = encode_event(EVENT_BEGIN, lease_id, 1410, b"F3", sent_ns=123_456_789_012)
    assert len(frame) == 31  # 29-byte header (sender's monotonic ns included) + unit: one event per unit
    event = decode_event(frame)
    got = (event.kind, event.lease_id, event.clock_mhz, event.unit, event.sent_ns)
    assert got == (EVENT_BEGIN, lease_id, 1410, "F3", 123_456_789_012)
    assert decode_event(encode_event(EVENT_END, 1, 0, b"")).unit == ""


def test_lease_ids_wider_than_128_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="128-bit"):
        encode_event(EVENT_BEGIN, 1 << 128, 0, b"")


def test_protocol_1_event_frame_is_refused() -> None:
    # A client of protocol 1 (9-byte header, 32-bit lease id) must not be read as a protocol-2 event.
    old = bytes([EVENT_MAGIC, 1, EVENT_BEGIN]) + (5).to_bytes(4, "little") + (900).to_bytes(2, "little")
    with pytest.raises(ProtocolError):
        decode_event(old + b"F0" * 6)
    padded = EVENT_STRUCT.pack(EVENT_MAGIC, 1, EVENT_BEGIN, bytes(16), 900, 0)
    with pytest.raises(ProtocolError) as caught:
        decode_event(padded)
    assert caught.value.code == ErrorCode.VERSION_MISMATCH


def test_protocol_2_event_frame_is_refused_with_a_version_mismatch() -> None:
    # Protocol 2: the same header without the 8-byte stamp (21 bytes); padded by a unit name it has the
    # length of a 3 frame, and must still be refused by its version byte, not misread.
    old = bytes([EVENT_MAGIC, 2, EVENT_BEGIN]) + bytes(16) + (900).to_bytes(2, "little") + b"F0123456"
    with pytest.raises(ProtocolError) as caught:
        decode_event(old)
    assert caught.value.code == ErrorCode.VERSION_MISMATCH


def test_sender_stamps_in_the_future_or_too_old_are_not_trusted() -> None:
    now_ns = 100 * MAX_STAMP_AGE_NS
    assert stamp_or_now_ns(now_ns - 1_000, now_ns) == now_ns - 1_000
    assert stamp_or_now_ns(now_ns + 1, now_ns) is None  # another node's clock, ahead
    assert stamp_or_now_ns(now_ns - MAX_STAMP_AGE_NS - 1, now_ns) is None


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"not json", ErrorCode.BAD_REQUEST),
        (b"[1, 2]", ErrorCode.BAD_REQUEST),
        (json.dumps({"v": 1, "id": 1, "op": "hello"}).encode(), ErrorCode.VERSION_MISMATCH),
        (json.dumps({"v": PROTOCOL_VERSION, "id": 1, "op": "format_disk"}).encode(), ErrorCode.UNKNOWN_OP),
        (json.dumps({"v": PROTOCOL_VERSION, "id": "x", "op": "hello"}).encode(), ErrorCode.BAD_REQUEST),
        (
            json.dumps({"v": PROTOCOL_VERSION, "id": 1, "op": "hello", "args": []}).encode(),
            ErrorCode.BAD_REQUEST,
        ),
        (b"{" + b" " * MAX_CONTROL_BYTES + b"}", ErrorCode.TOO_LARGE),
    ],
)
def test_bad_requests_name_their_error(frame: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(frame)
    assert caught.value.code == code


def test_version_mismatch_message_says_what_to_do() -> None:
    expected = "agent speaks protocol 3, request says 2; install the same envpipe"
    with pytest.raises(ProtocolError, match=expected):
        decode_request(json.dumps({"v": 2, "id": 1, "op": "hello"}).encode())


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xe7\x01",
        b"\x00\x01\x00\x01\x00\x00\x00\x00\x00",
        b"\xe7\x01\x05\x01\x00\x00\x00\x00\x00",
        encode_event(EVENT_BEGIN, 1, 0, b"") + b"x" * 40,
        b"\xe7\x01\x00\x01\x00\x00\x00\x00\x00\xff",
    ],
)
def test_bad_events_are_rejected(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_event(frame)


def test_request_id_survives_bad_frames() -> None:
    assert request_id_of(json.dumps({"v": 9, "id": 42}).encode()) == 42
    assert request_id_of(b"\xff\xfe") == 0
