"""``envpipe status``: what the node agent is doing, one row per GPU."""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from envpipe_cli._errors import user_errors


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _holder(gpu: dict[str, Any]) -> str:
    holder = gpu.get("holder")
    return "-" if not holder else f"{holder['job_id']}/{holder['rank']}/{holder['pid']}"


def render_status(status: dict[str, Any]) -> Group:
    """A header line and a table, from the agent's status snapshot (pure: used by tests and --watch)."""
    mode = " read-only" if status.get("read_only") else ""
    simulated = " [bold yellow](simulated)[/]" if status.get("simulated") else ""
    header = Text.from_markup(
        f"envpipe-agent {status['version']} · backend {status['backend']}{mode}{simulated} · "
        f"uptime {status['uptime_s']:.0f} s · lease timeout {status['lease_timeout_s']} s"
    )
    table = Table(box=None, header_style="bold")
    for column in (
        "GPU",
        "UUID",
        "name",
        "SM MHz (actual/target)",
        "locked",
        "power W",
        "energy J",
        "holder job/rank/pid",
        "lease age s",
        "events/s",
        "clock changes",
        "apply p99 ms",
    ):
        table.add_column(
            column, justify="left" if column in ("UUID", "name", "holder job/rank/pid") else "right"
        )
    for gpu in status["gpus"]:
        table.add_row(
            str(gpu["index"]),
            gpu["uuid"][4:12],
            gpu["name"],
            f"{_fmt(gpu['clock_mhz'])}/{_fmt(gpu['target_mhz'])}",
            "yes" if gpu["locked"] else "no",
            _fmt(gpu["power_w"], ".0f"),
            _fmt(gpu["energy_j"], ".1f"),
            _holder(gpu),
            _fmt(gpu["lease_age_s"], ".1f"),
            _fmt(gpu["events_per_s"], ".0f"),
            str(gpu["clock_changes"]),
            _fmt(gpu["apply_latency_p99_ms"], ".3f"),
        )
    parts: list[Any] = [header, table]
    if status.get("simulated"):
        parts.append(Text(f"model: {status.get('model', '')}", style="dim"))
    return Group(*parts)


def status(
    endpoint: Annotated[
        Optional[str], typer.Option(envvar="ENVPIPE_AGENT", help="The agent's control endpoint.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the raw snapshot as JSON.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh every --interval seconds until Ctrl-C.")
    ] = False,
    interval_s: Annotated[
        float, typer.Option("--interval", help="Seconds between refreshes with --watch.")
    ] = 1.0,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the agent.")] = 2.0,
) -> None:
    """Show the node agent's GPUs: clocks, locks, power, energy, lease holders and event rates."""
    import json

    from envpipe_agent.client import AgentClient, check_endpoint

    console = Console()
    with user_errors():
        if endpoint is not None:
            check_endpoint(endpoint, source="--endpoint (or ENVPIPE_AGENT)")
        client = AgentClient(endpoint, job_id="envpipe-status", rank=-1, timeout_s=timeout_s)
        try:
            snapshot = client.status()
            if json_output and not watch:
                typer.echo(json.dumps(snapshot, indent=2))
                return
            if not watch:
                console.print(render_status(snapshot))
                return
            _watch(console, client, interval_s, json_output)
        finally:
            client.close()


def _watch(console: Console, client: Any, interval_s: float, json_output: bool) -> None:
    import json

    from rich.live import Live

    try:
        if json_output:  # one JSON document per line, for piping
            while True:
                typer.echo(json.dumps(client.status()))
                time.sleep(interval_s)
        with Live(render_status(client.status()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render_status(client.status()), refresh=True)
    except KeyboardInterrupt:
        return
