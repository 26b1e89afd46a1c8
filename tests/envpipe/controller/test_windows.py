"""Windows, timelines and the statistics of paired rounds."""

from __future__ import annotations

import pytest

from envpipe.controller.stats import median_interval
from envpipe.controller.windows import Window, median_timeline, merge_windows


def _window(energy_j, iterations=2, iteration_ms=10.0):
    return Window(
        iterations=iterations,
        iteration_ms=iteration_ms,
        iteration_ms_median=iteration_ms,
        stage_energy_j={0: energy_j},
        simulated=True,
        losses=[1.0] * iterations,
        stage_unit_ms={0: {"F": 1.0, "B": 2.0}},
    )


def test_profiling_windows_of_one_clock_merge_by_iterations():
    merged = merge_windows([_window(10.0, iterations=2), _window(16.0, iterations=4, iteration_ms=13.0)])
    assert merged.iterations == 6 and merged.energy_j == pytest.approx(14.0)
    assert merged.iteration_ms == pytest.approx(12.0)
    assert merge_windows([_window(10.0), _window(None)]).energy_j == 10.0  # the window that has energy


def test_median_timeline_is_per_unit_and_keeps_ends_after_starts():
    from envpipe.sim import UnitSpan

    def iteration(f_end, b_start, b_end):
        return [UnitSpan(0, "F0", 0.0, f_end, 1980), UnitSpan(0, "B0", b_start, b_end, 1320)]

    # The second iteration was descheduled in F0: one bad sample does not move the median.
    timeline = median_timeline(
        [iteration(1.0, 1.1, 3.0), iteration(9.0, 9.1, 11.0), iteration(1.2, 1.3, 3.1)]
    )
    assert [(s.unit, s.start_ms, s.end_ms, s.clock_mhz) for s in timeline] == [
        ("F0", 0.0, 1.2, 1980),
        ("B0", 1.3, 3.1, 1320),
    ]


def test_median_interval_is_distribution_free_from_six_rounds():
    interval = median_interval([0.05, 0.01, 0.09, 0.03, 0.07, 0.02])
    # n = 6: the extremes cover the median with probability 1 - 2/64 = 96.9 %
    assert (interval.low, interval.high) == (0.01, 0.09) and "96.9%" in interval.method
    assert interval.median == pytest.approx(0.04) and not interval.contains_zero
    many = median_interval(list(range(20)))
    assert (many.low, many.high) == (5, 14)  # order statistics 6 and 15 of 20 (95.9 %)
    noisy = median_interval([-0.09, 0.66, 0.27, 0.1])  # the README's old rounds: -9 % .. +66 %
    assert noisy.contains_zero and "Student t" in noisy.method
    assert median_interval([0.1]).contains_zero  # one round: no interval, nothing shown
