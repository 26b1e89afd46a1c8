"""UnitSpan: one record for simulated and measured units, read from objects or report JSON."""

from __future__ import annotations

from types import SimpleNamespace

from envpipe.spans import UnitSpan


def test_a_span_is_read_from_a_span_an_object_or_a_dict() -> None:
    span = UnitSpan(1, "F3", 10.0, 12.5, 1410)
    assert UnitSpan.of(span) is span
    as_dict = {"stage": 1, "unit": "F3", "start_ms": 10, "end_ms": 12.5, "clock_mhz": 1410}
    assert UnitSpan.of(as_dict) == span == UnitSpan.of(SimpleNamespace(**as_dict))
    assert UnitSpan.of({**as_dict, "clock_mhz": None}).clock_mhz is None  # measured at an unknown clock


def test_the_row_is_the_rank_when_a_rank_holds_several_stages() -> None:
    assert UnitSpan(2, "B0", 0.0, 1.0, 1980).row == 2
    assert UnitSpan(2, "B0", 0.0, 1.0, 1980, rank=0).row == 0
