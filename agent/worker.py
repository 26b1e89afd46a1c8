"""Per-GPU worker thread: applies the latest requested clock so NVML latency never blocks the event loop.

The event loop writes into a one-slot mailbox; a newer target overwrites an older one that the worker has
not taken yet (only the latest clock matters), and a target equal to the applied clock is skipped.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time

from envpipe_agent.backend import GpuBackend

log = logging.getLogger("envpipe_agent.worker")

RESET = -1  # mailbox value: reset the GPU's clocks
# Bucket bounds (seconds) of the event-to-apply latency histogram: NVML sets take ~0.1-1 ms, a loaded agent
# several ms.
APPLY_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
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
        # Cumulative counts per APPLY_LATENCY_BUCKETS_S bucket (+Inf last) and their sum: the Prometheus
        # histogram, kept as the worker applies (the deque above only holds the latest samples).
        self.latency_buckets = [0] * (len(APPLY_LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        # Held around every setter call: the shutdown reset waits for a set still in flight (an NVML call
        # can outlast stop()'s join) and then closes the worker, so no set can land after the final reset.
        self._apply_lock = threading.Lock()
        self._closed = False
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
        with self._apply_lock:
            if not self._closed:
                self._apply_locked(value, received_ns)

    def _apply_locked(self, value: int, received_ns: int) -> None:
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
        latency_ns = time.monotonic_ns() - received_ns
        self.apply_latency_ns.append(latency_ns)
        latency_s = latency_ns / 1e9
        self.latency_sum_s += latency_s
        self.latency_buckets[bisect.bisect_left(APPLY_LATENCY_BUCKETS_S, latency_s)] += 1

    def reset_now(self, final: bool = False) -> None:
        """Reset synchronously from the caller's thread (startup, and shutdown with ``final``: after a set
        still in flight, and no set after it)."""
        with self._apply_lock:
            self._apply_locked(RESET, 0)
            self._closed = final
