"""Energy counters: a sampler thread for status, and the estimate of the energy at a window mark.

NVML's counter advances in steps about every 100 ms and one read costs ~3 ms (p99 16 ms). Status and the
Prometheus endpoint show the latest sample of a thread that reads every ``interval_ms``. A window mark
instead gets its own estimate (:meth:`EnergySampler.estimate_at`), computed on one executor thread per
GPU so the event loop keeps serving: the counter is read back to back until it has stepped twice after the
mark, which times both steps to within one read, and the energy at the mark is interpolated on the power
between them (method in docs/protocol.md, "Energy windows"). Backends whose reads are cheap and exact
(``energy_read_cheap``, the sim) are read directly at the mark instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from envpipe_agent.backend import GpuBackend

log = logging.getLogger("envpipe_agent.energy")

COUNTER_PERIOD_S = 0.1  # NVML's energy counter steps about this often (H100: median 99.8 ms, p90 116 ms)
MARK_POLL_S = 0.001  # pause between back-to-back reads at a mark (a real read itself takes ~3 ms)
MARK_WAIT_S = 4 * COUNTER_PERIOD_S  # longest a mark waits for two steps (an idle card's counter may stall)
# Marks (and window results) queued per GPU at most: each takes up to MARK_WAIT_S, so a holder flooding
# window begin/end grew the queue (and the agent, ~10 MiB/s) without bound. 64 marks = up to ~26 s of work.
MAX_PENDING_MARKS = 64


class MarksBusy(Exception):
    """Too many window marks of one GPU are still being estimated."""


def interpolate_mark(mark_s: float, steps: list[tuple[float, float]]) -> float:
    """Counter value (mJ) at ``mark_s`` from two timed steps ``(when_s, value_mj)`` after it.

    The power between the two steps is taken for the stretch from the mark to the first step as well: the
    stretch is shorter than one counter period, so the error is the change of power within one period
    times that stretch, not the counter's whole step.
    """
    (first_s, first_mj), (second_s, second_mj) = steps
    power_mj_per_s = (second_mj - first_mj) / (second_s - first_s)
    return first_mj - power_mj_per_s * (first_s - mark_s)


class EnergySampler:
    """Latest ``(energy_mj, monotonic_s)`` per GPU index."""

    def __init__(self, backend: GpuBackend, indices: list[int], interval_ms: float) -> None:
        self.backend = backend
        self.interval_s = interval_ms / 1000.0
        self._latest: dict[int, tuple[int, float]] = {}
        self.read_errors = 0
        self.marks_interpolated = 0
        self.marks_fresh_read = 0  # the counter did not step twice in MARK_WAIT_S: the plain fresh read
        # One thread per GPU: a mark's reads take up to ~0.3 s and must not delay another GPU's marks; a
        # window's end is queued behind its begin, so it always finds the begin's estimate done.
        self._marks = {
            index: ThreadPoolExecutor(1, thread_name_prefix=f"envpipe-mark{index}") for index in indices
        }
        self._pending = dict.fromkeys(indices, 0)  # queued marks per GPU (changed under _pending_lock)
        self._pending_lock = threading.Lock()
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
        for executor in self._marks.values():
            executor.shutdown(wait=False, cancel_futures=True)

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

    def mark(self, index: int, mark_s: float) -> Future[float]:
        """The GPU's energy (mJ) at monotonic time ``mark_s``: exact for a cheap backend (at ``mark_s`` when
        it keeps a timeline, like the sim; else now), else estimated on the GPU's mark thread (see
        :meth:`estimate_at`)."""
        if self.backend.energy_read_cheap:
            done: Future[float] = Future()
            energy_at_mj = getattr(self.backend, "energy_at_mj", None)  # the sim: exact at any recent time
            done.set_result(
                energy_at_mj(index, mark_s) if energy_at_mj else float(self.backend.read_energy_mj(index))
            )
            return done
        return self._submit(index, self.estimate_at, index, mark_s)

    def _submit(self, index: int, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``fn`` on the GPU's mark thread; raises :class:`MarksBusy` when MAX_PENDING_MARKS wait."""
        with self._pending_lock:
            if self._pending[index] >= MAX_PENDING_MARKS:
                raise MarksBusy(
                    f"{self._pending[index]} window marks of GPU {index} are still being measured; "
                    "end windows less often"
                )
            self._pending[index] += 1
        future = self._marks[index].submit(fn, *args)
        future.add_done_callback(lambda _done: self._done(index))
        return future

    def _done(self, index: int) -> None:
        with self._pending_lock:
            self._pending[index] -= 1

    def pending(self, index: int) -> int:
        """Marks of GPU ``index`` queued or running."""
        return self._pending[index]

    def _timed_read(self, index: int) -> tuple[float, int]:
        start_s = time.monotonic()
        value_mj = self.backend.read_energy_mj(index)
        return (start_s + time.monotonic()) / 2, value_mj  # the read's midpoint: a ~3 ms call on NVML

    def estimate_at(self, index: int, mark_s: float) -> float:
        """Energy (mJ) at ``mark_s``, interpolated between the counter's next two steps.

        Reads back to back until the value has changed twice; each change is timed at the midpoint between
        the reads around it (within one read, ~3 ms on NVML, of the true step). Falls back to the first
        fresh read when the counter does not step twice within ``MARK_WAIT_S``.
        """
        previous_s, previous_mj = self._timed_read(index)
        fresh_mj, deadline_s = previous_mj, previous_s + MARK_WAIT_S
        steps: list[tuple[float, float]] = []
        while len(steps) < 2 and time.monotonic() < deadline_s:
            time.sleep(MARK_POLL_S)
            now_s, value_mj = self._timed_read(index)
            if value_mj != previous_mj:
                steps.append(((previous_s + now_s) / 2, float(value_mj)))
            previous_s, previous_mj = now_s, value_mj
        if len(steps) < 2:
            self.marks_fresh_read += 1
            return float(fresh_mj)
        self.marks_interpolated += 1
        return interpolate_mark(mark_s, steps)
