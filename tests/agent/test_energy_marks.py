"""Energy at a window mark: interpolation between timed counter steps (no agent, a stepped fake counter)."""

from __future__ import annotations

import time

import pytest

from envpipe_agent.energy import EnergySampler, interpolate_mark


class SteppedCounter:
    """A GPU whose energy counter publishes every ``step_s``; power is ``power_w`` (a function of time)."""

    name, simulated, read_only, energy_read_cheap = "stepped", False, True, False

    def __init__(self, step_s: float, power_w) -> None:
        self.step_s, self.power_w, self.start_s, self.reads = step_s, power_w, time.monotonic(), 0

    def true_mj(self, at_s: float) -> float:
        # Integrate power over [start, at] in 1 ms slices (power changes only at whole milliseconds here).
        slices = int((at_s - self.start_s) * 1000)
        return sum(self.power_w(self.start_s + i / 1000) for i in range(slices))  # W * 1 ms = 1 mJ

    def read_energy_mj(self, index: int) -> int:
        self.reads += 1
        now_s = time.monotonic() - self.start_s
        return int(self.true_mj(self.start_s + now_s // self.step_s * self.step_s))


@pytest.fixture
def stepped():
    """A 700 W GPU whose counter steps every 100 ms (70 J a step), and a sampler on it."""
    counter = SteppedCounter(0.1, lambda t: 700.0)
    sampler = EnergySampler(counter, [0], 100.0)
    yield counter, sampler
    sampler.stop()


def test_interpolation_takes_the_power_after_the_mark() -> None:
    # Steps at 1.05 s (1050 J) and 1.15 s (1120 J): 700 W; the mark at 1.0 s lies 50 ms before the first.
    assert interpolate_mark(1.0, [(1.05, 1_050_000.0), (1.15, 1_120_000.0)]) == pytest.approx(1_015_000.0)


def test_a_mark_between_steps_is_estimated_well_below_one_step(stepped) -> None:
    counter, sampler = stepped
    time.sleep(0.23)
    mark_s = time.monotonic()
    estimate_mj = sampler.estimate_at(0, mark_s)
    assert abs(estimate_mj - counter.true_mj(mark_s)) < 0.1 * 70_000  # one step is 70 J
    assert sampler.marks_interpolated == 1



def test_a_queued_mark_is_interpolated_back_to_its_own_time(stepped) -> None:
    # A window's end is estimated after its begin on the GPU's one mark thread: the second estimate starts
    # late, and must still answer for its own mark, not for when its reads began.
    counter, sampler = stepped
    time.sleep(0.17)
    first_s = time.monotonic()
    second_s = first_s + 0.002
    first, second = sampler.mark(0, first_s), sampler.mark(0, second_s)
    first_mj, second_mj = first.result(2), second.result(2)
    assert abs(second_mj - counter.true_mj(second_s)) < 0.1 * 70_000
    # 2 ms at 700 W apart, each within a few reads of its step (far below one 70 J step)
    assert second_mj - first_mj == pytest.approx(700.0 * 2, abs=0.1 * 70_000)


def test_pending_marks_per_gpu_are_bounded() -> None:
    """Issue 12 item 4: window begin/end floods queued marks without bound (~10 MiB/s on NVML)."""
    import threading

    from envpipe_agent.energy import MAX_PENDING_MARKS, EnergySampler, MarksBusy
    from envpipe_agent.sim import SimBackend

    class SlowCounter(SimBackend):
        energy_read_cheap = False

        def __init__(self) -> None:
            super().__init__(gpus=1)
            self.gate = threading.Event()

        def read_energy_mj(self, index: int) -> int:
            self.gate.wait(10)
            return super().read_energy_mj(index)

    backend = SlowCounter()
    backend.gate.set()
    sampler = EnergySampler(backend, [0], 100.0)
    backend.gate.clear()
    try:
        marks = [sampler.mark(0, 0.0) for _ in range(MAX_PENDING_MARKS)]
        with pytest.raises(MarksBusy):
            sampler.mark(0, 0.0)
        backend.gate.set()
        for mark in marks:
            mark.result(10)
        assert sampler.pending(0) == 0
        sampler.mark(0, 0.0).result(10)  # free again
    finally:
        backend.gate.set()
        sampler.stop()
