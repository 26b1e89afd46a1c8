"""``envpipe lock``: hold one GPU at one clock until interrupted (admin/debug tool, the simplest client)."""

from __future__ import annotations

import signal
import time
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from envpipe_cli._errors import user_errors


def resolve_gpu(gpus: list[Any], gpu_id: str) -> Any:
    """The GPU named by an agent index (``0``) or a UUID / UUID prefix (``GPU-5f1e``)."""
    from envpipe_agent.errors import AgentError

    for gpu in gpus:
        if (gpu_id.isdigit() and gpu.index == int(gpu_id)) or (
            not gpu_id.isdigit() and gpu.uuid.startswith(gpu_id)
        ):
            return gpu
    known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus)
    raise AgentError(f"no GPU {gpu_id!r} on this agent; give an index or UUID prefix of: {known}")


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM releases the lease like Ctrl-C


def lock(
    gpu: Annotated[str, typer.Option("--gpu", help="Agent GPU index or UUID (prefix).")],
    mhz: Annotated[int, typer.Option("--mhz", help="SM clock to hold (snapped to the agent's allow-list).")],
    endpoint: Annotated[
        Optional[str], typer.Option(envvar="ENVPIPE_AGENT", help="The agent's control endpoint.")
    ] = None,
    job_id: Annotated[str, typer.Option(help="Job id shown as the lease holder.")] = "envpipe-lock",
    duration_s: Annotated[
        float, typer.Option(help="Release after this many seconds (0 = until Ctrl-C).")
    ] = 0.0,
    timeout_s: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the agent.")] = 2.0,
) -> None:
    """Claim a GPU, apply a clock and hold the lease (heartbeating) until Ctrl-C, SIGTERM or --duration-s."""
    from envpipe_agent.client import AgentClient

    console = Console()
    previous = signal.signal(signal.SIGTERM, _terminate)
    with user_errors():
        client = AgentClient(endpoint, job_id=job_id, rank=0, timeout_s=timeout_s)
        try:
            target = resolve_gpu(client.hello().gpus, gpu)
            client.claim(target.uuid)
            reply = client.set_clock(mhz)
            snapped = f" (asked {mhz}, snapped to the allow-list)" if reply["snapped"] else ""
            console.print(
                f"GPU {target.index} {target.uuid} locked at {reply['target_mhz']} MHz{snapped}; "
                "holding the lease, Ctrl-C releases",
                highlight=False,
                soft_wrap=True,
            )
            _hold(client, mhz, duration_s)
        except KeyboardInterrupt:
            pass  # Ctrl-C or SIGTERM, at any point: release below
        finally:
            client.close()
            signal.signal(signal.SIGTERM, previous)
    console.print("released; the agent reset the GPU's clocks")


def _hold(client: Any, mhz: int, duration_s: float) -> None:
    deadline_s = time.monotonic() + duration_s if duration_s > 0 else float("inf")
    lease_id = client.lease_id
    while time.monotonic() < deadline_s:
        time.sleep(min(0.2, max(0.0, deadline_s - time.monotonic())))
        if client.lease_id and client.lease_id != lease_id:  # the agent restarted and we claimed again
            lease_id = client.lease_id
            client.set_clock(mhz)
