"""Progress of a run: rank 0 prints marker lines, the launching process renders them with rich.

A marker line is ``@envpipe@ {json}``. Markers may arrive with a launcher's prefix (``[1,0]<stdout>:``, a
pdsh host name), so the parser looks for the marker anywhere in the line.

Events: ``phase`` (a phase starts: ``phase``, ``label``, ``total``), ``advance`` (``phase``, ``completed``,
``info``), ``phase_done`` (``phase``, ``info``), ``message`` (``text``), ``result`` (``data``: the final
result dict, see :mod:`envpipe.train.report`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

MARKER = "@envpipe@ "


def emit(event: str, **fields: Any) -> None:
    """Print one progress marker on stdout (rank 0 only; the caller checks the rank)."""
    sys.stdout.write(MARKER + json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def parse_marker(line: str) -> dict[str, Any] | None:
    """The event in a marker line, or ``None`` for any other line (including a garbled marker)."""
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(MARKER) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


class ProgressDisplay:
    """One rich progress bar per phase, fed with the events of :func:`parse_marker`."""

    def __init__(self, console: Any) -> None:
        """Create the display on ``console`` (shown while used as a context manager)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self._progress = Progress(
            TextColumn("{task.description:<30}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressDisplay:
        """Start rendering."""
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop rendering (the finished bars stay on screen)."""
        self._progress.stop()

    def handle(self, event: dict[str, Any]) -> None:
        """Apply one event; unknown events are ignored so old launchers survive new ranks."""
        kind = event.get("event")
        if kind == "phase":
            name = str(event.get("phase"))
            self._tasks[name] = self._progress.add_task(
                str(event.get("label", name)), total=event.get("total"), info=""
            )
        elif kind in ("advance", "phase_done"):
            self._advance(event, done=kind == "phase_done")
        elif kind == "message":
            self._progress.console.print(str(event.get("text", "")), highlight=False, markup=False)

    def _advance(self, event: dict[str, Any], *, done: bool) -> None:
        task = self._tasks.get(str(event.get("phase")))
        if task is None:
            return
        fields: dict[str, Any] = {}
        if "info" in event:
            fields["info"] = str(event["info"])
        if "completed" in event:
            fields["completed"] = event["completed"]
        if "total" in event:
            fields["total"] = event["total"]
        if done:
            total = self._progress.tasks[task].total
            fields["completed"] = fields.get("completed", total)
            fields.setdefault("total", fields["completed"])
        self._progress.update(task, **fields)
