"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import pytest

from envpipe_agent.embedded import start_agent


@pytest.fixture(scope="module")
def agent():
    """A sim agent subprocess with two virtual GPUs, one per test module that asks for it."""
    running = start_agent(gpus=2)
    yield running
    running.stop()
