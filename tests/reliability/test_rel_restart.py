"""Scenario 2 at CI size: the agent SIGKILLed (then restarted per the unit's Restart=) or SIGTERMed."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks.reliability import restart


@pytest.mark.slow
@pytest.mark.skipif(os.path.exists("/dev/nvidiactl") or shutil.which("gcc") is None,
                    reason="fake NVML needs gcc and a machine without NVIDIA GPUs")
def test_crash_leaves_locks_that_the_restart_clears_and_sigterm_resets() -> None:
    result = restart.run(rounds=2, gpus=2, lease_timeout_s=1.0, restart_sec_s=0.0)
    kill, term = result["sigkill"], result["sigterm"]
    assert kill["left_locked_by_crash"] == 4  # the crash really leaves the GPUs locked ...
    assert kill["restarted"] == 2 and kill["locked_when_restarted_agent_answers"] == 0  # ... the start clears them
    assert kill["clients_reclaimed"] == 2  # and the ranks take their GPUs back by themselves
    assert term["locked_after_exit"] == 0 and term["exit_codes"] == [0]
    # Restart=always: a SIGTERM that is not `systemctl stop` (which never restarts) brings the agent back too.
    assert term["systemd_would_restart"] == 2


def test_unit_restart_policy_is_always() -> None:
    assert restart.unit_restart_policy()[0] == "always"


@pytest.mark.parametrize(("policy", "returncode", "restarts"), [
    ("on-failure", -9, True), ("on-failure", -15, False), ("on-failure", 0, False), ("on-failure", 1, True),
    ("on-abnormal", 1, False), ("on-abnormal", -9, True), ("always", 0, True), ("no", -9, False),
])
def test_systemd_restart_table(policy: str, returncode: int, restarts: bool) -> None:
    assert restart.systemd_restarts(policy, returncode) is restarts
