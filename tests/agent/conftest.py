"""Fixtures for the agent tests: an in-process sim agent served on a thread over ipc in a short temp dir."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest

from envpipe_agent.config import resolve_config
from envpipe_agent.server import Agent
from envpipe_agent.sim import SimBackend


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short temporary directory (ipc paths must stay under ~100 characters)."""
    path = tempfile.mkdtemp(prefix="ep-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class ThreadAgent:
    """An Agent served on a background thread; ``endpoint`` is its control endpoint."""

    def __init__(self, runtime_dir: str, **overrides: object) -> None:
        values = {
            "backend": "sim",
            "gpus": 2,
            "runtime_dir": runtime_dir,
            "lease_timeout_s": 0.5,
            "socket_group": grp.getgrgid(os.getegid()).gr_name,
            # off unless a test turns it on: this agent lives in the test process, whose memory is pytest's
            "memory_guard_mb": 0,
            **overrides,
        }
        self.config = resolve_config("", values)
        self.backend = SimBackend(gpus=self.config.gpus)
        self.agent = Agent(self.config, self.backend)
        self.endpoint = self.config.control_endpoint()
        self._stop = threading.Event()
        ready = threading.Event()
        self._thread = threading.Thread(target=self.agent.serve, args=(self._stop, ready.set), daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("agent thread did not become ready")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def sim_agent(short_dir: str) -> Iterator[ThreadAgent]:
    agent = ThreadAgent(short_dir)
    yield agent
    agent.stop()


@pytest.fixture
def make_sim_agent(short_dir: str) -> Iterator[Callable[..., ThreadAgent]]:
    """Start sim agents with config overrides (all stopped at teardown)."""
    started: list[ThreadAgent] = []

    def make(**overrides: object) -> ThreadAgent:
        agent = ThreadAgent(short_dir, **overrides)
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module")
def module_sim_agent() -> Iterator[ThreadAgent]:
    """One sim agent for a whole module (hypothesis runs many examples against it)."""
    directory = tempfile.mkdtemp(prefix="ep-")
    agent = ThreadAgent(directory)
    yield agent
    agent.stop()
    shutil.rmtree(directory, ignore_errors=True)


# -- fake NVML -------------------------------------------------------------------------------------------
_HEADER = struct.Struct("<IIQ")
_GPU = struct.Struct("<IIIIQQQQQQ")
_GPU_FIELDS = (
    "locked",
    "min_mhz",
    "max_mhz",
    "sm_mhz",
    "set_calls",
    "reset_calls",
    "bad_calls",
    "last_set_ns",
    "energy_uj",
    "energy_ns",
)


class FakeNvmlState:
    """Reads (and pre-seeds) the fake library's state file (layout: struct fake_state in fake_nvml.c)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def gpu(self, index: int) -> dict[str, int]:
        with open(self.path, "rb") as handle:
            data = handle.read()
        values = _GPU.unpack_from(data, _HEADER.size + index * _GPU.size)
        return dict(zip(_GPU_FIELDS, values, strict=True))

    def seed_locked(self, ngpus: int, clock_mhz: int) -> None:
        """Write a state with every GPU locked at ``clock_mhz``, as a crashed agent would leave it."""
        data = bytearray(_HEADER.size + 8 * _GPU.size)
        _HEADER.pack_into(data, 0, 0x4E564D4C, ngpus, 0)
        for index in range(8):
            _GPU.pack_into(
                data,
                _HEADER.size + index * _GPU.size,
                1,
                clock_mhz,
                clock_mhz,
                clock_mhz,
                0,
                0,
                0,
                0,
                0,
                time.monotonic_ns(),
            )
        with open(self.path, "wb") as handle:
            handle.write(data)


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build tests/agent/fake_nvml.c into <dir>/libnvidia-ml.so.1 with gcc (skip without gcc)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("needs gcc to build the fake libnvidia-ml.so.1")
    out_dir = tmp_path_factory.mktemp("fakenvml")
    source = Path(__file__).with_name("fake_nvml.c")
    subprocess.run(
        [
            gcc,
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Werror",
            "-o",
            str(out_dir / "libnvidia-ml.so.1"),
            str(source),
        ],
        check=True,
    )
    return str(out_dir)


@pytest.fixture
def fake_nvml(fake_nvml_dir: str, short_dir: str) -> tuple[FakeNvmlState, dict[str, str]]:
    """A fresh fake-NVML state and the environment that makes a subprocess load the fake library."""
    state_path = os.path.join(short_dir, "nvml.state")
    env = dict(
        os.environ,
        LD_LIBRARY_PATH=fake_nvml_dir,
        ENVPIPE_FAKE_NVML_STATE=state_path,
        ENVPIPE_FAKE_NVML_GPUS="2",
        # UUIDs of this test's own (agents lock GPUs by UUID node-wide; parallel runs must not collide)
        ENVPIPE_FAKE_NVML_UUID_TAG=os.urandom(4).hex(),
    )
    return FakeNvmlState(state_path), env


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until true (tests of cross-process effects)."""
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline_s:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture
def waiter() -> Callable[..., None]:
    return wait_for


# -- a second real Unix user (access control) ---------------------------------------------------------------
SECOND_USER = "envpipe-peer"


@pytest.fixture(scope="session")
def second_user() -> pwd.struct_passwd:
    """A real second Unix user (created with useradd once; kept), whose processes run this checkout's Python.

    Skips where that cannot be: not root (useradd and switching uid need root), no useradd/setpriv, or the
    checkout not readable by other users.
    """
    if os.geteuid() != 0:
        pytest.skip("access control needs a second Unix user: run the tests as root (useradd, setpriv)")
    if shutil.which("useradd") is None or shutil.which("setpriv") is None:
        pytest.skip("needs useradd and setpriv (passwd, util-linux) to run a client as a second user")
    try:
        pwd.getpwnam(SECOND_USER)
    except KeyError:
        # --user-group: its own group, which the tests make the socket group. A concurrent run may win.
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", SECOND_USER],
            capture_output=True,
            check=False,
        )
    user = pwd.getpwnam(SECOND_USER)
    probe = run_as(user, "import envpipe_agent.client", groups=())
    if probe.returncode != 0:
        pytest.skip(f"user {SECOND_USER} cannot import this checkout (file permissions): {probe.stderr[-200:]}")
    return user


def run_as(
    user: pwd.struct_passwd,
    code: str,
    *args: str,
    groups: tuple[int, ...] | None = None,
    timeout_s: float = 60,
    background: bool = False,
) -> Any:
    """Run ``python -c code args...`` as ``user`` (its own group, plus ``groups``; None = only its group);
    the CompletedProcess, or with ``background`` the running Popen."""
    group_args = ["--groups", ",".join(str(g) for g in groups)] if groups else ["--clear-groups"]
    command = ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), *group_args]
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "ENVPIPE_AGENT")}
    if background:
        return subprocess.Popen(
            [*command, sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd="/",
        )
    return subprocess.run(
        [*command, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd="/",
    )
