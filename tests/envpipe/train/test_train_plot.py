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
