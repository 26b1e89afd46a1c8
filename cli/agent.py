"""``envpipe-agent``: the per-node clock daemon's command line (a typer front for envpipe_agent.main).

Flags have the names of the config keys (see systemd/agent.toml); a flag given overrides the file.
Exit codes: 0 after SIGTERM/SIGINT, 1 when the backend cannot start, 2 for a bad flag, key or value.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="envpipe-agent",
    add_completion=False,
    rich_markup_mode="rich",
    help="EnvPipe's per-node agent: the only process that changes GPU clocks.",
)


def _version(value: bool) -> None:
    if value:
        from envpipe_agent import __version__

        typer.echo(f"envpipe-agent {__version__}")
        raise typer.Exit()


@app.command()
def agent(
    config: Annotated[
        Optional[str],
        typer.Option(help="TOML config ('' = none; default /etc/envpipe/agent.toml if present)."),
    ] = None,
    backend: Annotated[Optional[str], typer.Option(help="nvml (real GPUs) or sim (simulated GPUs).")] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="nvml: read everything, never set a clock (lent GPUs).")
    ] = False,
    gpus: Annotated[Optional[int], typer.Option(help="sim: number of virtual GPUs.")] = None,
    card: Annotated[Optional[str], typer.Option(help="sim: card (h100, a100, v100, rtx3090).")] = None,
    model: Annotated[
        Optional[str], typer.Option(help="sim: DVFS model (central, conservative, optimistic).")
    ] = None,
    runtime_dir: Annotated[Optional[str], typer.Option(help="Directory of the ipc sockets.")] = None,
    endpoint: Annotated[
        Optional[str], typer.Option(help="Control endpoint (ipc://PATH or tcp://HOST:PORT).")
    ] = None,
    event_endpoint: Annotated[
        Optional[str], typer.Option(help="Event endpoint (default: next to the control one).")
    ] = None,
    lease_timeout_s: Annotated[
        Optional[float], typer.Option(help="Reset a GPU this long after its last heartbeat.")
    ] = None,
    min_mhz: Annotated[
        Optional[int], typer.Option(help="Lowest clock the agent may apply (allow-list).")
    ] = None,
    max_mhz: Annotated[
        Optional[int], typer.Option(help="Highest clock the agent may apply (allow-list).")
    ] = None,
    prometheus_port: Annotated[
        Optional[int], typer.Option(help="Serve /metrics on 127.0.0.1:PORT (0 = off).")
    ] = None,
    socket_group: Annotated[
        Optional[str], typer.Option(help="Group owning the sockets (default envpipe).")
    ] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning or error.")] = None,
    manage: Annotated[
        Optional[str], typer.Option(help="nvml: only these GPUs (comma-separated indices or UUIDs).")
    ] = None,
    exit_with_pid: Annotated[
        Optional[int], typer.Option(help="Stop (resetting clocks) once this process is gone.")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Serve clock control to the training ranks of this node until SIGTERM (clocks are reset on exit)."""
    from envpipe_agent.main import start

    overrides = {
        "backend": backend,
        "read_only": read_only or None,
        "gpus": gpus,
        "card": card,
        "model": model,
        "runtime_dir": runtime_dir,
        "endpoint": endpoint,
        "event_endpoint": event_endpoint,
        "lease_timeout_s": lease_timeout_s,
        "min_mhz": min_mhz,
        "max_mhz": max_mhz,
        "prometheus_port": prometheus_port,
        "socket_group": socket_group,
        "log_level": log_level,
        "exit_with_pid": exit_with_pid,
        "manage": manage,
    }
    raise typer.Exit(start(config, overrides))


def main() -> None:
    """Console-script entry point of ``envpipe-agent``."""
    app()
