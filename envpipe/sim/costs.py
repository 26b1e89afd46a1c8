"""Per-unit time and power at each SM clock, p2p transfer time and clock-switch latency.

Power model (all simulated, named by :meth:`CostModel.describe`):

* busy power of a unit at clock f: ``busy_power_w * p(f / f_max)`` with the DVFS model's power curve, or the
  profile's derived active power at f;
* idle power (bubbles, blocked in p2p) at the current clock f: ``idle_w * (1 - idle_clock_drop * (f_max - f)
  / (f_max - f_min))`` with ``idle_w = idle_fraction * busy_power_w`` (model) or the profile's idle power.
  Only a Titan V pair is public for idle power at locked low clocks (~25% lower at the bottom clock), so
  ``idle_clock_drop`` defaults to 0.25 and is a parameter, not a fact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from envpipe_agent.dvfs import Card, DvfsModel, busy_power_w, get_card, get_model, idle_power_w

from envpipe.errors import ConfigError, SimulationError
from envpipe.ir import ActionKind
from envpipe.profile import MeasuredProfile


@dataclass(frozen=True)
class CostModel:
    """What a unit costs on each stage at each clock.

    Attributes:
        fwd_ms: per-stage forward time at the top clock.
        bwd_ms: per-stage backward time at the top clock.
        card: the GPU (clock set, busy and idle power).
        curve: a sourced/explicit ``DvfsModel`` or a ``MeasuredProfile``.
        p2p_latency_ms: fixed cost of one activation/gradient transfer.
        p2p_bandwidth_gb_s: link bandwidth (GB/s); with ``message_mb`` gives the size-dependent part.
        message_mb: size of one activation (= one gradient) message in MB.
        clock_switch_ms: how long a unit keeps running at the previous clock after a clock change.
        idle_clock_drop: share of idle power saved at the lowest clock (linear in between).
        input_share: per stage, the share of the backward that is backward-input (``I``; ``W`` is the
            rest), or None for :data:`BACKWARD_SHARE`. A profile with ``input_ms`` overrides it per clock.
    """

    fwd_ms: tuple[float, ...]
    bwd_ms: tuple[float, ...]
    card: Card
    curve: DvfsModel | MeasuredProfile
    p2p_latency_ms: float = 0.05
    p2p_bandwidth_gb_s: float = 25.0
    message_mb: float = 0.0
    clock_switch_ms: float = 1.0
    idle_clock_drop: float = 0.25
    input_share: tuple[float, ...] | None = None
    _clocks: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.fwd_ms) != len(self.bwd_ms) or not self.fwd_ms:
            raise ConfigError(
                f"give one forward and one backward time per stage (got {len(self.fwd_ms)} "
                f"and {len(self.bwd_ms)})"
            )
        if any(t <= 0 for t in (*self.fwd_ms, *self.bwd_ms)):
            raise ConfigError(f"unit times must be > 0 ms, got fwd {self.fwd_ms} bwd {self.bwd_ms}")
        if (
            min(self.p2p_latency_ms, self.message_mb, self.clock_switch_ms) < 0
            or self.p2p_bandwidth_gb_s <= 0
        ):
            raise ConfigError(
                "p2p latency, message size and clock-switch latency must be >= 0, bandwidth > 0"
            )
        if self.input_share is not None and (
            len(self.input_share) != len(self.fwd_ms) or not all(0 < x < 1 for x in self.input_share)
        ):
            raise ConfigError(
                f"input_share needs one share in (0, 1) per stage (the I part of the backward), got "
                f"{self.input_share}"
            )
        if not 0 <= self.idle_clock_drop < 1:
            raise ConfigError(f"idle_clock_drop must be in [0, 1), got {self.idle_clock_drop}")
        clocks = self.card.clocks_mhz
        if isinstance(self.curve, MeasuredProfile):
            object.__setattr__(self, "curve", self.curve.for_stages(len(self.fwd_ms)))
            clocks = self.curve.clocks_mhz
        object.__setattr__(self, "_clocks", tuple(clocks))

    @classmethod
    def build(
        cls,
        stages: int,
        *,
        gpu: str = "h100",
        model: str | DvfsModel = "central",
        profile: MeasuredProfile | None = None,
        fwd_ms: Sequence[float] | float | None = None,
        bwd_ms: Sequence[float] | float | None = None,
        input_ms: Sequence[float] | float | None = None,
        **options: float,
    ) -> CostModel:
        """Costs for ``stages`` stages: balanced 10/20 ms units unless times are given (one or per stage).

        With a profile and no times, the profile's top-clock times are used; given times scale the
        profile's curve. ``input_ms``: the backward-input (``I``) time at the top clock, one or per stage
        (``W`` takes the rest of the backward); default half the backward.
        """
        card = get_card(gpu)
        curve: DvfsModel | MeasuredProfile = get_model(model) if isinstance(model, str) else model
        if profile is not None:
            curve = profile.for_stages(stages)
            top = curve.clocks_mhz[0]
            fwd_ms = fwd_ms if fwd_ms is not None else [curve.unit_ms(s, True, top) for s in range(stages)]
            bwd_ms = bwd_ms if bwd_ms is not None else [curve.unit_ms(s, False, top) for s in range(stages)]
        bwd = _per_stage(bwd_ms, 20.0, stages, "bwd_ms")
        share = None
        if input_ms is not None:
            share = tuple(i / b for i, b in zip(_per_stage(input_ms, 0.0, stages, "input_ms"), bwd))
        return cls(_per_stage(fwd_ms, 10.0, stages, "fwd_ms"), bwd, card, curve, input_share=share,
                   **options)  # type: ignore[arg-type]

    def chunked(self, virtual_stages: int) -> CostModel:
        """The same layers cut into ``virtual_stages`` times as many stages (interleaved, ZB-V).

        Stage s of these costs becomes the contiguous chunks ``s*v .. s*v+v-1``, each with a v-th of its
        forward and backward time, the same I share and (profile) the same clock response and power.
        """
        v = virtual_stages
        if v == 1:
            return self
        curve = self.curve
        if isinstance(curve, MeasuredProfile):
            curve = replace(curve, stages=tuple(curve.stages[j // v] for j in range(self.stages * v)))
        share = self.input_share
        if share is not None:
            share = tuple(x for x in share for _ in range(v))
        return replace(self, fwd_ms=tuple(f / v for f in self.fwd_ms for _ in range(v)),
                       bwd_ms=tuple(b / v for b in self.bwd_ms for _ in range(v)), curve=curve,
                       input_share=share)

    @property
    def stages(self) -> int:
        """Number of stages the costs describe."""
        return len(self.fwd_ms)

    @property
    def clocks_mhz(self) -> tuple[int, ...]:
        """Candidate clocks, descending: the card's, or the profiled ones."""
        return self._clocks

    @property
    def max_clock_mhz(self) -> int:
        """The top candidate clock (baseline)."""
        return self._clocks[0]

    @property
    def min_clock_mhz(self) -> int:
        """The lowest candidate clock."""
        return self._clocks[-1]

    def _ratio(self, clock_mhz: float) -> float:
        if not self.min_clock_mhz <= clock_mhz <= self.max_clock_mhz:
            raise SimulationError(
                f"clock {clock_mhz} MHz is outside {self.min_clock_mhz}-{self.max_clock_mhz} MHz "
                f"({self.describe()}); choose a supported clock"
            )
        return clock_mhz / self.card.max_clock_mhz

    def unit_duration_ms(self, stage: int, kind: ActionKind | str, clock_mhz: float) -> float:
        """Duration of a ``F``, ``B``, ``I`` or ``W`` unit of ``stage`` at ``clock_mhz``.

        ``I`` and ``W`` split the backward (:meth:`backward_share`) and respond to the clock like it: the
        same DVFS curve, or the profile's backward column (its ``input_ms`` column when it has one).
        """
        value = _unit_kind(kind)
        forward = value == "F"
        base = self.fwd_ms[stage] if forward else self.bwd_ms[stage]
        if isinstance(self.curve, MeasuredProfile):
            self._ratio(clock_mhz)
            top = self.max_clock_mhz
            ratio = self.curve.unit_ms(stage, forward, clock_mhz) / self.curve.unit_ms(stage, forward, top)
        else:
            ratio = self.curve.time_ratio(self._ratio(clock_mhz))
        return base * ratio * self.backward_share(stage, value, clock_mhz)

    def backward_share(self, stage: int, kind: str, clock_mhz: float) -> float:
        """The share of a full backward that a ``B`` (1), ``I`` or ``W`` unit takes (a forward: 1)."""
        if kind in ("F", "B"):
            return 1.0
        share = None
        if isinstance(self.curve, MeasuredProfile):
            share = self.curve.input_share(stage, clock_mhz)
        if share is None:
            share = BACKWARD_SHARE["I"] if self.input_share is None else self.input_share[stage]
        return share if kind == "I" else 1.0 - share

    def unit_power_w(self, stage: int, kind: ActionKind | str, clock_mhz: float) -> float:
        """Busy power of a unit at ``clock_mhz`` (forward and backward share the shape)."""
        _unit_kind(kind)
        if isinstance(self.curve, MeasuredProfile):
            self._ratio(clock_mhz)
            return self.curve.active_power_w(stage, clock_mhz)
        self._ratio(clock_mhz)
        return busy_power_w(self.card, self.curve, clock_mhz)

    def idle_power_w(self, stage: int, clock_mhz: float) -> float:
        """Power while the stage waits (bubble, blocked in p2p) with its clock locked at ``clock_mhz``."""
        self._ratio(clock_mhz)
        low, high = self.min_clock_mhz, self.max_clock_mhz
        if isinstance(self.curve, MeasuredProfile):  # the profile's measured idle power, the same clock rule
            return self.curve.idle_power_w * self.card.idle_power_ratio(clock_mhz, self.idle_clock_drop, low, high)
        # The one power model, shared with the sim agent (envpipe_agent.dvfs).
        return idle_power_w(self.card, self.curve, clock_mhz, self.idle_clock_drop, low, high)

    def transfer_ms(self, src_stage: int, dst_stage: int) -> float:
        """Time of one activation or gradient transfer between neighbouring stages."""
        return self.p2p_latency_ms + self.message_mb / self.p2p_bandwidth_gb_s

    def f_low_mhz(self, stage: int) -> int:
        """Energy-optimal clock of ``stage``: least unit energy (model) or iteration energy (profile)."""
        if isinstance(self.curve, MeasuredProfile):
            return self.curve.f_low_mhz(stage)
        top = self.card.max_clock_mhz
        return min(self._clocks, key=lambda f: (self.curve.energy_ratio(f / top), -f))

    def describe(self) -> str:
        """Which model produced the numbers, for labels: every number from here is simulated."""
        return (
            f"{self.curve.describe()}; {self.card.name}; p2p {self.p2p_latency_ms} ms + "
            f"{self.message_mb} MB @ {self.p2p_bandwidth_gb_s} GB/s; clock switch {self.clock_switch_ms} ms"
        )


# Share of a full backward's time in its two halves. The zero-bubble paper (Qi et al., ICLR 2024, "Zero
# Bubble Pipeline Parallelism", section 2) takes T_I = T_W for transformer layers; we use that without a
# measurement of our own.
BACKWARD_SHARE = {"B": 1.0, "I": 0.5, "W": 0.5}


def _unit_kind(kind: ActionKind | str) -> str:
    value = kind.value if isinstance(kind, ActionKind) else str(kind)
    if value not in ("F", "B", "I", "W"):
        raise SimulationError(f"only F, B, I and W units have a duration, got {kind!r}")
    return value


def _per_stage(
    value: Sequence[float] | float | None, default: float, stages: int, name: str
) -> tuple[float, ...]:
    if value is None:
        return (default,) * stages
    if isinstance(value, int | float):
        return (float(value),) * stages
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * stages
    if len(values) != stages:
        raise ConfigError(f"{name} has {len(values)} entries for {stages} stages; give one or one per stage")
    return values
