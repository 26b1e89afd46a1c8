"""``envpipe train`` lifecycle on 2 CPU ranks: SIGTERM saves and stops every rank (exit 143, one line), a
resumed run continues from the checkpoint, ``--export-hf`` writes a folder transformers loads, logs are
plain lines off a terminal and live under the save folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _workers_in(cwd: Path) -> list[int]:
    """Pids of envpipe rank processes started from ``cwd`` (the test's own folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            here = os.readlink(proc / "cwd")
        except OSError:
            continue
        if b"envpipe.train.worker" in cmdline and here == str(cwd):
            found.append(int(proc.name))
    return found


def test_sigterm_saves_stops_every_rank_and_resume_continues_to_an_export(tmp_path: Path):
    env = {**os.environ, "ENVPIPE_AGENT": f"ipc://{tmp_path}/none.sock", "XDG_RUNTIME_DIR": str(tmp_path)}
    common = ["--type", "baseline", "--stages", "2", "--micro-batches", "4", "--seq-len", "16", "--save-dir", "ck"]
    cmd = [str(Path(sys.executable).parent / "envpipe"), "train", *common, "--steps", "500", "--log-interval", "1"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in launcher.stdout:  # off a terminal: one plain line per log record
        lines.append(line.rstrip("\n"))
        if line.startswith("step 6/500"):
            launcher.send_signal(signal.SIGTERM)
            break
    out, err = launcher.communicate(timeout=300)
    lines += out.splitlines()
    assert launcher.returncode == 143, "\n".join(lines) + err
    (last,) = err.strip().splitlines()[-1:]
    assert last.startswith("stopped by SIGTERM after step ") and "checkpoint saved to ck/global_step" in last
    step = int(last.split("after step ")[1].split(";")[0])
    assert step >= 6 and (tmp_path / "ck" / "latest").read_text() == f"global_step{step}"
    assert {"rank0.log", "rank1.log"} <= {p.name for p in (tmp_path / "ck" / "logs").iterdir()}
    assert all(len(line) > 0 for line in lines) and any(line.startswith("step 3/500  loss ") for line in lines)
    deadline = time.monotonic() + 10
    while _workers_in(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _workers_in(tmp_path) == []  # no rank outlives the launcher

    from envpipe_cli.main import app
    from typer.testing import CliRunner

    os.chdir(tmp_path)
    (tmp_path / "held.txt").write_text("a held-out text for evaluation\n" * 40)
    (tmp_path / "ds.json").write_text(json.dumps({"csv_monitor": {"enabled": True, "output_path": "mon", "job_name": "j"}}))
    more = 10  # warm-up (3) and a baseline window (5): an energy figure for the monitors
    result = CliRunner(env=env).invoke(
        app,
        ["train", *common, "--resume", "--steps", str(step + more), "--export-hf", "hf", "--report", "r.json",
         "--lr", "0.01", "--eval-data", "held.txt", "--deepspeed-config", "ds.json"],
    )
    assert result.exit_code == 0, result.output
    assert f"resuming from ck/global_step{step} at step {step}" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["optimizer_steps"] == step + more  # DeepSpeed's own count came back
    assert report["optimizer"]["type"] == "SGD" and report["optimizer"]["lr"] == 0.01
    assert set(report["software"]) == {"envpipe", "torch", "deepspeed", "transformers"}
    assert [c["step"] for c in report["checkpoints"]] == [step + more]
    (evaluation,) = report["eval"]
    assert evaluation["step"] == step + more and abs(evaluation["perplexity"] - 2.718281828 ** evaluation["loss"]) < 1e-6
    assert f"eval at step {step + more}: loss" in result.output
    monitors = {p.name: p.read_text().splitlines() for p in (tmp_path / "mon" / "j").iterdir()}
    for name in ("train_loss", "eval_loss", "envpipe_energy_j_per_iteration", "envpipe_power_w", "envpipe_mean_clock_mhz"):
        assert len(monitors[f"Train_Samples_{name}.csv"]) >= 2, name  # header and at least one row

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    with torch.no_grad():
        assert model(input_ids=torch.arange(16)[None]).logits.shape == (1, 16, 256)


def test_a_resumed_run_on_its_stored_plan_still_reports_energy_to_the_monitors(tmp_path: Path):
    """Resumed on the checkpoint's plan (no baseline window), the at-plan window still reaches the monitors."""
    from envpipe_cli.main import app
    from typer.testing import CliRunner

    env = {**os.environ, "ENVPIPE_AGENT": f"ipc://{tmp_path}/none.sock", "XDG_RUNTIME_DIR": str(tmp_path)}
    common = ["--type", "baseline", "--stages", "2", "--micro-batches", "4", "--seq-len", "16", "--save-dir", "ck"]
    os.chdir(tmp_path)
    first = CliRunner(env=env).invoke(app, ["train", *common, "--steps", "12"])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "ck" / "global_step12" / "plan.json").exists()  # planned: the resume reuses it
    (tmp_path / "ds.json").write_text(json.dumps({"csv_monitor": {"enabled": True, "output_path": "mon", "job_name": "j"}}))
    result = CliRunner(env=env).invoke(
        app, ["train", *common, "--resume", "--steps", "16", "--deepspeed-config", "ds.json", "--report", "r.json"]
    )
    assert result.exit_code == 0, result.output
    counts = json.loads((tmp_path / "r.json").read_text())["summary"]["step_counts"]
    assert "baseline" not in counts and counts.get("at-plan", 0) > 0  # no baseline step after planning
    monitors = {p.name: p.read_text().splitlines() for p in (tmp_path / "mon" / "j").iterdir()}
    assert len(monitors["Train_Samples_envpipe_energy_j_per_iteration.csv"]) >= 2  # header and a row
