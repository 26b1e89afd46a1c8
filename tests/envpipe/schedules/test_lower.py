"""Lowering unit orders to programs: it reproduces ``ours`` exactly and handles split backwards (I/W)."""

from __future__ import annotations

import itertools

import pytest

from envpipe.errors import ScheduleError
from envpipe.ir import ActionKind, Schedule, schedule_from_text
from envpipe.schedules import get_schedule
from envpipe.schedules.lower import lower
from envpipe.sim import CostModel, simulate
from envpipe.verify import verify

K = ActionKind


def test_lowering_the_unit_order_of_ours_gives_ours() -> None:
    checked = 0
    for stages in range(1, 6):
        for micro_batches in range(1, 9):
            for head in itertools.product(range(4), repeat=stages - 1):
                try:
                    schedule = get_schedule("ours", stages, micro_batches, (*head, 0))
                except ScheduleError:
                    continue  # not admissible
                orders = [[(a.stage, a.kind, a.microbatch) for a in schedule.units(s)] for s in range(stages)]
                assert lower(stages, orders) == schedule.programs, (stages, micro_batches, head)
                checked += 1
    assert checked > 1000


def test_split_backward_lowers_verifies_and_simulates() -> None:
    """1F1B with every backward split into I then W right after it: same busy time, I/W take half of B each,
    and the iteration is shorter, because the gradient leaves after I instead of after the whole B."""
    stages, micro_batches = 3, 4
    base = get_schedule("1f1b", stages, micro_batches)
    orders = []
    for s in range(stages):
        order = []
        for a in base.units(s):
            order += (
                [(s, K.I, a.microbatch), (s, K.W, a.microbatch)]
                if a.kind is K.B
                else [(s, K.F, a.microbatch)]
            )
        orders.append(order)
    split = Schedule("split", stages, micro_batches, (0,) * stages, lower(stages, orders))
    verify(split)
    assert "0I0" in split.render() and "0W0" in split.render()
    costs = CostModel.build(stages, fwd_ms=10, bwd_ms=20, p2p_latency_ms=0, clock_switch_ms=0)
    result, reference = simulate(split, costs), simulate(base, costs)
    assert result.stage_busy_ms == pytest.approx(reference.stage_busy_ms)
    assert result.iteration_time_ms < reference.iteration_time_ms == pytest.approx(180.0)
    spans = {(t.stage, t.unit): t.end_ms - t.start_ms for t in result.timeline}
    assert spans[(0, "I0")] == pytest.approx(10) and spans[(0, "W0")] == pytest.approx(10)


def test_weight_gradients_off_the_critical_path_shorten_the_iteration() -> None:
    """Deferring every W to the end of the rank lets the gradient reach the previous stage earlier."""
    text = "r0: 0F0 0SA0 0RG0 0I0 0W0\nr1: 1RA0 1F0 1I0 1SG0 1W0"
    costs = CostModel.build(2, fwd_ms=10, bwd_ms=20, p2p_latency_ms=0, clock_switch_ms=0)
    deferred = simulate(schedule_from_text(text), costs).iteration_time_ms
    full = simulate(
        schedule_from_text("r0: 0F0 0SA0 0RG0 0B0\nr1: 1RA0 1F0 1B0 1SG0"), costs
    ).iteration_time_ms
    assert (deferred, full) == (pytest.approx(50.0), pytest.approx(60.0))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("r0: 0F0 0SA0 0RG0 0I0 0W0 0B0\nr1: 1RA0 1F0 1B0 1SG0", "runs B0 and I0/W0"),
        ("r0: 0F0 0SA0 0RG0 0I0\nr1: 1RA0 1F0 1B0 1SG0", "runs W0 0 times"),
        ("r0: 0F0 0SA0 0W0 0RG0 0I0\nr1: 1RA0 1F0 1B0 1SG0", "runs W0 before I0"),
        ("r0: 0F0 0SA0 0I0 0RG0 0W0\nr1: 1RA0 1F0 1B0 1SG0", "RG0 must come before I0"),
    ],
)
def test_split_backward_errors(text: str, why: str) -> None:
    with pytest.raises(ScheduleError, match=why):
        verify(schedule_from_text(text))


def test_lower_rejects_a_stage_on_two_ranks() -> None:
    with pytest.raises(ScheduleError, match="on two ranks"):
        lower(2, [[(0, K.F, 0)], [(0, K.B, 0)]])
