"""The stdout console of the commands that print tables."""

from __future__ import annotations

import os
import sys

from rich.console import Console


def stdout_console(columns_off_terminal: int = 160) -> Console:
    """A console for stdout; off a terminal (a pipe, a log) rich would assume 80 columns and cut table cells.

    ``COLUMNS`` still wins where it is set.
    """
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else columns_off_terminal
    return Console(width=width)
