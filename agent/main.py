"""``envpipe-agent`` / ``python -m envpipe_agent``: parse flags, resolve the config, serve until a signal.

Every flag is a config key (``--lease-timeout-s`` for ``lease_timeout_s``), declared once in
:class:`envpipe_agent.config.AgentConfig`; this module only derives argparse from it, so the daemon that
systemd starts loads neither typer nor rich.

Exit codes: 0 after SIGTERM/SIGINT (clocks reset), 128+N after any other terminating signal N (clocks
reset; the unit restarts the agent), 1 when the backend cannot start, 2 for a bad config key, value or flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from typing import Any

import zmq
from envpipe_agent import __version__
from envpipe_agent.backend import BACKENDS, make_backend
from envpipe_agent.config import DEPRECATED_KEYS, AgentConfig, is_loopback, resolve_config
from envpipe_agent.errors import AgentConfigError, AgentError
from envpipe_agent.runtime import GpuLocks, InstanceLock, raise_fd_limit, sd_notify

log = logging.getLogger("envpipe_agent")

# Signals that do not end a process by default, and those the kernel sends for a fault of the process itself
# (a handler cannot fix those; the unit's restart and the reset at start do). SIGPIPE stays ignored (Python).
_NOT_TERMINATING = {"SIGCHLD", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGWINCH"}
_FAULTS = {"SIGKILL", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGTRAP", "SIGSYS", "SIGPIPE"}
CLEAN_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # systemctl stop, Ctrl-C: exit 0


def terminating_signals() -> list[int]:
    """Every signal whose default action would end the agent without resetting clocks (real-time included)."""
    skip = {getattr(signal, name) for name in _NOT_TERMINATING | _FAULTS if hasattr(signal, name)}
    return sorted(int(signum) for signum in signal.valid_signals() if signum not in skip)


def install_signal_handlers(stop: threading.Event) -> list[int]:
    """Make every terminating signal reset the clocks and stop the agent; returns the signal received
    (in a one-element list, filled by the handler)."""
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        log.info("%s: resetting clocks and stopping", name)
        sd_notify("STOPPING=1")
        if not received:
            received.append(signum)
        stop.set()

    for signum in terminating_signals():
        signal.signal(signum, on_signal)
    return received


def _start_prometheus(agent: Any, config: AgentConfig) -> None:
    from envpipe_agent.metrics import start_metrics_server

    start_metrics_server(agent, config.prometheus_addr, config.prometheus_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", config.prometheus_addr, config.prometheus_port)
    if not is_loopback(config.prometheus_addr):
        log.warning(
            "metrics on %s are readable by anyone who can reach it: job ids, ranks, pids and uids of lease "
            "holders; firewall it to the scraper",
            config.prometheus_addr,
        )


def serve(config: AgentConfig) -> int:
    """Run the agent until a terminating signal; every managed GPU is reset at start and on the way out."""
    from envpipe_agent.server import Agent

    # The GPU workers wait for the GIL whenever the event loop is busy; Python's default 5 ms switch
    # interval would then bound event->apply latency, so hand the GIL over more often (the agent is small).
    sys.setswitchinterval(0.0005)
    raise_fd_limit()  # each client connection is an fd; libzmq aborts the agent when it runs out
    stop = threading.Event()
    received = install_signal_handlers(stop)  # before anything is locked: a signal now still resets
    backend = make_backend(config)
    lock = InstanceLock(config.resolved_runtime_dir()) if config.is_local() else None
    gpu_locks = GpuLocks()
    try:
        if lock:
            from envpipe_agent.runtime import prepare_dir, resolve_group

            prepare_dir(config.resolved_runtime_dir(), resolve_group(config.socket_group))
            lock.acquire()
        agent = Agent(config, backend)
        if not (backend.simulated or backend.read_only):
            gpu_locks.acquire([gpu.uuid for gpu in agent.gpus])
        agent.reset_all("start (crash recovery)")
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

        if not stop.is_set():
            agent.serve(stop, on_ready)
    finally:
        backend.close()
        gpu_locks.release()
        if lock:
            lock.release()
    if received and received[0] not in CLEAN_STOP_SIGNALS:
        return 128 + received[0]
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
    """The flags: one per config key (derived from AgentConfig), plus --config and --version."""
    backends = ", ".join(f"{name} ({entry.description})" for name, entry in BACKENDS.items())
    parser = argparse.ArgumentParser(
        prog="envpipe-agent",
        description="EnvPipe's per-node GPU clock agent: the only process that changes GPU clocks. "
        f"Backends: {backends}. Every flag is also a key of the TOML config (systemd/agent.toml).",
    )
    parser.add_argument(
        "--config", help="TOML config file ('' = none; default /etc/envpipe/agent.toml if present)"
    )
    for field in dataclasses.fields(AgentConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default {field.default!r})"
        if field.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        choices = field.metadata["choices"]
        kind = {"int": int, "float": float}.get(str(field.type), str)
        parser.add_argument(flag, type=kind, choices=choices() if choices else None, help=help_text)
    for old in DEPRECATED_KEYS:  # the old spellings, hidden from --help
        parser.add_argument("--" + old.replace("_", "-"), dest=old, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"envpipe-agent {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``envpipe-agent`` and ``python -m envpipe_agent``."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    return start(config_file, args)
