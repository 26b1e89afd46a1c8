"""The Gantt chart labels its time axis by where the timeline came from and hides an empty critical path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from envpipe.render import gantt_figure, gantt_png
from envpipe.sim import UnitSpan

pytest.importorskip("matplotlib")


def _result(*, simulated: bool, critical_path: list) -> SimpleNamespace:
    timeline = [
        UnitSpan(0, "F0", 0.0, 1.0, 1980),
        UnitSpan(1, "F0", 1.2, 2.2, 1320),
        UnitSpan(1, "B0", 2.2, 4.2, 1320),
        UnitSpan(0, "B0", 4.4, 6.4, 1980),
    ]
    return SimpleNamespace(
        timeline=timeline,
        stage_busy_ms=[3.0, 3.0],
        critical_path=critical_path,
        model="test",
        simulated=simulated,
        iteration_time_ms=6.4,
    )


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_measured_timeline_is_labelled_measured_without_a_critical_path_entry():
    fig = gantt_figure(_result(simulated=False, critical_path=[]))
    ax = fig.axes[0]
    try:
        assert ax.get_xlabel() == "time (ms, measured)"
        assert ax.get_legend() is None
        assert ax.get_title().startswith("measured:")
    finally:
        _close(fig)


def test_simulated_timeline_keeps_its_label_and_critical_path_legend():
    fig = gantt_figure(_result(simulated=True, critical_path=[(0, "F0"), (1, "F0")]))
    ax = fig.axes[0]
    try:
        assert ax.get_xlabel() == "time (ms, simulated)"
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels == ["critical path"]
    finally:
        _close(fig)


def test_gantt_png_writes_the_file(tmp_path):
    path = gantt_png(_result(simulated=False, critical_path=[]), tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bar_colour(ax, start_ms: float):
    (bar,) = [p for p in ax.patches if abs(p.get_x() - start_ms) < 1e-9]
    return bar.get_facecolor()


def test_the_same_clock_is_the_same_colour_in_every_chart_on_the_cards_range():
    one = _result(simulated=True, critical_path=[])
    other = _result(simulated=True, critical_path=[])
    other.timeline = [UnitSpan(0, "F0", 0.0, 1.0, 1320), UnitSpan(1, "F0", 1.2, 2.2, 990)]  # other clocks present
    figs = [gantt_figure(r, clock_range_mhz=(345, 1980)) for r in (one, other)]
    try:
        colour_a = _bar_colour(figs[0].axes[0], 1.2)  # 1320 MHz in the first chart
        colour_b = _bar_colour(figs[1].axes[0], 0.0)  # 1320 MHz in the second
        assert colour_a == colour_b
        scale = figs[0].axes[1]  # the colour bar spans the card's range, not the clocks present
        assert scale.get_ylim() == (345.0, 1980.0)
        assert scale.get_ylabel() == "SM clock (MHz, simulated)"
    finally:
        for fig in figs:
            _close(fig)


def test_title_carries_energy_per_iteration_and_the_saving_with_their_label():
    fig = gantt_figure(_result(simulated=False, critical_path=[]), energy_j=41.234, saving=0.0712,
                       energy_label="simulated", title="envpipe train, last measured step")
    try:
        ax = fig.axes[0]
        assert ax.get_title().splitlines()[:2] == [
            "simulated: 41.2 J/iteration, +7.1% energy saving vs the baseline", "envpipe train, last measured step"]
        assert ax.get_xlabel() == "time (ms, measured)" and fig.axes[1].get_ylabel() == "SM clock (MHz, as planned)"
    finally:
        _close(fig)


@pytest.mark.parametrize(("stages", "micro_batches", "labelled"), [(8, 32, False), (2, 4, True)])
def test_a_chart_of_8_stages_and_32_micro_batches_stays_readable(stages, micro_batches, labelled):
    from envpipe.clock_types import assign_clocks
    from envpipe.schedules import get_schedule
    from envpipe.sim import CostModel, simulate

    costs = CostModel.build(stages, fwd_ms=10.0, bwd_ms=20.0)
    schedule = get_schedule("ours", stages, micro_batches, costs=costs)
    result = simulate(schedule, costs, assign_clocks(schedule, costs, "envelope"))
    fig = gantt_figure(result, title=f"ours / envelope, S={stages} M={micro_batches}",
                       clock_range_mhz=(costs.min_clock_mhz, costs.max_clock_mhz), energy_j=result.energy_j, saving=0.05)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        bars = [p.get_window_extent(renderer) for p in ax.patches]
        labels = [t for t in ax.texts]
        assert len(labels) == (len(result.timeline) if labelled else 0)  # every unit labelled alike, or none
        for text in labels:  # every unit label lies inside its own bar
            box = text.get_window_extent(renderer)
            assert any(b.x0 - 1 <= box.x0 and box.x1 <= b.x1 + 1 and b.y0 - 1 <= box.y0 and box.y1 <= b.y1 + 1 for b in bars)
        ticks = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
        assert len(ticks) == stages and all(a.y1 <= b.y0 + 0.5 or b.y1 <= a.y0 + 0.5 for a, b in zip(ticks, ticks[1:]))
        title = ax.title.get_window_extent(renderer)
        figure = fig.bbox
        assert figure.x0 <= title.x0 and title.x1 <= figure.x1 and title.y1 <= figure.y1
    finally:
        _close(fig)
