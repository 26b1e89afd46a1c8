"""``envpipe status``: what the node agent is doing, one row per GPU."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, Any, Optional

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from envpipe_cli._errors import user_errors


# Words a card's name carries that say nothing about which card it is.
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "rtx"}
NARROW_COLUMNS = 100  # the default table fits this many columns; --wide shows everything


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def short_card(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100``; ``h100 (simulated)`` -> ``h100`` (the header says simulated)."""
    words = [w for w in name.replace("(simulated)", "").split() if w.lower() not in _VENDOR_WORDS]
    return words[0] if words else name


def _holder(gpu: dict[str, Any]) -> str:
    holder = gpu.get("holder")
    return "-" if not holder else f"{holder['job_id']}/{holder['rank']}/{holder['pid']}"


# (header, value from a GPU's status, right-aligned, only with --wide)
_COLUMNS: tuple[tuple[str, Any, bool, bool], ...] = (
    ("GPU", lambda g: str(g["index"]), True, False),
    ("UUID", lambda g: g["uuid"], False, True),
    ("card", lambda g: short_card(g["name"]), False, False),
    ("name", lambda g: g["name"], False, True),
    ("MHz now/tgt", lambda g: f"{_fmt(g['clock_mhz'])}/{_fmt(g['target_mhz'])}", True, False),
    ("lock", lambda g: "yes" if g["locked"] else "no", True, False),
    ("W", lambda g: _fmt(g["power_w"], ".0f"), True, False),
    ("J", lambda g: _fmt(g["energy_j"], ".0f"), True, False),
    ("holder job/rank/pid", _holder, False, False),
    ("uid", lambda g: _fmt((g.get("holder") or {}).get("uid")), True, True),
    ("lease s", lambda g: _fmt(g["lease_age_s"], ".0f"), True, False),
    ("ev/s", lambda g: _fmt(g["events_per_s"], ".0f"), True, False),
    ("changes", lambda g: str(g["clock_changes"]), True, False),
    ("apply p99 ms", lambda g: _fmt(g["apply_latency_p99_ms"], ".3f"), True, True),
)


def render_status(status: dict[str, Any], wide: bool = False) -> Group:
    """A header line and a table, from the agent's status snapshot (pure: used by tests and --watch).

    Without ``wide`` it fits NARROW_COLUMNS (a short card name, no UUID); cells are never cut, a long job
    id folds onto the next line.
    """
    mode = " read-only" if status.get("read_only") else ""
    simulated = " [bold yellow](simulated)[/]" if status.get("simulated") else ""
    header = Text.from_markup(
        f"envpipe-agent {status['version']} · backend {status['backend']}{mode}{simulated} · "
        f"uptime {status['uptime_s']:.0f} s · lease timeout {status['lease_timeout_s']} s"
    )
    columns = [column for column in _COLUMNS if wide or not column[3]]
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1), collapse_padding=True)
    for title, _value, right, _wide in columns:
        table.add_column(title, justify="right" if right else "left", overflow="fold")
    for gpu in status["gpus"]:
        table.add_row(*(value(gpu) for _title, value, _right, _wide in columns))
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
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column (UUID, full name, holder uid, apply p99); wider than 100.")
    ] = False,
) -> None:
    """Show the node agent's GPUs: clocks, locks, power, energy, lease holders and event rates."""
    import json

    from envpipe_agent.client import AgentClient, check_endpoint

    # Off a terminal (a pipe, a log) rich would assume 80 columns and fold the table: give it the width
    # the table is made for, unless COLUMNS says otherwise.
    narrow = NARROW_COLUMNS if not wide else 250
    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else narrow)
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
                console.print(render_status(snapshot, wide))
                return
            _watch(console, client, interval_s, json_output, wide)
        finally:
            client.close()


def _watch(console: Console, client: Any, interval_s: float, json_output: bool, wide: bool) -> None:
    import json

    from rich.live import Live

    try:
        if json_output:  # one JSON document per line, for piping
            while True:
                typer.echo(json.dumps(client.status()))
                time.sleep(interval_s)
        with Live(render_status(client.status(), wide), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render_status(client.status(), wide), refresh=True)
    except KeyboardInterrupt:
        return
