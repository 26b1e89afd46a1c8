"""Phase events to the node agent: sent when the DEVICE reaches a unit, never blocking the training loop.

On GPU, Python enqueues kernels far ahead of the device, so "unit F3 begins" is true only when the CUDA
event recorded before F3's kernels completes. A notifier thread takes (event, message) pairs in order,
waits on each event (``event.synchronize()`` in that thread only; the training thread never synchronises)
and then sends the message. On CPU the work runs synchronously, so events are sent at once.

``agent.phase`` is fire-and-forget (NOBLOCK; drops are counted by the client), so neither path can stall.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

log = logging.getLogger("envpipe.deepspeed")


class NullNotifier:
    """No agent: events go nowhere."""

    def send(self, unit: str, event: str, clock_mhz: int | None, marker: Any = None) -> None:
        """Drop the event."""

    def close(self) -> None:
        """Nothing to stop."""


class ImmediateNotifier:
    """CPU: the unit boundary is now, so send at once."""

    def __init__(self, agent: Any) -> None:
        self._phase = agent.phase

    def send(self, unit: str, event: str, clock_mhz: int | None, marker: Any = None) -> None:
        """Send ``event`` ("begin"/"end") of ``unit`` with its planned clock."""
        self._phase(unit, event, clock_mhz)

    def close(self) -> None:
        """Nothing to stop."""


class CudaEventNotifier:
    """GPU: a thread sends each event once the device has reached the CUDA event marking it."""

    def __init__(self, agent: Any) -> None:
        self._phase = agent.phase
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="envpipe-phase-notifier", daemon=True)
        self._thread.start()

    def send(self, unit: str, event: str, clock_mhz: int | None, marker: Any = None) -> None:
        """Queue ``event`` of ``unit``; it is sent when the device passes ``marker`` (a recorded CUDA event)."""
        self._queue.put((marker, unit, event, clock_mhz))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            marker, unit, event, clock_mhz = item
            try:
                if marker is not None:
                    marker.synchronize()  # this thread only: the training thread never waits here
                self._phase(unit, event, clock_mhz)
            except Exception as exc:  # noqa: BLE001 - a broken agent must not kill training; say so, go on
                log.warning("phase event %s %s not sent: %s", unit, event, exc)

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=5.0)


def make_notifier(agent: Any, on_gpu: bool) -> NullNotifier | ImmediateNotifier | CudaEventNotifier:
    """The notifier for this device and agent (None → events are dropped)."""
    if agent is None:
        return NullNotifier()
    return CudaEventNotifier(agent) if on_gpu else ImmediateNotifier(agent)
