"""The joint search: family, parameters and clocks together, under a deadline and a memory cap (simulated)."""

from __future__ import annotations

import pytest

from envpipe.errors import ConfigError
from envpipe.planner import plan_clocks
from envpipe.planner.joint import candidates, reference_run, search
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, simulate

pytest.importorskip("scipy")  # the LP bound orders the candidates; without it every candidate is planned


def _costs(stages: int = 3) -> CostModel:
    return CostModel.build(stages)


def test_search_ranks_planned_choices_by_energy_within_deadline_and_cap() -> None:
    result = search(3, 6, _costs(), memory_cap=3, policy="balanced", planned=2)
    assert result.best is result.ranked[0]
    assert [c.energy_j for c in result.ranked] == sorted(c.energy_j for c in result.ranked)
    for choice in result.ranked:
        assert choice.met_deadline and choice.iteration_ms <= result.deadline_ms * (1 + 1e-9)
        assert max(choice.candidate.peak_activations) <= 3
        assert choice.dag_energy_j >= choice.lp_bound_j - 1e-6  # the LP relaxation is a lower bound
        sim = simulate(choice.candidate.schedule, choice.candidate.costs, choice.clocks)
        assert sim.energy_j == pytest.approx(choice.energy_j)
    why = dict(result.rejected)
    assert "over the memory cap 3" in why["zb-h2"]  # 2S - 1 = 5
    assert result.best.saving > 0.1  # a zero-bubble schedule beats 1F1B's top-clock energy by far


def test_a_deadline_below_every_schedule_leaves_nothing() -> None:
    result = search(3, 6, _costs(), deadline_ms=1.0, families=["1f1b", "zb-h1"])
    assert result.best is None and result.ranked == []
    assert all("over the deadline 1.0 ms" in why for _, why in result.rejected)


def test_the_reference_sets_the_deadline() -> None:
    result = search(3, 6, _costs(), reference="zb-v", slowdown_bound=0.0, families=["1f1b", "zb-v"],
                    policy="balanced")
    assert [c.candidate.family for c in result.ranked] == ["zb-v"]
    assert "over the deadline" in dict(result.rejected)["1f1b"]
    _, _, ref = reference_run("zb-v", 3, 6, _costs())
    assert result.reference_ms == pytest.approx(ref.iteration_time_ms)


def test_candidates_carry_parameters_and_memory() -> None:
    found, rejected = candidates(4, 8, _costs(4))
    labels = {c.label: c for c in found}
    assert {"1f1b", "zb-h1", "zb-h2", "zb-v", "interleaved v=2"} <= set(labels)
    assert max(labels["zb-v"].peak_activations) == 4 and labels["zb-v"].schedule.ranks == 4
    assert labels["interleaved v=2"].costs.stages == 8
    assert any(c.family == "ours-w" and c.params["lag"] == [0, 2, 4, 6] for c in found)
    # interleaved v=3 on 4 GPUs needs M % 4 == 0: M=8 is fine; M=6 is left out with Megatron's rule.
    _, rejected = candidates(4, 6, _costs(4), families=["interleaved"])
    assert all("multiple of the ranks" in why for _, why in rejected)


def test_the_planners_plan_schedules_with_several_stages_per_gpu() -> None:
    costs = _costs(2)
    reference = (get_schedule("1f1b", 2, 4), costs)
    chunked = costs.chunked(2)
    schedule = get_schedule("zb-v", 4, 4)
    for policy in ("optimal", "balanced", "greedy"):
        result = plan_clocks(schedule, chunked, policy, reference=reference, max_rounds=60)
        assert result.met_bound, policy
        assert result.sim.energy_j < simulate(schedule, chunked).energy_j


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"families": ["gpipe"]}, "unknown schedule family 'gpipe'"),
        ({"policy": "paper"}, "unknown planner policy 'paper'"),
        ({"memory_cap": 0.5}, "--memory-cap is in activations per GPU"),
        ({"slowdown_bound": 2.0}, "the slowdown bound is a fraction"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs: dict, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        search(2, 4, _costs(2), **kwargs)
