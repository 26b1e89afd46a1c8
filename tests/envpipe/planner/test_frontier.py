"""The frontier: each family's energy against deadline, planned and bounded on the DAG model (simulated)."""

from __future__ import annotations

import pytest

from envpipe.planner.frontier import frontier
from envpipe.sim import CostModel

pytest.importorskip("scipy")


def test_each_familys_bound_falls_with_a_looser_deadline_and_plans_stay_above_it() -> None:
    result = frontier(2, 4, CostModel.build(2), slowdowns=(-0.05, 0.0, 0.05), families=["1f1b", "zb-h1", "zb-v"])
    by_family: dict[str, list] = {}
    for point in result.points:
        by_family.setdefault(point.family, []).append(point)
    assert set(by_family) == {"1f1b", "zb-h1", "zb-v"}
    assert by_family["1f1b"][0].saving is None  # 1F1B cannot run 5% faster than itself
    for points in by_family.values():
        bounds = [p.lp_saving for p in points if p.lp_saving is not None]
        assert bounds == sorted(bounds)
        assert all(p.saving <= p.lp_saving + 1e-9 for p in points if p.saving is not None)
    assert by_family["zb-v"][1].saving > by_family["1f1b"][1].saving + 0.05
    assert result.to_dict()["simulated"] is True
