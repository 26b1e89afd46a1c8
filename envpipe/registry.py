"""One registry per extension point: the name -> entry mapping every list of choices is derived from.

The registries: schedules (``envpipe.schedules.SCHEDULES``), clock types
(``envpipe.clock_types.CLOCK_TYPES``), planner policies (``envpipe.planner.POLICIES``), p2p transports (``envpipe.transports.TRANSPORTS``); in the
agent, which sits below: DVFS models and cards (``envpipe_agent.dvfs.MODELS`` / ``CARDS``) and backends
(``envpipe_agent.backend.BACKENDS``). The CLI's choices and ``--help``, the config validation and the tables
of docs/registries.md (``python -m envpipe.extension_points``) are read from them, so a new entry needs its
module, its test and one registration line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from envpipe.errors import ConfigError


class Entry(Protocol):
    """What a registry holds: a name and a one-line summary (for ``--help`` and the docs table)."""

    name: str
    summary: str


E = TypeVar("E", bound=Entry)


class Registry(dict[str, E], Generic[E]):
    """Entries by name, in registration order; ``kind`` names the extension point in errors and docs."""

    def __init__(self, kind: str, entries: Iterable[E]) -> None:
        super().__init__()
        self.kind = kind
        for entry in entries:
            if entry.name in self:
                raise ValueError(f"{kind} {entry.name!r} registered twice")
            self[entry.name] = entry

    def lookup(self, name: str, *, source: str | None = None) -> E:
        """The entry called ``name``.

        Raises:
            ConfigError: an unknown name; the message names ``source`` (a flag or config key) and the choices.
        """
        try:
            return self[name]
        except KeyError:
            where = f" ({source})" if source else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}{where}; choose one of {', '.join(self)}"
            ) from None

    def help(self) -> str:
        """``name`` (summary) for every entry, for a ``--help`` text."""
        return "; ".join(f"{name}: {entry.summary}" for name, entry in self.items())

    def table(self, columns: dict[str, Callable[[E], Any]] | None = None) -> str:
        """A markdown table: name, summary and the extra ``columns`` (header -> value of an entry)."""
        columns = columns or {}
        rows = [
            [f"`{name}`", entry.summary, *(str(get(entry)) for get in columns.values())]
            for name, entry in self.items()
        ]
        return markdown_table(["name", "summary", *columns], rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (docs/registries.md)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
