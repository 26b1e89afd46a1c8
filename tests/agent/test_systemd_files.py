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


def _directives(name: str) -> list[str]:
    return re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.M)


def _syscalls(names: str) -> set[str]:
    """Expand systemd syscall names and @groups (with systemd-analyze, which knows this systemd's groups)."""
    found: set[str] = set()
    for name in names.split():
        if not name.startswith("@"):
            found.add(name)
            continue
        listing = subprocess.run(
            ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, timeout=60
        ).stdout
        for line in listing.splitlines()[1:]:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                found |= _syscalls(entry) if entry.startswith("@") else {entry}
    return found


def test_the_syscall_filter_lets_libzmq_start_its_io_thread() -> None:
    """Issue 12 item 1: libzmq calls sched_setscheduler when it starts its I/O thread and aborts when it
    fails; the unit's filter refused it (@resources), so the agent never started under systemd."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    allowed: set[str] = set()
    for number, line in enumerate(_directives("SystemCallFilter")):
        deny = line.startswith("~")
        names = _syscalls(line.lstrip("~"))
        assert number or not deny, "the first SystemCallFilter= must be an allow-list"
        allowed = allowed - names if deny else allowed | names
    assert {"sched_setscheduler", "sched_getscheduler", "sched_getparam", "mmap", "clone3"} <= allowed
    assert not {"setuid", "reboot", "init_module", "setrlimit"} & allowed


def test_any_exit_but_a_stop_restarts_and_resources_are_bounded() -> None:
    assert _directives("Restart") == ["always"]  # issue 12 item 6: SIGHUP was a "clean" exit
    assert _directives("RestartPreventExitStatus") == ["2"]
    assert _directives("StartLimitIntervalSec") == ["0"]
    assert _directives("RuntimeDirectoryPreserve") == ["restart"]  # leases.json survives a restart
    assert int(_directives("LimitNOFILE")[0]) >= 65536
    assert _directives("MemoryMax") == ["1G"] and int(_directives("TasksMax")[0]) <= 512


README = SYSTEMD / "README.md"


def test_readme_install_steps_create_the_snippet_directories() -> None:
    """Stock Debian 12 has no /etc/sysusers.d: `install` into it failed; -D creates it."""
    lines = [line for line in README.read_text().splitlines() if line.startswith("sudo install ")]
    for line in lines:
        if "/etc/sysusers.d/" in line or "/etc/tmpfiles.d/" in line or "/etc/envpipe/" in line:
            assert " -D " in line, line


def test_readme_says_where_the_agent_cannot_be_installed() -> None:
    text = README.read_text()
    assert "ProtectHome" in text and "/home" in text and "/root" in text and "PrivateTmp" in text


def test_other_users_processes_stay_visible_to_the_pid_check() -> None:
    """With ProtectProc=invisible every other user's process (PID 1 included) looked nonexistent to the
    agent, so a claim naming any pid passed the "caller's own pid or its uid's" check."""
    assert _directives("ProtectProc") == ["default"]
