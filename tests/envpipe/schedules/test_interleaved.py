"""Interleaved 1F1B: several stages per rank, verified deadlock-free and simulated (simulator as oracle)."""

from __future__ import annotations

import pytest

from envpipe.errors import ConfigError, ScheduleError
from envpipe.ir import ActionKind
from envpipe.schedules import get_schedule
from envpipe.schedules.interleaved import unit_order
from envpipe.sim import CostModel, simulate
from envpipe.verify import verify

K = ActionKind
SWEEP = [(p, v, m) for p in (2, 3, 4) for v in (1, 2, 3) for m in (p, 2 * p, 4 * p)]


@pytest.mark.parametrize(("ranks", "virtual", "micro_batches"), SWEEP)
def test_interleaved_is_deadlock_free_and_places_stage_s_on_rank_s_mod_p(
    ranks: int, virtual: int, micro_batches: int
) -> None:
    schedule = get_schedule("interleaved", ranks * virtual, micro_batches, virtual_stages=virtual)
    report = verify(schedule)
    assert schedule.ranks == ranks and schedule.stages == ranks * virtual
    assert schedule.stage_rank == tuple(s % ranks for s in range(ranks * virtual))
    assert schedule.one_stage_per_rank == (virtual == 1)
    assert all(len(schedule.units(r)) == 2 * micro_batches * virtual for r in range(ranks))
    assert max(report.max_in_flight) <= micro_batches * virtual


@pytest.mark.parametrize(("ranks", "virtual", "micro_batches"), [(4, 2, 8), (2, 3, 4), (3, 2, 6), (4, 3, 12)])
def test_simulated_makespan_is_megatrons_bubble_formula(ranks: int, virtual: int, micro_batches: int) -> None:
    """Equal chunks, free transfers: (M*v + P - 1) * (f + b), the bubble (P-1)(f+b) a v-th of 1F1B's."""
    fwd, bwd = 5.0, 10.0
    costs = CostModel.build(ranks * virtual, fwd_ms=fwd, bwd_ms=bwd, p2p_latency_ms=0, clock_switch_ms=0)
    schedule = get_schedule("interleaved", ranks * virtual, micro_batches, virtual_stages=virtual)
    result = simulate(schedule, costs)
    assert result.iteration_time_ms == pytest.approx((micro_batches * virtual + ranks - 1) * (fwd + bwd))
    assert len(result.stage_energy_j) == ranks  # energy per GPU
    assert {span.rank for span in result.timeline} == set(range(ranks))
    assert all(span.rank == span.stage % ranks for span in result.timeline)
    # The same model on one stage per rank (1F1B, v times longer units) has a v times longer bubble.
    flat = CostModel.build(
        ranks, fwd_ms=fwd * virtual, bwd_ms=bwd * virtual, p2p_latency_ms=0, clock_switch_ms=0
    )
    one_f_one_b = simulate(get_schedule("1f1b", ranks, micro_batches), flat)
    assert one_f_one_b.iteration_time_ms - result.iteration_time_ms == pytest.approx(
        (ranks - 1) * (fwd + bwd) * (virtual - 1)
    )


def test_unit_order_is_megatrons() -> None:
    order = unit_order(0, 4, 8, 2)
    # Rank 0 of 4, v=2: 2*(4-0-1) + (2-1)*4 = 10 warm-up forwards:
    # chunk 0 mb 0-3, chunk 1 mb 0-3, chunk 0 mb 4-5.
    assert order[:10] == [(0, K.F, m) for m in range(4)] + [(4, K.F, m) for m in range(4)] + [
        (0, K.F, 4),
        (0, K.F, 5),
    ]
    assert order[10:12] == [(0, K.F, 6), (4, K.B, 0)]  # then one forward, one backward (last chunk first)
    assert unit_order(3, 4, 8, 2)[:5] == [(3, K.F, 0), (3, K.F, 1), (3, K.F, 2), (3, K.F, 3), (7, K.F, 0)]


def test_interleaved_input_errors() -> None:
    with pytest.raises(ConfigError, match="multiple of the ranks"):
        get_schedule("interleaved", 4, 3, virtual_stages=2)
    with pytest.raises(ConfigError, match="multiple of virtual_stages"):
        get_schedule("interleaved", 5, 4, virtual_stages=2)
    with pytest.raises(ConfigError, match="at least 2 ranks"):
        get_schedule("interleaved", 2, 2, virtual_stages=2)
    with pytest.raises(ConfigError, match="one stage per rank"):
        get_schedule("1f1b", 4, 4, virtual_stages=2)
    with pytest.raises(ConfigError, match="takes no r"):
        get_schedule("interleaved", 4, 4, (1, 0, 0, 0))


def test_link_projection_and_the_paper_policy_refuse_several_stages_per_rank() -> None:
    """The other planners plan it (tests/envpipe/planner/test_joint.py); the ATC'23 walk needs a chain."""
    from envpipe.planner import plan_clocks
    from envpipe.verify import link_schedule

    schedule = get_schedule("interleaved", 4, 4)
    with pytest.raises(ConfigError, match="runs on 1f1b and ours only"):
        plan_clocks(schedule, CostModel.build(4), "paper")
    with pytest.raises(ScheduleError, match="needs one stage per rank"):
        link_schedule(schedule, 0)
