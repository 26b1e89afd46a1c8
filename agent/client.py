"""The client training ranks (and ``envpipe status`` / ``envpipe lock``) use to talk to the agent. No torch.

Two promises (DESIGN invariant 1):

* :meth:`AgentClient.phase` never blocks: a fixed struct on a PUSH socket with NOBLOCK, LINGER=0 and
  IMMEDIATE=1; when nothing is connected, or no lease is held, the event is dropped, counted, and one
  warning says training goes on at the card's default clocks.
* control calls (hello, claim, windows, status) time out after ``timeout_s`` with :class:`AgentUnavailable`.

A background thread heartbeats the lease and claims it again when the agent comes back after a restart.
``phase`` may be called from any thread; control calls are serialised by a lock.
"""

from __future__ import annotations

import grp
import json
import logging
import math
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from envpipe_agent.config import SYSTEM_RUNTIME_DIR
from envpipe_agent.errors import AgentError, AgentUnavailable, LeaseError
from envpipe_agent.protocol import (
    EVENT_KINDS,
    EVENT_MAGIC,
    EVENT_SEND_HWM,
    EVENT_SOCKET_BUFFER_BYTES,
    EVENT_STRUCT,
    MAX_UNIT_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    encode_request,
    lease_token,
)

log = logging.getLogger("envpipe_agent.client")

_PACK = EVENT_STRUCT.pack
_now_ns = time.monotonic_ns
_LEASE_CODES = (ErrorCode.LEASE_HELD, ErrorCode.UNKNOWN_LEASE, ErrorCode.NO_SUCH_GPU)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """A GPU the agent manages; ``clocks_mhz`` (descending) are the clocks it will apply."""

    index: int
    uuid: str
    name: str
    clocks_mhz: tuple[int, ...]
    min_mhz: int
    max_mhz: int


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """The agent's ``hello`` reply."""

    version: str
    backend: str
    simulated: bool
    gpus: list[GpuInfo]
    read_only: bool = False
    protocol: int = PROTOCOL_VERSION
    event_endpoint: str = ""
    lease_timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class EnergyWindow:
    """Energy used by the leased GPU between two marks (``simulated`` for the sim backend)."""

    energy_j: float
    duration_s: float
    simulated: bool


_ENDPOINT_RE = re.compile(r"^(ipc://.+|inproc://.+|tcp://(\[[0-9a-fA-F:.]+\]|[^:/\s]+):[0-9]+)$")


def check_endpoint(endpoint: str, *, source: str = "agent endpoint") -> str:
    """Return ``endpoint`` if ZeroMQ can connect to it, else raise ``AgentError`` naming ``source``.

    Accepted: ``ipc:///path/control.sock``, ``tcp://HOST:PORT`` (``[v6]:PORT`` too), ``inproc://name``.
    """
    if not isinstance(endpoint, str) or not _ENDPOINT_RE.match(endpoint):
        raise AgentError(
            f"{source} {endpoint!r} is not an agent address; use ipc:///run/envpipe/control.sock "
            "(the system agent), ipc://$XDG_RUNTIME_DIR/envpipe/control.sock or tcp://HOST:PORT",
            "bad-endpoint",
        )
    return endpoint


def default_endpoint() -> str:
    """``$ENVPIPE_AGENT``, else the user agent's socket if it exists, else the system service's socket."""
    explicit = os.environ.get("ENVPIPE_AGENT")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and (Path(xdg) / "envpipe" / "control.sock").exists():
        return f"ipc://{Path(xdg) / 'envpipe' / 'control.sock'}"
    return f"ipc://{SYSTEM_RUNTIME_DIR}/control.sock"


def access_problem(endpoint: str) -> str:
    """Why this process cannot reach an ipc endpoint's socket file ('' when it can, or for tcp).

    zmq retries a refused ipc connect silently, so without this check a user outside the socket group
    would be told to start an agent that is running.
    """
    if not endpoint.startswith("ipc://"):
        return ""
    path = endpoint[len("ipc://") :]
    try:
        info = os.stat(path)
    except PermissionError:
        info = None
    except OSError:
        return ""  # no such socket: no agent there
    if info is not None and os.access(path, os.R_OK | os.W_OK):
        return ""
    owner = Path(path).parent if info is None else Path(path)
    try:
        group = grp.getgrgid(os.stat(owner).st_gid).gr_name
    except (OSError, KeyError):
        group = "envpipe"
    return (
        f"permission denied: {owner} belongs to group {group!r} and this user ({os.geteuid()}) is not in it; "
        f"ask an administrator to run `usermod -aG {group} $USER`, then log in again"
    )


def _raise_for(error: dict[str, Any]) -> None:
    code, message = str(error.get("code", "")), str(error.get("message", "agent error"))
    if code in _LEASE_CODES:
        raise LeaseError(message, code)
    raise AgentError(message, code)


class AgentClient:
    """One rank's connection to its node's agent (see docs/architecture.md, "Agent client")."""

    def __init__(
        self, endpoint: str | None = None, *, job_id: str, rank: int, timeout_s: float = 2.0
    ) -> None:
        self.endpoint = check_endpoint(endpoint or default_endpoint())
        self.job_id, self.rank, self.timeout_s = job_id, rank, timeout_s
        self.pid = os.getpid()
        self.events_sent = 0
        self.events_dropped = 0
        self._lease_events = 0  # events sent on the current lease; requests carry it so none is overtaken
        self._context = zmq.Context.instance()
        self._lock = threading.Lock()
        self._event_lock = threading.Lock()
        self._control: zmq.Socket | None = None
        self._events: zmq.Socket | None = None
        self._event_endpoint = ""
        self._next_id = 0
        self._lease_token = b""  # the lease id's 16 bytes, packed once per lease (phase() only copies them)
        self._lease_id = 0
        self._lost_lease_id = 0  # the lease held when the agent stopped answering: proof for the re-claim
        self._gpu_uuid = ""
        self._info: AgentInfo | None = None
        self._warned = False
        self._units: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------------------
    def _control_socket(self) -> zmq.Socket:
        if self._control is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._control = sock
        return self._control

    def _drop_control(self) -> None:
        # After a timeout the DEALER may still deliver the old request; a fresh socket forgets it.
        if self._control is not None:
            self._control.close(0)
            self._control = None

    def call(
        self, op: str, args: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """One control request; returns the ``result`` object.

        Raises:
            AgentUnavailable: no reply within the timeout.
            LeaseError: a claim was refused or the lease is gone.
            AgentError: any other error reply (its ``code`` says which).
        """
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        with self._lock:
            sock = self._control_socket()
            self._next_id += 1
            request_id = self._next_id
            sock.send_multipart([b"", encode_request(request_id, op, args)])
            deadline_s = time.monotonic() + timeout_ms / 1000.0
            while True:
                remaining_ms = int(1000 * (deadline_s - time.monotonic()))
                if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
                    self._drop_control()
                    raise AgentUnavailable(
                        access_problem(self.endpoint)
                        or f"no envpipe agent answered at {self.endpoint} within {timeout_ms / 1000:.1f} s; "
                        "start one "
                        "(`envpipe-agent --backend sim --gpus 1`, or `systemctl start envpipe-agent`) or set "
                        "ENVPIPE_AGENT to its endpoint",
                        "unavailable",
                    )
                reply = json.loads(sock.recv_multipart()[-1])
                if reply.get("id") == request_id:
                    break
        if reply.get("v") != PROTOCOL_VERSION:
            raise AgentError(
                f"agent speaks protocol {reply.get('v')!r}, this client {PROTOCOL_VERSION}; "
                "install the same envpipe version on both sides",
                ErrorCode.VERSION_MISMATCH,
            )
        if not reply.get("ok"):
            _raise_for(reply.get("error") or {})
        return reply.get("result") or {}

    def hello(self) -> AgentInfo:
        """Ask the agent who it is and which GPUs it manages; connects the event socket."""
        result = self.call("hello")
        gpus = [
            GpuInfo(g["index"], g["uuid"], g["name"], tuple(g["clocks_mhz"]), g["min_mhz"], g["max_mhz"])
            for g in result["gpus"]
        ]
        info = AgentInfo(
            result["version"],
            result["backend"],
            result["simulated"],
            gpus,
            result["read_only"],
            result["protocol"],
            result["event_endpoint"],
            result["lease_timeout_s"],
        )
        self._info = info
        self._connect_events(info.event_endpoint)
        return info

    def _connect_events(self, endpoint: str) -> None:
        with self._event_lock:
            if self._events is not None and endpoint == self._event_endpoint:
                return
            if self._events is not None:
                self._events.close(0)
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no peer -> zmq.Again at once, never a queue that fills up
            sock.setsockopt(zmq.SNDHWM, EVENT_SEND_HWM)  # overload = zmq.Again = counted drop, not lateness
            sock.setsockopt(zmq.SNDBUF, EVENT_SOCKET_BUFFER_BYTES)
            sock.connect(endpoint)
            self._events, self._event_endpoint = sock, endpoint

    def gpu_uuid_for_cuda_index(self, cuda_index: int) -> str:
        """Translate a CUDA device index into the UUID of the GPU the agent knows (never trust the index).

        ``CUDA_VISIBLE_DEVICES`` entries that are UUIDs (or UUID prefixes) are matched against the agent's
        GPUs; numeric entries are NVML indices, which equal CUDA indices only with
        ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. Passing the UUID from ``torch.cuda.get_device_properties(i).uuid``
        to :meth:`claim` avoids the question.
        """
        info = self._info or self.hello()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if cuda_index < 0 or (visible and cuda_index >= len(visible)):
            raise AgentError(
                f"CUDA device {cuda_index} is not among CUDA_VISIBLE_DEVICES={','.join(visible)}"
            )
        entry = visible[cuda_index] if visible else str(cuda_index)
        for gpu in info.gpus:
            if (entry.isdigit() and gpu.index == int(entry)) or (
                entry.startswith("GPU-") and gpu.uuid.startswith(entry)
            ):
                return gpu.uuid
        raise AgentError(
            f"CUDA device {cuda_index} ({entry}) is none of the agent's GPUs: "
            f"{', '.join(g.uuid for g in info.gpus)}"
        )

    def claim(self, gpu_uuid: str) -> int:
        """Lease ``gpu_uuid`` for this rank and start heartbeating; returns the lease id.

        Raises:
            LeaseError: another rank holds it (the message names the holder) or the agent has no such GPU.
        """
        if self._info is None:
            self.hello()
        args = {"gpu_uuid": gpu_uuid, "job_id": self.job_id, "rank": self.rank, "pid": self.pid}
        if self._lease_id and gpu_uuid == self._gpu_uuid:
            args["lease_id"] = self._lease_id  # a repeated claim proves it holds the lease
        result = self.call("claim", args)
        if int(result["lease_id"]) != self._lease_id:
            self._lease_events = 0
        self._gpu_uuid, self._lease_id = gpu_uuid, int(result["lease_id"])
        self._wait_event_peer()
        if self._heartbeat is None:
            timeout_s = float(result.get("lease_timeout_s", 2.0))
            # A quarter of the lease timeout, within [0.05, 10] s: an agent's nan or inf must not stop it.
            interval_s = min(10.0, max(0.05, timeout_s / 4)) if math.isfinite(timeout_s) else 0.5
            self._heartbeat = threading.Thread(
                target=self._heartbeat_loop, args=(interval_s,), name="envpipe-heartbeat", daemon=True
            )
            self._heartbeat.start()
        return self._lease_id

    def _wait_event_peer(self) -> None:
        # With IMMEDIATE=1 a PUSH socket is writable only once its connection is up: wait (briefly) so the
        # first phase events after a claim are not dropped for a connection still being made.
        sock = self._events
        if sock is not None:
            sock.poll(int(1000 * min(self.timeout_s, 1.0)), zmq.POLLOUT)

    @property
    def lease_id(self) -> int:
        """The current lease id (0 when none is held)."""
        return self._lease_id

    @property
    def _lease_id(self) -> int:
        return self._lease_id_value

    @_lease_id.setter
    def _lease_id(self, value: int) -> None:
        # The token is set first on release (phase() then drops) and with the id on a claim; phase() reads
        # only the token, so it never packs a half-updated lease.
        self._lease_token = lease_token(value) if value else b""
        self._lease_id_value = value

    def _heartbeat_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            if not self._gpu_uuid:
                continue
            try:
                if self._lease_id:
                    self.call("heartbeat", {"lease_id": self._lease_id})
                else:
                    self._reclaim()
            except LeaseError as exc:
                if exc.code == ErrorCode.UNKNOWN_LEASE:
                    self._reclaim_quietly()
                else:
                    self._warn_once(f"envpipe agent refused the lease again: {exc}")
                    self._lease_id = 0
            except AgentError as exc:  # unavailable: drop the lease, keep trying
                if self._lease_id:
                    # A stuck agent that resumes still holds this lease: naming it in the re-claim keeps it,
                    # instead of being refused until it expires.
                    self._lost_lease_id = self._lease_id
                    self._warn_once(f"envpipe agent lost ({exc}); training continues at default clocks")
                self._lease_id = 0

    def _reclaim(self) -> None:
        self.hello()
        args = {"gpu_uuid": self._gpu_uuid, "job_id": self.job_id, "rank": self.rank, "pid": self.pid}
        if self._lost_lease_id:
            args["lease_id"] = self._lost_lease_id
        result = self.call("claim", args)
        if int(result["lease_id"]) != self._lost_lease_id:
            self._lease_events = 0  # a new lease: the agent counts its events from zero
        self._lease_id, self._lost_lease_id = int(result["lease_id"]), 0
        self._wait_event_peer()
        self._warned = False  # the next outage warns again
        # The lease id is the lease's only credential: never logged.
        log.info("envpipe agent is back; GPU %s claimed again", self._gpu_uuid)

    def _reclaim_quietly(self) -> None:
        self._lease_id = 0
        try:
            self._reclaim()
        except AgentError as exc:
            self._warn_once(f"claiming GPU {self._gpu_uuid} again failed: {exc}")

    def release(self) -> None:
        """Give the GPU back (the agent resets its clocks) and stop heartbeating."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(self.timeout_s + 1.0)
            self._heartbeat = None
        lease_id, self._lease_id, self._gpu_uuid = self._lease_id, 0, ""
        if lease_id:
            try:
                self.call("release", {"lease_id": lease_id, "events_sent": self._lease_events})
            except LeaseError:
                pass  # already expired: the agent reset the GPU itself
        self._stop = threading.Event()

    def set_clock(self, clock_mhz: int) -> dict[str, Any]:
        """Ask for a clock through the control socket (for tools); returns ``target_mhz`` and ``snapped``."""
        args = {"lease_id": self._lease_id, "clock_mhz": int(clock_mhz), "events_sent": self._lease_events}
        return self.call("set_clock", args)

    def window_begin(self) -> int:
        """Mark the start of an energy window on the leased GPU; returns its id."""
        # sent_ns: the window covers the span this rank measured, however late the agent handles the request.
        args = {"lease_id": self._lease_id, "events_sent": self._lease_events, "sent_ns": _now_ns()}
        return int(self.call("window_begin", args)["window_id"])

    def window_end(self, window_id: int) -> EnergyWindow:
        """Close window ``window_id``: energy and wall time since its start."""
        args = {
            "lease_id": self._lease_id,
            "window_id": window_id,
            "events_sent": self._lease_events,
            "sent_ns": _now_ns(),
        }
        result = self.call("window_end", args)
        return EnergyWindow(float(result["energy_j"]), float(result["duration_s"]), bool(result["simulated"]))

    def status(self) -> dict[str, Any]:
        """The agent's status snapshot (as ``envpipe status --json`` prints it)."""
        return self.call("status")

    # -- events (hot path) -----------------------------------------------------------------------------
    def phase(self, unit: str, event: str, clock_mhz: int = 0) -> None:
        """Tell the agent that ``unit`` begins or ends on this rank's GPU, with the unit's target clock.

        Never blocks and never raises for a missing agent: the event is dropped and counted.
        """
        token = self._lease_token
        sock = self._events
        if not token or sock is None:
            self._drop()
            return
        unit_bytes = self._units.get(unit)
        if unit_bytes is None:
            unit_bytes = self._units[unit] = unit.encode("ascii", "replace")[:MAX_UNIT_BYTES]
        try:
            # The rank's own time: the sim agent integrates energy on it, not on when it got to the event.
            frame = (
                _PACK(EVENT_MAGIC, PROTOCOL_VERSION, EVENT_KINDS[event], token, clock_mhz, _now_ns())
                + unit_bytes
            )
        except (KeyError, struct.error):
            raise ValueError(
                f"phase({unit!r}, {event!r}, {clock_mhz!r}): event must be 'begin' or 'end' and "
                "clock_mhz an integer 0..65535 (0 = keep the clock)"
            ) from None
        with self._event_lock:
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                self._drop()
                return
        self.events_sent += 1
        self._lease_events += 1

    def _drop(self) -> None:
        self.events_dropped += 1
        self._warn_once(
            "envpipe agent not reachable, overloaded (event queue full) or no GPU leased: phase events "
            "are dropped and counted, and training continues (at the card's default clocks when nothing "
            "was applied) (said once)"
        )

    def _warn_once(self, message: str) -> None:
        # One warning per outage (DESIGN invariant 1), whichever path notices it first; repeats go to debug.
        if self._warned:
            log.debug("%s", message)
            return
        self._warned = True
        log.warning("%s", message)

    def close(self) -> None:
        """Release the lease (if any) and close the sockets."""
        try:
            self.release()
        except AgentError:
            pass
        with self._event_lock:
            if self._events is not None:
                self._events.close(0)
                self._events = None
        with self._lock:
            self._drop_control()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
