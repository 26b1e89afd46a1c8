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


def gantt_png(
    result: SimResult,
    path: str | Path,
    *,
    title: str | None = None,
    clock_range_mhz: tuple[int, int] | None = None,
    energy_j: float | None = None,
    saving: float | None = None,
    energy_label: str | None = None,
) -> Path:
    """Write a Gantt chart: a row per stage, units coloured by clock, bubbles blank, critical path red.

    ``result`` is a :class:`~envpipe.sim.engine.SimResult` or a measured iteration with the same fields; its
    ``simulated`` flag labels the axes (one word each: *simulated* or *measured*), and the critical-path
    legend entry appears only when there is a path to show (a measured iteration has none of its own).
    ``clock_range_mhz`` (the card's lowest and highest clock) fixes the colour scale, so the same colour is
    the same clock in every chart; ``energy_j`` (per iteration) and ``saving`` (a fraction, against the
    baseline) go into the title, labelled ``energy_label`` (default: as the time axis; a measured timeline
    with the sim agent's energy is ``simulated``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = gantt_figure(
        result, title=title, clock_range_mhz=clock_range_mhz, energy_j=energy_j, saving=saving,
        energy_label=energy_label,
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_headline(kind: str, energy_j: float | None, saving: float | None) -> str:
    """The first title line: energy per iteration and the saving, labelled (simulated or measured)."""
    parts = []
    if energy_j is not None:
        parts.append(f"{energy_j:.1f} J/iteration")
    if saving is not None:
        parts.append(f"{saving:+.1%} energy saving vs the baseline")
    return f"{kind}: " + (", ".join(parts) if parts else "energy not available")


def gantt_figure(
    result: SimResult,
    *,
    title: str | None = None,
    clock_range_mhz: tuple[int, int] | None = None,
    energy_j: float | None = None,
    saving: float | None = None,
    energy_label: str | None = None,
) -> Any:
    """The matplotlib figure behind :func:`gantt_png` (the caller saves and closes it)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colormaps, colors

    simulated = bool(getattr(result, "simulated", True))
    kind = "simulated" if simulated else "measured"
    stages = len(result.stage_busy_ms)
    clocks = sorted({span.clock_mhz for span in result.timeline}) or [0]
    low, high = clock_range_mhz or (min(clocks), max(clocks))
    norm = colors.Normalize(vmin=low, vmax=high if high > low else low + 1)
    cmap = colormaps["viridis"]
    critical = set(result.critical_path)
    units_per_row = len(result.timeline) / max(stages, 1)
    width_in = min(24.0, max(9.0, 0.12 * units_per_row + 6))
    fig, ax = plt.subplots(figsize=(width_in, 1.6 + 0.5 * stages))
    # share of the time axis one character of a 7 pt label takes (0.6 em wide; the axes ~80 % of the figure)
    # a label needs room for the longest name in the chart: units are labelled alike or not at all
    char_share = 7 * 0.6 / 72 / (0.8 * width_in) * (1 + max((len(s.unit) for s in result.timeline), default=1))
    for span in result.timeline:
        _draw_span(
            ax, span, result.iteration_time_ms, cmap, norm, on_path=(span.stage, span.unit) in critical,
            char_share=char_share,
        )
    row = "rank" if any(getattr(span, "rank", None) is not None for span in result.timeline) else "stage"
    ax.set_yticks(range(stages), [f"{row} {s}" for s in range(stages)], fontsize=8 if stages > 4 else 10)
    ax.invert_yaxis()
    ax.set_xlim(0, result.iteration_time_ms * 1.01)
    ax.set_xlabel(f"time (ms, {kind})")
    lines = [chart_headline(energy_label or kind, energy_j, saving)]
    lines += (title or str(getattr(result, "model", ""))).splitlines()
    wrapped = [textwrap.fill(line, int(width_in * 13)) for line in lines if line]
    ax.set_title("\n".join(wrapped), fontsize=8)
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    clock_word = "simulated" if simulated else "as planned"
    fig.colorbar(mappable, ax=ax, label=f"SM clock (MHz, {clock_word})", pad=0.01)
    if critical:  # an empty path would still get a legend entry that points at nothing
        ax.plot([], [], color="red", linewidth=2, label="critical path")
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.12), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _draw_span(
    ax: Any, span: Any, iteration_ms: float, cmap: Any, norm: Any, *, on_path: bool, char_share: float
) -> None:
    """One unit as a bar coloured by its clock (backward hatched), labelled only when the label fits."""
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
    if (span.end_ms - span.start_ms) / iteration_ms > char_share:
        ax.text(
            (span.start_ms + span.end_ms) / 2,
            getattr(span, "row", span.stage),
            span.unit,
            ha="center",
            va="center",
            fontsize=7,
            color="white" if norm(span.clock_mhz) < 0.5 else "black",
        )
