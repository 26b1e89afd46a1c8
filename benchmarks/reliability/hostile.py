"""A hostile member of the socket group against a running agent (issue 12): each attack and its effect.

Run AS the member (any uid in the agent's socket group, not root), against an agent whose GPUs are free
or held by someone else::

    python -m benchmarks.reliability.hostile --endpoint ipc:///run/envpipe/control.sock

Prints one JSON line. Every attack is bounded in count and time (about a minute in all). The agent's
resident memory is read from /proc/<agent pid> (the pid the agent's lock file names).

Attacks: claim a free GPU naming another user's pid (pid 1); open ``--connections`` plain connections to
the control socket while probing with ``hello``; send one never-ending message (raw ZMTP, 60 kB frames);
queue status requests on many connections without reading the replies; flood window begin/end on a lease
of its own; and send requests with a forged ``events_sent`` from 40 connections while another client's
heartbeats are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from envpipe_agent.protocol import encode_request


AGENT_PID = 0  # --agent-pid; else the pid in the agent's lock file when readable


def agent_rss_mb(endpoint: str) -> float | None:
    """The agent's resident memory, from /proc/<its pid>/status (None when not readable)."""
    try:
        pid = AGENT_PID or int(Path(endpoint[len("ipc://") :]).with_name("agent.lock").read_text().strip())
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


class Dealer:
    """One control connection; ``call`` returns the result, or the error code, or 'timeout'."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 0

    def call(self, op: str, timeout_s: float = 2.0, **args: Any) -> Any:
        self.next_id += 1
        self.sock.send_multipart([b"", encode_request(self.next_id, op, args)])
        deadline_s = time.monotonic() + timeout_s
        while (left_ms := int(1000 * (deadline_s - time.monotonic()))) > 0 and self.sock.poll(left_ms):
            reply = json.loads(self.sock.recv_multipart()[-1])
            if reply.get("id") == self.next_id:
                return reply["result"] if reply["ok"] else reply["error"]["code"]
        return "timeout"

    def close(self) -> None:
        self.sock.close(0)


def alive(endpoint: str, timeout_s: float = 2.0) -> bool:
    probe = Dealer(endpoint)
    try:
        return isinstance(probe.call("hello", timeout_s), dict)
    finally:
        probe.close()


def claim_for_pid_1(endpoint: str, gpu: str) -> Any:
    client = Dealer(endpoint)
    try:
        reply = client.call("claim", gpu_uuid=gpu, job_id="hostile", rank=0, pid=1)
        if isinstance(reply, dict):
            client.call("release", lease_id=reply["lease_id"])
            return "granted"
        return reply
    finally:
        client.close()


def _shut(sock: socket.socket) -> bool:
    """Whether the agent has shut this connection down (its greeting, then the end of the stream)."""
    try:
        while sock.recv(1 << 16, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def connect_flood(endpoint: str, count: int) -> dict[str, Any]:
    """``count`` plain connections; connections the agent shuts down are closed here (as a real attacker
    would, to keep going), the open ones are kept. The agent is probed with ``hello`` 20 times."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    path = endpoint[len("ipc://") :]
    socks: list[socket.socket] = []
    probes = answered = shut = 0
    errors = ""
    start_s = time.monotonic()
    try:
        for number in range(count):
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)  # blocking: waits while the listen backlog is full
            except OSError as exc:
                errors = f"{type(exc).__name__} after {number} connects: {exc}"
                break
            socks.append(sock)
            if number % 256 == 255:
                kept = []
                for old in socks:
                    if _shut(old):
                        old.close()
                        shut += 1
                    else:
                        kept.append(old)
                socks = kept
            if number % max(1, count // 20) == 0:
                probes += 1
                answered += _probe(endpoint)
            if time.monotonic() - start_s > 120:
                errors = f"stopped after 120 s at {number + 1} connects"
                break
        time.sleep(1.0)
        still_open = sum(not _shut(sock) for sock in socks)
        probes += 1
        answered += _probe(endpoint)
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"connects": number + 1, "shut_by_agent": shut + len(socks) - still_open, "open_at_end": still_open,
            "probes_answered": f"{answered}/{probes}", "stopped_by": errors, "s": round(time.monotonic() - start_s, 1),
            "alive_after": _probe(endpoint)}


def _probe(endpoint: str) -> bool:
    try:
        return alive(endpoint)
    except zmq.ZMQError:  # this process out of descriptors: no probe
        return False


def never_ending_message(endpoint: str, frames: int, frame_bytes: int) -> dict[str, Any]:
    """Raw ZMTP 3.0 as a DEALER: greeting, READY, then frames that all say "more follows"."""
    before = agent_rss_mb(endpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(endpoint[len("ipc://") :])
    sock.settimeout(5)
    sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    sock.sendall(b"\x04" + bytes([len(body)]) + body)
    seen = b""
    while b"READY" not in seen:
        seen += sock.recv(4096)
    frame = b"\x03" + struct.pack(">Q", frame_bytes) + b"x" * frame_bytes
    sent, peak, cut = 0, before or 0.0, ""
    try:
        for sent in range(1, frames + 1):
            sock.sendall(frame)
            if sent % 100 == 0:
                peak = max(peak, agent_rss_mb(endpoint) or 0.0)
    except OSError as exc:
        cut = f"connection ended after {sent} frames ({type(exc).__name__})"
    time.sleep(2.5)  # the agent hands freed memory back a second after it sheds (malloc_trim)
    result = {"frames_sent": sent, "frame_bytes": frame_bytes, "cut": cut, "rss_before_mb": before,
              "rss_peak_mb": peak, "rss_after_mb": agent_rss_mb(endpoint), "alive_after": alive(endpoint)}
    sock.close()
    return result


def unread_replies(endpoint: str, connections: int, requests: int) -> dict[str, Any]:
    before = agent_rss_mb(endpoint)
    socks = []
    for _ in range(connections):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)  # read nothing: replies pile up at the agent
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(endpoint)
        socks.append(sock)
    for sock in socks:
        for number in range(requests):
            try:
                sock.send_multipart([b"", encode_request(number, "status")], zmq.NOBLOCK)
            except zmq.Again:
                break
    time.sleep(2.0)
    during = agent_rss_mb(endpoint)
    ok = alive(endpoint)
    for sock in socks:
        sock.close(0)
    return {"connections": connections, "requests_each": requests, "rss_before_mb": before,
            "rss_with_unread_mb": during, "per_connection_kib": None if None in (before, during)
            else round((during - before) * 1024 / connections, 1), "alive": ok}


def window_flood(endpoint: str, gpu: str, seconds: float, batch: int = 200) -> dict[str, Any]:
    """Window begins pipelined ``batch`` at a time (each queues an energy mark on the GPU's mark thread)."""
    client = Dealer(endpoint)
    lease = client.call("claim", gpu_uuid=gpu, job_id="hostile", rank=0, pid=os.getpid())
    if not isinstance(lease, dict):
        return {"skipped": f"claim refused: {lease}"}
    before, codes, sent = agent_rss_mb(endpoint), {}, 0
    peak = before or 0.0
    deadline_s = time.monotonic() + seconds
    while time.monotonic() < deadline_s:
        client.call("heartbeat", lease_id=lease["lease_id"])  # window requests are no heartbeat
        for _ in range(batch):
            client.next_id += 1
            client.sock.send_multipart([b"", encode_request(client.next_id, "window_begin",
                                                            {"lease_id": lease["lease_id"]})])
            sent += 1
        for _ in range(batch):
            if not client.sock.poll(2000):
                codes["timeout"] = codes.get("timeout", 0) + 1
                break
            reply = json.loads(client.sock.recv_multipart()[-1])
            code = "ok" if reply["ok"] else reply["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
        peak = max(peak, agent_rss_mb(endpoint) or 0.0)
    after = agent_rss_mb(endpoint)
    client.call("release", lease_id=lease["lease_id"])
    client.close()
    return {"window_begins": sent, "codes": codes, "rss_before_mb": before, "rss_peak_mb": peak,
            "rss_after_mb": after,
            "growth_mib_per_s": None if None in (before, after) else round((after - before) / seconds, 2)}


def catch_up_stall(endpoint: str, gpus: list[str], seconds: float, connections: int = 40) -> dict[str, Any]:
    """Forged events_sent from ``connections`` connections while another lease's heartbeats are timed."""
    attacker, victim = Dealer(endpoint), Dealer(endpoint)
    leases = [attacker.call("claim", gpu_uuid=gpus[0], job_id="hostile", rank=0, pid=os.getpid()),
              victim.call("claim", gpu_uuid=gpus[1], job_id="other", rank=1, pid=os.getpid())]
    if not all(isinstance(lease, dict) for lease in leases):
        return {"skipped": f"claims refused: {leases}"}
    stop = threading.Event()

    def flood() -> None:
        sock = Dealer(endpoint)
        while not stop.is_set():
            sock.call("set_clock", 1.0, lease_id=leases[0]["lease_id"], clock_mhz=1200, events_sent=10**9)
        sock.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    latencies, failed = [], 0
    deadline_s = time.monotonic() + seconds
    while time.monotonic() < deadline_s:
        start_s = time.monotonic()
        reply = victim.call("heartbeat", 5.0, lease_id=leases[1]["lease_id"])
        latencies.append(time.monotonic() - start_s)
        failed += not isinstance(reply, dict)
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(3)
    for client, lease in zip((attacker, victim), leases, strict=True):
        client.call("release", lease_id=lease["lease_id"])
        client.close()
    latencies.sort()
    return {"connections": connections, "heartbeats": len(latencies), "failed": failed,
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1), "max_ms": round(1000 * latencies[-1], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="ipc:///run/envpipe/control.sock")
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--frames", type=int, default=5_000)
    parser.add_argument("--frame-bytes", type=int, default=60_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", default="", help="comma-separated attacks to run (default all)")
    parser.add_argument("--agent-pid", type=int, default=0, help="the agent's pid (for its memory)")
    args = parser.parse_args(argv)
    global AGENT_PID
    AGENT_PID = args.agent_pid
    hello = Dealer(args.endpoint)
    info = hello.call("hello", 5.0)
    hello.close()
    if not isinstance(info, dict):
        print(json.dumps({"error": f"no agent at {args.endpoint}: {info}"}))
        return 1
    gpus = [gpu["uuid"] for gpu in info["gpus"]]
    attacks = {
        "claim_for_pid_1": lambda: claim_for_pid_1(args.endpoint, gpus[-1]),
        "catch_up_stall": lambda: catch_up_stall(args.endpoint, gpus, args.seconds),
        "window_flood": lambda: window_flood(args.endpoint, gpus[-1], args.seconds),
        "unread_replies": lambda: unread_replies(args.endpoint, 64, 1000),
        "never_ending_message": lambda: never_ending_message(args.endpoint, args.frames, args.frame_bytes),
        "connect_flood": lambda: connect_flood(args.endpoint, args.connections),
    }
    chosen = [name for name in attacks if not args.only or name in args.only.split(",")]
    results: dict[str, Any] = {"uid": os.getuid(), "agent": info["version"], "backend": info["backend"]}
    for name in chosen:
        if not alive(args.endpoint, 5.0):
            results[name] = "agent gone"
            continue
        try:
            results[name] = attacks[name]()
        except Exception as exc:  # noqa: BLE001 - recorded: an attack that breaks is a result too
            results[name] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
