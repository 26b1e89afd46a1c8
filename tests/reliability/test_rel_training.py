"""Scenario 6 at CI size (client mode): agent killed, restarted, stopped and resumed under a training loop."""

from __future__ import annotations

import pytest

from benchmarks.reliability import training

pytestmark = pytest.mark.slow


def test_training_survives_agent_death_restart_and_hang() -> None:
    result = training.run(mode="client", phase_s=3.0)
    phases = result["phases"]
    assert set(phases) == set(training.PHASES)
    assert result["warnings"] == 2, result["warning_messages"]  # one per outage (kill, hang), none for recovery
    assert phases["killed"]["events_dropped"] > 0  # training went on without the agent
    assert result["reclaimed_after_restart"]  # new lease from the new agent, same training loop
    assert result["lease_after_resume"] in ("kept", "new")
    # A blocking call on a stuck agent would cost a step the 2 s control timeout; events never block.
    assert phases["stopped"]["step_ms"]["max"] < 1000
    assert result["clock_target_at_end_mhz"] is not None  # clocks are applied again at the end
