"""Human renderings of timelines: as text, and as a Gantt chart PNG (the schedule grid is envpipe.grid).

matplotlib is imported only inside :func:`gantt_figure` (and :func:`gantt_png`, which saves it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from envpipe.sim.engine import SimResult


def timeline_text(result: SimResult, *, resolution_ms: float | None = None, width: int = 100) -> str:
    """One text line per rank: ``F``/``B``/``I``/``W`` when busy (lower case below the top clock), ``.`` idle."""
    total = result.iteration_time_ms
    step = resolution_ms or max(total / width, 1e-9)
    cells = int(total / step + 0.999)
    top = max((span.clock_mhz for span in result.timeline), default=0)
    rows = [["."] * cells for _ in range(len(result.stage_busy_ms))]
    for span in result.timeline:
        letter = span.unit[0] if span.clock_mhz >= top else span.unit[0].lower()
        for c in range(int(span.start_ms / step), min(cells, int(span.end_ms / step + 0.5))):
            rows[getattr(span, "row", span.stage)][c] = letter
    return "\n".join(f"s{s}: " + "".join(row) for s, row in enumerate(rows))


def gantt_png(result: SimResult, path: str | Path, *, title: str | None = None) -> Path:
    """Write a Gantt chart: a row per stage, units coloured by clock, bubbles blank, critical path red.

    ``result`` is a :class:`~envpipe.sim.engine.SimResult` or a measured iteration with the same fields; its
    ``simulated`` flag labels the time axis, and the critical-path legend entry appears only when there is
    a path to show (a measured iteration has none of its own).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = gantt_figure(result, title=title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gantt_figure(result: SimResult, *, title: str | None = None) -> Any:
    """The matplotlib figure behind :func:`gantt_png` (the caller saves and closes it)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colormaps, colors

    simulated = bool(getattr(result, "simulated", True))
    kind = "simulated" if simulated else "measured"
    stages = len(result.stage_busy_ms)
    clocks = sorted({span.clock_mhz for span in result.timeline})
    norm = colors.Normalize(
        vmin=min(clocks), vmax=max(clocks) if max(clocks) > min(clocks) else min(clocks) + 1
    )
    cmap = colormaps["viridis"]
    critical = set(result.critical_path)
    width_in = max(9.0, 0.12 * len(result.timeline) / max(stages, 1) + 6)
    fig, ax = plt.subplots(figsize=(width_in, 1.4 + 0.6 * stages))
    for span in result.timeline:
        _draw_span(ax, span, result.iteration_time_ms, cmap, norm, on_path=(span.stage, span.unit) in critical)
    row = "rank" if any(getattr(span, "rank", None) is not None for span in result.timeline) else "stage"
    ax.set_yticks(range(stages), [f"{row} {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, result.iteration_time_ms * 1.01)
    ax.set_xlabel(f"time (ms, {kind})")
    text = title or f"{kind}: {result.model}"
    ax.set_title("\n".join(textwrap.fill(line, int(width_in * 13)) for line in text.splitlines()), fontsize=8)
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=ax, label="SM clock (MHz)", pad=0.01)
    if critical:  # an empty path would still get a legend entry that points at nothing
        ax.plot([], [], color="red", linewidth=2, label="critical path")
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.12), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _draw_span(ax: Any, span: Any, iteration_ms: float, cmap: Any, norm: Any, *, on_path: bool) -> None:
    """One unit as a bar coloured by its clock (backward hatched), labelled when wide enough."""
    ax.barh(
        getattr(span, "row", span.stage),
        span.end_ms - span.start_ms,
        left=span.start_ms,
        height=0.8,
        color=cmap(norm(span.clock_mhz)),
        edgecolor="red" if on_path else "black",
        linewidth=2.0 if on_path else 0.4,
        hatch="//" if span.unit.startswith("B") else None,
    )
    if span.end_ms - span.start_ms > iteration_ms / 60:
        ax.text(
            (span.start_ms + span.end_ms) / 2,
            getattr(span, "row", span.stage),
            span.unit,
            ha="center",
            va="center",
            fontsize=7,
            color="white" if norm(span.clock_mhz) < 0.5 else "black",
        )
