"""``ours-w``: ours' warm-up with split backwards and W deferred; with r = 0 it is ZB-H1."""

from __future__ import annotations

import itertools

import pytest

from envpipe.errors import ScheduleError
from envpipe.schedules import get_schedule, ours_w
from envpipe.schedules.ours import warmups
from envpipe.sim import CostModel, simulate
from envpipe.verify import verify


def test_every_admissible_r_and_lag_is_deadlock_free_with_the_predicted_peak() -> None:
    checked = 0
    for stages in range(2, 5):
        for micro_batches in (stages, 2 * stages + 1):
            for head in itertools.product(range(3), repeat=stages - 1):
                r = (*head, 0)
                try:
                    warm = warmups(stages, micro_batches, ours_w.build(stages, micro_batches, r).r)
                except ScheduleError:
                    continue
                for lags in (None, [0] * stages, [2 * s for s in range(stages)]):
                    schedule = ours_w.build(stages, micro_batches, r, lags)
                    lag = ours_w.default_lags(stages) if lags is None else lags
                    expected = tuple(min(micro_batches, w + k) for w, k in zip(warm, lag))
                    assert verify(schedule).max_in_flight == expected
                    checked += 1
    assert checked > 100


def test_ours_w_with_r_zero_is_zb_h1() -> None:
    assert get_schedule("ours-w", 4, 8, [0, 0, 0, 0]).programs == get_schedule("zb-h1", 4, 8).programs


def test_ours_w_is_faster_than_ours_at_the_top_clock() -> None:
    costs = CostModel.build(4)
    ours = simulate(get_schedule("ours", 4, 16, costs=costs), costs)
    split = simulate(get_schedule("ours-w", 4, 16, costs=costs), costs)
    assert split.iteration_time_ms < 0.92 * ours.iteration_time_ms


def test_an_r_vector_that_cannot_run_is_refused() -> None:
    with pytest.raises(ScheduleError, match="dependency cycle"):
        get_schedule("ours-w", 3, 8, [0, 3, 0])
