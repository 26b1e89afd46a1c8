"""Sourced models of how a unit's time and power change with the SM clock, and the clock sets of real cards.

Shared by the agent's ``sim`` backend and the training library's simulator (which imports it from here), so
that both sides of a simulated run use one curve. Standard library only: this package runs as root.

Form, with ``x = clock_mhz / max_clock_mhz`` and every ratio taken against the same unit at the top clock::

    time   tau(x) = a / x + (1 - a)            a  = clock-sensitive share of the unit's time
    power  p(x)   = p0 + (1 - p0) * x ** g     p0 = clock-independent share of active power at f_max
    energy e(x)   = p(x) * tau(x)

Sources (see shared DVFS-MODELS.md): ``central`` is fitted to Perseus/Kareus Pareto frontiers (A100 SXM4,
Llama-3.2-3B / Qwen3-1.7B); ``conservative`` keeps that power shape with a GEMM-bound time share;
``optimistic`` is fitted to Zeus NSDI'23 power-limit traces (A40, BERT-base), a power-capped top of range.
Every number derived from these curves is a model output and must be labelled simulated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DvfsModel:
    """A per-unit time/power curve against the SM clock (ratios to the same unit at the top clock)."""

    name: str
    a: float
    p0: float
    g: float
    idle_fraction: float
    source: str

    def time_ratio(self, x: float) -> float:
        """Unit duration at relative clock ``x`` divided by its duration at the top clock."""
        _check_ratio(x)
        return self.a / x + (1.0 - self.a)

    def power_ratio(self, x: float) -> float:
        """Unit active power at relative clock ``x`` divided by its power at the top clock."""
        _check_ratio(x)
        return self.p0 + (1.0 - self.p0) * x**self.g

    def energy_ratio(self, x: float) -> float:
        """Unit energy at relative clock ``x`` divided by its energy at the top clock."""
        return self.power_ratio(x) * self.time_ratio(x)

    def describe(self) -> str:
        """One line naming the model and its parameters, for labelling simulated output."""
        return (
            f"{self.name} (a={self.a}, p0={self.p0}, g={self.g}, idle={self.idle_fraction}; {self.source})"
        )


def _check_ratio(x: float) -> None:
    if not 0.0 < x <= 1.0 + 1e-9:
        raise ValueError(f"relative clock must be in (0, 1], got {x!r}; divide the clock by the card's top clock")


# Idle (blocked in p2p) power as a share of active power at f_max: H100 measured 127 W idle vs ~700 W busy
# (FIELD-NOTES.md) = 0.18; A100/A40 Perseus constants give 0.23-0.28. 0.18 is the default for the H100 here.
_IDLE_H100 = 0.18

MODELS: dict[str, DvfsModel] = {
    "central": DvfsModel(
        "central", 0.658, 0.493, 3.62, _IDLE_H100,
        "fitted to Perseus/Kareus Pareto frontiers, A100 SXM4, Llama-3.2-3B / Qwen3-1.7B",
    ),
    "conservative": DvfsModel(
        "conservative", 0.90, 0.493, 3.62, _IDLE_H100,
        "central power shape, time proportional to 1/f for 90% of the unit (GEMM-bound)",
    ),
    "optimistic": DvfsModel(
        "optimistic", 0.30, 0.584, 4.12, _IDLE_H100,
        "fitted to Zeus NSDI'23 power-limit traces, A40 BERT-base (power-capped top)",
    ),
}


def get_model(name: str) -> DvfsModel:
    """Look up a sourced model by name, with an error that lists the choices."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown DVFS model {name!r}; choose one of {', '.join(MODELS)}") from None


def model_from_params(text: str) -> DvfsModel:
    """Build an explicit model from ``"a=0.6,p0=0.5,g=3.5,idle=0.2"`` (every key required)."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise ValueError(f"model parameter {part!r} is not key=value; write e.g. a=0.6,p0=0.5,g=3.5,idle=0.2")
        try:
            values[key.strip()] = float(raw)
        except ValueError:
            raise ValueError(f"model parameter {key.strip()!r} must be a number, got {raw!r}") from None
    expected = {"a", "p0", "g", "idle"}
    if set(values) != expected:
        raise ValueError(
            f"model parameters must be exactly a, p0, g, idle; got {sorted(values)} (missing "
            f"{sorted(expected - set(values))}, unknown {sorted(set(values) - expected)})"
        )
    if not (0 <= values["a"] <= 1 and 0 <= values["p0"] <= 1 and values["g"] > 0 and 0 <= values["idle"] <= 1):
        raise ValueError(f"model parameters out of range (need 0<=a<=1, 0<=p0<=1, g>0, 0<=idle<=1): {values}")
    return DvfsModel("explicit", values["a"], values["p0"], values["g"], values["idle"], "given explicitly")


# Idle power against the locked SM clock: only one Titan V pair is public for idle power at locked low
# clocks (~25 % lower at the bottom clock; shared DVFS-MODELS.md), so the drop is a model parameter with
# this default, linear in the clock between the top and the bottom of the range. The sim agent and the
# simulator (envpipe.sim.costs) both use busy_power_w / idle_power_w below, so both sides of a simulated
# run agree.
IDLE_CLOCK_DROP = 0.25


@dataclass(frozen=True, slots=True)
class Card:
    """A GPU's supported SM clocks and its power at the top clock (busy) and when idle."""

    name: str
    clocks_mhz: tuple[int, ...]  # descending, as NVML lists them
    busy_power_w: float
    idle_power_w: float
    source: str

    @property
    def max_clock_mhz(self) -> int:
        return self.clocks_mhz[0]

    @property
    def min_clock_mhz(self) -> int:
        return self.clocks_mhz[-1]

    def idle_power_ratio(
        self,
        clock_mhz: float,
        drop: float = IDLE_CLOCK_DROP,
        min_mhz: float | None = None,
        max_mhz: float | None = None,
    ) -> float:
        """Idle power with the clock locked at ``clock_mhz`` divided by idle power at the top clock.

        ``1 - drop * (max - f) / (max - min)``: linear from 1 at the top clock to ``1 - drop`` at the bottom
        one (the card's clock range unless ``min_mhz``/``max_mhz`` narrow it). Source: one Titan V pair, the
        only public measurement (see ``IDLE_CLOCK_DROP``); a model, so its outputs are simulated.

        Raises:
            ValueError: ``drop`` outside [0, 1) or the clock outside the range.
        """
        low = self.min_clock_mhz if min_mhz is None else min_mhz
        high = self.max_clock_mhz if max_mhz is None else max_mhz
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"idle clock drop must be in [0, 1), got {drop}")
        if not low - 1e-9 <= clock_mhz <= high + 1e-9:
            raise ValueError(f"clock {clock_mhz} MHz is outside {low}-{high} MHz of the {self.name}")
        span = high - low
        return 1.0 - drop * (high - clock_mhz) / span if span else 1.0


def busy_power_w(card: Card, model: DvfsModel, clock_mhz: float) -> float:
    """The one busy-power rule: ``card.busy_power_w * model.power_ratio(f / f_max)`` (simulated)."""
    return card.busy_power_w * model.power_ratio(clock_mhz / card.max_clock_mhz)


def idle_power_w(
    card: Card,
    model: DvfsModel,
    clock_mhz: float,
    drop: float = IDLE_CLOCK_DROP,
    min_mhz: float | None = None,
    max_mhz: float | None = None,
) -> float:
    """The one idle-power rule: ``model.idle_fraction * card.busy_power_w`` at the top clock, times
    :meth:`Card.idle_power_ratio` below it (simulated). The sim agent and the simulator both use it.

    The idle share is the model's (``idle=`` of an explicit model): 0.18 is the lent H100's 127 W idle over
    its ~700 W busy power.
    """
    return model.idle_fraction * card.busy_power_w * card.idle_power_ratio(clock_mhz, drop, min_mhz, max_mhz)


def _clock_range(high: int, low: int, step: int) -> tuple[int, ...]:
    return tuple(range(high, low - 1, -step))


CARDS: dict[str, Card] = {
    "h100": Card(
        "NVIDIA H100 80GB HBM3", _clock_range(1980, 345, 15), 700.0, 127.0,
        "measured on the lent H100: 110 SM clocks, idle 127 W, ~700 W (power cap) on a Llama-7B block",
    ),
    # The paper's cards use the artifact's candidate windows (multiples of 90 MHz); power figures are the
    # board TDPs, with idle at the central model's 0.18 share, i.e. a model, not a measurement.
    "v100": Card("Tesla V100", _clock_range(1530, 810, 90), 300.0, 54.0, "ATC'23 artifact window; TDP"),
    "rtx3090": Card("GeForce RTX 3090", _clock_range(1980, 1170, 90), 350.0, 63.0, "ATC'23 artifact window; TDP"),
    "a100": Card("A100-SXM4-40GB", _clock_range(1410, 750, 60), 400.0, 83.64,
                 "ATC'23 artifact window; TDP; idle 83.64 W from Perseus"),
}


def get_card(name: str) -> Card:
    """Look up a card by short name, with an error that lists the choices."""
    try:
        return CARDS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(CARDS)}") from None
