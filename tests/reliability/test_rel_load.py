"""Scenario 5 at CI size: 8 simulated ranks (a full node) at 1k events/s each for 3 s against one agent."""

from __future__ import annotations

import pytest

from benchmarks.reliability import load

pytestmark = pytest.mark.slow


def test_load_loses_no_control_message_and_no_event_in_transit() -> None:
    result = load.run(ranks=8, events_per_s=1000, duration_s=3.0, procs=2)
    assert result["control_failed"] == 0 and result["leases_lost"] == 0
    assert result["leases_expired_by_agent"] == 0
    assert result["lost_in_transit"] == 0
    assert result["event_drop_rate"] < 0.01
    assert result["clock_changes"] > 0 and result["apply_latency_p99_ms"]["worst_gpu"] is not None
