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
from typing import Any

import zmq

from envpipe_agent import __version__
from envpipe_agent.backend import AllowList, GpuBackend, GpuDesc
from envpipe_agent.config import AgentConfig
from envpipe_agent.energy import EnergySampler
from envpipe_agent.leases import Lease, LeaseManager, pid_alive
from envpipe_agent.protocol import (
    EVENT_BEGIN,
    EVENT_RECV_HWM,
    EVENT_SOCKET_BUFFER_BYTES,
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
from envpipe_agent.runtime import prepare_dir, resolve_group, secure_socket
from envpipe_agent.worker import RESET, GpuWorker

log = logging.getLogger("envpipe_agent.server")

TICK_S = 0.1  # lease expiry and rate bookkeeping period
MAX_WINDOWS_PER_LEASE = 4096
MAX_JOB_ID_CHARS = 256
CATCH_UP_S = 0.1  # longest a request waits for the events its client sent before it
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
            ),
            0,
        )
        self.started_s = time.monotonic()
        self.stopping = False  # set when the process named by exit_with_pid is gone
        self._events_sock: zmq.Socket | None = None
        # Replies still being computed off the loop: (envelope, request id, future). A done future writes a
        # byte into the pipe, which the loop polls next to its sockets.
        self._pending: list[tuple[list[bytes], int, Future[dict[str, Any]]]] = []
        # While a batch of events is drained: the latest clock per GPU index, queued once at the batch's end.
        self._batch_clocks: dict[int, tuple[int, int]] | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_window_id = 1
        self._last_rate_s = self.started_s
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any] | Future[dict[str, Any]]]] = {
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
    def reset_all(self, why: str) -> None:
        """Reset every managed GPU synchronously (agent start = crash recovery, and shutdown)."""
        for index, worker in self.workers.items():
            try:
                worker.reset_now()
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
        self._events_sock = events
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        monitors = [sock.get_monitor_socket(zmq.EVENT_DISCONNECTED) for sock in (control, events)]
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
                            self._count_disconnects(monitor)
                    if time.monotonic() - last_tick_s >= TICK_S:
                        last_tick_s = time.monotonic()
                        self.tick()
                except Exception:
                    self.counters["loop_errors"] += 1
                    log.exception("event loop error (the agent keeps serving)")
        finally:
            self.stop_threads()
            self.reset_all("shutdown")
            for sock, monitor in zip((control, events), monitors, strict=True):
                sock.disable_monitor()
                monitor.close(0)
            control.close(0)
            events.close(0)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _count_disconnects(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)  # one message per event: only disconnects are asked for
            except zmq.Again:
                return
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
        travel on two sockets, so a release or window mark could otherwise overtake the last events."""
        sent = args.get("events_sent")
        sock = self._events_sock
        if not isinstance(sent, int) or isinstance(sent, bool) or sock is None:
            return
        deadline_s = time.monotonic() + CATCH_UP_S
        while lease.events < sent:
            remaining_ms = int(1000 * (deadline_s - time.monotonic()))
            if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
                log.debug("lease %d: %d of %d events arrived", lease.lease_id, lease.events, sent)
                return
            self._drain_events(sock)

    # -- control path ----------------------------------------------------------------------------------
    def _drain_control(self, sock: zmq.Socket) -> None:
        for _ in range(64):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = self.handle_control(frames)
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

    def handle_control(self, frames: list[bytes]) -> list[bytes] | None:
        """Answer one ROUTER message; the envelope (identity and REQ delimiter) is echoed back.

        Returns None when there is nothing to send now: no payload to answer, or a reply still being
        computed (sent by the loop when done).
        """
        self.counters["control_requests"] += 1
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
        reply = self.dispatch(payload[0])
        if isinstance(reply, tuple):
            request_id, future = reply
            self._pending.append((envelope, request_id, future))
            future.add_done_callback(self._wake)
            return None
        return envelope + [reply]

    def dispatch(self, frame: bytes) -> bytes | tuple[int, Future[dict[str, Any]]]:
        """Decode, run the handler, encode the reply (errors included); a deferred result comes back as
        ``(request id, future)``."""
        try:
            request = decode_request(frame)
        except ProtocolError as exc:
            self.counters["control_errors"] += 1
            return encode_error(request_id_of(frame), exc.code, str(exc))
        try:
            result = self.handlers[request.op](request.args)
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

    def _lease(self, args: dict[str, Any]) -> Lease:
        lease_id = _arg(args, "lease_id", int)
        lease = self.leases.by_id.get(lease_id)
        if lease is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_LEASE, f"lease {lease_id} is not held (expired or released); claim again"
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

    def op_hello(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            **self._identity(),
            "event_endpoint": self.config.events_endpoint(),
            "lease_timeout_s": self.config.lease_timeout_s,
            "gpus": [self.gpu_info(gpu) for gpu in self.gpus],
        }

    def op_claim(self, args: dict[str, Any]) -> dict[str, Any]:
        gpu_uuid = _arg(args, "gpu_uuid", str)
        job_id, rank, pid = _arg(args, "job_id", str), _arg(args, "rank", int), _arg(args, "pid", int)
        if len(job_id) > MAX_JOB_ID_CHARS:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"job_id has {len(job_id)} characters; at most {MAX_JOB_ID_CHARS} (it is shown by status)",
            )
        # No range check on pid: one no process can have is simply dead, and the lease ends at the next tick.
        gpu = self.by_uuid.get(gpu_uuid)
        if gpu is None:
            raise ProtocolError(
                ErrorCode.NO_SUCH_GPU,
                f"no GPU {gpu_uuid!r} on this agent; it manages {', '.join(self.by_uuid)}",
            )
        try:
            held_id = _arg(args, "lease_id", int) if "lease_id" in args else 0  # proof for a repeated claim
            lease, new = self.leases.claim(gpu.index, gpu.uuid, job_id, rank, pid, held_id)
        except LookupError as exc:
            raise ProtocolError(ErrorCode.LEASE_HELD, str(exc)) from None
        if new:
            self.counters["leases_granted"] += 1
            log.info("GPU %d leased to job %r rank %d pid %d", gpu.index, job_id, rank, pid)
        return {"lease_id": lease.lease_id, "gpu_index": gpu.index, "lease_timeout_s": self.leases.timeout_s}

    def op_heartbeat(self, args: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(args)
        lease.heartbeat_s = time.monotonic()
        return {"lease_id": lease.lease_id}

    def op_release(self, args: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(args)
        self._catch_up(lease, args)
        self.leases.release(lease.lease_id)
        self.counters["leases_released"] += 1
        self._reset_gpu(lease.gpu_index)
        log.info("GPU %d released by job %r rank %d; clocks reset", lease.gpu_index, lease.job_id, lease.rank)
        return {}

    def op_set_clock(self, args: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(args)
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

    def op_window_begin(self, args: dict[str, Any]) -> dict[str, Any]:
        lease = self._lease(args)
        self._catch_up(lease, args)
        if len(lease.windows) >= MAX_WINDOWS_PER_LEASE:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"more than {MAX_WINDOWS_PER_LEASE} open windows; end some"
            )
        window_id, self._next_window_id = self._next_window_id, self._next_window_id + 1
        # The mark is the requester's timestamp (checked like an event's), after the catch-up; its energy is
        # estimated off the loop (the reply need not wait).
        mark_s = self._mark_s(args)
        lease.windows[window_id] = (self.sampler.mark(lease.gpu_index, mark_s), mark_s)
        return {"window_id": window_id}

    def op_window_end(self, args: dict[str, Any]) -> dict[str, Any] | Future[dict[str, Any]]:
        lease = self._lease(args)
        self._catch_up(lease, args)
        window_id = _arg(args, "window_id", int)
        start = lease.windows.pop(window_id, None)
        if start is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_WINDOW, f"window {window_id} is not open on lease {lease.lease_id}"
            )
        (begin_energy, begin_s), end_s = start, self._mark_s(args)
        end_energy = self.sampler.mark(lease.gpu_index, end_s)
        simulated = self.backend.simulated

        def result() -> dict[str, Any]:
            return {
                "energy_j": (end_energy.result() - begin_energy.result()) / 1000.0,
                "duration_s": end_s - begin_s,
                "simulated": simulated,
            }

        if begin_energy.done() and end_energy.done():
            return result()
        return self.sampler.after(lease.gpu_index, result)

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    # -- bookkeeping -----------------------------------------------------------------------------------
    def tick(self) -> None:
        """End overdue leases (and reset their GPUs); refresh event rates once a second."""
        if self.config.exit_with_pid and not pid_alive(self.config.exit_with_pid):
            log.warning("process %d is gone: stopping (exit_with_pid)", self.config.exit_with_pid)
            self.stopping = True
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
            for stats in self.stats.values():
                stats.events_per_s = (stats.events - stats._rate_events) / (now_s - self._last_rate_s)
                stats._rate_events = stats.events
            self._last_rate_s = now_s

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
            "simulated": self.backend.simulated,
        }

    def status(self) -> dict[str, Any]:
        """The snapshot behind ``envpipe status`` and the Prometheus endpoint."""
        describe = getattr(self.backend, "describe", None)
        return {
            **self._identity(),
            "model": describe() if describe else "",
            "uptime_s": round(time.monotonic() - self.started_s, 3),
            "lease_timeout_s": self.leases.timeout_s,
            "control_endpoint": self.config.control_endpoint(),
            "counters": dict(self.counters),
            "gpus": [self.gpu_status(gpu) for gpu in self.gpus],
        }
