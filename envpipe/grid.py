"""The step x column text grid that schedule errors and logs print (one column per rank, one row per step)."""

from __future__ import annotations

from collections.abc import Sequence

_GRID_TAIL_ROWS = 24


def format_grid(
    columns: Sequence[Sequence[str]],
    *,
    error_row: int | None = None,
    row_label: str = "step",
    column_label: str = "rank",
    tail_rows: int = _GRID_TAIL_ROWS,
) -> str:
    """A grid with one column per rank and one row per step; ``error_row`` gets ``<-- ERROR HERE``.

    Only the last ``tail_rows`` rows up to the error are shown (the interesting part of a deadlock).
    """
    rows = max((len(c) for c in columns), default=0)
    end = rows if error_row is None else min(rows, error_row + 1)
    start = max(0, end - tail_rows)
    width = max([len(cell) for col in columns for cell in col] + [len(f"{column_label} {len(columns)}")])
    header = f"{row_label:>5} | " + " ".join(
        f"{column_label + ' ' + str(s):<{width}}" for s in range(len(columns))
    )
    lines = [header, "-" * len(header)]
    if start:
        lines.append(f"{'...':>5} | ({start} earlier rows)")
    for row in range(start, end):
        cells = " ".join(f"{col[row] if row < len(col) else '':<{width}}" for col in columns)
        mark = "  <-- ERROR HERE" if row == error_row else ""
        lines.append(f"{row:>5} | {cells}{mark}".rstrip())
    return "\n".join(lines)
