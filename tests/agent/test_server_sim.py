"""Claim, phase, release and energy windows against an in-process sim agent over ipc."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
import zmq

from envpipe_agent.client import AgentClient
from envpipe_agent.errors import AgentError, LeaseError
from envpipe_agent.protocol import EVENT_BEGIN, encode_event


def _wait_for(predicate, timeout_s: float = 3.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline_s:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture
def client(sim_agent):
    c = AgentClient(sim_agent.endpoint, job_id="job-a", rank=0)
    yield c
    c.close()


def test_hello_lists_simulated_gpus(sim_agent, client) -> None:
    info = client.hello()
    assert info.backend == "sim" and info.simulated
    assert len(info.gpus) == 2 and info.gpus[0].uuid.startswith("GPU-")
    assert info.gpus[0].clocks_mhz[0] == 1980 and info.gpus[0].clocks_mhz[-1] == 345


def test_claim_phase_release_resets(sim_agent, client) -> None:
    uuid = client.hello().gpus[1].uuid
    client.claim(uuid)
    client.phase("F0", "begin", 1410)
    client.phase("F0", "end", 0)
    _wait_for(lambda: sim_agent.backend.read_clock_mhz(1) == 1410)
    assert sim_agent.backend.is_locked(1)
    client.release()
    _wait_for(lambda: not sim_agent.backend.is_locked(1))
    assert sim_agent.backend.read_clock_mhz(1) == 1980
    assert sim_agent.agent.counters["leases_released"] == 1


def test_duplicate_clocks_are_skipped_and_others_snapped(sim_agent, client) -> None:
    client.claim(client.hello().gpus[0].uuid)
    for _ in range(5):
        client.phase("B1", "begin", 1410)
    # The mailbox keeps only the latest target, so let 1410 land before asking for more.
    _wait_for(lambda: sim_agent.backend.read_clock_mhz(0) == 1410)
    client.phase("B2", "begin", 1412)  # not a supported clock: snapped to 1410, a duplicate
    # Wait, or 5000 may supersede 1412 within one drained batch before 1412 is snapped.
    _wait_for(lambda: sim_agent.agent.stats[0].events == 6)
    client.phase("B3", "begin", 5000)  # above the top clock: snapped to 1980
    _wait_for(lambda: sim_agent.agent.stats[0].events == 7)
    _wait_for(lambda: sim_agent.backend.read_clock_mhz(0) == 1980)
    sets = [call for call in sim_agent.backend.calls if call[0] == "set"]
    assert sets == [("set", 0, 1410), ("set", 0, 1980)]
    stats = sim_agent.agent.stats[0]
    # 1410 five times, 1412 -> 1410 once: skipped as a duplicate, or superseded within a drained batch.
    assert stats.duplicates + stats.superseded == 5 and stats.snapped == 2


def test_second_claimant_is_refused_with_the_holder(sim_agent, client) -> None:
    uuid = client.hello().gpus[0].uuid
    client.claim(uuid)
    other = AgentClient(sim_agent.endpoint, job_id="job-b", rank=3)
    try:
        with pytest.raises(LeaseError, match=rf"job 'job-a' rank 0 pid {os.getpid()}"):
            other.claim(uuid)
    finally:
        other.close()


def test_events_of_a_non_holder_are_dropped_and_counted(sim_agent, client) -> None:
    client.claim(client.hello().gpus[0].uuid)
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(sim_agent.config.events_endpoint())
    bogus_lease = client.lease_id ^ 0x5A5A
    for _ in range(10):
        push.send(encode_event(EVENT_BEGIN, bogus_lease, 900, b"F0"))
    push.close()
    _wait_for(lambda: sim_agent.agent.counters["events_no_lease"] == 10)
    assert sim_agent.backend.read_clock_mhz(0) == 1980


def test_lease_expires_without_heartbeats_and_gpu_is_reset(sim_agent) -> None:
    c = AgentClient(sim_agent.endpoint, job_id="job-x", rank=0, timeout_s=1.0)
    c.claim(c.hello().gpus[0].uuid)
    c.phase("F0", "begin", 990)
    _wait_for(lambda: sim_agent.backend.is_locked(0))
    c._stop.set()  # silence the heartbeat thread, as a hung rank would be
    c._heartbeat.join()
    _wait_for(lambda: not sim_agent.backend.is_locked(0), timeout_s=2.0)
    assert sim_agent.agent.counters["leases_expired"] == 1
    c._heartbeat = None
    c.close()


def test_dead_holder_pid_releases_the_gpu(sim_agent, client) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    uuid = client.hello().gpus[0].uuid
    reply = client.call("claim", {"gpu_uuid": uuid, "job_id": "ghost", "rank": 0, "pid": dead_pid})
    assert reply["lease_id"]
    _wait_for(lambda: sim_agent.agent.counters["leases_expired"] == 1, timeout_s=1.0)


def test_energy_window_integrates_busy_and_idle(sim_agent, client) -> None:
    info = client.hello()
    client.claim(info.gpus[0].uuid)
    window = client.window_begin()
    client.phase("F0", "begin", 1980)
    time.sleep(0.2)
    client.phase("F0", "end", 0)
    time.sleep(0.2)
    result = client.window_end(window)
    assert result.simulated
    # ~0.2 s at 700 W busy + ~0.2 s at 126 W idle (0.18 x 700 W) = ~165 J (simulated); slack both ways.
    expected_j = 700 * 0.2 + 126 * 0.2
    assert 0.7 * expected_j < result.energy_j < 1.4 * expected_j
    assert 0.35 < result.duration_s < 0.6


def test_control_errors_are_replies_not_crashes(sim_agent, client) -> None:
    with pytest.raises(AgentError) as caught:
        client.call("window_end", {"lease_id": 1, "window_id": 1})
    assert caught.value.code == "unknown_lease"
    with pytest.raises(AgentError) as caught:
        client.call("claim", {"gpu_uuid": "GPU-nope", "job_id": "j", "rank": 0, "pid": 1})
    assert caught.value.code == "no_such_gpu"
    with pytest.raises(AgentError) as caught:
        client.call("claim", {"gpu_uuid": 3})
    assert caught.value.code == "bad_request"
    uuid = client.hello().gpus[0].uuid
    with pytest.raises(AgentError, match="at most 256"):
        client.call("claim", {"gpu_uuid": uuid, "job_id": "j" * 300, "rank": 0, "pid": os.getpid()})
    assert client.status()["counters"]["control_errors"] == 4


def test_sockets_are_group_restricted(sim_agent) -> None:
    runtime_dir = sim_agent.config.resolved_runtime_dir()
    assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o750
    for name in ("control.sock", "events.sock"):
        info = os.stat(os.path.join(runtime_dir, name))
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getegid()


def _free_port_pair() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports")


def test_tcp_endpoint_works_and_checks_no_pids(make_sim_agent) -> None:
    port = _free_port_pair()
    agent = make_sim_agent(endpoint=f"tcp://127.0.0.1:{port}", lease_timeout_s=1.0)
    assert agent.config.events_endpoint() == f"tcp://127.0.0.1:{port + 1}"
    assert not agent.agent.leases.check_pids  # a tcp peer's pid names a process on another host
    with AgentClient(agent.endpoint, job_id="remote", rank=0) as client:
        info = client.hello()
        assert info.event_endpoint == f"tcp://127.0.0.1:{port + 1}"
        reply = client.call(
            "claim", {"gpu_uuid": info.gpus[0].uuid, "job_id": "r", "rank": 1, "pid": 999_999_999}
        )
        time.sleep(0.3)
        assert agent.agent.leases.by_id.get(reply["lease_id"]) is not None  # not ended for its "dead" pid
        _wait_for(
            lambda: agent.agent.counters["leases_expired"] == 1, timeout_s=2.0
        )  # heartbeats still count


def test_min_max_allow_list_applies_to_the_sim(make_sim_agent) -> None:
    agent = make_sim_agent(min_mhz=1000, max_mhz=1200)
    with AgentClient(agent.endpoint, job_id="j", rank=0) as client:
        info = client.hello()
        assert (info.gpus[0].min_mhz, info.gpus[0].max_mhz) == (1005, 1200)
        client.claim(info.gpus[0].uuid)
        client.phase("F0", "begin", 1980)
        _wait_for(lambda: agent.backend.read_clock_mhz(0) == 1200)


def test_a_zombie_holder_counts_as_dead() -> None:
    import signal

    from envpipe_agent.leases import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        _wait_for(lambda: not pid_alive(child.pid), timeout_s=3.0)  # not reaped yet: a zombie
        assert child.poll() is not None
    finally:
        child.kill()
        child.wait()
    assert pid_alive(os.getpid()) and not pid_alive(0)


def test_release_and_windows_see_every_event_sent_before_them(sim_agent, client) -> None:
    # Events and requests travel on two sockets; a request names how many events preceded it, and the
    # agent processes those first, so none is counted as "no lease" after the release.
    client.claim(client.hello().gpus[0].uuid)
    for _round in range(3):
        for i in range(500):  # back to back: a burst past the event queue's bound is dropped and counted
            client.phase(f"F{i}", "begin" if i % 2 == 0 else "end", (1410, 1200)[i % 2])
        window = client.window_end(client.window_begin())
        assert window.simulated
        assert sim_agent.agent.leases.by_gpu[0].events == client.events_sent
    client.phase("B0", "begin", 990)
    sent = client.events_sent
    client.release()
    assert sim_agent.agent.stats[0].events == sent
    assert sent + client.events_dropped == 1501
    assert sim_agent.agent.counters["events_no_lease"] == 0
    assert sim_agent.backend.read_power_w(0) == pytest.approx(126.0)  # released: idle (0.18 x 700 W), though its last unit never ended


def test_a_client_claiming_unsent_events_stalls_the_agent_at_most_briefly(sim_agent, client) -> None:
    client.claim(client.hello().gpus[0].uuid)
    started_s = time.monotonic()
    client.call("window_begin", {"lease_id": client.lease_id, "events_sent": 10**9})
    assert time.monotonic() - started_s < 0.5  # CATCH_UP_S = 0.1 bounds the wait


def test_lease_ids_are_128_random_bits(sim_agent) -> None:
    # 32-bit ids fell to a flooder in the socket group within hours; 128 random bits never do.
    ids = []
    for _ in range(8):
        with AgentClient(sim_agent.endpoint, job_id="ids", rank=0) as c:
            ids.append(c.claim(c.hello().gpus[0].uuid))
    assert len(set(ids)) == len(ids)
    assert max(ids).bit_length() > 120  # P(all 8 below 2**120) = 2**-64
    assert sum(i.bit_count() for i in ids) / len(ids) == pytest.approx(64, abs=12)


def test_event_with_a_128_bit_lease_sets_the_clock(sim_agent, client) -> None:
    client.claim(client.hello().gpus[1].uuid)
    assert client.lease_id >= 1 << 32  # would not fit the old u32 field (P(not) = 2**-96)
    client.phase("F0", "begin", 990)
    _wait_for(lambda: sim_agent.backend.read_clock_mhz(1) == 990)
