"""Emulated DVFS: stretch a unit's wall time by its clock's modelled slowdown (simulated, for CPU/sim runs).

With the sim agent nothing really slows down at a lower clock, so reconfiguration would see flat timings
and learn nothing. Here a unit planned at clock f takes ``time_ratio(f / f_max)`` times its real duration:
on CPU the extra is busy-waited after the unit (a sleeping rank loses its core); on GPU a
``torch.cuda._sleep`` spin is queued after the unit's kernels, sized from the unit's own compute time in
the latest timeline read with ``last_timeline()`` (a CUDA event separates compute from spin; the device is
not waited on). The spin rate is measured at setup and then from every timeline, as the GPU's clock under
load differs from its idle clock.
The curve is an ``envpipe_agent.dvfs`` model, the same one the sim agent integrates energy with.
"""

from __future__ import annotations

import time
from typing import Any

from envpipe.errors import ConfigError


def wait_until(deadline_s: float) -> None:
    """Busy-wait until ``perf_counter() >= deadline_s``, keeping the core like the compute it stands for.

    Not ``time.sleep``: a sleeping rank gives its core away, and on a machine with more runnable processes
    than cores it gets it back a scheduler time slice (ms) late. Measured on 2 shared cores, units at
    1650 MHz then took 1.3x their top-clock time instead of the model's 1.13x, so lower clocks looked
    slower and costlier than modelled (f_low at the top clock, targets calibrated too high).
    """
    while time.perf_counter() < deadline_s:
        pass


class DvfsStretcher:
    """Slows units down as if they ran at their planned clock (a model, labelled simulated)."""

    simulated = True

    def __init__(self, model: str | Any = "central", *, max_clock_mhz: int) -> None:
        from envpipe_agent.dvfs import DvfsModel, get_model

        if max_clock_mhz is None or max_clock_mhz <= 0:
            raise ConfigError(f"emulated DVFS needs the card's top clock, got {max_clock_mhz!r}")
        self.model = model if isinstance(model, DvfsModel) else get_model(model)
        self.max_clock_mhz = int(max_clock_mhz)
        self._ratio_cache: dict[int, float] = {}
        self._last_ms: dict[str, float] = {}
        self._cycles_per_ms: float | None = None
        self._spin_cycles: dict[str, int] = {}

    def ratio(self, clock_mhz: int | None) -> float:
        """Modelled duration at ``clock_mhz`` over the duration at the top clock (1.0 for None)."""
        if clock_mhz is None:
            return 1.0
        if clock_mhz not in self._ratio_cache:
            x = min(clock_mhz, self.max_clock_mhz) / self.max_clock_mhz
            self._ratio_cache[clock_mhz] = self.model.time_ratio(x)
        return self._ratio_cache[clock_mhz]

    def stretch_cpu(self, elapsed_s: float, clock_mhz: int | None) -> float:
        """Wait out the modelled extra of a unit that took ``elapsed_s`` at the top clock; returns it (s).

        The wait spins to a deadline (:func:`wait_until`): ``time.sleep`` overshot by ~0.1 ms on an idle
        core (a third of a 2 ms unit's 1650 MHz stretch) and by a time slice on a busy one.
        """
        extra_s = elapsed_s * (self.ratio(clock_mhz) - 1.0)
        if extra_s > 0:
            wait_until(time.perf_counter() + extra_s)
        return max(extra_s, 0.0)

    def stretch_gpu(self, unit: str, clock_mhz: int | None) -> None:
        """Queue a device spin of the modelled extra, sized from the unit's last measured compute time."""
        import torch

        base_ms = self._last_ms.get(unit)
        extra_ms = 0.0 if base_ms is None else base_ms * (self.ratio(clock_mhz) - 1.0)
        cycles = int(extra_ms * self._device_cycles_per_ms()) if extra_ms > 0 else 0
        self._spin_cycles[unit] = cycles
        if cycles > 0:
            torch.cuda._sleep(cycles)

    def observe_gpu(self, splits: list[tuple[str, float, float]]) -> None:
        """Learn each unit's own compute time and the spin rate actually achieved, from one iteration.

        The spin runs at whatever clock the GPU is at (idle-low at setup, boosted under load), so its rate
        is re-measured every time a timeline is read: the stretch converges within an iteration or two.
        """
        rates = []
        for unit, compute_ms, spin_ms in splits:
            self._last_ms[unit] = compute_ms
            cycles = self._spin_cycles.get(unit, 0)
            if cycles > 0 and spin_ms > 0.01:
                rates.append(cycles / spin_ms)
        if rates:
            self._cycles_per_ms = sorted(rates)[len(rates) // 2]

    def calibrate_gpu(self) -> float:
        """Measure the spin rate now (``initialize`` calls this at setup, so no unit pays for it)."""
        return self._device_cycles_per_ms()

    def _device_cycles_per_ms(self) -> float:
        """Spin cycles per ms on this device, measured once (CUDA events around a known spin)."""
        if self._cycles_per_ms is None:
            import torch

            # The nominal clock is not the clock the SM runs the spin at (boost, power caps): time a spin
            # once instead of trusting device properties.
            cycles = 20_000_000
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._cycles_per_ms = cycles / max(start.elapsed_time(end), 1e-3)
        return self._cycles_per_ms
