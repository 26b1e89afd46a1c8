"""Scenario 7: the unit's exposure score from systemd-analyze (offline)."""

from __future__ import annotations

import pytest

from benchmarks.reliability import systemd_unit


def test_unit_exposure_is_low() -> None:
    result = systemd_unit.security()
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["exposure"] <= 3.0, result
