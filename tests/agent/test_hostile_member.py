"""A hostile member of the socket group (a second real Unix user) against a root agent (issue 12, items 2-5).

The agent runs in this (root) process; the attacker is a subprocess of the second user, in the socket group.
Every flood is bounded in count and time (seconds in all).
"""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path

import pytest
import zmq

from envpipe_agent.client import AgentClient
from envpipe_agent.errors import LeaseError
from envpipe_agent.leases import Reservations
from envpipe_agent.protocol import CONTROL_HWM, CONTROL_SNDHWM, MAX_CONTROL_FRAMES, encode_request

from tests.agent.conftest import ThreadAgent, run_as, wait_for

# The attacker: raw DEALER requests, each answered with its error code (or "ok").
_ATTACK = """
import json, os, sys, zmq
from envpipe_agent.protocol import encode_request
endpoint, gpu0, gpu1, victim_lease, victim_pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
def call(op, **args):
    sock.send_multipart([b"", encode_request(1, op, args)])
    if not sock.poll(5000):
        return "timeout"
    reply = json.loads(sock.recv_multipart()[-1])
    return reply["result"] if reply["ok"] else reply["error"]["code"]
out = {
    "claim_pid_1": call("claim", gpu_uuid=gpu1, job_id="x", rank=0, pid=1),
    "claim_victim_pid": call("claim", gpu_uuid=gpu1, job_id="x", rank=0, pid=victim_pid),
    "heartbeat": call("heartbeat", lease_id=victim_lease),
    "set_clock": call("set_clock", lease_id=victim_lease, clock_mhz=345),
    "window_begin": call("window_begin", lease_id=victim_lease),
    "release": call("release", lease_id=victim_lease),
    "claim_own_pid": call("claim", gpu_uuid=gpu1, job_id="x", rank=0, pid=os.getpid()),
}
print(json.dumps(out), flush=True)
sys.stdin.read()  # hold the lease (its pid alive) until the test is done
"""


@pytest.fixture
def group_agent(short_dir: str, second_user: pwd.struct_passwd):
    """A root sim agent whose socket group is the second user's group."""
    group = __import__("grp").getgrgid(second_user.pw_gid).gr_name
    agent = ThreadAgent(short_dir, socket_group=group, max_connections_per_uid=8, lease_timeout_s=1.0)
    yield agent
    agent.stop()


def test_another_uid_can_neither_use_a_lease_nor_claim_for_another_users_pid(
    group_agent: ThreadAgent, second_user: pwd.struct_passwd
) -> None:
    with AgentClient(group_agent.endpoint, job_id="victim", rank=0) as victim:
        gpus = victim.hello().gpus
        lease_id = victim.claim(gpus[0].uuid)  # the id leaked: a uid-bound lease is still useless to others
        victim.set_clock(1410)
        attacker = run_as(
            second_user,
            _ATTACK,
            group_agent.endpoint,
            gpus[0].uuid,
            gpus[1].uuid,
            str(lease_id),
            str(os.getpid()),
            background=True,
        )
        try:
            out = json.loads(attacker.stdout.readline() or "null")
        finally:
            attacker.kill()
            attacker.communicate()
        assert out is not None, "the attacker script failed"
        refused = {key: out[key] for key in out if key != "claim_own_pid"}
        assert refused == dict.fromkeys(refused, "not_permitted")
        assert isinstance(out["claim_own_pid"], dict)  # its own pid: granted, bound to its uid
        status = victim.status()
        assert status["gpus"][0]["holder"]["job_id"] == "victim"  # the victim's lease is intact ...
        assert status["gpus"][0]["target_mhz"] == 1410  # ... and so is its clock
        assert status["counters"]["requests_not_permitted"] == len(refused)
        # Root may administer: use the other user's lease with its id (while it lasts: its pid was killed).
        try:
            victim.call("heartbeat", {"lease_id": out["claim_own_pid"]["lease_id"]})
        except LeaseError as exc:
            assert exc.code == "unknown_lease"


_CONNECT_FLOOD = """
import socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
time.sleep(1.0)  # the agent's loop reads the accepts from its monitor
closed = 0
for s in socks:
    try:
        while s.recv(1 << 16, socket.MSG_DONTWAIT):  # zmq's greeting, then the end of the stream if shut
            pass
        closed += 1
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(closed)
"""


def test_connections_over_the_per_uid_cap_are_shut_down_at_accept(
    group_agent: ThreadAgent, second_user: pwd.struct_passwd
) -> None:
    control = group_agent.endpoint[len("ipc://") :]
    result = run_as(second_user, _CONNECT_FLOOD, control, "40")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 40 - 8  # all but the cap's 8 were closed by the agent
    counters = group_agent.agent.status()["counters"]
    assert counters["connections_refused"] >= 32
    with AgentClient(group_agent.endpoint, job_id="other", rank=0) as client:
        assert client.hello().gpus  # other users are still served


# Raw ZMTP 3.0 (libzmq's client side would buffer an unfinished message itself): greeting, READY as a
# DEALER, then frames that all say "more follows", so the agent's libzmq holds them all.
_HALF_MESSAGE = """
import socket, struct, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(b"\\xff" + b"\\0" * 8 + b"\\x7f" + b"\\x03\\x00" + b"NULL".ljust(20, b"\\0") + b"\\0" * 32)
body = b"\\x05READY" + b"\\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
sock.sendall(b"\\x04" + bytes([len(body)]) + body)
sock.settimeout(5)
seen = b""
while b"READY" not in seen:  # the agent's greeting and READY: the handshake is done
    seen += sock.recv(4096)
frame = b"\\x03" + struct.pack(">Q", 60000) + b"x" * 60000  # MORE | LONG
sent = 0
sock.settimeout(5)
try:
    for _ in range(int(sys.argv[2])):
        sock.sendall(frame)
        sent += 1
except OSError as exc:
    print(repr(exc), flush=True)
print(sent, flush=True)
sys.stdin.read()
"""


def test_the_memory_guard_sheds_a_never_ending_message(
    short_dir: str, second_user: pwd.struct_passwd
) -> None:
    from envpipe_agent.peers import rss_bytes

    group = __import__("grp").getgrgid(second_user.pw_gid).gr_name
    guard_mb = (rss_bytes() >> 20) + 48
    agent = ThreadAgent(short_dir, socket_group=group, memory_guard_mb=guard_mb)
    try:
        attacker = run_as(second_user, _HALF_MESSAGE, agent.endpoint[6:], "2000", background=True)  # 120 MB
        try:
            for _ in range(200):
                if agent.agent.status()["counters"]["memory_guard_trips"]:
                    break
                time.sleep(0.1)
        finally:
            attacker.kill()
            sent = attacker.communicate()
        counters = agent.agent.status()["counters"]
        assert counters["memory_guard_trips"] >= 1, sent
        assert counters["connections_shed"] >= 1
        with AgentClient(agent.endpoint, job_id="other", rank=0) as client:  # root: never shed
            assert client.hello().gpus
    finally:
        agent.stop()


def test_a_message_of_too_many_frames_is_dropped_unanswered(sim_agent: ThreadAgent) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sim_agent.endpoint)
    try:
        sock.send_multipart([b""] + [b"x"] * MAX_CONTROL_FRAMES + [encode_request(1, "hello")])
        sock.send_multipart([b"", encode_request(2, "hello")])
        assert sock.poll(5000)
        assert json.loads(sock.recv_multipart()[-1])["id"] == 2  # the long message got no reply
    finally:
        sock.close(0)
    assert sim_agent.agent.status()["counters"]["control_messages_too_long"] == 1


def test_control_queues_are_small(sim_agent: ThreadAgent) -> None:
    control = sim_agent.agent.control_sock
    assert control is not None
    assert (control.getsockopt(zmq.RCVHWM), control.getsockopt(zmq.SNDHWM)) == (CONTROL_HWM, CONTROL_SNDHWM)
    assert CONTROL_SNDHWM <= 64  # zmq's default was 1 000 each way


def test_a_forged_events_sent_does_not_stall_the_loop(sim_agent: ThreadAgent) -> None:
    with AgentClient(sim_agent.endpoint, job_id="j", rank=0) as client:
        lease_id = client.claim(client.hello().gpus[0].uuid)
        client.call("set_clock", {"lease_id": lease_id, "clock_mhz": 1410, "events_sent": 10**12})
        for _ in range(20):  # each would wait CATCH_UP_S (0.1 s) for events that never come
            client.call("heartbeat", {"lease_id": lease_id})
            client.call("set_clock", {"lease_id": lease_id, "clock_mhz": 1410, "events_sent": 50})
        skipped = client.status()["counters"]["catch_up_skipped"]
    assert skipped >= 1 + 15, (sim_agent.agent._catch_up_spent, sim_agent.agent.leases.by_id)  # see above


def test_the_gpu_of_a_holder_lost_in_a_restart_is_kept_for_its_uid(
    short_dir: str, second_user: pwd.struct_passwd
) -> None:
    from envpipe_agent.sim import sim_uuid

    Path(short_dir, "leases.json").write_text(json.dumps({"holders": {sim_uuid(0): 4242}}))
    os.chmod(os.path.join(short_dir, "leases.json"), 0o600)
    group = __import__("grp").getgrgid(second_user.pw_gid).gr_name
    agent = ThreadAgent(short_dir, socket_group=group, lease_timeout_s=1.0)
    claim = (
        "import os, sys\nfrom envpipe_agent.client import AgentClient\nfrom envpipe_agent.errors import LeaseError\n"
        "c = AgentClient(sys.argv[1], job_id='late', rank=0)\n"
        "try:\n    c.claim(sys.argv[2]); print('granted')\nexcept LeaseError as e:\n    print(e.code, e)\n"
        "c.close()\n"
    )
    try:
        first = run_as(second_user, claim, agent.endpoint, sim_uuid(0)).stdout
        assert first.startswith("lease_held") and "uid 4242" in first
        time.sleep(1.1)  # one lease timeout
        assert run_as(second_user, claim, agent.endpoint, sim_uuid(0)).stdout.strip() == "granted"
        assert agent.agent.status()["counters"]["claims_reserved"] == 1
    finally:
        agent.stop()


def test_holders_are_recorded_for_the_next_agent(sim_agent: ThreadAgent, short_dir: str) -> None:
    with AgentClient(sim_agent.endpoint, job_id="j", rank=0) as client:
        lease_id = client.claim(client.hello().gpus[1].uuid)
        path = Path(short_dir, "leases.json")
        recorded = json.loads(path.read_text())
        assert recorded == {"holders": {client.hello().gpus[1].uuid: os.getuid()}}
        assert str(lease_id) not in path.read_text()  # the lease id is a credential: never on disk
        assert path.stat().st_mode & 0o777 == 0o600


def test_reservations_expire_and_root_passes() -> None:
    reservations = Reservations({"GPU-a": 1000}, timeout_s=60)
    assert reservations.blocks("GPU-a", 1001) == 1000
    assert reservations.blocks("GPU-a", 0) is None  # root administers
    assert reservations.blocks("GPU-a", 1000) is None  # its holder's uid ends it
    assert reservations.blocks("GPU-a", 1001) is None
    assert Reservations({"GPU-b": 1000}, timeout_s=0).blocks("GPU-b", 1001) is None
