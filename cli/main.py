"""The ``envpipe`` command: one module per verb, registered here."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from envpipe import __version__

app = typer.Typer(
    name="envpipe",
    help="Energy-saving pipeline-parallel training: schedules, clock planning and the node agent.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"envpipe {__version__}")
        raise typer.Exit()


@app.callback()
def callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages to stderr.")] = False,
) -> None:
    """EnvPipe: fill pipeline bubbles, lower clocks off the critical path, keep the iteration time."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


# Verb registration: each verb lives in its own module (cli/<verb>.py) exposing a function of the same name.
# VERBS-BEGIN (one line per verb; keep sorted)
from envpipe_cli.export import export; app.command("export")(export)  # noqa: E402,E702
from envpipe_cli.lock import lock; app.command("lock")(lock)  # noqa: E402,E702
from envpipe_cli.profile import profile; app.command("profile")(profile)  # noqa: E402,E702
from envpipe_cli.simulate import simulate; app.command("simulate")(simulate)  # noqa: E402,E702
from envpipe_cli.status import status; app.command("status")(status)  # noqa: E402,E702
from envpipe_cli.train import TrainCommand, train; app.command("train", cls=TrainCommand)(train)  # noqa: E402,E702
# VERBS-END


def main() -> None:
    """Console-script entry point."""
    app()
