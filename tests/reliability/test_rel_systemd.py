"""Scenario 7 and the unit half of scenario 2: what systemd-analyze says about systemd/envpipe-agent.service."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from benchmarks.reliability import systemd_unit
from benchmarks.reliability.restart import systemd_verify


def test_unit_exposure_is_low() -> None:
    result = systemd_unit.security()
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["exposure"] <= 3.0, result


def test_unit_verifies_cleanly() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    if not (shutil.which("envpipe-agent") or Path(sys.executable).with_name("envpipe-agent").exists()):
        pytest.skip("no envpipe-agent script installed for ExecStart to name")
    assert systemd_verify() == ""
