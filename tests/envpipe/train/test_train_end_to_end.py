"""Real runs on 2 CPU ranks (gloo) with the embedded sim agent.

`envpipe train --type envelope --scheduling ours --reconfig balanced` on llama-tiny, checked through its
--report JSON and --plot file; and a run whose rank is killed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from envpipe_cli.main import app
from typer.testing import CliRunner


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_envelope_ours_balanced_on_two_cpu_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Nothing answers here, so the run must start (and stop) its own sim agent.
    monkeypatch.setenv("ENVPIPE_AGENT", f"ipc://{tmp_path}/no-agent.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    report_path, plot_path = tmp_path / "report.json", tmp_path / "last.png"
    ds_config = tmp_path / "ds.json"  # the "envpipe" block keeps the phases short for CI
    ds_config.write_text(
        json.dumps({"envpipe": {"reconfig_max_rounds": 30, "baseline_steps": 3, "compare_rounds": 2}})
    )
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--type",
            "envelope",
            "--scheduling",
            "ours",
            "--reconfig",
            "balanced",
            "--model",
            "llama-tiny",
            "--stages",
            "2",
            "--micro-batches",
            "4",
            "--seq-len",
            "32",
            "--steps",
            "4",
            "--report",
            str(report_path),
            "--plot",
            str(plot_path),
            "--deepspeed-config",
            str(ds_config),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "started an embedded sim agent" in " ".join(result.output.split())

    report = json.loads(report_path.read_text())
    assert [p["name"] for p in report["phases"]] == ["baseline", "profiling", "reconfiguration", "steady"]
    assert report["simulated"] is True and report["agent"]["embedded"] is True
    summary = report["summary"]
    assert summary["energy_label"] == "simulated" and "simulated" in report["energy_source"]
    # Its sign depends on CPU timing noise; it must be a real number and no more than the whole energy.
    assert isinstance(summary["energy_saving"], float) and math.isfinite(summary["energy_saving"])
    assert summary["energy_saving"] < 1.0
    assert summary["baseline"]["energy_j_per_iteration"] > 0 and summary["steady"]["tokens_per_s"] > 0
    assert set(summary["steady"]["stage_energy_j"]) == {"0", "1"}

    profiling = report["phases"][1]
    assert len(profiling["clocks_mhz"]) >= 2
    assert [s["stage"] for s in report["profile"]["stages"]] == [0, 1]
    assert all(s["f_low_mhz"] in profiling["clocks_mhz"] for s in report["profile"]["stages"])
    reconfiguration = report["phases"][2]
    assert reconfiguration["policy"] == "balanced" and 1 <= reconfiguration["rounds"] <= 30 + 1
    assert reconfiguration["target_ms"] > 0 and reconfiguration["baseline_ms"] > 0

    assert report["schedule"]["name"] == "ours" and report["config"]["emulate_dvfs"] is True
    clocks = {int(s): units for s, units in report["clocks"].items()}
    assert set(clocks) == {0, 1} and all(len(units) == 8 for units in clocks.values())
    # Which clocks win depends on the measured timings; they must be clocks the (simulated) GPU supports.
    assert {c for units in clocks.values() for c in units.values()} <= set(report["gpu"]["clocks_mhz"])
    spans = report["last_iteration"]
    assert {(s["stage"], s["unit"]) for s in spans} == {
        (s, f"{k}{m}") for s in (0, 1) for k in "FB" for m in range(4)
    }
    assert plot_path.stat().st_size > 1000


def _children_with(pid: int, needle: bytes) -> list[int]:
    """Direct children of ``pid`` whose command line contains ``needle`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and needle in cmdline:
            found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"RANK=")), "?")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_rank_stops_the_job_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import os
    import signal
    import threading

    from rich.console import Console

    from envpipe.train import launch
    from envpipe.train.config import resolve
    from envpipe.train.progress import ProgressDisplay

    monkeypatch.setenv("ENVPIPE_AGENT", f"ipc://{tmp_path}/no-agent.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    training = threading.Event()
    handle = ProgressDisplay.handle

    def spy(self, event):
        if event.get("event") == "phase":
            training.set()
        handle(self, event)

    monkeypatch.setattr(ProgressDisplay, "handle", spy)
    killed: list[int] = []

    def kill_rank_1():
        if training.wait(120):
            for pid in _children_with(os.getpid(), b"envpipe.train.worker"):
                if _rank_of(pid) == "1":
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    config = resolve({"type": "baseline", "scheduling": "1f1b", "stages": 2, "steps": 10**6, "seq_len": 32})
    with pytest.raises(launch.RunError) as info:
        launch.train(config, console=Console(file=open(os.devnull, "w")))
    killer.join(5)
    assert killed, "rank 1 was never seen running"
    message = str(info.value)
    assert "was killed by signal 9" in message or "exited with code" in message
    kept = Path(message.split("Logs are kept in ", 1)[1].split(" ", 1)[0])
    assert (kept / "rank1.log").is_file()
    shutil.rmtree(kept)
    assert _children_with(os.getpid(), b"envpipe.train.worker") == []  # every rank is gone
    assert _children_with(os.getpid(), b"envpipe_agent") == []  # and the embedded agent too


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_profile_command_writes_a_profile_the_simulator_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from envpipe.sim import load_profile

    monkeypatch.setenv("ENVPIPE_AGENT", f"ipc://{tmp_path}/no-agent.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(
        app, ["profile", "--stages", "2", "--micro-batches", "4", "--seq-len", "32", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["format"] == "envpipe-profile/1" and data["simulated"] is True and data["micro_batches"] == 4
    assert [s["stage"] for s in data["stages"]] == [0, 1]
    clocks = [p["clock_mhz"] for p in data["stages"][0]["points"]]
    assert len(clocks) >= 2 and all(s["f_low_mhz"] in clocks for s in data["stages"])
    profile = load_profile(out)
    assert profile.simulated and profile.f_low_mhz(0) == data["stages"][0]["f_low_mhz"]
