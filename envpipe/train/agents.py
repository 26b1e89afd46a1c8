"""The agent of an ``envpipe train`` run: the node's agent if one answers, else an embedded sim agent."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from envpipe.errors import EnvpipeError


class RunError(EnvpipeError):
    """A rank failed or the run could not start; the message names the rank and where its log is kept."""


@dataclass(frozen=True)
class AgentForRun:
    """The agent a run talks to: its endpoint and whether it is the embedded sim agent we started."""

    endpoint: str
    simulated: bool
    embedded: bool
    description: str
    read_only: bool = False


@contextlib.contextmanager
def agent_for_run(
    endpoint: str | None,
    *,
    gpus: int,
    console: Any,
    dvfs_model: str = "central",
    multi_node: bool = False,
    explicit: bool = False,
) -> Iterator[AgentForRun]:
    """The agent at ``endpoint`` (or the default endpoints); none reachable: start the embedded sim agent.

    The embedded agent is stopped when the block exits, also on errors. Ranks on other nodes cannot reach
    an embedded agent, so a multi-node run needs the node agents running. An ``explicit`` endpoint (the
    user named it: ``--agent``) that does not answer is an error, never replaced by the sim agent.
    """
    if explicit:
        from envpipe_agent.client import check_endpoint

        check_endpoint(endpoint, source="--agent")
    found = probe_agent(endpoint)
    if found is None and explicit:
        raise RunError(
            f"--agent {endpoint}: no agent answered there; start it (`envpipe-agent --backend sim --gpus N`, "
            "or `systemctl start envpipe-agent`), fix the address, or drop --agent to use an embedded sim agent"
        )
    if found is not None:
        console.print(f"agent: {found.description} at {found.endpoint}")
        if found.read_only:
            console.print(
                "[yellow]the agent is read-only: it measures energy but never sets clocks, so every unit "
                "runs at the card's default clock whatever the plan says[/]"
            )
        yield found
        return
    if multi_node:
        raise RunError(
            f"no agent reachable at {endpoint or 'the default endpoints'}: a multi-node run needs "
            "envpipe-agent running on every node (see systemd/README.md); start it, or pass --agent"
        )
    from envpipe_agent.embedded import start_agent

    where = endpoint or "the default endpoints"
    # Same DVFS curve as the ranks' emulation; warnings only, so its log does not bury the progress display.
    running = start_agent(
        backend="sim", gpus=gpus, extra_args=["--dvfs-model", dvfs_model, "--log-level", "warning"]
    )
    console.print(
        f"[yellow]no agent reachable at {where}: started an embedded sim agent ({gpus} simulated GPUs) "
        "for this run; energy figures are simulated[/]"
    )
    try:
        yield AgentForRun(
            running.endpoint,
            simulated=True,
            embedded=True,
            description=f"embedded sim agent, {gpus} simulated GPUs, {dvfs_model} DVFS model",
        )
    finally:
        running.stop()


def probe_agent(endpoint: str | None, timeout_s: float = 1.0) -> AgentForRun | None:
    """Say hello to an agent; ``None`` when none answers within ``timeout_s``."""
    from envpipe_agent.client import AgentClient, AgentUnavailable

    client = AgentClient(endpoint, job_id=f"envpipe-probe-{os.getpid()}", rank=-1, timeout_s=timeout_s)
    try:
        info = client.hello()
    except AgentUnavailable:
        return None
    finally:
        client.close()
    names = sorted({gpu.name for gpu in info.gpus}) or ["no GPUs"]
    kind = "sim agent (simulated)" if info.simulated else f"{info.backend} agent"
    read_only = bool(getattr(info, "read_only", False))
    return AgentForRun(
        client.endpoint,
        simulated=bool(info.simulated),
        embedded=False,
        description=f"{kind}{' (read-only)' if read_only else ''} {info.version}, {len(info.gpus)} x "
        f"{', '.join(names)}",
        read_only=read_only,
    )


