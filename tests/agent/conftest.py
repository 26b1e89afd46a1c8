"""Fixtures for the agent tests: an in-process sim agent served on a thread over ipc in a short temp dir."""

from __future__ import annotations

import grp
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

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
        values = {"backend": "sim", "gpus": 2, "runtime_dir": runtime_dir, "lease_timeout_s": 0.5,
                  "socket_group": grp.getgrgid(os.getegid()).gr_name, **overrides}
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
