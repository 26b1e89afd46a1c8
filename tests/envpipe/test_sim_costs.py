"""CostModel: the three sourced curves, explicit parameters, measured profiles, and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envpipe_agent.dvfs import get_model, model_from_params

from envpipe.errors import ConfigError, SimulationError
from envpipe.schedules import compute_r, get_schedule
from envpipe.sim import CostModel, load_profile, profile_from_dict


def _profile_dict(stages: int = 1) -> dict[str, object]:
    # M=4, idle 127 W. Points built from known active power: energy = P * busy + idle * (iteration - busy).
    def point(clock: int, fwd: float, bwd: float, power_w: float) -> dict[str, float]:
        busy_ms = 4 * (fwd + bwd)
        iteration_ms = busy_ms + 70.0
        return {
            "clock_mhz": clock,
            "fwd_ms": fwd,
            "bwd_ms": bwd,
            "iteration_ms": iteration_ms,
            "energy_j": (power_w * busy_ms + 127.0 * 70.0) / 1e3,
        }

    points = [point(1980, 10, 20, 700), point(1500, 12, 24, 480), point(1200, 14, 28, 380)]
    return {
        "format": "envpipe-profile/1",
        "simulated": True,
        "source": "unit test",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "clocks_mhz": [1980, 1500, 1200]},
        "idle_power_w": 127.0,
        "micro_batches": 4,
        "stages": [{"stage": s, "points": points} for s in range(stages)],
    }


def test_model_curves_scale_time_and_power() -> None:
    for name in ("central", "conservative", "optimistic"):
        costs = CostModel.build(2, model=name, fwd_ms=[10, 12], bwd_ms=20)
        model = get_model(name)
        x = 1350 / 1980
        assert costs.unit_duration_ms(1, "F", 1350) == pytest.approx(12 * model.time_ratio(x))
        assert costs.unit_duration_ms(0, "B", 1980) == pytest.approx(20)
        assert costs.unit_power_w(0, "F", 1350) == pytest.approx(700 * model.power_ratio(x))
        assert costs.idle_power_w(0, 1980) == pytest.approx(0.18 * 700)
        assert costs.idle_power_w(0, 345) == pytest.approx(0.18 * 700 * 0.75)
        assert name in costs.describe()


def test_f_low_is_the_unit_energy_minimum_on_the_card() -> None:
    costs = CostModel.build(1)
    f_low = costs.f_low_mhz(0)
    assert f_low in costs.clocks_mhz and 0.63 <= f_low / 1980 <= 0.74
    assert CostModel.build(1, gpu="v100").f_low_mhz(0) in CostModel.build(1, gpu="v100").clocks_mhz


def test_explicit_parameters() -> None:
    model = model_from_params("a=0.5,p0=0.4,g=3,idle=0.3")
    costs = CostModel.build(1, model=model)
    assert costs.unit_duration_ms(0, "F", 990) == pytest.approx(10 * (0.5 / 0.5 + 0.5))
    assert costs.idle_power_w(0, 1980) == pytest.approx(0.3 * 700)
    assert "explicit" in costs.describe()


def test_measured_profile(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile_dict()))
    profile = load_profile(path)
    assert profile.clocks_mhz == (1980, 1500, 1200)
    assert profile.active_power_w(0, 1500) == pytest.approx(480)
    assert profile.f_low_mhz(0) == 1200
    costs = CostModel.build(3, profile=profile)  # a one-stage profile applies to every stage
    assert costs.fwd_ms == (10, 10, 10) and costs.max_clock_mhz == 1980 and costs.min_clock_mhz == 1200
    assert costs.unit_duration_ms(2, "B", 1500) == pytest.approx(24)
    assert costs.unit_duration_ms(0, "F", 1740) == pytest.approx(11)  # linear between 1500 and 1980
    assert costs.unit_power_w(0, "F", 1200) == pytest.approx(380)
    assert costs.idle_power_w(0, 1980) == pytest.approx(127)
    assert "simulated profile (unit test" in costs.describe()
    scaled = CostModel.build(3, profile=profile, fwd_ms=[20, 20, 20])
    assert scaled.unit_duration_ms(0, "F", 1500) == pytest.approx(24)
    with pytest.raises(SimulationError, match="outside 1200-1980"):
        costs.unit_duration_ms(0, "F", 1000)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"format": "other"}, "'format' must be"),
        ({"micro_batches": None}, "missing field 'micro_batches'"),
        ({"stages": [{"stage": 0, "points": []}]}, "positive fwd_ms"),
    ],
)
def test_profile_errors(change: dict[str, object], why: str) -> None:
    data = _profile_dict()
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=why):
        profile_from_dict(data)


def test_profile_stage_count_must_fit() -> None:
    with pytest.raises(ConfigError, match="has 2 stages but the pipeline has 3"):
        CostModel.build(3, profile=profile_from_dict(_profile_dict(stages=2)))


def test_cost_model_input_errors() -> None:
    with pytest.raises(ConfigError, match="2 entries for 3 stages"):
        CostModel.build(3, fwd_ms=[1, 2])
    with pytest.raises(ConfigError, match="must be > 0"):
        CostModel.build(1, fwd_ms=0)
    with pytest.raises(ValueError, match="unknown GPU"):
        CostModel.build(1, gpu="tpu")
    with pytest.raises(SimulationError, match="only F, B, I and W"):
        CostModel.build(1).unit_duration_ms(0, "RA", 1980)


def test_profile_below_the_card_top_clock_drives_r_and_baseline() -> None:
    data = _profile_dict()
    data["stages"][0]["points"] = data["stages"][0]["points"][1:]  # top profiled clock 1500 MHz
    costs = CostModel.build(4, profile=profile_from_dict(data))
    assert costs.max_clock_mhz == 1500 and costs.fwd_ms == (12, 12, 12, 12)
    r = compute_r(4, 16, costs)
    assert r == get_schedule("ours", 4, 16, costs=costs).r and r[0] > 0


def test_split_backward_defaults_to_halves_that_follow_the_backwards_curve() -> None:
    costs = CostModel.build(2, fwd_ms=10, bwd_ms=[20, 30])
    for clock in (1980, 1500, 1200):
        b = costs.unit_duration_ms(1, "B", clock)
        assert costs.unit_duration_ms(1, "I", clock) == pytest.approx(b / 2)
        assert costs.unit_duration_ms(1, "W", clock) == pytest.approx(b / 2)
        assert costs.unit_power_w(1, "W", clock) == costs.unit_power_w(1, "B", clock)


def test_split_backward_from_given_input_times() -> None:
    costs = CostModel.build(2, fwd_ms=10, bwd_ms=[20, 30], input_ms=[8, 18])
    assert costs.unit_duration_ms(0, "I", 1980) == pytest.approx(8)
    assert costs.unit_duration_ms(1, "W", 1980) == pytest.approx(12)
    slow = costs.unit_duration_ms(1, "B", 1200) / 30
    assert costs.unit_duration_ms(1, "I", 1200) == pytest.approx(18 * slow)
    with pytest.raises(ConfigError, match="input_share needs one share in"):
        CostModel.build(2, bwd_ms=20, input_ms=[8, 25])


def test_split_backward_from_a_profile_with_input_times() -> None:
    data = _profile_dict()
    shares = {1980: 0.4, 1500: 0.5, 1200: 0.6}
    for point in data["stages"][0]["points"]:  # type: ignore[index]
        point["input_ms"] = point["bwd_ms"] * shares[point["clock_mhz"]]
    costs = CostModel.build(2, profile=profile_from_dict(data))
    assert costs.unit_duration_ms(1, "I", 1980) == pytest.approx(8.0)
    assert costs.unit_duration_ms(1, "I", 1200) == pytest.approx(28 * 0.6)
    assert costs.unit_duration_ms(1, "W", 1200) == pytest.approx(28 * 0.4)
    data["stages"][0]["points"][0]["input_ms"] = 25.0  # type: ignore[index]
    with pytest.raises(ConfigError, match="input_ms .* strictly between 0 and bwd_ms"):
        profile_from_dict(data)


def test_chunked_costs_cut_each_stage_into_v_contiguous_chunks() -> None:
    costs = CostModel.build(2, fwd_ms=[16, 10], bwd_ms=[32, 20], input_ms=[8, 10])
    chunks = costs.chunked(2)
    assert chunks.fwd_ms == (8, 8, 5, 5) and chunks.bwd_ms == (16, 16, 10, 10)
    assert chunks.unit_duration_ms(1, "I", 1980) == pytest.approx(4.0)  # stage 0's I share, halved
    assert costs.chunked(1) is costs
    profiled = CostModel.build(2, profile=profile_from_dict(_profile_dict())).chunked(3)
    assert profiled.stages == 6
    assert profiled.unit_duration_ms(5, "F", 1200) == pytest.approx(14 / 3)
    assert profiled.unit_power_w(5, "F", 1500) == pytest.approx(480)
