"""`envpipe train` / `envpipe profile` option handling: validation, exit codes and config precedence.

No rank starts here: the launcher entry points are replaced by recorders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envpipe_cli.main import app
from typer.testing import CliRunner

from envpipe.train import launch
from envpipe.train.config import TrainConfig

runner = CliRunner()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """Record the configs `train`/`profile` would run, instead of running them."""
    seen: list[TrainConfig] = []
    monkeypatch.setattr(launch, "train", lambda config, console: seen.append(config))
    monkeypatch.setattr(launch, "profile", lambda config, output, console: seen.append((config, output)))
    return seen


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_defaults_when_no_flags(calls):
    result = _invoke("train")
    assert result.exit_code == 0, result.output
    (config,) = calls
    assert (config.type, config.scheduling, config.reconfig) == ("envelope", "ours", "balanced")
    assert (config.stages, config.micro_batches, config.model) == (2, 4, "llama-tiny")
    assert config.emulate_dvfs is None  # decided once the agent is known
    assert config.ds_config["gradient_accumulation_steps"] == 4


def test_every_flag_reaches_the_config(calls, tmp_path: Path):
    data = tmp_path / "corpus.txt"
    data.write_text("hello world " * 100)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\n")
    result = _invoke(
        "train",
        "--type",
        "uniform",
        "--scheduling",
        "1f1b",
        "--reconfig",
        "greedy",
        "--stages",
        "4",
        "--micro-batches",
        "8",
        "--micro-batch-size",
        "3",
        "--seq-len",
        "32",
        "--steps",
        "5",
        "--model",
        "llama-160m",
        "--data",
        str(data),
        "--agent",
        "tcp://127.0.0.1:5555",
        "--no-emulate-dvfs",
        "--device",
        "cpu",
        "--num-gpus",
        "4",
        "--hostfile",
        str(hostfile),
        "--num-nodes",
        "2",
        "--report",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "g.png"),
    )
    assert result.exit_code == 0, result.output
    (c,) = calls
    assert (c.type, c.scheduling, c.reconfig, c.stages, c.micro_batches, c.micro_batch_size) == (
        "uniform",
        "1f1b",
        "greedy",
        4,
        8,
        3,
    )
    assert (c.seq_len, c.steps, c.model, c.data, c.agent, c.emulate_dvfs) == (
        32,
        5,
        "llama-160m",
        str(data),
        "tcp://127.0.0.1:5555",
        False,
    )
    assert (c.device, c.num_gpus, c.hostfile, c.num_nodes) == ("cpu", 4, str(hostfile), 2)
    assert c.report.endswith("r.json") and c.plot.endswith("g.png")


def test_flags_beat_envpipe_block_beats_deepspeed_keys(calls, tmp_path: Path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 5,
                "gradient_accumulation_steps": 6,
                "envpipe": {"micro-batches": 7, "stages": 3, "type": "uniform", "profile_clocks": 2},
                "fp16": {"enabled": False},
            }
        )
    )
    result = _invoke("train", "--deepspeed-config", str(ds), "--stages", "2")
    assert result.exit_code == 0, result.output
    (c,) = calls
    assert c.stages == 2  # flag beats the block
    assert c.micro_batches == 7 and c.type == "uniform" and c.profile_clocks == 2  # block beats DS keys
    assert c.micro_batch_size == 5  # DeepSpeed's own key beats the default
    assert c.ds_config["gradient_accumulation_steps"] == 7 and c.ds_config["fp16"] == {"enabled": False}
    assert "envpipe" not in c.ds_config and c.deepspeed_config == str(ds)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "org/llama-2-7b"], "never downloads models"),
        (["--model", "llama-99b"], "give a preset"),
        (["--data", "missing.txt"], "no such file"),
        (["--deepspeed-config", "missing.json"], "no such file"),
        (["--scheduling", "ours", "--stages", "4", "--micro-batches", "2"], "raise --micro-batches"),
        (["--num-nodes", "2"], "needs --hostfile"),
        (["--report", "no-such-dir/r.json"], "folder does not exist"),
        (["--report", "r.txt"], "use a .json file name"),
        (["--plot", "g.gif"], "use a .png"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_1(calls, args, needle, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("train", *args)
    assert result.exit_code == 1, result.output
    assert calls == []
    text = _one_line(result.output)
    assert text.startswith("error:") and needle in text
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"data": 5}, "error: ds.json: envpipe.data must be a string or null, got 5 (int); fix that value"),
        ({"model": None}, "error: ds.json: envpipe.model must be a string, got None (NoneType); fix that value"),
        ({"plot": True}, "error: ds.json: envpipe.plot must be a string or null, got True (bool); fix that value"),
        ({"seed": "x"}, "error: ds.json: envpipe.seed must be an integer, got 'x' (str); fix that value"),
        ({"micro-batches": 0}, "error: ds.json: envpipe.micro-batches must be an integer >= 1, got 0"),
        ({"scheduling": "zigzag"}, "error: ds.json: envpipe.scheduling = 'zigzag' is not one of"),
        ({"data": "missing.txt"}, "error: ds.json: envpipe.data missing.txt: no such file"),
        ({"keep_last": 2}, "error: ds.json: envpipe.keep_last needs --save-dir"),
        ({"stages": 9}, "error: ds.json: envpipe.stages 9: the model (--model) has 4 decoder layers"),
    ],
)
def test_each_bad_block_value_is_one_error_line_naming_the_block_key(calls, tmp_path: Path, monkeypatch, block, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text(json.dumps({"envpipe": block}))
    result = _invoke("train", "--deepspeed-config", "ds.json")
    assert result.exit_code == 1 and calls == []
    assert result.output.count("\n") == 1 and result.output.startswith(message), result.output


def test_common_knobs_are_flags_that_reach_the_deepspeed_config(calls, tmp_path: Path, monkeypatch):
    from envpipe.train.config import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95]}}}))
    config = resolve({"lr": 1e-3, "precision": "bf16", "seed": 9, "slowdown_bound": 0.05, "dvfs_model": "optimistic",
                      "log_interval": 3}, "ds.json")
    assert config.ds_config["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}}
    assert config.ds_config["bf16"] == {"enabled": True} and config.ds_config["fp16"] == {"enabled": False}
    assert (config.seed, config.slowdown_bound, config.dvfs_model, config.log_interval) == (9, 0.05, "optimistic", 3)
    assert resolve({}, "ds.json").ds_config["optimizer"]["params"]["lr"] == 3e-4  # no --lr: the file's own
    result = _invoke("train", "--bf16", "--fp16")
    assert result.exit_code == 1 and result.output.startswith("error: --bf16 and --fp16 exclude each other")
    result = _invoke("train", "--agent", "foo")
    assert result.exit_code == 1 and calls == []
    assert result.output.startswith("error: --agent 'foo' is not an agent address")
    result = _invoke("train", "--save-interval", "5")
    assert result.output.startswith("error: --save-interval needs --save-dir")


def test_bad_envpipe_block(calls, tmp_path: Path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"envpipe": {"stagez": 2}}))
    result = _invoke("train", "--deepspeed-config", str(ds))
    assert result.exit_code == 1
    assert 'unknown key "stagez"' in _one_line(result.output) and calls == []
    ds.write_text(json.dumps({"envpipe": {"stages": "two"}}))
    result = _invoke("train", "--deepspeed-config", str(ds))
    assert result.exit_code == 1 and "ds.json: envpipe.stages must be an integer" in _one_line(result.output)
    ds.write_text("{not json")
    result = _invoke("train", "--deepspeed-config", str(ds))
    assert result.exit_code == 1 and "not valid JSON" in _one_line(result.output)


@pytest.mark.parametrize(
    "args",
    [
        ["--type", "fast"],
        ["--scheduling", "gpipe"],
        ["--reconfig", "magic"],
        ["--stages", "0"],
        ["--seq-len", "1"],
        ["--bogus"],
        ["--device", "tpu"],
    ],
)
def test_usage_errors_exit_2(calls, args):
    result = _invoke("train", *args)
    assert result.exit_code == 2, result.output
    assert calls == []


def test_run_failure_is_one_line(monkeypatch):
    def fail(config, console):
        raise launch.RunError("rank 1 exited with code 1: boom; the job was stopped. Logs are kept in /tmp/x")

    monkeypatch.setattr(launch, "train", fail)
    result = _invoke("train")
    assert result.exit_code == 1
    assert _one_line(result.output).startswith("error: rank 1 exited with code 1: boom")


def test_profile_command(calls, tmp_path: Path):
    out = tmp_path / "p.json"
    result = _invoke("profile", "--stages", "2", "--micro-batches", "4", "-o", str(out))
    assert result.exit_code == 0, result.output
    ((config, output),) = calls
    assert config.mode == "profile" and config.stages == 2 and Path(output) == out


def test_help_lists_every_option():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--type",
        "--scheduling",
        "--reconfig",
        "--stages",
        "--micro-batches",
        "--micro-batch-size",
        "--seq-len",
        "--steps",
        "--model",
        "--data",
        "--deepspeed-config",
        "--agent",
        "--emulate-dvfs",
        "--no-emulate-dvfs",
        "--num-gpus",
        "--hostfile",
        "--num-nodes",
        "--report",
        "--plot",
    ):
        assert option in result.output, option


def test_a_long_error_stays_one_line_off_a_terminal(monkeypatch):
    # CliRunner is not a terminal: rich would wrap at 80 columns and split the one error line.
    message = "rank 3 exited with code 1: " + "a long reason " * 12 + "; logs are kept in the run folder"
    assert len(message) > 160

    def fail(config, console):
        raise launch.RunError(message)

    monkeypatch.setattr(launch, "train", fail)
    result = _invoke("train")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {message}"]


def test_an_error_quoting_brackets_is_printed_verbatim(monkeypatch):
    # gloo errors quote "[/path/unbound_buffer.cc:78]", which rich markup would reject (MarkupError).
    message = "rank 1 exited with code 1: [/src/gloo/transport/tcp/unbound_buffer.cc:78] Timed out [bold]"

    def fail(config, console):
        raise launch.RunError(message)

    monkeypatch.setattr(launch, "train", fail)
    result = _invoke("train")
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {message}"


@pytest.mark.parametrize(
    ("args", "rounds"),
    [([], 0), (["--compare"], 6), (["--compare", "3"], 3), (["--compare", "--steps", "400"], 6)],
)
def test_compare_takes_an_optional_number_of_rounds(calls, args, rounds):
    result = _invoke("train", *args)
    assert result.exit_code == 0, result.output
    (config,) = calls
    assert config.compare_rounds == rounds
    assert config.controller_block()["max_steps"] == config.steps  # the rounds land at the end of the run
    if "--steps" in args:
        assert config.steps == 400


def test_compare_every_reaches_the_config_and_its_errors_name_the_flag(calls, tmp_path: Path, monkeypatch):
    result = _invoke("train", "--compare", "4", "--compare-every", "50")
    assert result.exit_code == 0, result.output
    (config,) = calls
    assert (config.compare_rounds, config.compare_every) == (4, 50)
    assert config.controller_config().compare_every == 50 and config.compare_tail_steps() == 0  # spread out
    result = _invoke("train", "--compare-every", "50")  # rounds are opt-in: alone, it is a mistake
    assert result.exit_code == 1 and len(calls) == 1
    assert result.output.startswith("error: --compare-every = 50 spreads paired rounds")
    assert "set --compare (paired rounds are opt-in)" in result.output
    assert _invoke("train", "--compare", "--compare-every", "0").exit_code == 2  # usage error (K >= 1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text(json.dumps({"envpipe": {"compare_rounds": 2, "compare_every": 0}}))
    result = _invoke("train", "--deepspeed-config", "ds.json")
    assert result.output.startswith("error: ds.json: envpipe.compare_every must be an integer >= 1, got 0")
    result = _invoke("train", "--deepspeed-config", "ds.json", "--compare-every", "7")  # the flag wins
    assert result.exit_code == 0, result.output
    assert calls[-1].compare_every == 7


def test_plan_flags_reach_the_config_and_a_foreign_plan_is_refused_before_any_rank(calls, tmp_path: Path):
    from envpipe.controller.planfile import fingerprint, plan_dict, write_plan
    from envpipe.schedules import get_schedule

    def plan_for(**changes):
        fields = {"model": "m", "stages": 2, "micro_batches": 4, "micro_batch_size": 2, "seq_len": [64],
                  "card": "c", "clocks_mhz": [1980], "dvfs_model": "central", "envpipe_version": "0.1.0", **changes}
        return plan_dict(fingerprint=fingerprint(**fields), schedule=get_schedule("1f1b", 2, 4), clocks={},
                         target_ms=1.0, baseline_ms=1.0, settings={}, profile=None, simulated=True)

    ours, theirs = tmp_path / "plan.json", tmp_path / "other.json"
    write_plan(plan_for(), ours)
    write_plan(plan_for(micro_batches=8), theirs)
    result = _invoke("train", "--plan", str(ours), "--plan-out", str(tmp_path / "new.json"), "--recheck-interval", "50")
    assert result.exit_code == 0, result.output
    (config,) = calls
    assert config.plan == str(ours) and config.plan_out.endswith("new.json") and config.recheck_interval == 50
    result = _invoke("train", "--plan", str(theirs))
    text = _one_line(result.output)
    assert result.exit_code == 1 and result.output.count("error:") == 1 and len(calls) == 1
    assert "the plan was made for micro_batches = 8, this run has micro_batches = 4" in text
    result = _invoke("train", "--plan", str(tmp_path / "none.json"))
    assert result.exit_code == 1 and "no such file" in _one_line(result.output)
