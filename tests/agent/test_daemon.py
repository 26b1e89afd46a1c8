"""Daemon plumbing end to end: sd_notify, Prometheus, the single-instance lock, and socket access by uid."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest

from envpipe_agent.embedded import agent_command, start_agent

pytestmark = pytest.mark.slow

_PROBE = """
import sys
from envpipe_agent.client import AgentClient
from envpipe_agent.errors import AgentUnavailable
try:
    AgentClient(sys.argv[1], job_id="probe", rank=0, timeout_s=1.0).hello()
    print("connected")
except AgentUnavailable:
    print("refused")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sd_notify_ready_and_stopping(short_dir: str) -> None:
    notify_path = os.path.join(short_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify_path)
        listener.settimeout(10)
        agent = start_agent(
            gpus=1,
            runtime_dir=os.path.join(short_dir, "run"),
            env=dict(os.environ, NOTIFY_SOCKET=notify_path),
        )
        try:
            assert listener.recv(64) == b"READY=1"
        finally:
            assert agent.stop() == 0
        assert listener.recv(64) == b"STOPPING=1"


def test_prometheus_serves_the_status_on_loopback(short_dir: str) -> None:
    port = _free_port()
    with start_agent(gpus=2, runtime_dir=short_dir, extra_args=["--prometheus-port", str(port)]):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'envpipe_gpu_sm_clock_hertz{gpu="1"' in body and 'simulated="true"' in body
    assert "envpipe_agent_events_received_total" in body


def test_a_second_agent_on_the_same_sockets_is_refused(short_dir: str) -> None:
    with start_agent(gpus=1, runtime_dir=short_dir):
        second = subprocess.run(
            agent_command("sim", 1, short_dir, []), capture_output=True, text=True, timeout=20
        )
    assert second.returncode == 2
    assert "another envpipe-agent" in second.stderr


def _as_nobody(endpoint: str, *groups: str) -> str:
    group_args = ["--groups", ",".join(groups)] if groups else ["--clear-groups"]
    command = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        *group_args,
        sys.executable,
        "-c",
        _PROBE,
        endpoint,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()


def test_another_uid_cannot_connect_but_a_group_member_can(short_dir: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (setpriv); run the suite as root to cover this")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run a client as another uid")
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "import envpipe_agent.client",
        ],
        capture_output=True,
        timeout=20,
    )
    if probe.returncode != 0:
        pytest.skip(
            "uid 65534 cannot run this Python/checkout (file permissions), so it cannot probe the socket"
        )
    os.chmod(short_dir, 0o755)  # the agent tightens it to 0750 with its socket group
    with start_agent(gpus=1, runtime_dir=short_dir, extra_args=["--socket-group", "root"]) as agent:
        assert _as_nobody(agent.endpoint) == "refused"
        assert _as_nobody(agent.endpoint, "0") == "connected"


def test_configured_socket_group_owns_dir_and_sockets(short_dir: str) -> None:
    import grp
    import stat

    if os.geteuid() != 0:
        pytest.skip("giving files to another group needs root (or membership); run as root to cover this")
    try:
        group = grp.getgrnam("nogroup")
    except KeyError:
        pytest.skip("no group 'nogroup' on this machine to hand the sockets to")
    with start_agent(gpus=1, runtime_dir=short_dir, extra_args=["--socket-group", "nogroup"]):
        for name, mode in (("", 0o750), ("control.sock", 0o660), ("events.sock", 0o660)):
            info = os.stat(os.path.join(short_dir, name))
            assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (group.gr_gid, mode), name


def test_unknown_socket_group_exits_2(short_dir: str) -> None:
    result = subprocess.run(
        [*agent_command("sim", 1, short_dir, []), "--socket-group", "no-such-group-x"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2 and "no-such-group-x" in result.stderr


_PARENT = """
import sys, time
from envpipe_agent.embedded import start_agent
agent = start_agent(gpus=1, runtime_dir=sys.argv[1])
print(agent.pid, flush=True)
time.sleep(60)
"""


def test_embedded_agent_stops_when_its_parent_dies(short_dir: str) -> None:
    import signal
    import time

    from envpipe_agent.leases import pid_alive

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, short_dir], stdout=subprocess.PIPE, text=True)
    try:
        agent_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline_s = time.monotonic() + 5
        while pid_alive(agent_pid) and time.monotonic() < deadline_s:
            time.sleep(0.05)
            try:
                os.waitpid(agent_pid, os.WNOHANG)  # reap if it became our child (it does not: init adopts it)
            except ChildProcessError:
                pass
        assert not pid_alive(agent_pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
