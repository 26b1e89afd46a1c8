"""ZB-V: two stages per rank in a V, verified deadlock-free, 1F1B's memory peak, near-zero bubble."""

from __future__ import annotations

import pytest

from envpipe.errors import ConfigError
from envpipe.schedules import get_schedule
from envpipe.sim import CostModel, simulate
from envpipe.verify import verify

SWEEP = [(p, m) for p in range(2, 6) for m in range(1, 13)]


@pytest.mark.parametrize(("ranks", "micro_batches"), SWEEP)
def test_zb_v_is_deadlock_free_in_a_v_with_1f1b_memory(ranks: int, micro_batches: int) -> None:
    schedule = get_schedule("zb-v", 2 * ranks, micro_batches)
    report = verify(schedule)
    assert schedule.stage_rank == (*range(ranks), *reversed(range(ranks)))
    assert all(len(schedule.units(r)) == 2 * 3 * micro_batches for r in range(ranks))
    # At most 2P chunk activations of half a stage each: P stages' worth, 1F1B's peak (stage 0's).
    assert max(report.max_in_flight) <= 2 * min(micro_batches, ranks) + 1
    if micro_batches >= 2 * ranks:
        assert max(report.max_in_flight) == 2 * ranks


@pytest.mark.parametrize(("ranks", "micro_batches"), [(4, 16), (3, 9), (5, 10)])
def test_equal_f_i_w_leave_only_half_a_forward_per_rank(ranks: int, micro_batches: int) -> None:
    """T_F = T_I = T_W on half-size chunks, free transfers: M (F + B) + (P - 1) F / 2."""
    fwd, bwd = 10.0, 20.0
    costs = CostModel.build(ranks, fwd_ms=fwd, bwd_ms=bwd, p2p_latency_ms=0, clock_switch_ms=0).chunked(2)
    result = simulate(get_schedule("zb-v", 2 * ranks, micro_batches), costs)
    assert result.iteration_time_ms == pytest.approx(micro_batches * (fwd + bwd) + (ranks - 1) * fwd / 2)
    assert len(result.stage_energy_j) == ranks


def test_zb_v_needs_an_even_stage_count() -> None:
    with pytest.raises(ConfigError, match="stages must be even and >= 4"):
        get_schedule("zb-v", 5, 8)
    with pytest.raises(ConfigError, match="exactly 2 stages per rank"):
        get_schedule("zb-v", 8, 8, virtual_stages=4)
