"""The step x rank text grid of schedule errors."""

from __future__ import annotations

from envpipe.grid import format_grid


def test_format_grid_marks_the_error_row_and_keeps_the_tail() -> None:
    columns = [[f"0F{i}" for i in range(40)], ["." for _ in range(40)]]
    text = format_grid(columns, error_row=30, tail_rows=5)
    lines = text.splitlines()
    assert lines[0].split() == ["step", "|", "rank", "0", "rank", "1"]
    assert "(26 earlier rows)" in lines[2]
    assert lines[-1].endswith("<-- ERROR HERE") and lines[-1].split()[0] == "30"
    assert len(lines) == 3 + 5
