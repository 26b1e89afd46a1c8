"""Scenario 7 (and the systemd half of scenario 2): what systemd itself says about the unit file.

``systemd-analyze security --offline=yes`` scores the unit's sandboxing (0 = locked down, 10 = exposed)
without loading it into a running systemd, so it works where systemd is not PID 1. The restart policy is
read from the unit (``Restart=``, ``RestartSec=``) and exercised by scenario 2's supervisor emulation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from benchmarks.reliability.restart import UNIT, systemd_verify, unit_restart_policy


def pid1() -> str:
    """The name of PID 1 (``systemd`` on a normal node; something else in containers and sandboxes)."""
    try:
        with open("/proc/1/comm") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def security() -> dict[str, Any]:
    """The overall exposure score and the number of checks passed/failed, or why it could not run."""
    if shutil.which("systemd-analyze") is None:
        return {"skipped": "systemd-analyze not installed"}
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=120, check=False)
    text = done.stdout + done.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", text)
    if match is None:
        return {"skipped": f"no exposure line in the output (exit {done.returncode}): {text[-300:]}"}
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {"exposure": float(match.group(1)), "verdict": match.group(2),
            "checks_passed": text.count("✓"), "checks_failed": text.count("✗"), "systemd": version}


def run() -> dict[str, Any]:
    """Exposure score, restart policy, ``verify`` output and PID 1."""
    restart, restart_sec = unit_restart_policy()
    return {"scenario": "systemd", "unit": str(UNIT.relative_to(UNIT.parents[1])), "security": security(),
            "Restart": restart, "RestartSec_s": restart_sec, "verify": systemd_verify(), "pid1": pid1()}
