"""Per-GPU worker thread: applies the latest requested clock so NVML latency never blocks the event loop.

The event loop writes into a one-slot mailbox; a newer target overwrites an older one that the worker has
not taken yet (only the latest clock matters), and a target equal to the applied clock is skipped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from envpipe_agent.backend import GpuBackend

log = logging.getLogger("envpipe_agent.worker")

RESET = -1  # mailbox value: reset the GPU's clocks
_STOP = -2


class Mailbox:
    """A latest-value slot: ``put`` never blocks and replaces what was not taken yet."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: tuple[int, int] | None = None
        self.overwritten = 0

    def put(self, value: int, received_ns: int) -> None:
        with self._cond:
            if self._item is not None:
                self.overwritten += 1
            self._item = (value, received_ns)
            self._cond.notify()

    def take(self) -> tuple[int, int]:
        with self._cond:
            while self._item is None:
                self._cond.wait()
            item, self._item = self._item, None
            return item


class GpuWorker:
    """Owns the setters of one GPU. Statistics are read by the event loop without locking (ints, deque)."""

    def __init__(self, backend: GpuBackend, index: int) -> None:
        self.backend = backend
        self.index = index
        self.mailbox = Mailbox()
        self.applied_mhz: int | None = None  # None = unlocked (reset)
        self.clock_changes = 0
        self.resets = 0
        self.duplicates = 0
        self.failures = 0
        self.last_error = ""
        self.apply_latency_ns: collections.deque[int] = collections.deque(maxlen=2048)
        self._thread = threading.Thread(target=self._run, name=f"envpipe-gpu{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.mailbox.put(_STOP, 0)
        self._thread.join(timeout_s)

    def apply_latency_p99_ms(self) -> float | None:
        samples = sorted(self.apply_latency_ns)
        if not samples:
            return None
        return samples[min(len(samples) - 1, int(0.99 * len(samples)))] / 1e6

    def _run(self) -> None:
        while True:
            value, received_ns = self.mailbox.take()
            if value == _STOP:
                return
            try:
                self._apply(value, received_ns)
            except Exception as exc:  # noqa: BLE001 - a failing GPU must not kill the worker; counted, logged
                self.failures += 1
                self.last_error = str(exc)
                log.error("GPU %d: applying %s failed: %s", self.index, value, exc)

    def _apply(self, value: int, received_ns: int) -> None:
        if value == RESET:
            self.backend.reset_clocks(self.index)
            self.applied_mhz = None
            self.resets += 1
            return
        if value == self.applied_mhz:
            self.duplicates += 1
            return
        self.backend.set_locked_clock(self.index, value)
        self.applied_mhz = value
        self.clock_changes += 1
        self.apply_latency_ns.append(time.monotonic_ns() - received_ns)

    def reset_now(self) -> None:
        """Reset synchronously from the caller's thread (startup and shutdown, when no worker runs)."""
        self._apply(RESET, 0)
