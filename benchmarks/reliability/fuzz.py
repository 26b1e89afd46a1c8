"""Scenario 3: hostile frames on both sockets; the agent answers or counts each one and stays up.

Categories (weights in ``_CONTROL`` / ``_EVENT``): random bytes, truncated JSON, JSON nested past the
recursion limit, wrong types, huge and negative numbers, unknown ops, wrong protocol versions, replayed
lease ids (of a released lease), forged lease ids, attempts to take a held lease, oversized control frames
(> 64 KiB: ``too_large``), extra or missing envelope frames, and on the event socket random bytes, short and long frames, bad magic/kind and
forged/replayed lease ids. Frames above the transport limit (1 MiB, ZMQ_MAXMSGSIZE) make zmq drop the
connection before the agent sees them; those are sent on their own sockets and counted here.

A legitimate holder keeps GPU 0 for the whole run; at the end its lease must be intact, no GPU clock may
have changed, every control frame must have an error reply (or a reply of an op that was well formed), and
every event must be counted by the agent as malformed or lease-less.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq
from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import start_agent
from envpipe_agent.protocol import (
    EVENT_MAGIC,
    EVENT_STRUCT,
    MAX_CONTROL_BYTES,
    MAX_CONTROL_FRAME_BYTES,
    MAX_FRAME_BYTES,
    OPS,
    PROTOCOL_VERSION,
    encode_event,
    lease_token,
)

from benchmarks.reliability.common import cpu_s, rss_kib, short_dir

_HUGE = [-1, 0, -2**31, 2**31, 2**32, -2**63, 2**63, 2**64, 10**30, -10**30, 1e308, -1e308, 1.5, -0.0, True,
         None, "", "9" * 50, [], {}, [1] * 100]
_LEASE_OPS = ("heartbeat", "release", "set_clock", "window_begin", "window_end")


class _Gen:
    """Frame generators; ``lease`` is the holder's (never sent), ``replayed`` a released lease id."""

    def __init__(self, rng: random.Random, uuids: list[str], holder: dict[str, Any], replayed: int, lease: int):
        self.rng, self.uuids, self.holder, self.replayed, self.lease = rng, uuids, holder, replayed, lease

    def forged_id(self) -> int:
        while True:
            value = self.rng.randrange(1, 1 << 32)
            if value != self.lease:
                return value

    def request(self, op: str, args: Any, version: Any = PROTOCOL_VERSION, request_id: Any = None) -> bytes:
        rid = self.rng.randrange(1 << 31) if request_id is None else request_id
        return json.dumps({"v": version, "id": rid, "op": op, "args": args}).encode()

    def random_bytes(self) -> bytes:
        return os.urandom(self.rng.randrange(0, 400))

    def truncated(self) -> bytes:
        frame = self.request(self.rng.choice(OPS), {"lease_id": self.forged_id(), "clock_mhz": 900})
        return frame[: self.rng.randrange(1, len(frame))]

    def wrong_types(self) -> bytes:
        bad = self.rng.choice(["x", [1], {"a": 1}, None, 1.5, True, "1"])
        args = {k: bad for k in self.rng.sample(["gpu_uuid", "job_id", "rank", "pid", "lease_id", "clock_mhz",
                                                  "window_id"], 3)}
        kind = self.rng.randrange(4)
        if kind == 0:
            return self.request(self.rng.choice(OPS), args)
        if kind == 1:
            return self.request(self.rng.choice(OPS), self.rng.choice([[1, 2], "args", 7, None]))
        if kind == 2:
            return self.request(self.rng.choice(OPS), {}, request_id=self.rng.choice(["7", 1.5, None, [], True]))
        return json.dumps(self.rng.choice([[1, 2], "text", 7, None, 1.5])).encode()

    def huge_numbers(self) -> bytes:
        op = self.rng.choice(("set_clock", "claim", "window_end", "heartbeat"))
        value = self.rng.choice(_HUGE)
        if op == "claim":
            args = {"gpu_uuid": self.rng.choice(self.uuids), "job_id": "fuzz", "rank": value, "pid": value}
        else:
            args = {"lease_id": self.rng.choice([value, self.forged_id()]), "clock_mhz": value, "window_id": value}
        return self.request(op, args, request_id=self.rng.choice([value, 5]) if isinstance(value, int) else 5)

    def unknown_op(self) -> bytes:
        op = self.rng.choice(["", "shutdown", "exec", "set_power_limit", "HELLO", "claim ", "__init__", "reset"])
        return self.request(op, {"lease_id": self.forged_id()})

    def bad_version(self) -> bytes:
        return self.request("hello", {}, version=self.rng.choice([0, 1, 3, "2", None, 2.0001, -1, 2**70]))

    def replayed_lease(self) -> bytes:
        return self.request(self.rng.choice(_LEASE_OPS), {"lease_id": self.replayed, "clock_mhz": 345, "window_id": 1})

    def forged_lease(self) -> bytes:
        return self.request(self.rng.choice(_LEASE_OPS), {"lease_id": self.forged_id(), "clock_mhz": 345,
                                                          "window_id": 1})

    def steal(self) -> bytes:
        """Claims of the held GPU: as another job, or copying the holder's public job/rank/pid."""
        args = {"gpu_uuid": self.uuids[0], **self.holder}
        if self.rng.random() < 0.5:
            args["lease_id"] = self.forged_id()
        if self.rng.random() < 0.3:
            args["job_id"] = "thief"
        return self.request("claim", args)

    def deep_nesting(self) -> bytes:
        """JSON nested deeper than Python's recursion limit, yet under the 64 KiB control limit."""
        opener = self.rng.choice([b"[", b'{"a":', b'{"v":1,"op":"hello","args":{"x":['])
        return (opener * self.rng.randrange(1_200, 20_000))[:MAX_CONTROL_BYTES]

    def oversize(self) -> bytes:
        # over the agent's JSON limit but within zmq's frame limit: answered ``too_large`` (larger frames end
        # the connection: _transport_oversize)
        slack = MAX_CONTROL_FRAME_BYTES - MAX_CONTROL_BYTES - 64
        return self.request("hello", {"pad": "x" * (MAX_CONTROL_BYTES + self.rng.randrange(1, slack))})

    def event_random(self) -> bytes:
        return os.urandom(self.rng.randrange(0, 80))

    def event_bad_header(self) -> bytes:
        magic = self.rng.choice([EVENT_MAGIC, 0, 0xFF])
        version = self.rng.choice([1, 0, 2, 255])
        kind = self.rng.choice([0, 1, 2, 255])
        token, clock_mhz = lease_token(self.forged_id()), self.rng.randrange(65536)
        head = EVENT_STRUCT.pack(magic, version, kind, token, clock_mhz, self.rng.randrange(1 << 64))  # any stamp
        return head + os.urandom(self.rng.choice([0, 5, 32, 33, 200]))

    def event_forged(self) -> bytes:
        lease = self.rng.choice([self.replayed, self.forged_id()])
        return encode_event(self.rng.randrange(2), lease, self.rng.randrange(65536), b"F0")


_CONTROL: dict[str, tuple[float, Callable[[_Gen], bytes]]] = {
    "random_bytes": (10, _Gen.random_bytes), "truncated": (10, _Gen.truncated), "wrong_types": (15, _Gen.wrong_types),
    "huge_numbers": (15, _Gen.huge_numbers), "unknown_op": (5, _Gen.unknown_op), "bad_version": (5, _Gen.bad_version),
    "replayed_lease": (10, _Gen.replayed_lease), "forged_lease": (10, _Gen.forged_lease), "steal": (5, _Gen.steal),
    "oversize": (0.5, _Gen.oversize), "deep_nesting": (1, _Gen.deep_nesting),
}
_EVENT: dict[str, tuple[float, Callable[[_Gen], bytes]]] = {
    "event_random": (5, _Gen.event_random), "event_bad_header": (5, _Gen.event_bad_header),
    "event_forged": (5, _Gen.event_forged),
}
_ENVELOPES = ("normal", "normal", "normal", "normal", "extra_frame", "no_delimiter", "empty_payload")


def _control_batch(sock: zmq.Socket, frames: list[tuple[str, bytes]], envelopes: list[str],
                   codes: Counter, answered: Counter) -> None:
    for (_, frame), envelope in zip(frames, envelopes):
        parts = {"normal": [b"", frame], "extra_frame": [b"", frame, b"x"], "no_delimiter": [frame],
                 "empty_payload": [b""]}[envelope]
        sock.send_multipart(parts)
    for category, _ in frames:
        if not sock.poll(5000, zmq.POLLIN):
            raise RuntimeError(f"no reply to a {category} frame within 5 s: the agent is stuck or dead")
        raw = sock.recv_multipart()[-1]
        reply = json.loads(raw)
        codes["ok" if reply.get("ok") else reply["error"]["code"]] += 1
        codes["_with_traceback"] += b"Traceback" in raw
        answered[category] += 1


def _transport_oversize(endpoint: str, count: int) -> int:
    """Frames over ZMQ_MAXMSGSIZE, each on its own socket: zmq drops the peer, nobody answers."""
    context = zmq.Context.instance()
    unanswered = 0
    for _ in range(count):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart([b"", b"{" + b" " * (MAX_FRAME_BYTES + 1024) + b"}"])
        unanswered += not sock.poll(300, zmq.POLLIN)
        sock.close(0)
    return unanswered


def run(frames: int = 100_000, seed: int = 0, event_share: float = 0.3, batch: int = 200) -> dict[str, Any]:
    """Send ``frames`` hostile frames (``event_share`` of them on the event socket) to a sim agent."""
    rng = random.Random(seed)
    with short_dir() as runtime_dir, start_agent("sim", gpus=2, runtime_dir=runtime_dir) as agent:
        holder = AgentClient(agent.endpoint, job_id="legit", rank=0)
        observer = AgentClient(agent.endpoint, job_id="observer", rank=-1)
        info = holder.hello()
        uuids = [g.uuid for g in info.gpus]
        lease = holder.claim(uuids[0])
        replayed = observer.claim(uuids[1])
        observer.release()
        status = observer.status()
        gen = _Gen(rng, uuids, status["gpus"][0]["holder"], replayed, lease)
        result = _fuzz(agent, gen, frames, event_share, batch)
        status = observer.status()
        result.update(
            scenario="fuzz", backend="sim", seed=seed, agent_alive=agent.process.poll() is None,
            holder_lease_intact=status["gpus"][0]["holder"] == gen.holder and holder.lease_id == lease,
            clock_changes=sum(g["clock_changes"] for g in status["gpus"]),
            locked_gpus=sum(g["locked"] for g in status["gpus"]),
            agent_counters=status["counters"],
        )
        holder.close()
        observer.close()
    return result


def _fuzz(agent: Any, gen: _Gen, frames: int, event_share: float, batch: int) -> dict[str, Any]:
    context = zmq.Context.instance()
    control = context.socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    control.connect(agent.endpoint)
    events = context.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 5000)
    events.connect(agent.endpoint.replace("control.sock", "events.sock"))
    with AgentClient(agent.endpoint, job_id="counter", rank=-1) as probe:
        events_before = probe.status()["counters"]["events_received"]
    rss_before = rss_kib(agent.pid)
    cpu_before_s, started_s = cpu_s(agent.pid), time.monotonic()
    control_names, control_weights = list(_CONTROL), [w for w, _ in _CONTROL.values()]
    event_names, event_weights = list(_EVENT), [w for w, _ in _EVENT.values()]
    sent, answered, codes, rss_peak = Counter(), Counter(), Counter(), rss_before
    remaining = frames
    while remaining > 0:
        n = min(batch, remaining)
        remaining -= n
        n_events = sum(gen.rng.random() < event_share for _ in range(n))
        for name in gen.rng.choices(event_names, event_weights, k=n_events):
            events.send(_EVENT[name][1](gen))
            sent[name] += 1
        names = gen.rng.choices(control_names, control_weights, k=n - n_events)
        batch_frames = [(name, _CONTROL[name][1](gen)) for name in names]
        envelopes = [gen.rng.choice(_ENVELOPES) for _ in batch_frames]
        sent.update(names)
        sent.update(f"envelope:{e}" for e in envelopes)
        _control_batch(control, batch_frames, envelopes, codes, answered)
        rss_peak = max(rss_peak, rss_kib(agent.pid))
    control.close(0)
    oversize_transport = max(1, frames // 2000)
    unanswered_transport = _transport_oversize(agent.endpoint, oversize_transport)
    events.close()  # lingers until every event is handed over
    events_sent = sum(sent[name] for name in _EVENT)
    with AgentClient(agent.endpoint, job_id="counter", rank=-1) as probe:
        deadline_s = time.monotonic() + 10
        while probe.status()["counters"]["events_received"] - events_before < events_sent:
            if time.monotonic() > deadline_s:
                break
            time.sleep(0.01)
        counters = probe.status()["counters"]
    duration_s = time.monotonic() - started_s
    control_sent = frames - events_sent
    return {
        "frames": frames + oversize_transport, "control_frames": control_sent,
        "control_answered": sum(answered.values()), "replies_with_traceback": codes.pop("_with_traceback", 0),
        "reply_codes": dict(codes),
        "event_frames": events_sent, "events_counted": counters["events_received"] - events_before,
        "events_malformed": counters["events_malformed"], "events_no_lease": counters["events_no_lease"],
        "transport_oversize_sent": oversize_transport, "transport_oversize_unanswered": unanswered_transport,
        "sent_by_category": dict(sent), "rss_kib_before": rss_before, "rss_kib_peak": rss_peak,
        "rss_kib_after": rss_kib(agent.pid), "agent_cpu_s": round(cpu_s(agent.pid) - cpu_before_s, 2),
        "duration_s": round(duration_s, 1), "frames_per_s": round(frames / duration_s),
    }
