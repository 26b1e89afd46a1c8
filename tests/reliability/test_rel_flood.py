"""Part of scenario 3 at CI size: idle connections beyond the agent's soft fd limit do not kill it."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks.reliability import flood


@pytest.mark.slow
@pytest.mark.skipif(os.path.exists("/dev/nvidiactl") or shutil.which("gcc") is None or shutil.which("prlimit") is None,
                    reason="needs gcc (fake NVML), prlimit and a machine without NVIDIA GPUs")
def test_connections_beyond_the_soft_fd_limit_are_served() -> None:
    case = flood._case(connections=400, soft=256, hard=4096)
    assert case["agent_alive"] and case["exit_code"] == 0
    assert case["holder_served"] and case["newcomer_served"]
