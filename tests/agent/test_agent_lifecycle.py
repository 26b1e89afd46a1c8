"""How the agent starts and stops under a hostile node (issue 12, items 6, 7, 9): signals, its runtime
directory, a second agent on the same GPUs, a set in flight at shutdown, what it logs, who it refuses."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from envpipe_agent.client import AgentClient
from envpipe_agent.embedded import agent_command, start_agent
from envpipe_agent.main import install_signal_handlers, terminating_signals
from envpipe_agent.sim import SimBackend
from envpipe_agent.worker import GpuWorker
from tests.agent.conftest import ThreadAgent, run_as, wait_for


def test_every_terminating_signal_is_handled() -> None:
    handled = set(terminating_signals())
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
                 "SIGPROF", "SIGXCPU", "SIGXFSZ", "SIGIO", "SIGPWR"):
        assert getattr(signal, name) in handled, name
    assert set(range(signal.SIGRTMIN, signal.SIGRTMAX + 1)) <= handled
    assert not handled & {signal.SIGCHLD, signal.SIGWINCH, signal.SIGCONT, signal.SIGURG, signal.SIGPIPE}
    previous = {signum: signal.getsignal(signum) for signum in handled}
    try:
        install_signal_handlers(threading.Event())
        assert all(callable(signal.getsignal(signum)) for signum in handled)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.slow  # an agent subprocess
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_sighup_and_sigusr1_reset_the_clocks_and_exit_for_a_restart(fake_nvml, short_dir, signum) -> None:
    state, env = fake_nvml
    agent = start_agent("nvml", runtime_dir=short_dir, env=env)
    try:
        with AgentClient(agent.endpoint, job_id="j", rank=0) as client:
            client.claim(client.hello().gpus[0].uuid)
            client.set_clock(1200)
            wait_for(lambda: state.gpu(0)["locked"] == 1)
            agent.process.send_signal(signum)
            assert agent.process.wait(10) == 128 + signum  # not a clean stop: systemd restarts it
        assert state.gpu(0)["locked"] == 0
    finally:
        agent.stop()


@pytest.mark.slow  # an agent subprocess
def test_a_symlinked_runtime_dir_is_refused(short_dir: str) -> None:
    target = os.path.join(short_dir, "elsewhere")
    os.mkdir(target)
    link = os.path.join(short_dir, "run")
    os.symlink(target, link)
    result = subprocess.run(agent_command("sim", 1, link, []), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "symlink" in result.stderr
    assert os.listdir(target) == []


@pytest.mark.slow  # an agent subprocess
def test_a_runtime_dir_of_another_user_is_never_written(short_dir: str, second_user: pwd.struct_passwd) -> None:
    victim = Path(short_dir, "victim")
    victim.write_text("precious")
    run_dir = Path(short_dir, "run")
    run_dir.mkdir()
    os.symlink(victim, run_dir / "agent.lock")  # root used to open (and truncate) whatever this points to
    os.chown(run_dir, second_user.pw_uid, second_user.pw_gid)
    result = subprocess.run(agent_command("sim", 1, str(run_dir), []), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"belongs to uid {second_user.pw_uid}" in result.stderr
    assert victim.read_text() == "precious"


@pytest.mark.slow  # an agent subprocess
def test_a_second_agent_on_the_same_gpus_is_refused(fake_nvml, short_dir) -> None:
    _state, env = fake_nvml
    with start_agent("nvml", runtime_dir=os.path.join(short_dir, "a"), env=env):
        second = subprocess.run(
            agent_command("nvml", 1, os.path.join(short_dir, "b"), []),
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert second.returncode == 2 and "already drives GPU" in second.stderr


class _SlowSet(SimBackend):
    """A sim backend whose clock sets hang until released (an NVML call that outlasts stop()'s join)."""

    def __init__(self) -> None:
        super().__init__(gpus=1)
        self.entered, self.release = threading.Event(), threading.Event()
        self.order: list[str] = []

    def set_locked_clock(self, index: int, clock_mhz: int) -> None:
        self.entered.set()
        self.release.wait(10)
        super().set_locked_clock(index, clock_mhz)
        self.order.append(f"set {clock_mhz}")

    def reset_clocks(self, index: int) -> None:
        super().reset_clocks(index)
        self.order.append("reset")


def test_a_clock_set_in_flight_at_shutdown_cannot_land_after_the_reset() -> None:
    backend = _SlowSet()
    worker = GpuWorker(backend, 0)
    worker.start()
    worker.mailbox.put(1200, time.monotonic_ns())
    assert backend.entered.wait(5)
    worker.stop(timeout_s=0.05)  # the join gives up while the set is still in NVML
    threading.Timer(0.2, backend.release.set).start()
    worker.reset_now(final=True)  # waits for the set, then resets: the reset is last
    worker.mailbox.put(990, time.monotonic_ns())  # nothing after the final reset
    worker._apply(990, time.monotonic_ns())
    assert backend.order == ["set 1200", "reset"]


def test_the_lease_id_is_never_logged_at_info(short_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    agent = ThreadAgent(short_dir)
    client = AgentClient(agent.endpoint, job_id="j", rank=0, timeout_s=0.5)
    try:
        first = client.claim(client.hello().gpus[0].uuid)
        agent.stop()
        agent = ThreadAgent(short_dir)  # a restart: the client claims again by itself and says so
        wait_for(lambda: client.lease_id not in (0, first), 10)
        second = client.lease_id
        client.release()
    finally:
        client.close()
        agent.stop()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("claimed again" in message for message in loud)
    assert not [m for m in loud if str(first) in m or str(second) in m]


_PROBE = """
import sys
from envpipe_agent.client import AgentClient
from envpipe_agent.errors import AgentUnavailable
try:
    AgentClient(sys.argv[1], job_id="probe", rank=0, timeout_s=0.5).hello()
    print("connected")
except AgentUnavailable as exc:
    print(exc)
"""


def test_a_user_outside_the_group_is_told_permission_denied(
    short_dir: str, second_user: pwd.struct_passwd
) -> None:
    agent = ThreadAgent(short_dir, socket_group="root")
    try:
        refused = run_as(second_user, _PROBE, agent.endpoint).stdout
        admitted = run_as(second_user, _PROBE, agent.endpoint, groups=(second_user.pw_gid, 0)).stdout
    finally:
        agent.stop()
    assert refused.startswith("permission denied") and "usermod -aG root" in refused
    assert admitted.strip() == "connected"


@pytest.mark.slow  # an agent subprocess
def test_an_agent_started_from_a_thread_outlives_that_thread(short_dir: str) -> None:
    """PR_SET_PDEATHSIG fires when the parent *thread* ends; a supervisor thread's agent must live on."""
    started = []
    thread = threading.Thread(target=lambda: started.append(start_agent(gpus=1, runtime_dir=short_dir)))
    thread.start()
    thread.join(30)
    agent = started[0]
    try:
        time.sleep(0.5)
        assert agent.process.poll() is None
        with AgentClient(agent.endpoint, job_id="j", rank=0) as client:
            assert client.hello().gpus
    finally:
        assert agent.stop() == 0
