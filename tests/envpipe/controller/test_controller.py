"""The controller's state machine without torch: rank threads, the simulator as the engine, a fake agent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fakes import CARD, default_fingerprint, run_pipeline

from envpipe.controller import ControllerConfig
from envpipe.controller.core import SAMPLES
from envpipe.errors import ConfigError

FAST = {
    "warmup_steps": 2,
    "baseline_steps": 3,
    "profile_steps": 2,
    "profile_clocks": 3,
    "reconfig_max_rounds": 20,
}


def _config(**changes) -> ControllerConfig:
    return ControllerConfig(**{**FAST, "recheck_interval": 0, **changes})


def test_every_step_is_one_engine_step_and_no_baseline_after_planning():
    result, pipeline, ports = run_pipeline(_config(), 150)
    assert [p.optimizer_steps for p in ports] == [150, 150] and pipeline.steps == 150
    counts = result["controller"]["step_counts"]
    assert sum(counts.values()) == 150
    assert counts["warm-up"] == 2 and counts["baseline"] == 3
    assert counts["profiling"] == 3 * 2 * (1 + 2)  # 3 clocks, down and up, 1 settling + 2 measured each
    assert counts["reconfiguration"] >= 5 + SAMPLES  # the fresh baseline (settle, samples, settle), rounds
    planning = result["controller"]["planning_steps"]
    assert planning == sum(v for k, v in counts.items() if k != "at-plan")
    # After planning every step ran the plan: ours, never 1F1B at the top clock.
    after = pipeline.plans[planning:]
    assert after and all(name == "ours" for name, _ in after)
    assert result["schedule"]["name"] == "ours" and result["compare"] is None
    assert (
        result["unpaired"]["label"].startswith("unpaired")
        and result["at_plan"]["iterations"] == 150 - planning
    )
    predicted = result["predicted"]
    assert predicted["label"].startswith("predicted") and 0 < predicted["energy_saving"] < 0.3
    assert predicted["slowdown"] <= 0.01 + 1e-6
    # Every rank holds the plan (a checkpoint stores it whichever rank saves).
    assert (
        pipeline.rank_plans[0] == pipeline.rank_plans[1]
        and pipeline.rank_plans[1]["format"] == "envpipe-plan/1"
    )


def test_compare_rounds_are_paired_at_the_end_with_an_interval():
    rounds, side = 6, 3
    steps = 150
    result, pipeline, _ = run_pipeline(
        _config(compare_rounds=rounds, compare_steps=side, max_steps=steps), steps
    )
    compare = result["compare"]
    assert compare["rounds"] == rounds and len(compare["paired_savings"]) == rounds
    tail = rounds * 2 * (1 + side)
    assert result["controller"]["step_counts"]["compare: baseline"] == rounds * (1 + side)
    # The rounds are the last steps; the baseline side runs 1F1B at the top clock.
    assert sum(1 for name, top in pipeline.plans[-tail:] if name == "1f1b" and top) == rounds * (1 + side)
    saving = compare["energy_saving"]
    assert saving["low"] <= saving["median"] <= saving["high"] and "order statistics" in saving["method"]
    # The simulator is deterministic: every round saves the same, the interval excludes 0.
    assert saving["median"] > 0 and not saving["contains_zero"]
    assert any("saves energy" in line for line in compare["verdict"])


def test_no_agent_trains_unplanned():
    result, pipeline, ports = run_pipeline(_config(), 12, agent=False)
    assert result["controller"]["step_counts"] == {"warm-up": 2, "unplanned": 10}
    assert all(top for _, top in pipeline.plans)


def test_noisy_non_monotone_profile_is_repaired_with_a_warning():
    # At the middle candidate clock units run 40 % faster than at the top: noise, not physics.
    clocks = ControllerConfig(**FAST).profile_clocks
    from envpipe.profiling import candidate_clocks

    middle = candidate_clocks(CARD.clocks_mhz, count=clocks, min_mhz=int(CARD.max_clock_mhz * 0.5))[1]
    result, _, _ = run_pipeline(_config(), 80, noise={middle: 0.6})
    assert any("fell as the clock fell" in w and "monotone fit" in w for w in result["warnings"])
    for stage in result["profile"]["stages"]:
        points = sorted(stage["points"], key=lambda p: p["clock_mhz"])
        fwd = [p["fwd_ms"] for p in points]
        assert fwd == sorted(fwd, reverse=True)  # time never falls as the clock falls
        assert "fwd_ms" in stage["repaired"] and stage["raw_points"]


def test_drift_guard_replans_when_a_stage_slows_down():
    config = _config(recheck_interval=20, drift_threshold=0.15)
    result, pipeline, _ = run_pipeline(config, 220, slow_from_step=120, slow_stage=0, slow_factor=1.5)
    replans = result["drift"]["replans"]
    assert len(replans) == 1 and "stage 0" in replans[0]["reason"] and replans[0]["step"] > 120
    assert result["controller"]["step_counts"]["re-plan"] >= 3
    assert result["drift"]["checks"] >= 3


def test_drift_guard_stays_quiet_without_drift():
    result, _, _ = run_pipeline(_config(recheck_interval=20), 200)
    assert result["drift"]["replans"] == [] and result["drift"]["checks"] >= 4


def test_plan_reuse_skips_profiling_and_a_mismatch_names_the_field(tmp_path):
    plan = tmp_path / "plan.json"
    first, _, _ = run_pipeline(_config(plan_out=str(plan)), 80)
    assert plan.is_file()
    again, pipeline, _ = run_pipeline(_config(plan=str(plan)), 40)
    counts = again["controller"]["step_counts"]
    assert "profiling" not in counts and "reconfiguration" not in counts
    assert again["clocks"] == first["clocks"] and again["schedule"]["r"] == first["schedule"]["r"]
    other = default_fingerprint(2, 4, micro_batch_size=8)
    with pytest.raises(ConfigError, match="micro_batch_size = 2.*micro_batch_size = 8"):
        run_pipeline(_config(plan=str(plan)), 10, print_fingerprint=other)


def test_reused_plan_with_its_stored_baseline_runs_no_baseline_step(tmp_path):
    plan = tmp_path / "plan.json"
    first, _, _ = run_pipeline(_config(plan_out=str(plan)), 80)
    stored = json.loads(plan.read_text())["baseline"]
    assert stored["iterations"] == 3 and stored["simulated"] is True and stored["world_size"] == 2
    assert stored["energy_j"] == pytest.approx(first["baseline"]["energy_j"]) and stored["date"]
    assert stored["tokens_per_s"] == pytest.approx(4 * 2 * 64 / (stored["iteration_ms"] / 1e3))
    fingerprint = json.loads(plan.read_text())["fingerprint"]

    again, pipeline, _ = run_pipeline(_config(plan=str(plan)), 40)
    counts = again["controller"]["step_counts"]
    assert counts == {"warm-up": 2, "at-plan": 38}  # no baseline step, no profiling
    assert sum(1 for name, top in pipeline.plans if name == "1f1b" and top) == 2  # the warm-up only
    assert again["baseline_origin"]["stored"] and again["baseline_origin"]["date"] == stored["date"]
    label = "baseline from the plan file (an earlier run; unpaired)"
    assert label in again["unpaired"]["label"] and label in again["baseline"]["statistic"]
    assert again["unpaired"]["energy_saving"] > 0 and again["baseline"]["energy_j"] == stored["energy_j"]
    # The plan's own target stands (no fresh window to rescale it by); the next checkpoint keeps the baseline.
    assert again["controller"]["target_ms"] == pytest.approx(first["controller"]["target_ms"])
    assert pipeline.rank_plans[1]["baseline"] == stored
    assert again["plan_fingerprint"] == fingerprint


def test_an_old_plan_file_without_a_stored_baseline_still_runs_the_window(tmp_path):
    plan = tmp_path / "plan.json"
    run_pipeline(_config(plan_out=str(plan)), 80)
    old = json.loads(plan.read_text())
    del old["baseline"]
    plan.write_text(json.dumps(old))
    again, pipeline, _ = run_pipeline(_config(plan=str(plan)), 40)
    assert again["controller"]["step_counts"] == {"warm-up": 2, "baseline": 3, "at-plan": 35}
    assert not again["baseline_origin"]["stored"] and "at the start" in again["unpaired"]["label"]
    assert next(p for p in again["phases"] if p["name"] == "plan")["baseline"] == "window"
    assert pipeline.rank_plans[0]["baseline"]["iterations"] == 3  # the plan in use now carries it


def test_a_stored_baseline_of_another_world_size_or_a_malformed_one(tmp_path):
    plan = tmp_path / "plan.json"
    run_pipeline(_config(plan_out=str(plan)), 80)
    data = json.loads(plan.read_text())
    data["baseline"]["world_size"] = 4  # energy summed over other replicas: not this run's reference
    plan.write_text(json.dumps(data))
    again, _, _ = run_pipeline(_config(plan=str(plan)), 40)
    assert again["controller"]["step_counts"]["baseline"] == 3
    data["baseline"]["iteration_ms"] = "fast"
    plan.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="stored baseline is malformed.*iteration_ms"):
        run_pipeline(_config(plan=str(plan)), 10)


def test_block_validation_names_the_key():
    with pytest.raises(ConfigError, match='unknown key "profile_clock"'):
        ControllerConfig.from_block({"profile_clock": 3})
    with pytest.raises(ConfigError, match="reconfig = 'fast' is not one of"):
        ControllerConfig.from_block({"reconfig": "fast"})
    assert ControllerConfig.from_block({"stages": 4, "recheck-interval": 50}).recheck_interval == 50


def test_no_torch_imported():
    code = "import envpipe.controller, envpipe.controller.driver, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_keys_are_exactly_the_train_configs_own_fields():
    import dataclasses

    from envpipe.controller.config import CONTROLLER_KEYS, RUN_KEYS
    from envpipe.train.config import TrainConfig

    own = {f.name for f in dataclasses.fields(TrainConfig)} - CONTROLLER_KEYS
    assert RUN_KEYS == own - {"deepspeed_config", "ds_config", "job_id"}


def test_model_check_replaces_an_online_plan_the_model_says_is_far_too_slow():
    from envpipe.controller.core import Context
    from envpipe.controller.meter import EnergyMeter
    from envpipe.controller.planning import model_check
    from envpipe.controller.ports import Gpu, SingleProcessComm
    from envpipe.schedules import get_schedule
    from envpipe.sim import CostModel

    class Port:
        stage = 0

        def set_plan(self, schedule, clocks):
            self.clocks = clocks

    costs = CostModel.build(2, fwd_ms=10.0, bwd_ms=20.0)
    schedule = get_schedule("ours", 2, 4, costs=costs)
    ctx = Context(
        config=ControllerConfig(),
        port=Port(),
        comm=SingleProcessComm(),
        meter=EnergyMeter(None, print),
        gpu=Gpu(CARD.name, CARD.clocks_mhz),
        simulated=True,
        stages=2,
        micro_batches=4,
        listener=lambda event, **fields: None,
        fingerprint=dict,
    )
    ctx.costs = costs
    slow = ctx.top_clocks(schedule, 990)  # every unit at half the top clock: +30 % or more in the model
    ctx.use(schedule, slow)
    model_check(ctx)
    assert ctx.clocks != slow and ctx.port.clocks == ctx.clocks
    assert any("too noisy to reconfigure on" in w for w in ctx.warnings)
    from envpipe.controller.planning import predicted_saving

    assert predicted_saving(ctx)["slowdown"] <= 0.01 + 1e-6
