"""``envpipe status``: table and JSON from a running sim agent; a clear message and exit 1 without one."""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest
from typer.testing import CliRunner

from envpipe_agent.client import AgentClient
from envpipe_cli.main import app
from envpipe_cli.status import render_status

pytestmark = pytest.mark.slow  # each module starts an agent subprocess

runner = CliRunner(env={"COLUMNS": "250"})


def test_status_json_lists_every_gpu(agent) -> None:
    result = runner.invoke(app, ["status", "--endpoint", agent.endpoint, "--json"])
    assert result.exit_code == 0, result.output
    snapshot = json.loads(result.output)
    assert snapshot["backend"] == "sim" and snapshot["simulated"] is True
    assert [gpu["index"] for gpu in snapshot["gpus"]] == [0, 1]
    assert all(gpu["simulated"] for gpu in snapshot["gpus"])


def test_status_table_shows_holder_and_clock(agent) -> None:
    with AgentClient(agent.endpoint, job_id="job-7", rank=3) as client:
        client.claim(client.hello().gpus[1].uuid)
        client.set_clock(1410)
        result = runner.invoke(app, ["status", "--endpoint", agent.endpoint])
    assert result.exit_code == 0, result.output
    assert "backend sim" in result.output and "(simulated)" in result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("1 "))
    assert "job-7/3/" in row and "/1410" in row


def test_status_without_agent_says_how_to_start_one() -> None:
    directory = tempfile.mkdtemp(prefix="ep-")
    try:
        result = runner.invoke(
            app, ["status", "--endpoint", f"ipc://{directory}/control.sock", "--timeout", "0.2"]
        )
    finally:
        shutil.rmtree(directory)
    assert result.exit_code == 1
    assert "envpipe-agent --backend sim" in result.output


@pytest.mark.parametrize("endpoint", ["foo", "tcp://host-without-port", "ipc://"])
def test_status_with_a_malformed_endpoint_is_one_error_line(endpoint) -> None:
    result = runner.invoke(app, ["status", "--endpoint", endpoint])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: --endpoint (or ENVPIPE_AGENT) {endpoint!r} is not an agent address; use "
        "ipc:///run/envpipe/control.sock (the system agent), ipc://$XDG_RUNTIME_DIR/envpipe/control.sock "
        "or tcp://HOST:PORT"
    ]


def test_render_status_marks_read_only() -> None:
    from rich.console import Console

    snapshot = {
        "version": "0",
        "backend": "nvml",
        "read_only": True,
        "simulated": False,
        "uptime_s": 1.0,
        "lease_timeout_s": 2.0,
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-12345678-aaaa",
                "name": "H100",
                "clock_mhz": 1980,
                "target_mhz": None,
                "locked": False,
                "power_w": 127.0,
                "energy_j": 5.0,
                "holder": None,
                "lease_age_s": None,
                "events_per_s": 0.0,
                "clock_changes": 0,
                "apply_latency_p99_ms": None,
            }
        ],
    }
    console = Console(width=200, record=True)
    console.print(render_status(snapshot, wide=True))
    text = console.export_text()
    assert "nvml read-only" in text and "12345678" in text and "1980/-" in text


def _eight_busy_gpus() -> dict:
    gpu = {
        "uuid": "GPU-5f1e2d3c-aaaa-bbbb-cccc-0123456789ab",
        "name": "NVIDIA H100 80GB HBM3",
        "clock_mhz": 1980,
        "target_mhz": 1410,
        "locked": True,
        "power_w": 699.6,
        "energy_j": 12345678.9,
        "holder": {"job_id": "llama-7b-run-12", "rank": 7, "pid": 4194303, "uid": 1000},
        "lease_age_s": 86399.0,
        "events_per_s": 12000.0,
        "clock_changes": 123456789,
        "apply_latency_p99_ms": 0.25,
    }
    return {
        "version": "0.1.0",
        "backend": "nvml",
        "read_only": False,
        "simulated": False,
        "uptime_s": 86400.0,
        "lease_timeout_s": 2.0,
        "gpus": [dict(gpu, index=index) for index in range(8)],
    }


def test_status_fits_100_columns_with_a_short_card_name() -> None:
    """Issue 15 item 9: the default table fits 100 columns, nothing cut; --wide has the rest."""
    from rich.console import Console

    console = Console(width=100, record=True)
    console.print(render_status(_eight_busy_gpus()))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 8  # one line per GPU: nothing folded
    assert all(" H100 " in row and "llama-7b-run-12/7/4194303" in row and "1980/1410" in row for row in rows)
    wide = Console(width=250, record=True)
    wide.print(render_status(_eight_busy_gpus(), wide=True))
    text = wide.export_text()
    assert "GPU-5f1e2d3c-aaaa-bbbb-cccc-0123456789ab" in text and "NVIDIA H100 80GB HBM3" in text


def test_short_card_names() -> None:
    from envpipe_cli.status import short_card

    assert short_card("NVIDIA H100 80GB HBM3") == "H100"
    assert short_card("NVIDIA GeForce RTX 3090") == "3090"
    assert short_card("h100 (simulated)") == "h100"
    assert short_card("Tesla V100-SXM2-16GB") == "V100-SXM2-16GB"


def test_watch_json_prints_one_snapshot_per_line_until_interrupted(agent, monkeypatch) -> None:
    import envpipe_cli.status as status_module

    ticks = []

    def fake_sleep(_seconds: float) -> None:
        ticks.append(1)
        if len(ticks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_module.time, "sleep", fake_sleep)
    result = runner.invoke(app, ["status", "--endpoint", agent.endpoint, "--watch", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert len(lines) == 2 and all(line["backend"] == "sim" for line in lines)


def test_watch_table_refreshes_until_interrupted(agent, monkeypatch) -> None:
    import envpipe_cli.status as status_module

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(status_module.time, "sleep", interrupt)
    result = runner.invoke(app, ["status", "--endpoint", agent.endpoint, "--watch"])
    assert result.exit_code == 0, result.output
    assert "backend sim" in result.output
