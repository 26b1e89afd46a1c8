"""Allow-list snapping and the per-GPU worker's latest-value mailbox."""

from __future__ import annotations

import threading
import time

import pytest

from envpipe_agent.backend import AllowList
from envpipe_agent.errors import AgentConfigError
from envpipe_agent.worker import RESET, GpuWorker, Mailbox

H100 = tuple(range(1980, 344, -15))


@pytest.mark.parametrize(
    ("asked", "snapped"), [(1410, 1410), (1412, 1410), (1418, 1425), (1417, 1410), (100, 900), (9999, 1500)]
)
def test_snap_to_nearest_allowed_clock(asked: int, snapped: int) -> None:
    assert AllowList(H100, 900, 1500).snap(asked) == snapped


def test_empty_allow_list_is_a_config_error() -> None:
    with pytest.raises(AgentConfigError, match="widen the allow-list"):
        AllowList(H100, 2000, 2100)


def test_mailbox_keeps_only_the_latest_value() -> None:
    box = Mailbox()
    for value in (1410, 1200, 990):
        box.put(value, 0)
    assert box.take() == (990, 0) and box.overwritten == 2


def _until(predicate) -> None:
    deadline_s = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline_s, "worker did not get there"
        time.sleep(0.001)


class RecordingBackend:
    """Records setter calls; ``gate`` lets a test hold the worker inside a slow set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def set_locked_clock(self, index: int, clock_mhz: int) -> None:
        self.entered.set()
        self.gate.wait(5)
        self.calls.append(("set", clock_mhz))

    def reset_clocks(self, index: int) -> None:
        self.calls.append(("reset", 0))


def test_worker_applies_latest_skips_duplicates_and_resets() -> None:
    backend = RecordingBackend()
    worker = GpuWorker(backend, 0)  # type: ignore[arg-type]
    worker.start()
    backend.gate.clear()
    worker.mailbox.put(1410, 0)
    assert backend.entered.wait(5)  # the worker is stuck in a slow NVML call ...
    for value in (1200, 990, 1605):  # ... while newer targets arrive: only the last one survives
        worker.mailbox.put(value, 0)
    backend.gate.set()
    _until(lambda: worker.clock_changes == 2)
    worker.mailbox.put(1605, 0)  # already applied: skipped
    _until(lambda: worker.duplicates == 1)
    worker.mailbox.put(RESET, 0)
    _until(lambda: worker.resets == 1)
    worker.stop()
    assert backend.calls == [("set", 1410), ("set", 1605), ("reset", 0)]
