"""The systemd unit is commented line by line, hardened within target, and the example config loads."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from envpipe_agent.config import resolve_config

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "envpipe-agent.service"


def test_every_directive_has_a_comment_above_it() -> None:
    lines = UNIT.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[number - 1].startswith("#"), f"line {number + 1} has no comment: {line}"


def test_unit_is_notify_with_group_restricted_runtime_dir() -> None:
    text = UNIT.read_text()
    for directive in (
        "Type=notify",
        "RuntimeDirectory=envpipe",
        "RuntimeDirectoryMode=0750",
        "Group=envpipe",
        "CapabilityBoundingSet=CAP_SYS_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ):
        assert re.search(rf"^{re.escape(directive)}$", text, re.M), directive


def test_example_config_is_valid() -> None:
    config = resolve_config(str(SYSTEMD / "agent.toml"), {})
    assert (config.backend, config.socket_group, config.lease_timeout_s) == ("nvml", "envpipe", 2.0)


def test_security_exposure_is_at_most_2_5() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score offline: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) <= 2.5
