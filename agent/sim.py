"""The ``sim`` backend: virtual GPUs whose power follows a sourced DVFS model; everything is simulated.

Power model (documented in docs/protocol.md, "Simulated backend"):

* busy (between a unit's ``begin`` and ``end`` event): ``envpipe_agent.dvfs.busy_power_w`` =
  ``card.busy_power_w * model.power_ratio(f / f_max)`` where ``f`` is the applied SM clock (the card's top
  clock when unlocked);
* idle (otherwise): ``envpipe_agent.dvfs.idle_power_w`` = ``model.idle_fraction * card.busy_power_w *
  card.idle_power_ratio(f)``: up to 25 % lower at the bottom clock, linear in between. The simulator
  (``envpipe.sim.costs``) uses the same two functions: one power model (source and caveats in
  ``envpipe_agent.dvfs.IDLE_CLOCK_DROP``).

Energy is integrated exactly at every state change (busy/idle flip or clock change). A busy/idle flip
happens at the rank's own timestamp (carried by the event frame), not when the agent processes the event,
so a loaded agent does not stretch or shrink busy periods; a window query returns the energy up to the
requester's timestamp.
"""

from __future__ import annotations

import bisect
import collections
import socket
import threading
import time
import uuid
from typing import Any

from envpipe_agent.backend import GpuDesc
from envpipe_agent.dvfs import Card, DvfsModel, busy_power_w, get_card, get_model, idle_power_w
from envpipe_agent.errors import AgentConfigError


def _at_s(point: list) -> float:
    return point[0]


_SIM_NAMESPACE = uuid.UUID("6d9c7a52-43f1-4a52-9a0e-1f0e5e2a7c11")


def sim_uuid(index: int) -> str:
    """Deterministic UUID of simulated GPU ``index`` on this host (stable across agent restarts and unique
    across nodes, like real UUIDs: a multi-node run can tell which node's agent a rank's GPU came from)."""
    return f"GPU-{uuid.uuid5(_SIM_NAMESPACE, f'envpipe-sim-{socket.gethostname()}-{index}')}"


HISTORY_S = 10.0  # state changes kept per GPU: a window mark or a late event may reach this far back
MAX_POINTS = 8192  # ... but never more changes than this (a flood of events within 10 s)
# A late event goes at most this many changes back (further back it is placed there): an honest rank's events
# arrive in order and only the worker's clock changes interleave, while a sender with stale stamps must not
# make every event re-integrate the whole history.
MAX_REORDER = 64
_BUSY, _CLOCK = 0, 1  # which field a state change sets


class _SimGpu:
    """A GPU's power timeline: state changes ``[at_s, field, value, busy, clock_mhz, energy_j]`` sorted by
    time, each with the state from ``at_s`` on and the energy integrated up to ``at_s``.

    Phase changes are placed at the rank's own timestamp and clock changes at the worker's apply time, so
    a change may land before later ones: the energies after it are integrated again (only a few, since
    events of one rank arrive in order).
    """

    def __init__(self, card: Card) -> None:
        self.clock_mhz = card.max_clock_mhz  # applied clock (what NVML would report)
        self.locked = False
        self.points: list[list] = [
            [time.monotonic(), _CLOCK, card.max_clock_mhz, False, card.max_clock_mhz, 0.0]
        ]


def from_config(config: Any) -> SimBackend:
    """The sim backend of the agent's config (registered in envpipe_agent.backend)."""
    if config.manage:
        raise AgentConfigError("manage applies to the nvml backend; the sim backend has --gpus N")
    if config.read_only:
        raise AgentConfigError("read_only applies to the nvml backend; the sim backend changes nothing real")
    return SimBackend(gpus=config.gpus, card=config.card, model=config.dvfs_model)


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

    def _power_w(self, busy: bool, clock_mhz: int) -> float:
        if not busy:
            return idle_power_w(self.card, self.model, clock_mhz)
        return busy_power_w(self.card, self.model, clock_mhz)

    def _energy_j(self, gpu: _SimGpu, at_s: float) -> float:
        points = gpu.points
        point = points[max(0, bisect.bisect_right(points, at_s, key=_at_s) - 1)]
        return point[5] + self._power_w(point[3], point[4]) * max(0.0, at_s - point[0])

    def _change(self, gpu: _SimGpu, at_s: float, field: int, value: int | bool) -> None:
        """Record that ``field`` becomes ``value`` at ``at_s`` and integrate the energies after it again."""
        points = gpu.points
        floor_s = points[max(0, len(points) - MAX_REORDER)][0]
        at_s = max(at_s, floor_s)  # older than the reorder limit (or the kept history): placed there
        pos = bisect.bisect_right(points, at_s, key=_at_s)
        last = points[pos - 1]
        if pos == len(points) and last[3 + field] == value:
            return  # power unchanged: nothing to record (a repeated begin, a clock already applied)
        points.insert(pos, [at_s, field, value, last[3], last[4], 0.0])
        for index in range(pos, len(points)):
            before, point = points[index - 1], points[index]
            point[3], point[4] = before[3], before[4]
            point[3 + point[1]] = point[2]
            point[5] = before[5] + self._power_w(before[3], before[4]) * (point[0] - before[0])
        if len(points) > 64 and (points[32][0] < points[-1][0] - HISTORY_S or len(points) > MAX_POINTS):
            del points[:32]  # in chunks: one list shift per 32 changes

    def set_locked_clock(self, index: int, clock_mhz: int) -> None:
        if clock_mhz not in self.card.clocks_mhz:
            raise ValueError(f"{clock_mhz} MHz is not a supported clock of the simulated {self.card.name}")
        with self._lock:
            gpu = self._gpus[index]
            self._change(gpu, time.monotonic(), _CLOCK, clock_mhz)
            gpu.clock_mhz, gpu.locked = clock_mhz, True
            self.calls.append(("set", index, clock_mhz))

    def reset_clocks(self, index: int) -> None:
        with self._lock:
            gpu = self._gpus[index]
            self._change(gpu, time.monotonic(), _CLOCK, self.card.max_clock_mhz)
            gpu.clock_mhz, gpu.locked = self.card.max_clock_mhz, False
            self.calls.append(("reset", index, 0))

    def is_locked(self, index: int) -> bool:
        return self._gpus[index].locked

    def read_clock_mhz(self, index: int) -> int:
        return self._gpus[index].clock_mhz

    def read_power_w(self, index: int) -> float:
        with self._lock:
            last = self._gpus[index].points[-1]
            return self._power_w(last[3], last[4])

    def read_energy_mj(self, index: int) -> int:
        return int(self.energy_at_mj(index, time.monotonic()))

    def energy_at_mj(self, index: int, at_s: float) -> float:
        """Energy (mJ) at monotonic time ``at_s`` (a window mark at the requester's timestamp), exact within
        the last HISTORY_S."""
        with self._lock:
            return self._energy_j(self._gpus[index], at_s) * 1000.0

    def on_phase(self, index: int, busy: bool, at_s: float | None = None) -> None:
        """A unit began (busy) or ended on GPU ``index`` at monotonic ``at_s`` (the rank's timestamp; now
        when None): switch the power level from then on."""
        # A flag, not a depth: units run one after another on a GPU, and a dropped event must not leave the
        # GPU counted busy (or idle) for the rest of the run.
        with self._lock:
            self._change(self._gpus[index], time.monotonic() if at_s is None else at_s, _BUSY, busy)

    def close(self) -> None:
        """Nothing to release."""
