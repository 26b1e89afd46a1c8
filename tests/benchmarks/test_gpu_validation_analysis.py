"""Pure helpers of benchmarks/gpu_validation (issue 7): energy integral, event matching, syncs, goals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_validation"


def _load(name: str, filename: str):
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(name, HERE / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


analysis = _load("gpu_validation_analysis", "analysis.py")
driver = _load("gpu_validation_run", "run.py")


# -- energy ------------------------------------------------------------------------------------------------
def test_constant_power_integrates_to_power_times_duration():
    samples = [(t / 10, 300.0) for t in range(51)]
    assert analysis.integrate_power_j(samples, 1.0, 4.0) == pytest.approx(900.0)


def test_ramp_is_integrated_linearly_and_window_is_clipped_between_samples():
    samples = [(0.0, 100.0), (1.0, 200.0), (2.0, 300.0)]
    # 0.5 .. 1.5 s: power 150 → 250 linearly, mean 200 W over 1 s.
    assert analysis.integrate_power_j(samples, 0.5, 1.5) == pytest.approx(200.0)


def test_power_is_held_outside_the_samples():
    samples = [(1.0, 100.0), (2.0, 100.0)]
    assert analysis.integrate_power_j(samples, 0.0, 3.0) == pytest.approx(300.0)


@pytest.mark.parametrize("samples, start, end, message", [
    ([(0.0, 1.0)], 0.0, 1.0, "at least two"),
    ([(0.0, 1.0), (1.0, 1.0)], 1.0, 1.0, "empty window"),
    ([(1.0, 1.0), (0.0, 1.0)], 0.0, 1.0, "sorted"),
])
def test_bad_integration_input_says_what_is_wrong(samples, start, end, message):
    with pytest.raises(ValueError, match=message):
        analysis.integrate_power_j(samples, start, end)


# -- events ------------------------------------------------------------------------------------------------
def test_expected_events_are_begin_end_per_unit_per_iteration():
    assert analysis.expected_events([["F0", "B0"], ["F0"]]) == [
        (0, "F0", "begin"), (0, "F0", "end"), (0, "B0", "begin"), (0, "B0", "end"),
        (1, "F0", "begin"), (1, "F0", "end"),
    ]


def _boundaries(expected):
    return {event: 1_000_000 * i for i, event in enumerate(expected)}


def test_events_in_order_give_their_lags():
    expected = analysis.expected_events([["F0", "B0"]])
    received = [(1_000_000 * i + 250_000, unit, kind) for i, (_, unit, kind) in enumerate(expected)]
    match = analysis.match_events(expected, received, _boundaries(expected))
    assert match.in_order and match.first_mismatch is None
    assert match.lags_ms == pytest.approx([0.25] * 4)


def test_swapped_events_are_reported_at_the_first_wrong_position():
    expected = analysis.expected_events([["F0", "B0"]])
    received = [(0, "F0", "begin"), (0, "B0", "begin"), (0, "F0", "end"), (0, "B0", "end")]
    match = analysis.match_events(expected, received, _boundaries(expected))
    assert not match.in_order and match.first_mismatch == 1


@pytest.mark.parametrize("received_count, mismatch", [(3, 3), (5, 4)])
def test_missing_or_extra_events_are_not_in_order(received_count, mismatch):
    expected = analysis.expected_events([["F0", "B0"]])
    received = [(0, unit, kind) for _, unit, kind in expected] + [(0, "F1", "begin")]
    match = analysis.match_events(expected, received[:received_count], _boundaries(expected))
    assert not match.in_order and match.first_mismatch == mismatch


def test_sync_calls_are_counted_per_thread_and_other_events_ignored():
    trace = {"traceEvents": [
        {"ph": "X", "name": "cudaEventSynchronize", "tid": 7},
        {"ph": "X", "name": "cudaEventSynchronize", "tid": 7},
        {"ph": "X", "name": "cudaDeviceSynchronize", "tid": 1},
        {"ph": "X", "name": "cudaLaunchKernel", "tid": 1},
        {"ph": "i", "name": "cudaDeviceSynchronize", "tid": 1},
    ]}
    expected = {7: {"cudaEventSynchronize": 2}, 1: {"cudaDeviceSynchronize": 1}}
    assert analysis.sync_calls_by_thread(trace) == expected


# -- summaries and goals -------------------------------------------------------------------------------------
def test_stats_use_observed_values():
    result = analysis.stats([5, 1, 4, 2, 3])
    assert result["n"] == 5 and result["median"] == 3 and result["min"] == 1 and result["max"] == 5
    assert result["p90"] == 5 and result["p10"] == 1
    assert analysis.stats([]) == {"n": 0}


def test_goals_pass_and_fail_and_missing_values_fail():
    assert analysis.goal("g", -0.04, 0.05)["met"] is True
    assert analysis.goal("g", 0.06, 0.05)["met"] is False
    assert analysis.goal("g", 1.02, 1.01, kind="le")["met"] is False
    assert analysis.goal("g", 0.5, 1.01, kind="le")["met"] is True
    assert analysis.goal("g", None, 1.0)["met"] is False
    with pytest.raises(ValueError, match="abs_le"):
        analysis.goal("g", 1.0, 1.0, kind="ge")


def test_relative_error_and_zero_reference():
    assert analysis.relative_error(105.0, 100.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="reference is 0"):
        analysis.relative_error(1.0, 0.0)


def _engine_result(lease_id=3):
    spans = [[("F0", 1.0, 2.0), ("B0", 2.5, 4.0)]]
    return {
        "client": {"lease_id": lease_id, "events_sent": 6, "events_dropped": 0},
        "lag": {"spans": spans, "calibration_ns": [(10_000_000, 10_005_000)], "events_sent_before": 2,
                "events_sent_after": 6, "calibration_width_us": {"n": 1}},
        "overhead": {"ratio_envpipe_over_stock": 1.004, "times_ms": {}, "median_ms": {}},
        "profiler": {"main_tids": [1], "notifier_tids": [9, 4242], "stock": {"1": {"cudaDeviceSynchronize": 2}},
                     "envpipe": {"1": {"cudaDeviceSynchronize": 2}, "9": {"cudaEventSynchronize": 16}},
                     "stock_device_wide": 2, "envpipe_device_wide": 2},
    }


def test_engine_summary_matches_the_lag_stretch_of_this_lease():
    # Two warm-up events, then the lag stretch 0.1 ms behind each boundary; another lease's event ignored.
    boundaries = [11_000_000, 12_000_000, 12_500_000, 14_000_000]
    records = [[1, 3, "F0", "begin"], [2, 3, "F0", "end"], [5, 99, "F0", "begin"]]
    records += [[ns + 100_000, 3, unit, kind] for ns, (unit, kind) in
                zip(boundaries, [("F0", "begin"), ("F0", "end"), ("B0", "begin"), ("B0", "end")])]
    summary = driver.summarise_engine(_engine_result(), records)
    assert summary["events_received_for_lease"] == 6
    assert summary["lag"]["in_order"] and summary["lag"]["lag_ms"]["median"] == pytest.approx(0.1)
    assert summary["goal_events"]["met"] and summary["goal_overhead"]["met"] and summary["goal_sync"]["met"]
    assert summary["sync_calls_by_thread"] == {
        "stock": {"main": {"cudaDeviceSynchronize": 2}},
        "envpipe": {"main": {"cudaDeviceSynchronize": 2}, "notifier": {"cudaEventSynchronize": 16}},
    }


def test_engine_summary_flags_an_extra_device_wide_sync_and_slow_engine():
    result = _engine_result()
    result["profiler"]["envpipe_device_wide"] = 3
    result["overhead"]["ratio_envpipe_over_stock"] = 1.05
    summary = driver.summarise_engine(result, [])
    assert not summary["goal_sync"]["met"] and not summary["goal_overhead"]["met"]
    assert not summary["goal_events"]["met"]  # nothing received


def test_goals_table_collects_goal_lines_of_every_part():
    results = {"parts": {"1": {"goal": analysis.goal("a", 0, 0, kind="le")},
                         "4": {"goal_sync": analysis.goal("b", 1, 0, kind="le"), "other": {}}}}
    rows = driver.goals_table(results)
    assert [(r["part"], r["goal"], r["met"]) for r in rows] == [("1", "a", True), ("4", "b", False)]


def test_counter_updates_reports_how_often_the_counter_changes():
    # Read every 10 ms; the counter moves by 50 J every 100 ms.
    series = [(i * 0.01, 50.0 * (i // 10)) for i in range(51)]
    result = analysis.counter_updates(series)
    assert result["reads"] == 51 and result["changes"] == 5
    assert result["change_interval_ms"]["median"] == pytest.approx(100.0)
    assert result["change_step_j"]["median"] == pytest.approx(50.0)
    assert result["read_interval_ms"]["median"] == pytest.approx(10.0)
