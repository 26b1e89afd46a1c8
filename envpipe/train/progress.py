"""Progress of a run: rank 0 prints marker lines, the launching process renders them with rich.

A marker line is ``@envpipe@ {json}``. Markers may arrive with a launcher's prefix (``[1,0]<stdout>:``, a
pdsh host name), so the parser looks for the marker anywhere in the line.

Events: ``phase`` (a phase starts: ``phase``, ``label``, ``total``), ``advance`` (``phase``, ``completed``,
``info``), ``phase_done`` (``phase``, ``info``), ``message`` (``text``), ``log`` (``record``, ``line``: every
``--log-interval`` steps), ``eval`` (``step``, ``loss``, ``perplexity``), ``checkpoint`` (``step``, ``path``),
``stopped`` (``stopped``: the signal, ``step``, ``checkpoint``), ``result`` (``data``: the final result dict,
see :mod:`envpipe.train.report`).

On a terminal the phases are rich progress bars; off a terminal (a log file, CI, a pipe) every event that
matters is one plain line, printed when it happens and never cut or wrapped. Either way the log, eval and
checkpoint records are kept for the report (:attr:`ProgressDisplay.records`).
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
        self.plain = not console.is_terminal
        self.records: dict[str, list[dict[str, Any]]] = {"log": [], "eval": [], "checkpoint": []}
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
        if not self.plain:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop rendering (the finished bars stay on screen)."""
        if not self.plain:
            self._progress.stop()

    def line(self, text: str) -> None:
        """One plain line, as is (no markup, no wrapping, no cutting)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def handle(self, event: dict[str, Any]) -> None:
        """Apply one event; unknown events are ignored so old launchers survive new ranks."""
        kind = event.get("event")
        if kind in self.records:
            self._record(kind, event)
            return
        if self.plain:
            self._plain(kind, event)
            return
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

    def _record(self, kind: str, event: dict[str, Any]) -> None:
        """Keep a log/eval/checkpoint record; off a terminal print it (a log record on a terminal: the bar)."""
        record = event.get("record") if kind == "log" else {k: v for k, v in event.items() if k != "event"}
        self.records[kind].append(record)
        if kind == "log" and self.plain:
            self.line(str(event.get("line", "")))
        elif kind == "eval":
            self.line(f"eval at step {record['step']}: loss {record['loss']:.4f}, perplexity {record['perplexity']:.2f}")
        elif kind == "checkpoint" and self.plain:
            self.line(f"checkpoint of step {record['step']} saved to {record['path']}")

    def _plain(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "phase":
            total = event.get("total")
            self.line(f"{event.get('label', event.get('phase'))}" + (f" ({total} steps)" if total else ""))
        elif kind == "phase_done" and event.get("info"):
            self.line(f"{event.get('phase')}: {event['info']}")
        elif kind == "message":
            self.line(str(event.get("text", "")))
