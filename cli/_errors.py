"""Turn library errors into one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

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
        # escape: messages quote foreign text (gloo's "[/path/file.cc:78]") that rich would read as markup.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=exit_code) from None
