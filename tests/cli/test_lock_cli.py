"""``envpipe lock``: claims, applies (snapped) and holds; releasing resets the GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from envpipe_agent.client import AgentClient
from envpipe_cli.main import app

pytestmark = pytest.mark.slow  # each module starts an agent subprocess

runner = CliRunner(env={"COLUMNS": "250"})


def _gpu(agent, index: int) -> dict:
    with AgentClient(agent.endpoint, job_id="probe", rank=0) as client:
        return client.status()["gpus"][index]


def test_lock_applies_holds_and_releases(agent) -> None:
    result = runner.invoke(
        app, ["lock", "--endpoint", agent.endpoint, "--gpu", "1", "--mhz", "1412", "--duration-s", "0.3"]
    )
    assert result.exit_code == 0, result.output
    assert "locked at 1410 MHz (asked 1412, snapped" in result.output
    assert "released" in result.output
    gpu = _gpu(agent, 1)
    assert gpu["clock_changes"] >= 1 and gpu["holder"] is None and not gpu["locked"]


def test_lock_unknown_gpu_names_the_choices(agent) -> None:
    result = runner.invoke(app, ["lock", "--endpoint", agent.endpoint, "--gpu", "7", "--mhz", "1200"])
    assert result.exit_code == 1
    assert "no GPU '7'" in result.output and "GPU-" in result.output


def test_lock_refused_while_another_job_holds_the_gpu(agent) -> None:
    with AgentClient(agent.endpoint, job_id="trainer", rank=2) as holder:
        holder.claim(holder.hello().gpus[0].uuid)
        result = runner.invoke(app, ["lock", "--endpoint", agent.endpoint, "--gpu", "0", "--mhz", "1200"])
    assert result.exit_code == 1
    assert "held by job 'trainer' rank 2" in result.output


def test_lock_process_releases_on_sigint(agent) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from envpipe_cli.main import main; main()",
            "lock",
            "--endpoint",
            agent.endpoint,
            "--gpu",
            "0",
            "--mhz",
            "990",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, COLUMNS="200"),
    )
    try:
        assert "locked at 990 MHz" in process.stdout.readline()
        gpu = _gpu(agent, 0)
        assert gpu["locked"] and gpu["holder"]["job_id"] == "envpipe-lock"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0  # generous: a loaded CI machine is slow to start Python
        assert "released" in process.stdout.read()
        assert _gpu(agent, 0)["holder"] is None
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
