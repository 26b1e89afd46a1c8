"""Start an agent as a subprocess: for ``envpipe train`` when no agent is reachable, and for tests.

The subprocess is ``python -m envpipe_agent`` with its sockets in a fresh private directory; ``stop()``
sends SIGTERM (the agent resets clocks and exits), waits, and removes the directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from envpipe_agent.errors import AgentError, AgentUnavailable


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``), even by SIGKILL.

    Nothing a parent starts then outlives it. Elsewhere a no-op.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class RunningAgent:
    """A started agent: ``endpoint`` is its control endpoint; ``stop()`` ends it (also on ``with`` exit)."""

    def __init__(self, process: subprocess.Popen, endpoint: str, runtime_dir: str, owns_dir: bool) -> None:
        self.process = process
        self.endpoint = endpoint
        self.runtime_dir = runtime_dir
        self._owns_dir = owns_dir

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout_s`` (then SIGKILL); returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._owns_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> RunningAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def agent_command(backend: str, gpus: int, runtime_dir: str, extra_args: Sequence[str]) -> list[str]:
    """The command line of an embedded agent: no system config file (``--config ''``), and it stops (resetting
    clocks) when this process is gone, so a crashed trainer leaves no agent behind."""
    command = [sys.executable, "-m", "envpipe_agent", "--config", "", "--backend", backend]
    command += ["--runtime-dir", runtime_dir, "--exit-with-pid", str(os.getpid())]
    if backend == "sim":
        command += ["--gpus", str(gpus)]
    return command + list(extra_args)


def start_agent(
    backend: str = "sim",
    gpus: int = 1,
    *,
    runtime_dir: str | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout_s: float = 15.0,
    log_path: str | None = None,
) -> RunningAgent:
    """Start ``python -m envpipe_agent`` and wait until it answers ``hello``.

    Args:
        backend: ``sim`` (default) or ``nvml``.
        gpus: number of simulated GPUs (sim only).
        runtime_dir: socket directory; default a fresh temporary directory removed by ``stop()``.
        extra_args: more agent flags, e.g. ``["--lease-timeout-s", "0.5"]``.
        env: environment of the subprocess (default: this process's).
        timeout_s: how long to wait for the agent to answer.
        log_path: file for the agent's stderr (default: inherited).

    Raises:
        AgentError: the agent exited or did not answer in time (its exit code is in the message).
    """
    from envpipe_agent.client import AgentClient

    owns_dir = runtime_dir is None
    directory = runtime_dir or tempfile.mkdtemp(prefix="envpipe-agent-")
    endpoint = f"ipc://{Path(directory) / 'control.sock'}"
    stderr = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child, closed below
    try:
        process = subprocess.Popen(
            agent_command(backend, gpus, directory, extra_args),
            env=env if env is not None else os.environ.copy(),
            stderr=stderr,
            # Its own session: a signal to the caller's process group (Ctrl-C, `timeout`) does not end it
            # before the caller's ranks have released their leases; it still ends with the caller.
            start_new_session=True,
            # PR_SET_PDEATHSIG fires when the parent *thread* ends: from another thread (a supervisor that
            # restarts the agent) the agent would get SIGTERM as soon as that thread returns. There,
            # --exit-with-pid (checked every 0.1 s) is what ends the agent with the caller.
            preexec_fn=die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
    finally:
        if stderr:
            stderr.close()
    agent = RunningAgent(process, endpoint, directory, owns_dir)
    deadline_s = time.monotonic() + timeout_s
    client = AgentClient(endpoint, job_id="embedded-probe", rank=-1, timeout_s=0.5)
    try:
        while True:
            if process.poll() is not None:
                agent.stop()
                raise AgentError(
                    f"embedded envpipe agent exited with code {process.returncode} before answering"
                )
            try:
                client.hello()
                return agent
            except AgentUnavailable:
                if time.monotonic() > deadline_s:
                    agent.stop()
                    raise AgentError(f"embedded envpipe agent did not answer within {timeout_s} s") from None
    finally:
        client.close()
