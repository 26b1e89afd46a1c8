"""Scenario 3 at CI size: hostile frames on both sockets are answered or counted; nothing changes a clock."""

from __future__ import annotations

import pytest

from benchmarks.reliability import fuzz

pytestmark = pytest.mark.slow


def test_fuzzed_frames_are_answered_or_counted_and_change_nothing() -> None:
    result = fuzz.run(frames=4000, seed=1)
    assert result["agent_alive"]
    assert result["control_answered"] == result["control_frames"]
    assert result["replies_with_traceback"] == 0
    assert set(result["reply_codes"]) <= {"ok", "bad_request", "unknown_op", "version_mismatch", "too_large",
                                          "no_such_gpu", "lease_held", "unknown_lease", "unknown_window"}
    assert result["events_counted"] == result["event_frames"]
    assert result["events_malformed"] + result["events_no_lease"] == result["event_frames"]
    assert result["transport_oversize_unanswered"] == result["transport_oversize_sent"]
    assert result["agent_counters"].get("loop_errors", 0) == 0  # no frame escaped the decoder
    assert result["holder_lease_intact"] and result["clock_changes"] == 0 and result["locked_gpus"] == 0
    assert result["rss_kib_after"] - result["rss_kib_before"] < 16 * 1024
