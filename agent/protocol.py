"""The envpipe-agent wire protocol, version 3 (documented in docs/protocol.md).

Two sockets, two encodings:

* control (client DEALER/REQ -> agent ROUTER): one JSON object per frame,
  request ``{"v": 3, "id": 7, "op": "claim", "args": {...}}``,
  reply ``{"v": 3, "id": 7, "ok": true, "result": {...}}`` or
  ``{"v": 3, "id": 7, "ok": false, "error": {"code": "lease_held", "message": "..."}}``.
* events (client PUSH -> agent PULL): a fixed little-endian struct plus the unit name, no JSON, because a
  training rank sends one per compute unit and must spend only microseconds on it.

Standard library only: both the root agent and the training ranks import this module.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any

# 3: event frames carry the sender's CLOCK_MONOTONIC stamp (the sim agent integrates energy over the rank's
# own timeline, not over when a loaded agent got round to an event). 2: lease ids are 128-bit random numbers
# (16 bytes in event frames); 1 had 32-bit ids, guessable by a flooder in the socket group within hours.
PROTOCOL_VERSION = 3

# Control frames above this size are answered with ``too_large``; zmq drops (by closing the connection) a
# frame above MAX_FRAME_BYTES on either socket (the agent sets it as both sockets' MAXMSGSIZE).
MAX_CONTROL_BYTES = 64 * 1024
MAX_CONTROL_FRAME_BYTES = MAX_CONTROL_BYTES + 8 * 1024
MAX_FRAME_BYTES = MAX_CONTROL_FRAME_BYTES  # the largest frame either socket accepts
# zmq bounds the size of one frame, not the number of frames of a message, and delivers a message only when
# it is complete: a request has at most this many frames (identity, REQ delimiter, payload, and slack for a
# proxy's envelope); longer messages are dropped and counted. The agent's memory guard bounds what an
# incomplete message can hold (docs/reliability.md, "Hostile group member").
MAX_CONTROL_FRAMES = 8
# Messages queued per control connection (zmq's default, 1 000 each way, let one connection that never
# read its replies hold ~3.4 MiB of status replies). AgentClient has one request in flight at a time; a
# tool that pipelines more than CONTROL_SNDHWM requests without reading may lose replies (zmq drops them).
CONTROL_HWM = 16  # requests queued per connection (the agent reads at most this many per loop turn)
CONTROL_SNDHWM = 4 * CONTROL_HWM  # replies queued per connection

# Event frame: magic, version, kind, lease token, target clock (0 = keep), the sender's time.monotonic_ns()
# (CLOCK_MONOTONIC, system-wide on Linux: comparable across processes of one node), then the unit name.
EVENT_MAGIC = 0xE7
LEASE_TOKEN_BYTES = 16  # the lease id, little-endian: 128 random bits, never guessed by a flood
EVENT_STRUCT = struct.Struct(f"<BBB{LEASE_TOKEN_BYTES}sHQ")
MAX_UNIT_BYTES = 32
EVENT_BEGIN = 0
EVENT_END = 1

# Queue bounds on the event path, per rank connection. An overloaded agent must turn into counted drops at
# the sender (zmq.Again on its NOBLOCK send), not into clocks applied seconds late: with 100 000 queued per
# connection, 64 ranks past the agent's rate left events ~30 s late. Per connection at most
# SNDHWM + RCVHWM messages queue in zmq plus what the two kernel buffers hold (~150 frames each), i.e.
# ~0.5 s of one rank's 1 000 events/s: enough for the agent's short stalls, never a backlog.
EVENT_SEND_HWM = 100  # client PUSH
EVENT_RECV_HWM = 100  # agent PULL
EVENT_SOCKET_BUFFER_BYTES = 4096  # SO_SNDBUF / SO_RCVBUF of the event connection
EVENT_KINDS = {"begin": EVENT_BEGIN, "end": EVENT_END}
# Events of one lease that can be in transit at once: both HWMs plus what the two kernel buffers hold. A
# request whose ``events_sent`` is further ahead than this cannot be waited for (a forged count).
MAX_EVENTS_IN_FLIGHT = EVENT_SEND_HWM + EVENT_RECV_HWM + 2 * (EVENT_SOCKET_BUFFER_BYTES // 16)

# A sender stamp in the future or older than this is not trusted (another node's clock over tcp, a bug):
# the agent uses its receive time instead and counts the event (``events_stamp_fallback``).
MAX_STAMP_AGE_NS = 5_000_000_000

OPS = ("hello", "claim", "heartbeat", "release", "set_clock", "window_begin", "window_end", "status")


class ErrorCode:
    """Error codes carried in ``error.code`` of a reply (stable strings; clients switch on them)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    VERSION_MISMATCH = "version_mismatch"
    TOO_LARGE = "too_large"
    NO_SUCH_GPU = "no_such_gpu"
    LEASE_HELD = "lease_held"
    UNKNOWN_LEASE = "unknown_lease"
    UNKNOWN_WINDOW = "unknown_window"
    NOT_PERMITTED = "not_permitted"  # the caller's uid may not act on this lease or pid
    BUSY = "busy"  # a bounded queue is full (window marks still being estimated); retry later
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame that cannot be decoded; ``code`` is one of :class:`ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded control request."""

    id: int
    op: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PhaseEvent:
    """A decoded phase event: unit ``unit`` of lease ``lease_id`` began or ended at the sender's monotonic
    ``sent_ns``; 0 MHz = no clock change."""

    kind: int
    lease_id: int
    clock_mhz: int
    unit: str
    sent_ns: int = 0


def encode_request(request_id: int, op: str, args: dict[str, Any] | None = None) -> bytes:
    """Serialise a control request."""
    return json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args or {}}).encode()


def decode_request(frame: bytes) -> Request:
    """Parse and validate a control request.

    Raises:
        ProtocolError: with ``too_large``, ``bad_request``, ``version_mismatch`` or ``unknown_op``.
    """
    if len(frame) > MAX_CONTROL_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"control frame of {len(frame)} bytes exceeds {MAX_CONTROL_BYTES}"
        )
    try:
        message = json.loads(frame)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # "[[[[…" nests past the stack in 64 KiB
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"control frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "control frame must be a JSON object")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"agent speaks protocol {PROTOCOL_VERSION}, request says {version!r}; "
            "install the same envpipe version for the agent and the client",
        )
    request_id, op, args = message.get("id", 0), message.get("op"), message.get("args", {})
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"request id must be an integer, got {request_id!r}")
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"args must be a JSON object, got {type(args).__name__}")
    if op not in OPS:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; the agent knows {', '.join(OPS)}")
    return Request(request_id, op, args)


def request_id_of(frame: bytes) -> int:
    """Best-effort request id of an undecodable frame, so the error reply still matches its request."""
    try:
        value = json.loads(frame).get("id", 0)
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def encode_reply(request_id: int, result: dict[str, Any]) -> bytes:
    """Serialise a successful reply."""
    return json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}).encode()


def encode_error(request_id: int, code: str, message: str) -> bytes:
    """Serialise an error reply (no tracebacks ever cross the socket)."""
    error = {"code": code, "message": message}
    return json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error}).encode()


def lease_token(lease_id: int) -> bytes:
    """The 16 bytes that stand for ``lease_id`` in event frames (the agent looks leases up by them).

    Raises:
        ValueError: the id is negative or wider than 128 bits.
    """
    if not 0 <= lease_id < 1 << (8 * LEASE_TOKEN_BYTES):
        raise ValueError(f"lease id {lease_id} is not a 128-bit unsigned integer; use the id claim returned")
    return lease_id.to_bytes(LEASE_TOKEN_BYTES, "little")


def encode_event(kind: int, lease_id: int, clock_mhz: int, unit: bytes, sent_ns: int | None = None) -> bytes:
    """Serialise a phase event; ``unit`` is the ASCII unit name, at most MAX_UNIT_BYTES; ``sent_ns`` the
    sender's ``time.monotonic_ns()`` (now when None)."""
    token = lease_token(lease_id)
    stamp_ns = time.monotonic_ns() if sent_ns is None else sent_ns
    header = EVENT_STRUCT.pack(EVENT_MAGIC, PROTOCOL_VERSION, kind, token, clock_mhz, stamp_ns)
    return header + unit[:MAX_UNIT_BYTES]


_EVENT_MIN_BYTES = EVENT_STRUCT.size
_EVENT_MAX_BYTES = EVENT_STRUCT.size + MAX_UNIT_BYTES
_UNPACK_EVENT = EVENT_STRUCT.unpack_from


def parse_event(frame: bytes) -> tuple[int, bytes, int, int]:
    """The agent's hot path: validate an event frame and return ``(kind, lease_token, clock_mhz, sent_ns)``.

    The lease stays in its 16-byte form: the agent looks leases up by token, so no integer is built.

    The unit name is checked (ASCII) but not decoded: the agent does not need it.

    Raises:
        ProtocolError: ``bad_request`` for a short, oversized or non-event frame, ``version_mismatch``.
    """
    if not _EVENT_MIN_BYTES <= len(frame) <= _EVENT_MAX_BYTES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"event frame of {len(frame)} bytes")
    magic, version, kind, token, clock_mhz, sent_ns = _UNPACK_EVENT(frame)
    if magic != EVENT_MAGIC or kind > EVENT_END or not frame[_EVENT_MIN_BYTES:].isascii():
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"not an event frame (magic {magic:#x}, kind {kind})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"event protocol {version}, agent {PROTOCOL_VERSION}")
    return kind, token, clock_mhz, sent_ns


def stamp_or_now_ns(sent_ns: int, now_ns: int) -> int | None:
    """``sent_ns`` when it is a plausible stamp of this node's monotonic clock (not in the future, at most
    MAX_STAMP_AGE_NS old), else None: the caller then uses its own time ``now_ns`` and counts the event."""
    if now_ns - MAX_STAMP_AGE_NS <= sent_ns <= now_ns:
        return sent_ns
    return None


def decode_event(frame: bytes) -> PhaseEvent:
    """Parse a phase event, unit name included (tools and tests; the agent uses :func:`parse_event`)."""
    kind, token, clock_mhz, sent_ns = parse_event(frame)
    unit = frame[_EVENT_MIN_BYTES:].decode("ascii")
    return PhaseEvent(kind, int.from_bytes(token, "little"), clock_mhz, unit, sent_ns)
