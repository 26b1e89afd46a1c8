"""Turn library errors into one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

# soft_wrap: off a terminal rich wraps at 80 columns, and one error must stay one line (logs, grep, CI).
err_console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def user_errors(exit_code: int = 1) -> Iterator[None]:
    """Show EnvPipe, agent and value errors as ``error: ...`` and exit with ``exit_code``."""
    from envpipe.errors import EnvpipeError
    from envpipe_agent.errors import AgentError

    try:
        yield
    except (EnvpipeError, AgentError, ValueError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=exit_code) from None
