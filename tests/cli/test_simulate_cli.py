"""``envpipe simulate``: table, JSON fields, Gantt PNG, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envpipe_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def _run(*args: str) -> object:
    return runner.invoke(app, ["simulate", *args])


def test_table_compares_with_1f1b_at_max_clock() -> None:
    result = _run(
        "--stages",
        "4",
        "--micro-batches",
        "16",
        "--type",
        "envelope",
        "--scheduling",
        "ours",
        "--reconfig",
        "default",
        "--fwd-ms",
        "10,10,10,14",
        "--bwd-ms",
        "20,20,20,28",
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "simulated" in out and "baseline (1f1b, max clock)" in out
    assert "ours / envelope / default" in out and "r = [4, 3, 1, 0]" in out and "central" in out
    assert "per stage (simulated)" in out and "critical units" in out


def test_json_carries_the_contract_fields() -> None:
    result = _run(
        "-S",
        "4",
        "-M",
        "8",
        "--scheduling",
        "ours",
        "--type",
        "uniform",
        "--reconfig",
        "default",
        "--r",
        "4,3,1,0",
        "--dvfs-model",
        "optimistic",
        "--card",
        "a100",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in (
        "model",
        "iteration_time_s",
        "energy_j",
        "baseline",
        "energy_saving",
        "slowdown",
        "r",
        "order",
        "clocks_mhz",
    ):
        assert key in data
    assert data["simulated"] is True and "optimistic" in data["model"] and "A100" in data["model"]
    assert set(data["baseline"]) >= {"iteration_time_s", "energy_j"}
    assert data["r"] == [4, 3, 1, 0]
    assert data["order"][3][:4] == ["F0", "B0", "F1", "B1"] and len(data["order"][0]) == 16
    assert len(data["clocks_mhz"][0]) == 16 and set(data["clocks_mhz"][0]) == {data["f_low_mhz"][0]}
    assert data["energy_saving"] == pytest.approx(1 - data["energy_j"] / data["baseline"]["energy_j"])


def test_baseline_against_itself_saves_nothing() -> None:
    data = json.loads(_run("--scheduling", "1f1b", "--type", "baseline", "--reconfig", "default", "--json").output)
    assert data["energy_saving"] == pytest.approx(0) and data["slowdown"] == pytest.approx(0)


def test_model_params_and_profile(tmp_path: Path) -> None:
    data = json.loads(_run("--model-params", "a=0.5,p0=0.4,g=3,idle=0.2", "--json").output)
    assert data["model"].startswith("explicit")
    profile = {
        "format": "envpipe-profile/1",
        "simulated": True,
        "source": "cli test",
        "idle_power_w": 127.0,
        "micro_batches": 4,
        "gpu": {"name": "H100"},
        "stages": [
            {
                "stage": 0,
                "points": [
                    {"clock_mhz": 1980, "fwd_ms": 10, "bwd_ms": 20, "iteration_ms": 190, "energy_j": 92.9},
                    {"clock_mhz": 1350, "fwd_ms": 13, "bwd_ms": 26, "iteration_ms": 226, "energy_j": 80.0},
                ],
            }
        ],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    data = json.loads(_run("--profile", str(path), "-S", "2", "-M", "4", "--json").output)
    assert "simulated profile (cli test" in data["model"] and data["f_low_mhz"] == [1350, 1350]


def test_a_non_monotone_profile_is_repaired_and_warned_about(tmp_path: Path) -> None:
    # 1350 MHz measured 40 % faster than 1980 MHz (noise, not physics): used raw, the plan would be "faster".
    points = [
        {"clock_mhz": 1980, "fwd_ms": 10, "bwd_ms": 20, "iteration_ms": 190, "energy_j": 92.9},
        {"clock_mhz": 1350, "fwd_ms": 6, "bwd_ms": 12, "iteration_ms": 114, "energy_j": 60.0},
    ]
    profile = {"format": "envpipe-profile/1", "simulated": True, "source": "noisy", "idle_power_w": 127.0,
               "micro_batches": 4, "gpu": {"name": "H100"}, "stages": [{"stage": 0, "points": points}]}
    path = tmp_path / "noisy.json"
    path.write_text(json.dumps(profile))
    result = _run("--profile", str(path), "-S", "2", "-M", "4", "--scheduling", "1f1b", "--type", "uniform",
                  "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.output
    assert str(path) in warnings[0] and "fell as the clock fell" in warnings[0] and "monotone" in warnings[0]
    data = json.loads(result.output[result.output.index("{"):])
    assert data["slowdown"] >= -1e-9  # repaired: a lower clock is never faster than the top one
    assert data["f_low_mhz"] == [1350, 1350]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "gantt.png"
    result = _run("-S", "3", "-M", "6", "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--dvfs-model", "central", "--model-params", "a=1,p0=1,g=1,idle=0"], "give only one of"),
        (["--card", "a100", "--gpu", "h100"], "give --card only (--gpu is its old spelling)"),
        (["--r", "1,x"], "--r takes integers"),
        (["--r", "0,0,3,0", "-M", "8"], "cannot run"),
        (["--fwd-ms", "1,2"], "2 entries for 4 stages"),
        (["--model", "fast"], "unknown DVFS model"),
        (["--profile", "/nonexistent/p.json"], "No such file"),
        (["--scheduling", "interleaved", "-S", "2", "-M", "3"], "multiple of the ranks (2)"),
    ],
)
def test_errors_are_one_line(args: list[str], why: str) -> None:
    result = _run(*args)
    assert result.exit_code == 1
    assert why in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [
        ("--reconfig", "turbo", "'default', 'greedy', 'balanced', 'optimal', 'paper', 'paper-greedy'"),
        ("--type", "turbo", "'baseline', 'uniform', 'envelope'"),
        ("--scheduling", "gpipe", "'1f1b', 'ours', 'interleaved'"),
        ("--dvfs-model", "fast", "'central', 'conservative', 'optimistic'"),
        ("--card", "tpu", "'h100'"),
    ],
)
def test_choices_come_from_the_registries(flag: str, value: str, choices: str) -> None:
    result = _run(flag, value)
    assert result.exit_code == 2  # a usage error: the flag, the bad value and every choice
    text = " ".join(" ".join(line.strip(" │╭╮╰╯─") for line in result.output.splitlines()).split())
    assert f"'{value}' is not one of" in text and choices in text and flag in text


def test_help_lists_every_registered_choice_with_its_summary() -> None:
    from envpipe.planner import POLICIES
    from envpipe.schedules import SCHEDULES

    text = " ".join(_run("--help").output.split())
    for registry in (SCHEDULES, POLICIES):
        for name in registry:
            assert name in text
    assert "paper-greedy" in text and "Megatron-LM" in text


def test_simulate_has_trains_defaults() -> None:
    from envpipe.controller.config import ControllerConfig

    data = json.loads(_run("-S", "2", "-M", "4", "--json").output)
    defaults = ControllerConfig()
    assert (data["type"], data["scheduling"], data["reconfig"]) == (
        defaults.type,
        defaults.scheduling,
        defaults.reconfig,
    )
    assert defaults.dvfs_model in data["model"]


def test_old_spellings_work_with_one_deprecation_line() -> None:
    new = _run("-S", "2", "-M", "4", "--card", "a100", "--dvfs-model", "optimistic", "--json")
    old = _run("-S", "2", "-M", "4", "--gpu", "a100", "--model", "optimistic", "--json")
    assert old.exit_code == 0, old.output
    assert "warning: --gpu is deprecated, use --card" in old.stderr
    assert "warning: --model is deprecated, use --dvfs-model" in old.stderr
    assert json.loads(old.stdout) == json.loads(new.stdout)


def test_a_schedule_that_hangs_on_the_chosen_transport_is_refused_with_its_cycle() -> None:
    args = ["--stages", "2", "--micro-batches", "4", "--scheduling", "ours", "--r", "2,0"]
    assert _run(*args).exit_code == 0  # default: the NCCL-safe link transport
    result = _run(*args, "--p2p-transport", "pair")
    assert result.exit_code == 1
    assert "error:" in result.output and "hangs on GPUs with the 'pair' p2p transport" in result.output
    assert "rank 0 p2p 0<->1: 0iSA" in result.output and "Traceback" not in result.output
    unknown = _run(*args, "--p2p-transport", "nccl")
    text = " ".join(" ".join(line.strip(" │╭╮╰╯─") for line in unknown.output.splitlines()).split())
    assert unknown.exit_code == 2 and "'nccl' is not one of 'link', 'pair'" in text  # from TRANSPORTS


def test_a_zero_bubble_schedule_on_gpus_holding_two_stages() -> None:
    data = json.loads(_run("-S", "2", "-M", "4", "--scheduling", "zb-v", "--reconfig", "balanced", "--json").output)
    assert data["virtual_stages"] == 2 and data["reference"] == "1f1b"
    assert len(data["stage_energy_j"]) == 2 and data["peak_activations"] == [2.0, 2.0]
    assert data["order"][0][:3] == ["0F0", "0F1", "0F2"] and data["order"][0][3] == "3F0"
    assert data["energy_saving"] > 0.1 and data["slowdown"] <= 0.01 + 1e-9


def test_reference_and_memory_cap() -> None:
    data = json.loads(_run("-S", "4", "-M", "8", "--scheduling", "1f1b", "--reference", "zb-h1", "--json").output)
    assert data["baseline"]["scheduling"] == "zb-h1" and data["slowdown"] > 0.1  # 1f1b is slower than zb-h1
    result = _run("-S", "4", "-M", "8", "--scheduling", "zb-h2", "--memory-cap", "5")
    assert result.exit_code == 1 and "zb-h2 holds 7 activations on a GPU" in result.output


def test_best_is_the_joint_search_with_runner_ups() -> None:
    data = json.loads(_run("-S", "2", "-M", "4", "--scheduling", "best", "--memory-cap", "2",
                           "--reconfig", "balanced", "--json").output)
    assert data["simulated"] and data["best"] == data["ranked"][0]["label"]
    assert all(max(c["peak_activations"]) <= 2 for c in data["ranked"])
    assert [c["energy_j"] for c in data["ranked"]] == sorted(c["energy_j"] for c in data["ranked"])
    assert any("over the memory cap 2" in r["why"] for r in data["rejected"])


def test_frontier_table_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "frontier.png"
    result = _run("-S", "2", "-M", "2", "--frontier", "--json", "--plot", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    families = {p["family"] for p in data["points"]}
    assert {"1f1b", "zb-v", "zb-h1"} <= families and data["simulated"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _run("-S", "2", "-M", "3", "--frontier", "--memory-cap", "2").output
    assert "planned / LP bound" in table
    assert "left out: zb-h2: holds 3 activations on a GPU, over the memory cap 2" in table


def test_an_absolute_deadline() -> None:
    data = json.loads(_run("-S", "2", "-M", "4", "--scheduling", "zb-h1", "--reconfig", "balanced",
                           "--deadline-ms", "200", "--json").output)
    assert data["deadline_ms"] == 200 and data["iteration_time_s"] * 1e3 <= 200 * (1 + 1e-9)
    assert data["slowdown"] > 0.1  # slower than 1F1B at the top clocks (150 ms), as the deadline allows
    result = _run("-S", "2", "-M", "4", "--scheduling", "1f1b", "--deadline-ms", "50")
    assert result.exit_code == 1 and "1f1b takes 150.4 ms even at the top clocks" in result.output
    best = json.loads(_run("-S", "2", "-M", "4", "--scheduling", "best", "--deadline-ms", "140", "--json",
                           "--reconfig", "balanced").output)
    assert best["deadline_ms"] == 140 and all(c["iteration_ms"] <= 140 + 1e-6 for c in best["ranked"])
    assert "1f1b" not in [c["label"] for c in best["ranked"]]  # 150 ms at the top clocks
    assert _run("--frontier", "--deadline-ms", "140").exit_code == 1
