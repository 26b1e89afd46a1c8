"""Energy sampler: reads every GPU's energy counter on a thread so window queries never wait on NVML.

NVML's counter advances about every 100 ms and one read costs ~3 ms (p99 16 ms), so the agent samples it
every ``interval_ms`` and answers a window mark with the latest sample. Backends whose reads are cheap
(``energy_read_cheap``, the sim) are read directly at the mark instead, which is exact.
"""

from __future__ import annotations

import logging
import threading
import time

from envpipe_agent.backend import GpuBackend

log = logging.getLogger("envpipe_agent.energy")


class EnergySampler:
    """Latest ``(energy_mj, monotonic_s)`` per GPU index."""

    def __init__(self, backend: GpuBackend, indices: list[int], interval_ms: float) -> None:
        self.backend = backend
        self.interval_s = interval_ms / 1000.0
        self._latest: dict[int, tuple[int, float]] = {}
        self.read_errors = 0
        self._stop = threading.Event()
        self._indices = indices
        for index in indices:
            self._sample(index)
        self._thread = threading.Thread(target=self._run, name="envpipe-energy", daemon=True)

    def start(self) -> None:
        if not self.backend.energy_read_cheap:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _sample(self, index: int) -> None:
        try:
            self._latest[index] = (self.backend.read_energy_mj(index), time.monotonic())
        except Exception as exc:  # noqa: BLE001 - a failed read keeps the previous sample; counted
            self.read_errors += 1
            log.warning("GPU %d: energy read failed: %s", index, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for index in self._indices:
                self._sample(index)

    def read(self, index: int) -> tuple[int, float]:
        """The GPU's energy counter (mJ) and when it was read (monotonic seconds)."""
        if self.backend.energy_read_cheap:
            self._sample(index)
        return self._latest.get(index, (0, time.monotonic()))
