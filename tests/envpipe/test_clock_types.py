"""Clock types: baseline, uniform and envelope per-unit rules."""

from __future__ import annotations

import pytest

from envpipe.clock_types import assign_clocks
from envpipe.errors import ConfigError
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel


def test_clock_types() -> None:
    costs = CostModel.build(3)
    schedule = get_schedule("ours", 3, 4, (1, 1, 0))
    top, low = costs.max_clock_mhz, costs.f_low_mhz(0)
    baseline = assign_clocks(schedule, costs, "baseline")
    assert all(clock == top for plan in baseline.values() for clock in plan.values())
    uniform = assign_clocks(schedule, costs, "uniform")
    assert all(clock == low for plan in uniform.values() for clock in plan.values())
    envelope = assign_clocks(schedule, costs, "envelope")
    for stage in range(3):
        on_top = sorted(unit for unit, clock in envelope[stage].items() if clock == top)
        expected = sorted(envelope[stage]) if stage == 2 else ["B3", "F0"]
        assert on_top == expected
        assert set(envelope[stage].values()) <= {top, low}
        assert set(envelope[stage]) == {u.unit for u in schedule.units(stage)}


def test_unknown_clock_type() -> None:
    with pytest.raises(ConfigError, match="choose one of baseline, uniform, envelope"):
        assign_clocks(get_schedule("1f1b", 2, 2), CostModel.build(2), "turbo")
