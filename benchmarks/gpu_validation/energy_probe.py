"""Part 2 of the GPU validation: the agent's energy window against an integral of power samples.

The driver (not the agent) samples the GPU through NVML reads only (power, SM clock, energy counter) on a
thread every ~10 ms while a known load runs: ``idle lead-in → matmuls for load_s → idle tail``, all inside
one agent energy window. The lead-in and tail are idle so that a counter sample taken up to ~100 ms away
from the window's edges, and the ~1 s averaging of NVML's power reading, both cost little.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from analysis import counter_updates, goal, integrate_power_j, relative_error, stats

_POWER_INSTANT_FIELD = 186  # NVML_FI_DEV_POWER_INSTANT in nvml.h (pynvml may lack the constant)


class PowerSampler:
    """Samples power (average and, where the driver has it, instant), SM clock and energy counter."""

    def __init__(self, nvml: Any, handle: Any, interval_s: float = 0.01, energy_every: int = 10) -> None:
        self.nvml, self.handle = nvml, handle
        self.interval_s, self.energy_every = interval_s, energy_every
        self.power: list[tuple[float, float]] = []
        self.instant: list[tuple[float, float]] = []
        self.clock: list[tuple[float, int]] = []
        self.energy: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
        self._instant_ok = True

    def start(self) -> PowerSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _read_instant_w(self) -> float | None:
        if not self._instant_ok:
            return None
        nvml = self.nvml
        try:
            value = nvml.nvmlDeviceGetFieldValues(self.handle, [getattr(nvml, "NVML_FI_DEV_POWER_INSTANT",
                                                                        _POWER_INSTANT_FIELD)])[0]
        except Exception as exc:  # noqa: BLE001 - older drivers (and the fake NVML) lack it
            self._instant_ok = False
            self.errors.append(f"instant power unavailable: {exc}")
            return None
        if value.nvmlReturn != 0:
            self._instant_ok = False
            self.errors.append(f"instant power field returned {value.nvmlReturn}")
            return None
        return value.value.uiVal / 1000.0

    def _run(self) -> None:
        nvml, handle, k = self.nvml, self.handle, 0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self.power.append((now, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0))
                self.clock.append((now, nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)))
                instant = self._read_instant_w()
                if instant is not None:
                    self.instant.append((time.monotonic(), instant))
                if k % self.energy_every == 0:
                    energy_j = nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
                    self.energy.append((time.monotonic(), energy_j))
            except nvml.NVMLError as exc:
                self.errors.append(str(exc))
            k += 1
            self._stop.wait(self.interval_s)


def make_load(on_gpu: bool) -> Any:
    """A function ``load(seconds)`` keeping the device busy: bf16 8192³ matmuls on random data (GPU)."""
    if not on_gpu:
        return time.sleep  # CPU smoke run: no device to load
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    (a @ b).float().sum().item()  # warm: cuBLAS handle and kernel selection outside the window

    def load(seconds: float) -> None:
        end_s = time.monotonic() + seconds
        while time.monotonic() < end_s:
            for _ in range(8):
                a @ b
            torch.cuda.synchronize()

    return load


def measure_window(client: Any, sampler_factory: Any, load: Any, *, load_s: float, lead_s: float,
                   tail_s: float) -> dict[str, Any]:
    """One agent window around ``lead_s`` idle + ``load_s`` load + ``tail_s`` idle, against the samples."""
    sampler = sampler_factory().start()
    time.sleep(0.5)
    begin_s = time.monotonic()
    window_id = client.window_begin()
    time.sleep(lead_s)
    load_start_s = time.monotonic()
    load(load_s)
    load_end_s = time.monotonic()
    time.sleep(tail_s)
    end_s = time.monotonic()
    window = client.window_end(window_id)
    time.sleep(0.3)
    sampler.stop()
    out: dict[str, Any] = {
        "load_s": load_end_s - load_start_s, "window_wall_s": end_s - begin_s,
        "agent_energy_j": window.energy_j, "agent_duration_s": window.duration_s,
        "simulated": window.simulated,
        "samples": len(sampler.power), "sampler_errors": sampler.errors[:5],
        "sm_clock_mhz_under_load": stats(c for t, c in sampler.clock if load_start_s <= t <= load_end_s),
        "power_w_under_load": stats(p for t, p in sampler.power if load_start_s + 1.0 <= t <= load_end_s),
    }
    if len(sampler.power) >= 2:
        out["integral_power_avg_j"] = integrate_power_j(sampler.power, begin_s, end_s)
        out["error_vs_power_avg"] = relative_error(window.energy_j, out["integral_power_avg_j"])
    if len(sampler.instant) >= 2:
        out["integral_power_instant_j"] = integrate_power_j(sampler.instant, begin_s, end_s)
        out["error_vs_power_instant"] = relative_error(window.energy_j, out["integral_power_instant_j"])
    counter = [(t, e) for t, e in sampler.energy if begin_s <= t <= end_s]
    if len(counter) >= 2:
        out["own_counter_j"] = counter[-1][1] - counter[0][1]
        out["own_counter_span_s"] = counter[-1][0] - counter[0][0]
    return out


def probe_counter(nvml: Any, handle: Any, load: Any, seconds: float) -> dict[str, Any]:
    """Read the energy counter back to back while ``load`` runs: how often does it change?"""
    series: list[tuple[float, float]] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            energy_j = nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
            series.append((time.monotonic(), energy_j))

    thread = threading.Thread(target=reader, name="counter-probe", daemon=True)
    thread.start()
    load(seconds)
    done.set()
    thread.join(5.0)
    return counter_updates(series)


def run_energy_part(endpoint: str, gpu_uuid: str, on_gpu: bool, loads_s: list[float]) -> dict[str, Any]:
    """Claim the GPU at the agent, measure one window per load length, release; goals at 5 %."""
    import pynvml
    from envpipe_agent.client import AgentClient

    pynvml.nvmlInit()
    try:
        handle = _handle_for(pynvml, gpu_uuid)
        load = make_load(on_gpu)
        client = AgentClient(endpoint, job_id="gpu-validation-energy", rank=0)
        try:
            client.claim(gpu_uuid)
            windows = [measure_window(client, lambda: PowerSampler(pynvml, handle), load,
                                      load_s=seconds, lead_s=1.5, tail_s=1.5) for seconds in loads_s]
            counter = probe_counter(pynvml, handle, load, 2.0)
        finally:
            client.close()
    finally:
        pynvml.nvmlShutdown()
    errors = [w.get("error_vs_power_instant", w.get("error_vs_power_avg")) for w in windows]
    worst = max((abs(e) for e in errors if e is not None), default=None)
    return {"windows": windows, "counter_under_load": counter,
            "goal": goal("agent window energy vs integral of power samples", worst, 0.05)}


def _handle_for(nvml: Any, gpu_uuid: str) -> Any:
    """The NVML handle of ``gpu_uuid`` (by UUID where the library has it, else by scanning indices)."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
    except nvml.NVMLError:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if nvml.nvmlDeviceGetUUID(handle) == gpu_uuid:
                return handle
    raise LookupError(f"NVML has no GPU {gpu_uuid}")
