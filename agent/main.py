"""``python -m envpipe_agent``: parse flags, resolve the config, build the backend, serve until a signal.

Exit codes: 0 after SIGTERM/SIGINT (clocks reset), 1 when the backend cannot start, 2 for a bad config
key, value or flag. The ``envpipe-agent`` console script (envpipe_cli.agent) calls :func:`start` too.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

import zmq

from envpipe_agent import __version__
from envpipe_agent.backend import GpuBackend
from envpipe_agent.config import BACKENDS, AgentConfig, resolve_config
from envpipe_agent.errors import AgentConfigError, AgentError
from envpipe_agent.runtime import InstanceLock, raise_fd_limit, sd_notify

log = logging.getLogger("envpipe_agent")


def make_backend(config: AgentConfig) -> GpuBackend:
    """The backend named by the config (NVML is imported only when asked for)."""
    if config.backend == "sim" and config.manage:
        raise AgentConfigError("manage applies to the nvml backend; the sim backend has --gpus N")
    if config.backend == "sim":
        if config.read_only:
            raise AgentConfigError(
                "read_only applies to the nvml backend; the sim backend changes nothing real"
            )
        from envpipe_agent.sim import SimBackend

        return SimBackend(gpus=config.gpus, card=config.card, model=config.model)
    from envpipe_agent.nvml import NvmlBackend

    return NvmlBackend(read_only=config.read_only, manage=config.manage)


def _start_prometheus(agent: Any, config: AgentConfig) -> None:
    from envpipe_agent.metrics import start_metrics_server

    start_metrics_server(agent, config.prometheus_addr, config.prometheus_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", config.prometheus_addr, config.prometheus_port)


def serve(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT; every managed GPU is reset at start and on the way out."""
    from envpipe_agent.server import Agent

    # The GPU workers wait for the GIL whenever the event loop is busy; Python's default 5 ms switch
    # interval would then bound event->apply latency, so hand the GIL over more often (the agent is small).
    sys.setswitchinterval(0.0005)
    raise_fd_limit()  # each client connection is an fd; libzmq aborts the agent when it runs out
    backend = make_backend(config)
    stop = threading.Event()
    lock = InstanceLock(config.resolved_runtime_dir()) if config.is_local() else None
    try:
        agent = Agent(config, backend)
        if lock:
            from envpipe_agent.runtime import prepare_dir, resolve_group

            prepare_dir(config.resolved_runtime_dir(), resolve_group(config.socket_group))
            lock.acquire()
        agent.reset_all("start (crash recovery)")

        def on_signal(signum: int, _frame: object) -> None:
            log.info("%s: resetting clocks and stopping", signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if config.prometheus_port:
            _start_prometheus(agent, config)

        def on_ready() -> None:
            sd_notify("READY=1")
            log.info(
                "envpipe-agent %s ready: backend %s%s, %d GPU(s)",
                __version__,
                backend.name,
                " (read-only)" if backend.read_only else "",
                len(agent.gpus),
            )

        agent.serve(stop, on_ready)
    finally:
        backend.close()
        if lock:
            lock.release()
    return 0


def start(config_file: str | None, overrides: dict[str, Any], log_level: str | None = None) -> int:
    """Resolve the config and serve; map config errors to exit 2 and backend failures to exit 1."""
    try:
        config = resolve_config(config_file, overrides)
    except AgentConfigError as exc:
        print(f"envpipe-agent: error: {exc}", file=sys.stderr)
        return 2
    level = (log_level or config.log_level).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return serve(config)
    except AgentConfigError as exc:
        print(f"envpipe-agent: error: {exc}", file=sys.stderr)
        return 2
    except (AgentError, ValueError, OSError, zmq.ZMQError) as exc:
        print(f"envpipe-agent: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m envpipe_agent`` (the same names as the config keys)."""
    parser = argparse.ArgumentParser(prog="envpipe-agent", description="EnvPipe's per-node GPU clock agent.")
    add = parser.add_argument
    add("--config", help="TOML config file ('' = none; default /etc/envpipe/agent.toml if present)")
    add("--backend", choices=BACKENDS)
    add("--read-only", action="store_true", default=None, help="nvml: read everything, never set clocks")
    add("--gpus", type=int, help="sim: number of virtual GPUs")
    add("--card", help="sim: card (h100, a100, v100, rtx3090)")
    add("--model", help="sim: DVFS model (central, conservative, optimistic)")
    add("--runtime-dir", help="directory of the ipc sockets")
    add("--endpoint", help="control endpoint (ipc://... or tcp://host:port)")
    add("--event-endpoint", help="event endpoint (default: next to the control endpoint)")
    add("--lease-timeout-s", type=float)
    add("--min-mhz", type=int, help="lowest clock the agent may apply")
    add("--max-mhz", type=int, help="highest clock the agent may apply")
    add("--prometheus-port", type=int, help="serve metrics on 127.0.0.1:PORT (0 = off)")
    add("--socket-group", help="group owning the sockets (default envpipe, else the agent's group)")
    add("--log-level", choices=("debug", "info", "warning", "error"))
    add("--exit-with-pid", type=int, help="stop (resetting clocks) once this process is gone")
    add("--manage", help="nvml: only these GPUs (comma-separated indices or UUIDs; default all)")
    add("--version", action="version", version=f"envpipe-agent {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m envpipe_agent``."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    return start(config_file, args)
