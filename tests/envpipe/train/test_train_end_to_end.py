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
@pytest.mark.timeout(600)
def test_envelope_ours_balanced_on_two_cpu_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Nothing answers here, so the run must start (and stop) its own sim agent.
    monkeypatch.setenv("ENVPIPE_AGENT", f"ipc://{tmp_path}/no-agent.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    report_path, plot_path, plan_path = tmp_path / "report.json", tmp_path / "last.png", tmp_path / "plan.json"
    ds_config = tmp_path / "ds.json"  # the "envpipe" block keeps the planning short for CI
    ds_config.write_text(json.dumps({"envpipe": {"reconfig_max_rounds": 10, "baseline_steps": 3}}))
    steps = 90
    common = ["--model", "llama-tiny", "--stages", "2", "--micro-batches", "4", "--seq-len", "32",
              "--deepspeed-config", str(ds_config)]
    result = CliRunner().invoke(
        app,
        ["train", "--type", "envelope", "--scheduling", "ours", "--reconfig", "balanced", *common,
         "--steps", str(steps), "--compare", "2", "--report", str(report_path), "--plot", str(plot_path),
         "--plan-out", str(plan_path)],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "started an embedded sim agent" in text and f"{steps} optimizer steps" in text

    report = json.loads(report_path.read_text())
    summary = report["summary"]
    # --steps counts optimizer steps, planning included: the engine's own count.
    assert summary["optimizer_steps"] == steps == sum(summary["step_counts"].values())
    assert [p["name"] for p in report["phases"]][:3] == ["baseline", "profiling", "reconfiguration"]
    assert report["simulated"] is True and report["agent"]["embedded"] is True
    assert summary["energy_label"] == "simulated" and "simulated" in report["energy_source"]
    paired = summary["paired"]
    assert paired["rounds"] == 2 and summary["step_counts"]["compare: baseline"] == 2 * (1 + 5)
    # Its sign depends on CPU timing noise; the words must follow the interval.
    contains_zero = paired["energy_saving"]["contains_zero"]
    assert any(("not distinguishable from zero" in line) == contains_zero for line in paired["verdict"])
    assert paired["verdict"][0].split(":")[0] in text
    predicted = summary["predicted"]
    assert predicted["label"].startswith("predicted") and math.isfinite(predicted["energy_saving"])
    assert summary["unpaired"]["label"].startswith("unpaired")
    assert summary["loss_last"] < summary["loss_first"]  # it trains
    assert set(summary["at_plan"]["stage_energy_j"]) == {"0", "1"}
    assert [s["stage"] for s in report["profile"]["stages"]] == [0, 1]
    assert report["schedule"]["name"] == "ours" and report["config"]["emulate_dvfs"] is True
    clocks = {int(s): units for s, units in report["clocks"].items()}
    assert set(clocks) == {0, 1} and all(len(units) == 8 for units in clocks.values())
    assert {c for units in clocks.values() for c in units.values()} <= set(report["gpu"]["clocks_mhz"])
    assert plot_path.stat().st_size > 1000

    # The plan is reused: no profiling, the same clocks; a plan for other micro-batches is refused.
    reuse = tmp_path / "reuse.json"
    result = CliRunner().invoke(
        app, ["train", *common, "--steps", "20", "--plan", str(plan_path), "--report", str(reuse)]
    )
    assert result.exit_code == 0, result.output
    again = json.loads(reuse.read_text())
    assert "profiling" not in again["summary"]["step_counts"] and again["clocks"] == report["clocks"]
    # The plan file's stored baseline stands in for the baseline window: no step at the baseline.
    assert "baseline" not in again["summary"]["step_counts"] and again["summary"]["baseline_origin"]["stored"]
    assert "baseline from the plan file (an earlier run; unpaired)" in " ".join(result.output.split())
    result = CliRunner().invoke(
        app, ["train", *common[:4], "--micro-batches", "8", *common[6:], "--plan", str(plan_path)]
    )
    assert result.exit_code == 1 and "micro_batches" in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


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
