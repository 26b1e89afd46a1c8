"""The run's plain parts without training ranks.

Config round trip, progress markers, clock candidates, profile, report numbers, the DeepSpeed command line,
the embedded agent and the launcher's failure handling (with stand-in processes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from envpipe.errors import ConfigError
from envpipe.controller.windows import Window
from envpipe.train import agents, launch, ranks, report
from envpipe.train.config import TrainConfig, resolve
from envpipe.train.progress import MARKER, ProgressDisplay, parse_marker


def test_config_round_trips_through_json():
    config = resolve({"stages": 3, "micro_batches": 6, "emulate_dvfs": True})
    assert TrainConfig.from_json(config.to_json()) == config
    assert config.tokens_per_iteration == 6 * 2 * 64


def test_resolve_rejects_internal_keys_in_block(tmp_path: Path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"envpipe": {"job_id": "x"}}))
    with pytest.raises(ConfigError, match='unknown key "job_id"'):
        resolve({}, ds)


def test_resolve_checks_floats_and_choices():
    with pytest.raises(ConfigError, match="--slowdown-bound must be a number"):
        resolve({"slowdown_bound": 2.0})
    with pytest.raises(ConfigError, match="--dvfs-model = 'steep'"):
        resolve({"dvfs_model": "steep"})


def test_markers_survive_launcher_prefixes():
    line = "[1,0]<stdout>: " + MARKER + json.dumps({"event": "phase", "phase": "steady", "total": 3})
    assert parse_marker(line) == {"event": "phase", "phase": "steady", "total": 3}
    assert parse_marker("plain log line") is None
    assert parse_marker(MARKER + "{broken") is None


def test_progress_display_accepts_every_event():
    console = Console(file=open("/dev/null", "w"), force_terminal=True)
    with ProgressDisplay(console) as display:
        display.handle({"event": "phase", "phase": "p", "label": "profiling", "total": 4})
        display.handle({"event": "advance", "phase": "p", "completed": 2, "info": "1410 MHz"})
        display.handle({"event": "phase_done", "phase": "p", "info": "done"})
        display.handle({"event": "advance", "phase": "unknown"})
        display.handle({"event": "message", "text": "hello"})
        display.handle({"event": "from-the-future"})
        task = display._progress.tasks[0]
        assert task.completed == 4 and task.finished


def test_off_a_terminal_every_event_is_one_whole_plain_line_and_records_are_kept():
    import io

    from envpipe.train.lifecycle import log_line

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80, soft_wrap=True)
    record = {"step": 20, "steps": 100, "loss": 4.12345, "lr": 0.05, "ms_per_it": 312.04, "tokens_per_s": 1640.2,
              "energy_j_per_it": 41.234, "energy_label": "measured", "state": "at-plan"}
    with ProgressDisplay(console) as display:
        display.handle({"event": "phase", "phase": "p", "label": "profiling", "total": 4})
        display.handle({"event": "advance", "phase": "p", "completed": 2, "info": "1410 MHz"})
        display.handle({"event": "phase_done", "phase": "p", "info": "f_low s0: 1650 MHz"})
        display.handle({"event": "log", "record": record, "line": log_line(record)})
        display.handle({"event": "eval", "step": 20, "loss": 3.5, "perplexity": 33.12})
        display.handle({"event": "checkpoint", "step": 20, "path": "ck/global_step20"})
    assert out.getvalue().splitlines() == [
        "profiling (4 steps)",
        "p: f_low s0: 1650 MHz",
        "step 20/100  loss 4.1235  lr 0.05  312.0 ms/it  1640 tokens/s  41.23 J/it (measured)  state at-plan",
        "eval at step 20: loss 3.5000, perplexity 33.12",
        "checkpoint of step 20 saved to ck/global_step20",
    ]  # the log line is 98 columns: printed whole on an 80-column console
    assert display.records["log"] == [record] and display.records["eval"][0]["perplexity"] == 33.12
    assert display.records["checkpoint"] == [{"step": 20, "path": "ck/global_step20"}]


def _window(energy: dict[int, float], iteration_ms: float) -> Window:
    return Window(iterations=2, iteration_ms=iteration_ms, iteration_ms_median=iteration_ms,
                  stage_energy_j=energy, simulated=True, losses=[5.0, 4.0])


def _result() -> dict:
    base = _window({0: 10.0, 1: 10.0}, 100.0).to_dict()
    at_plan = _window({0: 7.0, 1: 9.0}, 101.0).to_dict()
    return {
        "simulated": True,
        "energy_source": "sim agent (simulated)",
        "world_size": 2,
        "controller": {"step_counts": {"warm-up": 3, "at-plan": 2}, "planning_steps": 3},
        "optimizer_steps": 5,
        "losses": [{"step": 0, "loss": 5.5}, {"step": 4, "loss": 5.1}],
        "baseline": base,
        "at_plan": at_plan,
        "unpaired": {"label": "unpaired", "energy_saving": 0.2, "slowdown": 0.01},
        "schedule": {"name": "ours", "r": [1, 0], "text": ""},
        "clocks": {},
        "phases": [],
        "profile": None,
        "last_iteration": [],
        "agent": {},
        "gpu": {},
    }


def test_report_summary_numbers(tmp_path: Path):
    config = resolve({"stages": 2, "micro_batches": 4, "micro_batch_size": 2, "seq_len": 64})
    rep = report.build_report(config, _result())
    summary = rep["summary"]
    assert summary["energy_label"] == "simulated" and summary["optimizer_steps"] == 5
    assert summary["unpaired"]["energy_saving"] == pytest.approx(0.2)
    assert summary["baseline"]["tokens_per_s"] == pytest.approx(512 / 0.1)
    assert summary["at_plan"]["stage_energy_j"] == {"0": 7.0, "1": 9.0}
    assert (summary["loss_first"], summary["loss_last"]) == (5.5, 5.1)
    out = tmp_path / "r.json"
    report.write_json(rep, out)
    assert json.loads(out.read_text())["summary"]["unpaired"]["energy_saving"] == pytest.approx(0.2)
    console = Console(record=True, width=140)
    report.print_summary(rep, console)
    rows = console.export_text().splitlines()
    text = " ".join(" ".join(rows).split())
    assert "simulated" in text and "+20.0% energy saving" in text and "unpaired" in text
    assert "tokens/s" in text and "5 optimizer steps (warm-up 3, at-plan 2)" in text
    loss_rows = [row.split("│")[1:-1] for row in rows if "loss" in row and "│" in row]  # the table's row
    assert [[cell.strip() for cell in row] for row in loss_rows] == [
        ["loss (the run's first / last step)", "5.500", "5.100", "-0.400"]
    ]


def test_report_says_when_the_baseline_came_from_the_plan_file():
    config = resolve({"stages": 2, "micro_batches": 4, "micro_batch_size": 2, "seq_len": 64})
    label = "baseline from the plan file (an earlier run; unpaired)"
    origin = {"stored": True, "label": label, "plan": "plan.json", "date": "2026-12-06T22:00:00+00:00"}
    rep = report.build_report(config, {**_result(), "baseline_origin": origin})
    assert rep["summary"]["baseline_origin"] == origin
    console = Console(record=True, width=200)
    report.print_summary(rep, console)
    text = " ".join(console.export_text().split())
    assert f"against the {label}: plan.json, measured 2026-12-06T22:00:00+00:00" in text
    assert "baseline (plan file)" in text and "baseline window" not in text


def test_deepspeed_command_forwards_launcher_options():
    config = resolve({"num_gpus": 4, "num_nodes": 1, "device": "cuda"})
    cmd = ranks.deepspeed_command(config, "QUJD", 29500)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--num_gpus") + 1] == "4" and cmd[cmd.index("--num_nodes") + 1] == "1"
    assert cmd[-4:] == ["--module", "envpipe.train.worker", "--config-b64", "QUJD"]


def _stand_in(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )


def test_one_failing_rank_stops_the_others_with_a_clear_error(tmp_path: Path):
    survivor = _stand_in(
        f'import time; print({MARKER!r} + \'{{"event":"message","text":"hi"}}\', flush=True); time.sleep(60)'
    )
    log = tmp_path / "rank1.log"
    log.write_text("Traceback ...\nerror: rank 1: RuntimeError: stage 1 ran out of memory\n")
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], start_new_session=True)
    procs = [ranks._Rank("rank 0", survivor, tmp_path / "rank0.log"), ranks._Rank("rank 1", failing, log)]
    console = Console(file=open("/dev/null", "w"))
    start = time.monotonic()
    with ProgressDisplay(console) as display, pytest.raises(launch.RunError) as info:
        ranks._follow(procs, survivor.stdout, display, tmp_path)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert (
        "rank 1 exited with code 3: RuntimeError: stage 1 ran out" in message
        and "ran out of memory" in message
        and str(tmp_path) in message
    )
    assert survivor.poll() is not None  # stopped, not left running


def test_the_root_cause_is_named_not_the_peer_that_lost_its_neighbour(tmp_path: Path):
    peer_log, root_log = tmp_path / "rank0.log", tmp_path / "rank1.log"
    peer_log.write_text(
        "error: rank 0: PeerLostError: stage 0: train_batch failed talking to the other ranks "
        "([../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242)\n"
    )
    root_log.write_text("Traceback ...\nerror: rank 1: ValueError: labels out of range\n")
    # rank 0 exits first (its peer is gone), rank 1, the root cause, a moment later
    peer = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"], start_new_session=True)
    root = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(1)"],
                            start_new_session=True)
    procs = [ranks._Rank("rank 0", peer, peer_log), ranks._Rank("rank 1", root, root_log)]
    stream = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE, text=True).stdout
    with ProgressDisplay(Console(file=open("/dev/null", "w"))) as display, pytest.raises(launch.RunError) as info:
        ranks._follow(procs, stream, display, tmp_path)
    assert str(info.value).startswith("rank 1 exited with code 1: ValueError: labels out of range")


def test_rank_env_is_what_the_launchers_set():
    env = ranks.rank_env(1, 4, 12345, agent="ipc:///tmp/x")
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "1", "4", "12345")
    assert env["OMP_NUM_THREADS"] == "1" and env["ENVPIPE_AGENT"] == "ipc:///tmp/x"


@pytest.mark.slow
def test_embedded_sim_agent_when_none_answers(tmp_path: Path):
    console = Console(record=True, width=200)
    nowhere = f"ipc://{tmp_path}/none.sock"
    with agents.agent_for_run(nowhere, gpus=2, console=console) as agent:
        assert agent.embedded and agent.simulated
        found = agents.probe_agent(agent.endpoint)
        assert found is not None and found.simulated
    assert "started an embedded sim agent (2 simulated GPUs)" in console.export_text()
    assert agents.probe_agent(agent.endpoint, timeout_s=0.3) is None  # stopped with the block
    with pytest.raises(launch.RunError, match="needs envpipe-agent running on every node"):
        with agents.agent_for_run(nowhere, gpus=2, console=console, multi_node=True):
            pass


def test_a_rank_failing_after_the_result_keeps_the_result(tmp_path: Path):
    marker = MARKER + json.dumps({"event": "result", "data": {"ok": 1}})
    rank0 = _stand_in(f"print({marker!r}, flush=True)")
    log = tmp_path / "rank1.log"
    log.write_text("error: rank 1: RuntimeError: teardown failed\n")
    rank1 = subprocess.Popen(
        [sys.executable, "-c", "import time, sys; time.sleep(1.0); sys.exit(2)"], start_new_session=True
    )
    procs = [ranks._Rank("rank 0", rank0, tmp_path / "rank0.log"), ranks._Rank("rank 1", rank1, log)]
    console = Console(record=True, width=200)
    with ProgressDisplay(console) as display:
        result = ranks._follow(procs, rank0.stdout, display, tmp_path)
    assert result["ok"] == 1 and "rank 1 exited with code 2" in result["shutdown_warning"]
    assert "warning: the run finished" in console.export_text()


def test_missing_training_stack_is_one_clear_error(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(launch.RunError, match=r"needs deepspeed: install the training extra"):
        launch.resolve_device(resolve({"device": "auto"}))


def test_launcher_options_are_refused_for_cpu_ranks():
    with pytest.raises(launch.RunError, match="one rank per stage"):
        launch._local_world_size(resolve({"device": "cpu", "num_gpus": 2}), "cpu")


def test_cpu_ranks_on_several_nodes_go_through_the_deepspeed_launcher_without_ssh(tmp_path: Path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    config = resolve({"device": "cpu", "stages": 2, "hostfile": str(hostfile), "node_rank": 1})
    assert launch._local_world_size(config, "cpu") == 2
    cmd = ranks.deepspeed_command(config, "QUJD", 29500)
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--no_ssh") :][:5] == ["--no_ssh", "--node_rank", "1", "--master_addr", "node0"]
    with pytest.raises(ConfigError, match="--node-rank needs --hostfile"):
        resolve({"node_rank": 0})


def test_more_cpu_ranks_than_cores_is_said(monkeypatch: pytest.MonkeyPatch):
    from rich.console import Console

    monkeypatch.setattr(ranks, "usable_cores", lambda: 2)
    console = Console(record=True, width=300)
    ranks.warn_shared_cores(4, console)
    ranks.warn_shared_cores(2, console)
    text = console.export_text()
    assert text.count("warning") == 1 and "4 CPU ranks share 2 cores" in text and "--stages 2" in text


def test_an_explicit_agent_that_does_not_answer_is_an_error_not_a_sim_agent(tmp_path: Path):
    from envpipe.train.agents import agent_for_run

    console = Console(file=open("/dev/null", "w"))
    with pytest.raises(launch.RunError, match="--agent ipc://.*: no agent answered there; start it"):
        with agent_for_run(f"ipc://{tmp_path}/none.sock", gpus=1, console=console, explicit=True):
            pass


def test_sigint_reaches_every_rank_group_a_stubborn_rank_is_killed_after_the_grace_and_the_exit_is_130(tmp_path):
    import signal
    import threading

    stopped = MARKER + json.dumps({"event": "stopped", "stopped": 2, "step": 7, "checkpoint": "ck/global_step7"})
    rank0 = _stand_in(
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGINT, lambda *a: (print({stopped!r}, flush=True), sys.exit(0)))\n"
        "print('ready', flush=True); time.sleep(60)"
    )
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"],
        start_new_session=True,
    )
    assert rank0.stdout.readline().strip() == "ready"
    procs = [ranks._Rank("rank 0", rank0, tmp_path / "rank0.log"), ranks._Rank("rank 1", stubborn, tmp_path / "r1.log")]
    signals = ranks._Signals()  # not entered: the test plays the user pressing Ctrl-C
    threading.Timer(0.5, lambda: signals.received.append(signal.SIGINT)).start()
    with ProgressDisplay(Console(file=open("/dev/null", "w"))) as display, pytest.raises(ranks.RunStopped) as info:
        ranks._follow(procs, rank0.stdout, display, tmp_path, signals, grace_s=1.0)
    assert info.value.exit_code == 130
    assert str(info.value) == (
        "stopped by SIGINT after step 7; checkpoint saved to ck/global_step7 (continue with --resume); "
        "every rank has exited"
    )
    assert stubborn.poll() == -signal.SIGKILL  # it ignored the signal: killed after the grace period


def test_a_run_that_ends_while_planning_says_so(tmp_path: Path):
    from envpipe.controller import ControllerConfig
    from envpipe.controller.simulated import run_pipeline

    result, _, _ = run_pipeline(ControllerConfig(), 12)  # warm-up 3, baseline 5, then profiling: cut short
    assert result["at_plan"] is None and result["controller"]["state"] == "profiling"
    result.update(optimizer_steps=12, losses=[{"step": 0, "loss": 5.0}, {"step": 11, "loss": 4.9}])
    rep = report.build_report(resolve({"stages": 2, "steps": 12}), result)
    assert rep["summary"]["unpaired"] is None and rep["summary"]["paired"] is None
    console = Console(record=True, width=140)
    report.print_summary(rep, console)
    text = " ".join(console.export_text().split())
    assert "12 optimizer steps (warm-up 3, baseline 5, profiling 4)" in text
    assert "the run ended before the plan was reached: raise --steps" in text
    assert "loss 5.000 -> 4.900" in text  # no table without a plan: the loss stays a line
