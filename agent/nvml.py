"""The ``nvml`` backend: real GPUs through pynvml (nvidia-ml-py), optionally read-only.

Locks use ``nvmlDeviceSetGpuLockedClocks(h, f, f)`` and ``nvmlDeviceResetGpuLockedClocks(h)`` (the
application-clocks API is deprecated). A success return is not proof, so every set is followed by a read
of the SM clock. Supported SM clocks are those at the highest memory clock. In read-only mode every
setter only logs what it would have done and counts it; nothing is ever written (DESIGN invariant 8).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from envpipe_agent.backend import GpuDesc
from envpipe_agent.errors import AgentConfigError, AgentError

log = logging.getLogger("envpipe_agent.nvml")
T = TypeVar("T")


def select_gpus(descs: list[GpuDesc], manage: str) -> list[GpuDesc]:
    """The GPUs named by ``manage`` ("" = all); an entry that names no GPU is a config error."""
    wanted = [entry.strip() for entry in manage.split(",") if entry.strip()]
    if not wanted:
        return descs
    chosen: list[GpuDesc] = []
    for entry in wanted:
        matches = [
            d for d in descs if (entry.isdigit() and d.index == int(entry)) or d.uuid.startswith(entry)
        ]
        if len(matches) != 1 or entry in ("GPU", "GPU-"):
            known = ", ".join(f"{d.index} ({d.uuid})" for d in descs)
            raise AgentConfigError(
                f"manage entry {entry!r} names {len(matches)} GPUs; give an index or UUID: {known}"
            )
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return sorted(chosen, key=lambda d: d.index)


def from_config(config: Any) -> NvmlBackend:
    """The nvml backend of the agent's config (registered in envpipe_agent.backend)."""
    return NvmlBackend(read_only=config.read_only, manage=config.manage)


class NvmlBackend:
    """All NVIDIA GPUs of the node, by NVML index."""

    name = "nvml"
    simulated = False
    energy_read_cheap = False

    def __init__(self, read_only: bool = False, manage: str = "") -> None:
        """Open every GPU, or only those named in ``manage`` (comma-separated NVML indices or UUID prefixes).

        GPUs left out are never touched: not reset at start, not listed, not claimable.
        """
        import pynvml

        self._nvml: Any = pynvml
        self.read_only = read_only
        # Read-only: the latest settings that would have been applied (bounded: a long run makes many).
        self.would_set: collections.deque[tuple[str, int, int]] = collections.deque(maxlen=10_000)
        self.would_count = 0
        self.readback_mismatches = 0
        self._call(
            "initialise NVML (is the NVIDIA driver installed? --backend sim simulates GPUs)", pynvml.nvmlInit
        )
        count = self._call("count GPUs", pynvml.nvmlDeviceGetCount)
        self._handles = [
            self._call(f"open GPU {i}", pynvml.nvmlDeviceGetHandleByIndex, i) for i in range(count)
        ]
        descs = [self._describe(i, handle) for i, handle in enumerate(self._handles)]
        self._descs = select_gpus(descs, manage)

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            raise AgentError(f"NVML: cannot {what}: {exc}") from None

    def _describe(self, index: int, handle: Any) -> GpuDesc:
        nvml = self._nvml
        uuid = self._call(f"read the UUID of GPU {index}", nvml.nvmlDeviceGetUUID, handle)
        name = self._call(f"read the name of GPU {index}", nvml.nvmlDeviceGetName, handle)
        try:
            memory_mhz = max(nvml.nvmlDeviceGetSupportedMemoryClocks(handle))
        except (nvml.NVMLError, ValueError):  # not supported (or empty): take the memory clock it runs at
            memory_mhz = self._call(
                f"read the memory clock of GPU {index}",
                nvml.nvmlDeviceGetClockInfo,
                handle,
                nvml.NVML_CLOCK_MEM,
            )
        clocks = self._call(
            f"list SM clocks of GPU {index}", nvml.nvmlDeviceGetSupportedGraphicsClocks, handle, memory_mhz
        )
        return GpuDesc(index, uuid, name, tuple(sorted(set(clocks), reverse=True)))

    def gpus(self) -> list[GpuDesc]:
        return list(self._descs)

    def set_locked_clock(self, index: int, clock_mhz: int) -> None:
        if self.read_only:
            self._would("lock", index, clock_mhz, f"lock GPU {index} at {clock_mhz} MHz")
            return
        handle = self._handles[index]
        self._call(
            f"lock GPU {index} at {clock_mhz} MHz",
            self._nvml.nvmlDeviceSetGpuLockedClocks,
            handle,
            clock_mhz,
            clock_mhz,
        )
        actual_mhz = self.read_clock_mhz(index)
        if actual_mhz > clock_mhz:
            # Below the lock is normal (idle, power or thermal cap); above it means the lock did not hold.
            self.readback_mismatches += 1
            log.warning("GPU %d: locked at %d MHz but reads %d MHz", index, clock_mhz, actual_mhz)

    def _would(self, operation: str, index: int, clock_mhz: int, text: str) -> None:
        self.would_set.append((operation, index, clock_mhz))
        self.would_count += 1
        # Every one at debug; at info the first 20 and then every 1000th, so a training run at 1k events/s
        # does not flood the journal.
        if self.would_count <= 20 or self.would_count % 1000 == 0:
            log.info("read-only: would %s (%d settings skipped so far)", text, self.would_count)
        else:
            log.debug("read-only: would %s", text)

    def reset_clocks(self, index: int) -> None:
        if self.read_only:
            self._would("reset", index, 0, f"reset the locked clocks of GPU {index}")
            return
        self._call(
            f"reset the clocks of GPU {index}",
            self._nvml.nvmlDeviceResetGpuLockedClocks,
            self._handles[index],
        )

    def read_clock_mhz(self, index: int) -> int:
        return self._call(
            f"read the SM clock of GPU {index}",
            self._nvml.nvmlDeviceGetClockInfo,
            self._handles[index],
            self._nvml.NVML_CLOCK_SM,
        )

    def read_power_w(self, index: int) -> float:
        return (
            self._call(
                f"read the power of GPU {index}", self._nvml.nvmlDeviceGetPowerUsage, self._handles[index]
            )
            / 1000.0
        )

    def read_energy_mj(self, index: int) -> int:
        return self._call(
            f"read the energy counter of GPU {index}",
            self._nvml.nvmlDeviceGetTotalEnergyConsumption,
            self._handles[index],
        )

    def on_phase(self, index: int, busy: bool, at_s: float | None = None) -> None:
        """Real GPUs measure their own energy (sender timestamps play no part); events only carry clocks."""

    def describe(self) -> str:
        return "NVML (read-only)" if self.read_only else "NVML"

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)
