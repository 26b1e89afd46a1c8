"""The agent's event loop: a ROUTER control socket, a PULL event socket, leases, workers and the sampler.

One thread runs :meth:`Agent.serve`; it never calls a GPU setter (the per-GPU workers do) and never reads
an energy counter of a slow backend (the sampler and its mark threads do), so a slow NVML call cannot
stall phase events. Handlers live in one dict, ``Agent.handlers``; any exception in one becomes an error
reply, never a traceback on the wire. A handler may return a ``Future`` instead of a result (a window end
whose energy is still being estimated): its reply is sent when the future is done, and the loop serves
everything else meanwhile.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message as _parse_monitor

from envpipe_agent import __version__
from envpipe_agent.backend import AllowList, GpuBackend, GpuDesc
from envpipe_agent.config import AgentConfig
from envpipe_agent.energy import EnergySampler, MarksBusy
from envpipe_agent.leases import (
    Lease,
    LeaseManager,
    Reservations,
    holders_record,
    parse_holders,
    pid_alive,
)
from envpipe_agent.peers import ConnectionGuard, Peer, peer_of, process_uid, rss_bytes, trim_heap
from envpipe_agent.protocol import (
    CONTROL_HWM,
    CONTROL_SNDHWM,
    EVENT_BEGIN,
    EVENT_RECV_HWM,
    EVENT_SOCKET_BUFFER_BYTES,
    MAX_CONTROL_FRAMES,
    MAX_EVENTS_IN_FLIGHT,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    ProtocolError,
    decode_request,
    encode_error,
    encode_reply,
    parse_event,
    request_id_of,
    stamp_or_now_ns,
)
from envpipe_agent.runtime import prepare_dir, read_private, resolve_group, secure_socket, write_private
from envpipe_agent.worker import APPLY_LATENCY_BUCKETS_S, RESET, GpuWorker

log = logging.getLogger("envpipe_agent.server")

TICK_S = 0.1  # lease expiry and rate bookkeeping period
MAX_WINDOWS_PER_LEASE = 4096
MAX_JOB_ID_CHARS = 256
CATCH_UP_S = 0.1  # longest a request waits for the events its client sent before it
CATCH_UP_BUDGET_S = 0.1  # ... and all requests of one uid together per second (a forged count stalls no one)
GUARD_MARGIN_MB = 64  # after a memory-guard trip, the next trips above what stayed resident plus this
LEASE_STATE_FILE = "leases.json"  # GPU -> holder uid, for the next agent after a restart (Reservations)
_MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_Handler = Callable[[dict[str, Any], Peer | None], "dict[str, Any] | Future[dict[str, Any]]"]
_EVENT_BATCH = 4096  # events drained per loop turn before control gets a look


@dataclass(slots=True)
class GpuStats:
    """Per-GPU event bookkeeping, owned by the event-loop thread."""

    events: int = 0
    target_mhz: int | None = None
    duplicates: int = 0
    superseded: int = 0  # clocks replaced by a newer one of the same drained batch before being queued
    snapped: int = 0
    events_per_s: float = 0.0
    _rate_events: int = 0


def _arg(args: dict[str, Any], name: str, kind: type) -> Any:
    value = args.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"argument {name!r} must be {kind.__name__}, got {value!r}"
        )
    return value


def _read_or_none(read: Callable[[int], float], index: int) -> float | None:
    # One GPU whose NVML read fails must not take the whole status (or Prometheus scrape) down with it.
    try:
        return round(read(index), 1)
    except Exception as exc:  # noqa: BLE001 - shown as null, logged
        log.warning("GPU %d: %s", index, exc)
        return None


class Agent:
    """State and handlers of one agent process (constructed in the main thread, served in one thread)."""

    def __init__(self, config: AgentConfig, backend: GpuBackend) -> None:
        self.config = config
        self.backend = backend
        self.gpus: list[GpuDesc] = backend.gpus()
        self.by_uuid = {gpu.uuid: gpu for gpu in self.gpus}
        self.allow = {
            gpu.index: AllowList(gpu.clocks_mhz, config.min_mhz or None, config.max_mhz or None)
            for gpu in self.gpus
        }
        self.workers = {gpu.index: GpuWorker(backend, gpu.index) for gpu in self.gpus}
        self.stats = {gpu.index: GpuStats() for gpu in self.gpus}
        self.leases = LeaseManager(config.lease_timeout_s, check_pids=config.is_local())
        self.guard = ConnectionGuard(config.max_connections_per_uid)
        self._state_path = Path(config.resolved_runtime_dir()) / LEASE_STATE_FILE if config.is_local() else None
        holders = parse_holders(read_private(self._state_path)) if self._state_path else {}
        self.reservations = Reservations(holders, config.lease_timeout_s)
        self._catch_up_spent: dict[int | None, float] = {}  # seconds waited per uid in the current second
        self._guard_limit = config.memory_guard_mb << 20
        self._guard_rearm_s = 0.0  # monotonic time of the next trim and re-arm after a trip (0: none due)
        self.sampler = EnergySampler(backend, [gpu.index for gpu in self.gpus], config.sample_interval_ms)
        self.counters = dict.fromkeys(
            (
                "events_received",
                "events_malformed",
                "events_no_lease",
                "control_requests",
                "control_errors",
                "leases_granted",
                "loop_errors",
                "leases_expired",
                "leases_released",
                # libzmq drops a frame over MAXMSGSIZE by closing that connection, reported only as a plain
                # disconnect (no reason); so oversize frames are counted here, among ordinary disconnects.
                "peer_disconnects",
                # events and window marks whose sender stamp was in the future or too old (another node's
                # clock over tcp): timed at the agent's receive time instead
                "events_stamp_fallback",
                # a hostile socket-group member (docs/reliability.md, "Hostile group member"):
                "requests_not_permitted",  # lease ops from another uid, claims naming another user's pid
                "claims_reserved",  # claims refused: the GPU is kept for the uid an agent restart lost
                "control_messages_too_long",  # more than MAX_CONTROL_FRAMES frames: dropped unanswered
                "catch_up_skipped",  # events_sent beyond what can be in flight, or the uid's wait budget spent
                "marks_busy",  # window marks refused: MAX_PENDING_MARKS of that GPU still being measured
                "connections_refused",  # shut down at accept: the uid holds max_connections_per_uid
                "connections_shed",  # shut down by the memory guard
                "memory_guard_trips",
            ),
            0,
        )
        self.started_s = time.monotonic()
        self.stopping = False  # set when the process named by exit_with_pid is gone
        self._events_sock: zmq.Socket | None = None
        self.control_sock: zmq.Socket | None = None  # while serving
        # Replies still being computed off the loop: (envelope, request id, future). A done future writes a
        # byte into the pipe, which the loop polls next to its sockets.
        self._pending: list[tuple[list[bytes], int, Future[dict[str, Any]]]] = []
        # While a batch of events is drained: the latest clock per GPU index, queued once at the batch's end.
        self._batch_clocks: dict[int, tuple[int, int]] | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_window_id = 1
        self._last_rate_s = self.started_s
        self.handlers: dict[str, _Handler] = {
            "hello": self.op_hello,
            "claim": self.op_claim,
            "heartbeat": self.op_heartbeat,
            "release": self.op_release,
            "set_clock": self.op_set_clock,
            "window_begin": self.op_window_begin,
            "window_end": self.op_window_end,
            "status": self.op_status,
        }

    # -- lifecycle -------------------------------------------------------------------------------------
    def reset_all(self, why: str, final: bool = False) -> None:
        """Reset every managed GPU synchronously (agent start = crash recovery, and shutdown: ``final``,
        after any set still in flight and with none after it)."""
        for index, worker in self.workers.items():
            try:
                worker.reset_now(final)
                self.stats[index].target_mhz = None
            except Exception as exc:  # noqa: BLE001 - keep resetting the other GPUs; logged
                log.error("GPU %d: reset at %s failed: %s", index, why, exc)
        log.info("reset clocks of %d GPU(s) at %s", len(self.workers), why)

    def start_threads(self) -> None:
        for worker in self.workers.values():
            worker.start()
        self.sampler.start()

    def stop_threads(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.sampler.stop()

    def bind(self, context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        """Create and bind both sockets, with the directory and file permissions of the config."""
        control_endpoint, event_endpoint = self.config.control_endpoint(), self.config.events_endpoint()
        gid = resolve_group(self.config.socket_group)
        if control_endpoint.startswith("ipc://") or event_endpoint.startswith("ipc://"):
            prepare_dir(self.config.resolved_runtime_dir(), gid)
        control = context.socket(zmq.ROUTER)
        events = context.socket(zmq.PULL)
        for sock in (control, events):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        control.setsockopt(zmq.RCVHWM, CONTROL_HWM)
        control.setsockopt(zmq.SNDHWM, CONTROL_SNDHWM)
        events.setsockopt(zmq.RCVHWM, EVENT_RECV_HWM)  # bounded: senders see zmq.Again, not a backlog
        events.setsockopt(zmq.RCVBUF, EVENT_SOCKET_BUFFER_BYTES)
        control.bind(control_endpoint)
        events.bind(event_endpoint)
        secure_socket(control_endpoint, gid)
        secure_socket(event_endpoint, gid)
        log.info("serving control on %s, events on %s", control_endpoint, event_endpoint)
        return control, events

    def serve(
        self,
        stop: threading.Event,
        on_ready: Callable[[], None] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        """Run the event loop until ``stop`` is set; resets every GPU on the way out."""
        context = context or zmq.Context.instance()
        control, events = self.bind(context)
        self._events_sock, self.control_sock = events, control
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        monitors = [sock.get_monitor_socket(_MONITOR_EVENTS) for sock in (control, events)]
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        self.start_threads()
        if on_ready:
            on_ready()
        last_tick_s = time.monotonic()
        try:
            while not (stop.is_set() or self.stopping):
                ready = dict(poller.poll(int(TICK_S * 1000)))
                try:
                    if events in ready:
                        self._drain_events(events)
                    if control in ready:
                        self._drain_control(control)
                    if self._wake_r in ready:
                        self._send_done(control)
                    for monitor in monitors:
                        if monitor in ready:
                            self._connection_events(monitor)
                    if time.monotonic() - last_tick_s >= TICK_S:
                        last_tick_s = time.monotonic()
                        self.tick()
                except Exception:
                    self.counters["loop_errors"] += 1
                    log.exception("event loop error (the agent keeps serving)")
        finally:
            self.stop_threads()
            self.reset_all("shutdown", final=True)
            for sock, monitor in zip((control, events), monitors, strict=True):
                sock.disable_monitor()
                monitor.close(0)
            control.close(0)
            events.close(0)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _connection_events(self, monitor: zmq.Socket) -> None:
        """Accepts (per-uid cap, read at accept) and disconnects, from a socket's monitor."""
        for _ in range(4096):
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = _parse_monitor(frames)
            event, fd = message["event"], message["value"]
            if event == zmq.EVENT_ACCEPTED:
                uid = self.guard.accepted(fd)
                if uid is not None:
                    self.counters["connections_refused"] += 1
                    refused = self.counters["connections_refused"]
                    if refused in (1, 10, 100) or refused % 1000 == 0:
                        log.warning(
                            "uid %d is over its %d connections: connection shut down (%d so far)",
                            uid,
                            self.guard.cap_per_uid,
                            refused,
                        )
            elif event == zmq.EVENT_DISCONNECTED:
                self.guard.disconnected(fd)
                self.counters["peer_disconnects"] += 1

    # -- event path ------------------------------------------------------------------------------------
    def _drain_events(self, sock: zmq.Socket) -> None:
        # Only a GPU's latest clock matters: within one batch, an older clock is dropped (counted as
        # superseded) before it costs a snap and a mailbox hand-over.
        self._batch_clocks = batch = {}
        try:
            for _ in range(_EVENT_BATCH):
                try:
                    frame = sock.recv(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    return
                self.handle_event(frame, time.monotonic_ns())
        finally:
            self._batch_clocks = None
            for index, (clock_mhz, received_ns) in batch.items():
                self._queue_clock(index, clock_mhz, received_ns)

    def handle_event(self, frame: bytes, received_ns: int) -> None:
        """Apply one phase event: count it, drop it unless its lease holds a GPU, queue its clock."""
        self.counters["events_received"] += 1
        try:
            kind, token, clock_mhz, sent_ns = parse_event(frame)
        except ProtocolError:
            self.counters["events_malformed"] += 1
            return
        lease = self.leases.by_token.get(token)
        if lease is None:
            self.counters["events_no_lease"] += 1
            return
        lease.heartbeat_s = received_ns / 1e9  # an event proves the holder alive, like a heartbeat
        lease.events += 1
        index = lease.gpu_index
        self.stats[index].events += 1
        at_ns = stamp_or_now_ns(sent_ns, received_ns)
        if at_ns is None:
            self.counters["events_stamp_fallback"] += 1
            at_ns = received_ns
        # The rank's time, not ours: a loaded agent must not move busy periods (the sim integrates on it).
        self.backend.on_phase(index, kind == EVENT_BEGIN, at_ns / 1e9)
        if not clock_mhz:
            return
        batch = self._batch_clocks
        if batch is None:
            self._queue_clock(index, clock_mhz, received_ns)
            return
        if index in batch:
            self.stats[index].superseded += 1
        batch[index] = (clock_mhz, received_ns)

    def _queue_clock(self, index: int, clock_mhz: int, received_ns: int) -> int:
        stats = self.stats[index]
        target = self.allow[index].snap(clock_mhz)
        if target != clock_mhz:
            stats.snapped += 1
        if target == stats.target_mhz:
            stats.duplicates += 1
            return target
        stats.target_mhz = target
        self.workers[index].mailbox.put(target, received_ns)
        return target

    def _reset_gpu(self, index: int) -> None:
        self.stats[index].target_mhz = None
        self.backend.on_phase(index, False, time.monotonic())  # nobody holds it: no unit runs (lost "end")
        self.workers[index].mailbox.put(RESET, time.monotonic_ns())

    def _catch_up(self, lease: Lease, args: dict[str, Any]) -> None:
        """Process the lease's events sent before this request (``events_sent``): events and requests
        travel on two sockets, so a release or window mark could otherwise overtake the last events.

        The wait is bounded three ways, so a forged count cannot stall the loop for everyone: at most
        CATCH_UP_S per request, not at all when more events are claimed than can be in flight
        (MAX_EVENTS_IN_FLIGHT), and at most CATCH_UP_BUDGET_S per second for all requests of one uid.
        """
        sent = args.get("events_sent")
        sock = self._events_sock
        if not isinstance(sent, int) or isinstance(sent, bool) or sock is None or lease.events >= sent:
            return
        spent_s = self._catch_up_spent.get(lease.uid, 0.0)
        left_s = min(CATCH_UP_S, CATCH_UP_BUDGET_S - spent_s)
        if sent - lease.events > MAX_EVENTS_IN_FLIGHT or left_s < 0.001:
            self.counters["catch_up_skipped"] += 1
            return
        start_s = time.monotonic()
        deadline_s = start_s + left_s
        try:
            while lease.events < sent:
                remaining_ms = int(1000 * (deadline_s - time.monotonic()))
                if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
                    log.debug("job %r rank %d: %d of %d events arrived", lease.job_id, lease.rank, lease.events, sent)
                    return
                self._drain_events(sock)
        finally:
            self._catch_up_spent[lease.uid] = spent_s + time.monotonic() - start_s

    # -- control path ----------------------------------------------------------------------------------
    def _drain_control(self, sock: zmq.Socket) -> None:
        for _ in range(CONTROL_HWM):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # Who sent it, as the kernel saw the connection (SO_PEERCRED via libzmq's Peer-Address).
            reply = self.handle_control([part.bytes for part in parts], peer_of(parts[-1]))
            if reply is not None:
                try:
                    sock.send_multipart(reply, zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # the peer went away between request and reply
                    log.debug("reply not sent: %s", exc)

    def _wake(self, _future: Future[dict[str, Any]]) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # pipe full (the loop wakes anyway) or closed at shutdown
            pass

    def _send_done(self, sock: zmq.Socket) -> None:
        """Send the replies whose futures are done (the wake pipe said some are)."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        waiting = []
        for envelope, request_id, future in self._pending:
            if not future.done():
                waiting.append((envelope, request_id, future))
                continue
            reply = envelope + [self._encode_result(request_id, future)]
            try:
                sock.send_multipart(reply, zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the peer went away meanwhile
                log.debug("reply not sent: %s", exc)
        self._pending = waiting

    def _encode_result(self, request_id: int, future: Future[dict[str, Any]]) -> bytes:
        try:
            return encode_reply(request_id, future.result())
        except ProtocolError as exc:
            self.counters["control_errors"] += 1
            return encode_error(request_id, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - as in dispatch: "internal", the agent stays up
            self.counters["control_errors"] += 1
            log.error("deferred reply to request %d failed: %s", request_id, exc)
            return encode_error(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def handle_control(self, frames: list[bytes], peer: Peer | None = None) -> list[bytes] | None:
        """Answer one ROUTER message from ``peer``; the envelope (identity and REQ delimiter) is echoed back.

        Returns None when there is nothing to send now: no payload to answer, a message of more than
        MAX_CONTROL_FRAMES frames (dropped, counted), or a reply still being computed (sent when done).
        """
        self.counters["control_requests"] += 1
        if len(frames) > MAX_CONTROL_FRAMES:
            self.counters["control_messages_too_long"] += 1
            return None
        if len(frames) < 2:
            self.counters["control_errors"] += 1
            return None  # nothing to answer to: no payload after the identity
        if b"" in frames[1:]:
            cut = len(frames) - 1 - frames[::-1].index(b"")
            envelope, payload = frames[: cut + 1], frames[cut + 1 :]
        else:
            envelope, payload = frames[:1], frames[1:]
        if len(payload) != 1:
            self.counters["control_errors"] += 1
            return envelope + [
                encode_error(0, ErrorCode.BAD_REQUEST, f"expected 1 payload frame, got {len(payload)}")
            ]
        reply = self.dispatch(payload[0], peer)
        if isinstance(reply, tuple):
            request_id, future = reply
            self._pending.append((envelope, request_id, future))
            future.add_done_callback(self._wake)
            return None
        return envelope + [reply]

    def dispatch(
        self, frame: bytes, peer: Peer | None = None
    ) -> bytes | tuple[int, Future[dict[str, Any]]]:
        """Decode, run the handler for ``peer`` (None: unknown, e.g. tcp), encode the reply (errors
        included); a deferred result comes back as ``(request id, future)``."""
        try:
            request = decode_request(frame)
        except ProtocolError as exc:
            self.counters["control_errors"] += 1
            return encode_error(request_id_of(frame), exc.code, str(exc))
        try:
            result = self.handlers[request.op](request.args, peer)
            if isinstance(result, Future):
                return request.id, result
            return encode_reply(request.id, result)
        except ProtocolError as exc:
            self.counters["control_errors"] += 1
            return encode_error(request.id, exc.code, str(exc))
        except Exception as exc:
            self.counters["control_errors"] += 1
            log.exception("handler %s failed", request.op)
            return encode_error(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _lease(self, args: dict[str, Any], peer: Peer | None) -> Lease:
        """The lease named by ``lease_id``, if ``peer`` may use it: its holder's uid, or root."""
        lease_id = _arg(args, "lease_id", int)
        lease = self.leases.by_id.get(lease_id)
        if lease is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_LEASE, "that lease is not held (expired or released); claim again"
            )
        if peer is not None and not peer.is_root and lease.uid is not None and peer.uid != lease.uid:
            self.counters["requests_not_permitted"] += 1
            raise ProtocolError(
                ErrorCode.NOT_PERMITTED,
                f"that lease belongs to uid {lease.uid}; only its holder's user (or root) may use it",
            )
        return lease

    def gpu_info(self, gpu: GpuDesc) -> dict[str, Any]:
        allow = self.allow[gpu.index]
        return {
            "index": gpu.index,
            "uuid": gpu.uuid,
            "name": gpu.name,
            "clocks_mhz": allow.ascending_mhz[::-1],
            "min_mhz": allow.min_mhz,
            "max_mhz": allow.max_mhz,
        }

    def _identity(self) -> dict[str, Any]:
        """Who answers: shared by ``hello`` and the status snapshot."""
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "backend": self.backend.name,
            "simulated": self.backend.simulated,
            "read_only": self.backend.read_only,
        }

    def op_hello(self, args: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        return {
            **self._identity(),
            "event_endpoint": self.config.events_endpoint(),
            "lease_timeout_s": self.config.lease_timeout_s,
            "gpus": [self.gpu_info(gpu) for gpu in self.gpus],
        }

    def _watch_pid(self, pid: int, peer: Peer | None) -> int:
        """The pid whose death ends a lease claimed for ``pid`` by ``peer``; refuses another user's pid.

        The claimed pid must be the caller's own or a process of the caller's uid (root may name any). A
        pid the agent cannot see (a rank in its own pid namespace, or a process hidden by ProtectProc) is
        not checked: the lease then follows the caller's own process.
        """
        if peer is None or peer.is_root or pid == peer.pid:
            return pid
        owner = process_uid(pid)
        if owner is None:
            return peer.pid
        if owner != peer.uid:
            self.counters["requests_not_permitted"] += 1
            raise ProtocolError(
                ErrorCode.NOT_PERMITTED,
                f"pid {pid} is not a process of uid {peer.uid}; claim with your own pid (os.getpid())",
            )
        return pid

    def op_claim(self, args: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        gpu_uuid = _arg(args, "gpu_uuid", str)
        job_id, rank, pid = _arg(args, "job_id", str), _arg(args, "rank", int), _arg(args, "pid", int)
        if len(job_id) > MAX_JOB_ID_CHARS:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"job_id has {len(job_id)} characters; at most {MAX_JOB_ID_CHARS} (it is shown by status)",
            )
        gpu = self.by_uuid.get(gpu_uuid)
        if gpu is None:
            raise ProtocolError(
                ErrorCode.NO_SUCH_GPU,
                f"no GPU {gpu_uuid!r} on this agent; it manages {', '.join(self.by_uuid)}",
            )
        watch_pid = self._watch_pid(pid, peer)
        uid = peer.uid if peer is not None else None
        reserved_for = self.reservations.blocks(gpu.uuid, uid) if peer is not None else None
        if reserved_for is not None and gpu.index not in self.leases.by_gpu:
            self.counters["claims_reserved"] += 1
            raise ProtocolError(
                ErrorCode.LEASE_HELD,
                f"GPU {gpu.uuid} is kept for uid {reserved_for}, whose job held it before the agent restarted, "
                f"for up to {self.config.lease_timeout_s} s; try again then",
            )
        try:
            held_id = _arg(args, "lease_id", int) if "lease_id" in args else 0  # proof for a repeated claim
            lease, new = self.leases.claim(
                gpu.index, gpu.uuid, job_id, rank, pid, held_id, uid=uid, watch_pid=watch_pid
            )
        except LookupError as exc:
            raise ProtocolError(ErrorCode.LEASE_HELD, str(exc)) from None
        if new:
            self.counters["leases_granted"] += 1
            self._save_holders()
            log.info("GPU %d leased to %s", gpu.index, lease.describe())
        return {"lease_id": lease.lease_id, "gpu_index": gpu.index, "lease_timeout_s": self.leases.timeout_s}

    def _save_holders(self) -> None:
        """Record who holds which GPU for the next agent (see Reservations); a failed write is logged."""
        if self._state_path is None:
            return
        try:
            write_private(self._state_path, holders_record(self.leases))
        except OSError as exc:
            log.warning("cannot record lease holders in %s: %s", self._state_path, exc)

    def op_heartbeat(self, args: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        lease = self._lease(args, peer)
        lease.heartbeat_s = time.monotonic()
        return {"lease_id": lease.lease_id}

    def op_release(self, args: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        lease = self._lease(args, peer)
        self._catch_up(lease, args)
        self.leases.release(lease.lease_id)
        self.counters["leases_released"] += 1
        self._reset_gpu(lease.gpu_index)
        self._save_holders()
        log.info("GPU %d released by job %r rank %d; clocks reset", lease.gpu_index, lease.job_id, lease.rank)
        return {}

    def op_set_clock(self, args: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        lease = self._lease(args, peer)
        self._catch_up(lease, args)
        clock_mhz = _arg(args, "clock_mhz", int)
        target = self._queue_clock(lease.gpu_index, clock_mhz, time.monotonic_ns())
        return {"target_mhz": target, "snapped": target != clock_mhz}

    def _mark_s(self, args: dict[str, Any]) -> float:
        """A window mark's time: the requester's ``sent_ns`` when plausible, else now (counted)."""
        now_ns = time.monotonic_ns()
        sent_ns = args.get("sent_ns")
        if not isinstance(sent_ns, int) or isinstance(sent_ns, bool):
            return now_ns / 1e9  # a client without the stamp (a tool): now, as before
        at_ns = stamp_or_now_ns(sent_ns, now_ns)
        if at_ns is None:
            self.counters["events_stamp_fallback"] += 1
            at_ns = now_ns
        return at_ns / 1e9

    def op_window_begin(self, args: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        lease = self._lease(args, peer)
        self._catch_up(lease, args)
        if len(lease.windows) >= MAX_WINDOWS_PER_LEASE:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"more than {MAX_WINDOWS_PER_LEASE} open windows; end some"
            )
        window_id, self._next_window_id = self._next_window_id, self._next_window_id + 1
        # The mark is the requester's timestamp (checked like an event's), after the catch-up; its energy is
        # estimated off the loop (the reply need not wait).
        mark_s = self._mark_s(args)
        lease.windows[window_id] = (self._mark(lease.gpu_index, mark_s), mark_s)
        return {"window_id": window_id}

    def _mark(self, index: int, mark_s: float) -> Future[float]:
        try:
            return self.sampler.mark(index, mark_s)
        except MarksBusy as exc:
            self.counters["marks_busy"] += 1
            raise ProtocolError(ErrorCode.BUSY, str(exc)) from None

    def op_window_end(
        self, args: dict[str, Any], peer: Peer | None = None
    ) -> dict[str, Any] | Future[dict[str, Any]]:
        lease = self._lease(args, peer)
        self._catch_up(lease, args)
        window_id = _arg(args, "window_id", int)
        start = lease.windows.get(window_id)
        if start is None:
            raise ProtocolError(ErrorCode.UNKNOWN_WINDOW, f"window {window_id} is not open on this lease")
        (begin_energy, begin_s), end_s = start, self._mark_s(args)
        end_energy = self._mark(lease.gpu_index, end_s)  # busy: the window stays open, the client may retry
        del lease.windows[window_id]
        simulated = self.backend.simulated

        def result() -> dict[str, Any]:
            return {
                "energy_j": (end_energy.result() - begin_energy.result()) / 1000.0,
                "duration_s": end_s - begin_s,
                "simulated": simulated,
            }

        if begin_energy.done() and end_energy.done():
            return result()
        # The end mark is queued behind the begin mark on the GPU's one mark thread: once it is done, both are.
        reply: Future[dict[str, Any]] = Future()

        def finish(_done: Future[float]) -> None:
            try:
                reply.set_result(result())
            except Exception as exc:  # noqa: BLE001 - sent as an error reply by the loop
                reply.set_exception(exc)

        end_energy.add_done_callback(finish)
        return reply

    def op_status(self, args: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        return self.status()

    # -- bookkeeping -----------------------------------------------------------------------------------
    def tick(self) -> None:
        """End overdue leases (and reset their GPUs); refresh event rates once a second."""
        if self.config.exit_with_pid and not pid_alive(self.config.exit_with_pid):
            log.warning("process %d is gone: stopping (exit_with_pid)", self.config.exit_with_pid)
            self.stopping = True
        self._guard_memory()
        for lease, reason in self.leases.expire():
            self.counters["leases_expired"] += 1
            self._reset_gpu(lease.gpu_index)
            log.warning(
                "GPU %d lease of job %r rank %d ended: %s; clocks reset",
                lease.gpu_index,
                lease.job_id,
                lease.rank,
                reason,
            )
        now_s = time.monotonic()
        if now_s - self._last_rate_s >= 1.0:
            self._catch_up_spent.clear()
            for stats in self.stats.values():
                stats.events_per_s = (stats.events - stats._rate_events) / (now_s - self._last_rate_s)
                stats._rate_events = stats.events
            self._last_rate_s = now_s

    def _guard_memory(self) -> None:
        """Above memory_guard_mb, shut down every connection but root's (their buffers are freed with them).

        zmq delivers a message only once it is complete and bounds a frame's size but not the number of
        frames, so one connection can make the agent buffer gigabytes (an OOM kill is a SIGKILL: no reset).
        Which connection holds the half-received message is invisible from here, so all non-root
        connections go; clients reconnect by themselves and their leases stay (shorter than a timeout).
        """
        limit_mb = self.config.memory_guard_mb
        if not limit_mb:
            return
        rss = rss_bytes()
        now_s = time.monotonic()
        if self._guard_rearm_s and now_s >= self._guard_rearm_s:
            trim_heap()  # the shed connections' buffers are free by now (libzmq's I/O thread)
            rss = rss_bytes()
            # Memory the allocator kept after the last trip is not a new attack: trip above it only.
            self._guard_limit = max(limit_mb << 20, rss + (GUARD_MARGIN_MB << 20))
            self._guard_rearm_s = 0.0
        if rss <= self._guard_limit or self._guard_rearm_s:
            return
        shed = self.guard.shed_all_but_root()
        self._guard_rearm_s = now_s + 1.0
        self.counters["memory_guard_trips"] += 1
        self.counters["connections_shed"] += shed
        log.warning(
            "resident memory %d MiB over the guard (%d MiB): shut down %d non-root connection(s)",
            rss >> 20,
            self._guard_limit >> 20,
            shed,
        )

    def gpu_status(self, gpu: GpuDesc) -> dict[str, Any]:
        index, stats, worker = gpu.index, self.stats[gpu.index], self.workers[gpu.index]
        lease = self.leases.by_gpu.get(index)
        energy_mj, _ = self.sampler.read(index)
        p99_ms = worker.apply_latency_p99_ms()
        info = self.gpu_info(gpu)
        info["supported_clocks"] = len(info.pop("clocks_mhz"))  # the list is in hello; 110 on an H100
        return {
            **info,
            "clock_mhz": _read_or_none(self.backend.read_clock_mhz, index),
            "target_mhz": stats.target_mhz,
            # Read-only agents apply nothing, so never hold a lock (target_mhz shows what they would set).
            "locked": worker.applied_mhz is not None and not self.backend.read_only,
            "power_w": _read_or_none(self.backend.read_power_w, index),
            "energy_j": energy_mj / 1000.0,
            "holder": lease.holder() if lease else None,
            "lease_age_s": round(time.monotonic() - lease.created_s, 3) if lease else None,
            "events": stats.events,
            "events_per_s": round(stats.events_per_s, 1),
            "duplicates": stats.duplicates + worker.duplicates,
            "superseded": stats.superseded + worker.mailbox.overwritten,
            "snapped": stats.snapped,
            "clock_changes": worker.clock_changes,
            "resets": worker.resets,
            "apply_failures": worker.failures,
            "apply_latency_p99_ms": round(p99_ms, 4) if p99_ms is not None else None,
            "apply_latency_histogram": {
                "bounds_s": list(APPLY_LATENCY_BUCKETS_S),
                "counts": list(worker.latency_buckets),  # per bucket, the last one above every bound
                "sum_s": round(worker.latency_sum_s, 6),
            },
            "simulated": self.backend.simulated,
        }

    def status(self) -> dict[str, Any]:
        """The snapshot behind ``envpipe status`` and the Prometheus endpoint."""
        describe = getattr(self.backend, "describe", None)
        return {
            **self._identity(),
            "model": describe() if describe else "",
            "uptime_s": round(time.monotonic() - self.started_s, 3),
            "rss_mb": round(rss_bytes() / (1 << 20), 1),
            "lease_timeout_s": self.leases.timeout_s,
            "control_endpoint": self.config.control_endpoint(),
            "counters": dict(self.counters),
            "gpus": [self.gpu_status(gpu) for gpu in self.gpus],
        }
