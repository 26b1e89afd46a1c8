"""Agent configuration: defaults < TOML file (/etc/envpipe/agent.toml) < command-line flags, resolved once.

A bad key or value raises :class:`AgentConfigError` naming it; the command line turns that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envpipe_agent.errors import AgentConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SYSTEM_RUNTIME_DIR = "/run/envpipe"
SYSTEM_CONFIG = "/etc/envpipe/agent.toml"
BACKENDS = ("nvml", "sim")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs, resolved (see :func:`resolve_config`)."""

    backend: str = "nvml"
    read_only: bool = False
    gpus: int = 1  # sim only
    card: str = "h100"  # sim only
    model: str = "central"  # sim only
    runtime_dir: str = ""  # "" = /run/envpipe as root, $XDG_RUNTIME_DIR/envpipe otherwise
    endpoint: str = ""  # control endpoint; "" = ipc://<runtime_dir>/control.sock
    event_endpoint: str = ""  # "" = derived from endpoint (events.sock, or tcp port + 1)
    lease_timeout_s: float = 2.0
    min_mhz: int = 0  # 0 = no lower bound beyond the supported clocks
    max_mhz: int = 0  # 0 = no upper bound beyond the supported clocks
    prometheus_port: int = 0  # 0 = off
    prometheus_addr: str = "127.0.0.1"
    socket_group: str = ""  # "" = "envpipe" if that group exists, else the agent's own group
    sample_interval_ms: float = 100.0
    log_level: str = "info"
    manage: str = ""  # nvml: comma-separated NVML indices or UUID prefixes to manage ("" = every GPU)
    # Stop (resetting clocks) once this pid is gone; embedded agents follow their parent. 0 = never.
    exit_with_pid: int = 0

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
_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def _check_type(key: str, value: Any, source: str) -> Any:
    expected = _TYPES[str(_FIELDS[key].type)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise AgentConfigError(f"{source}: {key} must be {expected.__name__}, got {value!r}")
    return value


def _check_values(config: AgentConfig) -> None:
    if config.backend not in BACKENDS:
        raise AgentConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.gpus < 1:
        raise AgentConfigError(f"gpus must be at least 1, got {config.gpus}")
    if config.lease_timeout_s <= 0:
        raise AgentConfigError(f"lease_timeout_s must be positive, got {config.lease_timeout_s}")
    if config.min_mhz < 0 or config.max_mhz < 0 or (config.max_mhz and config.min_mhz > config.max_mhz):
        raise AgentConfigError(f"min_mhz={config.min_mhz} max_mhz={config.max_mhz}: need 0 <= min <= max")
    if not 0 <= config.prometheus_port <= 65535:
        raise AgentConfigError(f"prometheus_port must be 0 (off) or a port, got {config.prometheus_port}")
    try:
        loopback = ipaddress.ip_address(config.prometheus_addr).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise AgentConfigError(f"prometheus_addr must be a loopback address, got {config.prometheus_addr!r}")
    if config.exit_with_pid < 0:
        raise AgentConfigError(f"exit_with_pid must be a pid or 0 (never), got {config.exit_with_pid}")
    if config.sample_interval_ms <= 0:
        raise AgentConfigError(f"sample_interval_ms must be positive, got {config.sample_interval_ms}")
    for name in ("endpoint", "event_endpoint"):
        value = getattr(config, name)
        if value and not value.startswith(("ipc://", "tcp://")):
            raise AgentConfigError(f"{name} must start with ipc:// or tcp://, got {value!r}")


def load_toml(path: str) -> dict[str, Any]:
    """Read a config file; unknown keys and wrong types are errors naming the key."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise AgentConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"config {path} is not valid TOML: {exc}") from None
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
    for key, value in overrides.items():
        if key not in _FIELDS:
            raise AgentConfigError(f"unknown option {key!r}")
        if value is not None:
            values[key] = _check_type(key, value, "command line")
    config = AgentConfig(**values)
    _check_values(config)
    return config
