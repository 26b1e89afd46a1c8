"""Agent configuration: defaults < TOML file (/etc/envpipe/agent.toml) < command-line flags, resolved once.

A bad key or value raises :class:`AgentConfigError` naming it; the command line turns that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envpipe_agent.errors import AgentConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SYSTEM_RUNTIME_DIR = "/run/envpipe"
SYSTEM_CONFIG = "/etc/envpipe/agent.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Upper bounds that keep every timer finite and every loop sane (nan and inf are refused too).
MAX_LEASE_TIMEOUT_S = 3600.0
SAMPLE_INTERVAL_RANGE_MS = (1.0, 60_000.0)


def key(default: Any, help: str, *, choices: Callable[[], tuple[str, ...]] | None = None) -> Any:
    """One config key: its default and help; the flag ``--name-with-dashes`` is derived from it (agent/main.py),
    and ``choices`` (a function, so registries load lazily) lists the allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def backend_names() -> tuple[str, ...]:
    from envpipe_agent.backend import BACKENDS

    return tuple(BACKENDS)


def card_names() -> tuple[str, ...]:
    from envpipe_agent.dvfs import CARDS

    return tuple(CARDS)


def model_names() -> tuple[str, ...]:
    from envpipe_agent.dvfs import MODELS

    return tuple(MODELS)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs, resolved (see :func:`resolve_config`). Each key is also a flag."""

    backend: str = key("nvml", "which GPUs: see the backend table in docs/protocol.md", choices=backend_names)
    read_only: bool = key(False, "nvml: read clocks, power and energy, never set anything (lent GPUs)")
    gpus: int = key(1, "sim: number of virtual GPUs")
    card: str = key("h100", "sim: card whose clocks and power are simulated", choices=card_names)
    dvfs_model: str = key("central", "sim: DVFS model (clock -> time and power)", choices=model_names)
    runtime_dir: str = key("", "directory of the ipc sockets ('' = /run/envpipe as root, else $XDG_RUNTIME_DIR/envpipe)")
    endpoint: str = key("", "control endpoint, ipc://PATH or tcp://HOST:PORT ('' = <runtime_dir>/control.sock)")
    event_endpoint: str = key("", "event endpoint ('' = next to the control endpoint)")
    lease_timeout_s: float = key(2.0, "reset a GPU this many seconds after its holder's last heartbeat")
    min_mhz: int = key(0, "lowest clock the agent may apply (0 = the lowest supported)")
    max_mhz: int = key(0, "highest clock the agent may apply (0 = the highest supported)")
    prometheus_port: int = key(0, "serve Prometheus metrics on prometheus_addr:PORT (0 = off)")
    prometheus_addr: str = key(
        "127.0.0.1", "address of the metrics endpoint; a non-loopback one exposes job ids and pids (README)"
    )
    socket_group: str = key("", "group owning the sockets ('' = envpipe if it exists, else the agent's group)")
    sample_interval_ms: float = key(100.0, "energy counter sampling period for status (ms)")
    log_level: str = key("info", "log level (stderr, i.e. the journal)", choices=lambda: LOG_LEVELS)
    manage: str = key("", "nvml: only these GPUs (comma-separated NVML indices or UUID prefixes; '' = all)")
    exit_with_pid: int = key(0, "stop (resetting clocks) once this process is gone (0 = never)")
    max_connections_per_uid: int = key(
        64, "connections one uid may hold (root and the agent's own uid excepted); more are shut down"
    )
    memory_guard_mb: int = key(
        256, "above this resident memory, connections of other uids than root's and the agent's are shut down (0 = off)"
    )

    def control_endpoint(self) -> str:
        return self.endpoint or f"ipc://{Path(self.resolved_runtime_dir()) / 'control.sock'}"

    def events_endpoint(self) -> str:
        if self.event_endpoint:
            return self.event_endpoint
        control = self.control_endpoint()
        if control.startswith("ipc://"):
            return f"ipc://{Path(control[len('ipc://') :]).with_name('events.sock')}"
        if control.startswith("tcp://"):
            host, _, port = control[len("tcp://") :].rpartition(":")
            return f"tcp://{host}:{int(port) + 1}"
        raise AgentConfigError(f"endpoint {control!r}: give event_endpoint too (only ipc/tcp derive it)")

    def resolved_runtime_dir(self) -> str:
        return self.runtime_dir or default_runtime_dir()

    def is_local(self) -> bool:
        """Whether clients are on this node (ipc), so their pids can be checked."""
        return self.control_endpoint().startswith("ipc://")


def default_runtime_dir() -> str:
    """/run/envpipe for the system service (root), $XDG_RUNTIME_DIR/envpipe for a user."""
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg:
        raise AgentConfigError("XDG_RUNTIME_DIR is not set; pass --runtime-dir DIR for the agent's sockets")
    return str(Path(xdg) / "envpipe")


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}
# Old key (and flag) spellings, accepted for one release with a warning on stderr: old -> new.
DEPRECATED_KEYS = {"model": "dvfs_model"}


def _renamed(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` with deprecated keys under their new names (one warning line each)."""
    out = dict(values)
    for old, new in DEPRECATED_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None:
            continue
        flags = (f"--{old.replace('_', '-')}", f"--{new.replace('_', '-')}")
        names = flags if source == "command line" else (old, new)
        if out.get(new) is not None:
            raise AgentConfigError(f"{source}: give {names[1]} only ({names[0]} is its old name)")
        print(
            f"envpipe-agent: warning: {source}: {names[0]} is deprecated, use {names[1]} "
            "(the old name goes in the next release)",
            file=sys.stderr,
        )
        out[new] = value
    return out
_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def _check_type(key: str, value: Any, source: str) -> Any:
    expected = _TYPES[str(_FIELDS[key].type)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise AgentConfigError(f"{source}: {key} must be {expected.__name__}, got {value!r}")
    return value


def _check_values(config: AgentConfig) -> None:
    for name in _FIELDS:
        choices = _FIELDS[name].metadata["choices"]
        if choices and getattr(config, name) not in choices():
            raise AgentConfigError(
                f"{name} must be one of {', '.join(choices())}, got {getattr(config, name)!r}"
            )
    if config.gpus < 1:
        raise AgentConfigError(f"gpus must be at least 1, got {config.gpus}")
    # nan passes every comparison and inf never expires: a lease that never ends, a sampler that spins
    if not (math.isfinite(config.lease_timeout_s) and 0 < config.lease_timeout_s <= MAX_LEASE_TIMEOUT_S):
        raise AgentConfigError(
            f"lease_timeout_s must be a number of seconds in (0, {MAX_LEASE_TIMEOUT_S:.0f}], got "
            f"{config.lease_timeout_s}"
        )
    low_ms, high_ms = SAMPLE_INTERVAL_RANGE_MS
    if not (math.isfinite(config.sample_interval_ms) and low_ms <= config.sample_interval_ms <= high_ms):
        raise AgentConfigError(
            f"sample_interval_ms must be within [{low_ms:.0f}, {high_ms:.0f}], got {config.sample_interval_ms}"
        )
    if config.min_mhz < 0 or config.max_mhz < 0 or (config.max_mhz and config.min_mhz > config.max_mhz):
        raise AgentConfigError(f"min_mhz={config.min_mhz} max_mhz={config.max_mhz}: need 0 <= min <= max")
    if not 0 <= config.prometheus_port <= 65535:
        raise AgentConfigError(f"prometheus_port must be 0 (off) or a port, got {config.prometheus_port}")
    try:
        ipaddress.ip_address(config.prometheus_addr)
    except ValueError:
        raise AgentConfigError(
            f"prometheus_addr must be an IP address (127.0.0.1 = this node only), got {config.prometheus_addr!r}"
        ) from None
    if config.exit_with_pid < 0:
        raise AgentConfigError(f"exit_with_pid must be a pid or 0 (never), got {config.exit_with_pid}")
    if config.max_connections_per_uid < 4:
        raise AgentConfigError(
            f"max_connections_per_uid must be at least 4 (a rank uses 2), got {config.max_connections_per_uid}"
        )
    if config.memory_guard_mb < 0:
        raise AgentConfigError(f"memory_guard_mb must be 0 (off) or positive, got {config.memory_guard_mb}")
    for name in ("endpoint", "event_endpoint"):
        value = getattr(config, name)
        if value and not value.startswith(("ipc://", "tcp://")):
            raise AgentConfigError(f"{name} must start with ipc:// or tcp://, got {value!r}")


def is_loopback(address: str) -> bool:
    """Whether ``address`` reaches this node only."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def load_toml(path: str) -> dict[str, Any]:
    """Read a config file; unknown keys and wrong types are errors naming the key."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise AgentConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"config {path} is not valid TOML: {exc}") from None
    data = _renamed(data, f"config {path}")
    for key in data:
        if key not in _FIELDS:
            raise AgentConfigError(f"config {path}: unknown key {key!r}; known keys: {', '.join(_FIELDS)}")
    return {key: _check_type(key, value, f"config {path}") for key, value in data.items()}


def resolve_config(config_file: str | None, overrides: dict[str, Any]) -> AgentConfig:
    """Defaults, then the TOML file (if given, or the system file if it exists), then non-None flags."""
    values: dict[str, Any] = {}
    path = (
        config_file if config_file is not None else (SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else "")
    )
    if path:
        values.update(load_toml(path))
    for key, value in _renamed(overrides, "command line").items():
        if key not in _FIELDS:
            raise AgentConfigError(f"unknown option {key!r}")
        if value is not None:
            values[key] = _check_type(key, value, "command line")
    config = AgentConfig(**values)
    _check_values(config)
    return config
