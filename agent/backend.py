"""What every GPU backend offers the agent, and the allow-list that clocks are snapped to."""

from __future__ import annotations

import bisect
import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from envpipe_agent.errors import AgentConfigError


@dataclass(frozen=True, slots=True)
class GpuDesc:
    """One managed GPU: its index on this node, UUID, name and supported SM clocks (descending)."""

    index: int
    uuid: str
    name: str
    clocks_mhz: tuple[int, ...]


class GpuBackend(Protocol):
    """The operations the agent needs from NVML (or from a simulation of it).

    Setters are only ever called from the GPU's own worker thread; reads may come from any thread.
    """

    name: str
    simulated: bool
    read_only: bool
    # True when reading the energy counter is cheap enough to do on every window query (sim); NVML's
    # counter costs ~3 ms per read and is sampled by a thread instead.
    energy_read_cheap: bool

    def gpus(self) -> list[GpuDesc]: ...

    def set_locked_clock(self, index: int, clock_mhz: int) -> None: ...

    def reset_clocks(self, index: int) -> None: ...

    def read_clock_mhz(self, index: int) -> int: ...

    def read_power_w(self, index: int) -> float: ...

    def read_energy_mj(self, index: int) -> int: ...

    # at_s: the sender's monotonic timestamp of the event (energy of a simulated GPU is integrated on it)
    def on_phase(self, index: int, busy: bool, at_s: float | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """A registered backend: ``factory`` is ``module:function``, the function takes the resolved config and
    returns a :class:`GpuBackend` (the module is imported only when the backend is chosen)."""

    factory: str
    description: str


# The one list of backends: --backend's choices, the config check and the docs table come from it.
# Adding a backend = its module (with a ``from_config(config)`` function), its test, and one line here.
BACKENDS: dict[str, BackendEntry] = {
    "nvml": BackendEntry("envpipe_agent.nvml:from_config", "real GPUs through NVML (read_only: never set)"),
    "sim": BackendEntry("envpipe_agent.sim:from_config", "simulated GPUs, labelled simulated everywhere"),
}


def make_backend(config: Any) -> GpuBackend:
    """The backend the config names, built by its registered factory."""
    module, _, function = BACKENDS[config.backend].factory.partition(":")
    backend: GpuBackend = getattr(importlib.import_module(module), function)(config)
    return backend


class AllowList:
    """The clocks the agent may apply on one GPU: supported clocks within the configured [min, max].

    Requests outside the list are snapped to the nearest allowed clock (ties go to the lower clock, which
    saves energy), so no raw client value ever reaches NVML.
    """

    def __init__(self, supported_mhz: tuple[int, ...], min_mhz: int | None, max_mhz: int | None) -> None:
        low = min_mhz if min_mhz is not None else 0
        high = max_mhz if max_mhz is not None else 1 << 31
        allowed = sorted(c for c in supported_mhz if low <= c <= high)
        if not allowed:
            raise AgentConfigError(
                f"no supported clock lies within min_mhz={min_mhz} .. max_mhz={max_mhz} "
                f"(supported {min(supported_mhz)}..{max(supported_mhz)} MHz); widen the allow-list"
            )
        self.ascending_mhz: list[int] = allowed

    @property
    def min_mhz(self) -> int:
        return self.ascending_mhz[0]

    @property
    def max_mhz(self) -> int:
        return self.ascending_mhz[-1]

    def snap(self, clock_mhz: int) -> int:
        """The allowed clock nearest to ``clock_mhz``."""
        clocks = self.ascending_mhz
        pos = bisect.bisect_left(clocks, clock_mhz)
        if pos == 0:
            return clocks[0]
        if pos == len(clocks):
            return clocks[-1]
        below, above = clocks[pos - 1], clocks[pos]
        if above == clock_mhz:
            return above
        return below if clock_mhz - below <= above - clock_mhz else above
