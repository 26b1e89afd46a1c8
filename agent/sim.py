"""The ``sim`` backend: virtual GPUs whose power follows a sourced DVFS model; everything is simulated.

Power model (documented in docs/protocol.md, "Simulated backend"):

* busy (between a unit's ``begin`` and ``end`` event): ``card.busy_power_w * model.power_ratio(f / f_max)``
  where ``f`` is the applied SM clock (the card's top clock when unlocked);
* idle (otherwise): ``card.idle_power_w * card.idle_power_ratio(f)``: up to 25 % lower at the bottom clock,
  linear in between, the rule the simulator (``envpipe.sim.costs``) uses too (source and caveats in
  ``envpipe_agent.dvfs.IDLE_CLOCK_DROP``).

Energy is integrated exactly at every state change (busy/idle flip or clock change), so a window query
returns the energy up to that instant.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid

from envpipe_agent.backend import GpuDesc
from envpipe_agent.dvfs import Card, DvfsModel, get_card, get_model

_SIM_NAMESPACE = uuid.UUID("6d9c7a52-43f1-4a52-9a0e-1f0e5e2a7c11")


def sim_uuid(index: int) -> str:
    """Deterministic UUID of simulated GPU ``index`` (stable across agent restarts, like real UUIDs)."""
    return f"GPU-{uuid.uuid5(_SIM_NAMESPACE, f'envpipe-sim-{index}')}"


class _SimGpu:
    def __init__(self, card: Card) -> None:
        self.clock_mhz = card.max_clock_mhz
        self.locked = False
        self.busy = False
        self.energy_j = 0.0
        self.last_s = time.monotonic()


class SimBackend:
    """Virtual GPUs of one card type; thread-safe (phase events and clock sets come from two threads)."""

    name = "sim"
    simulated = True
    read_only = False
    energy_read_cheap = True

    def __init__(self, gpus: int = 1, card: str = "h100", model: str = "central") -> None:
        if gpus < 1:
            raise ValueError(f"the sim backend needs at least one GPU, got gpus={gpus}")
        self.card = get_card(card)
        self.model: DvfsModel = get_model(model)
        self._lock = threading.Lock()
        self._gpus = [_SimGpu(self.card) for _ in range(gpus)]
        # (operation, gpu, clock_mhz) for tests and status; only the latest, because a long-running sim agent
        # (envpipe train's embedded one) makes thousands of sets a second and a list grew without bound.
        self.calls: collections.deque[tuple[str, int, int]] = collections.deque(maxlen=10_000)

    def describe(self) -> str:
        """The model behind every number this backend reports."""
        return f"simulated {self.card.name}, DVFS model {self.model.describe()}"

    def gpus(self) -> list[GpuDesc]:
        name = f"{self.card.name} (simulated)"
        return [GpuDesc(i, sim_uuid(i), name, self.card.clocks_mhz) for i in range(len(self._gpus))]

    def _power_w(self, gpu: _SimGpu) -> float:
        if not gpu.busy:
            return self.card.idle_power_w * self.card.idle_power_ratio(gpu.clock_mhz)
        return self.card.busy_power_w * self.model.power_ratio(gpu.clock_mhz / self.card.max_clock_mhz)

    def _advance(self, gpu: _SimGpu) -> None:
        now_s = time.monotonic()
        gpu.energy_j += self._power_w(gpu) * (now_s - gpu.last_s)
        gpu.last_s = now_s

    def set_locked_clock(self, index: int, clock_mhz: int) -> None:
        if clock_mhz not in self.card.clocks_mhz:
            raise ValueError(f"{clock_mhz} MHz is not a supported clock of the simulated {self.card.name}")
        with self._lock:
            gpu = self._gpus[index]
            self._advance(gpu)
            gpu.clock_mhz, gpu.locked = clock_mhz, True
            self.calls.append(("set", index, clock_mhz))

    def reset_clocks(self, index: int) -> None:
        with self._lock:
            gpu = self._gpus[index]
            self._advance(gpu)
            gpu.clock_mhz, gpu.locked = self.card.max_clock_mhz, False
            self.calls.append(("reset", index, 0))

    def is_locked(self, index: int) -> bool:
        return self._gpus[index].locked

    def read_clock_mhz(self, index: int) -> int:
        return self._gpus[index].clock_mhz

    def read_power_w(self, index: int) -> float:
        with self._lock:
            return self._power_w(self._gpus[index])

    def read_energy_mj(self, index: int) -> int:
        with self._lock:
            gpu = self._gpus[index]
            self._advance(gpu)
            return int(gpu.energy_j * 1000.0)

    def on_phase(self, index: int, busy: bool) -> None:
        """A unit began (busy) or ended on GPU ``index``: switch the power level from now on."""
        gpu = self._gpus[index]
        if gpu.busy == busy:
            return  # power unchanged: nothing to integrate yet
        with self._lock:
            self._advance(gpu)
            # A flag, not a depth: units run one after another on a GPU, and a dropped event must not leave
            # the GPU counted busy (or idle) for the rest of the run.
            gpu.busy = busy

    def close(self) -> None:
        """Nothing to release."""
