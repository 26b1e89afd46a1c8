"""Profiling logic (pure, no I/O): candidate clocks, the cost of a profiling run, the profile's cost model.

``envpipe profile`` measures, per stage and per candidate clock, the forward/backward time and the energy
per iteration (bubbles included) and turns the samples into the profile JSON of docs/architecture.md with
``envpipe.profile.build_profile`` (the module that owns the format). Energy comes from agent windows: the
NVML counter updates about every 100 ms, so a window shorter than ~1 s is mostly quantisation noise --
:func:`iterations_per_clock` lengthens short ones. f_low(s) is EnvPipe's energy-valley minimum: the
candidate clock with the least energy per iteration (``envpipe.profile.f_low_mhz``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envpipe.errors import ConfigError

MIN_WINDOW_S = 1.0  # energy counters tick every ~100 ms: >= 1 s keeps the quantisation error <= ~10%


def candidate_clocks(supported_mhz: Sequence[int], *, count: int | None = None, min_mhz: int | None = None,
                     max_mhz: int | None = None, step_mhz: int | None = None) -> list[int]:
    """The clocks to profile, descending, always including the top of the window.

    Args:
        supported_mhz: the GPU's supported SM clocks (any order).
        count: how many candidates, spread evenly over the window (None: every supported clock, or every
            ``step_mhz``).
        min_mhz: bottom of the window (default: the lowest supported clock).
        max_mhz: top of the window (default: the highest supported clock).
        step_mhz: take clocks at least this far apart, from the top down (the artifact used 90 MHz).

    Raises:
        ConfigError: an empty window or a bad count/step.
    """
    supported = sorted({int(c) for c in supported_mhz}, reverse=True)
    if not supported:
        raise ConfigError("the GPU reports no supported SM clocks; check the agent's backend")
    top = max_mhz if max_mhz is not None else supported[0]
    bottom = min_mhz if min_mhz is not None else supported[-1]
    window = [c for c in supported if bottom <= c <= top]
    if not window:
        raise ConfigError(f"no supported clock lies in {bottom}-{top} MHz (supported: {supported[-1]}-"
                          f"{supported[0]} MHz); widen the window")
    if count is not None and count < 1 or step_mhz is not None and step_mhz <= 0:
        raise ConfigError(f"count must be >= 1 and step_mhz > 0 (got count={count}, step_mhz={step_mhz})")
    if step_mhz is not None:
        picked = [window[0]]
        for c in window[1:]:
            if picked[-1] - c >= step_mhz:
                picked.append(c)
        window = picked
    if count is None or count >= len(window):
        return window
    if count == 1:
        return [window[0]]
    # Evenly spread by index over the window, top and bottom included.
    return sorted({window[round(k * (len(window) - 1) / (count - 1))] for k in range(count)}, reverse=True)


def iterations_per_clock(requested: int, iteration_ms: float, *, min_window_s: float = MIN_WINDOW_S) -> int:
    """Iterations to run at each clock: as requested, but enough for an energy window of ``min_window_s``."""
    if requested < 1 or iteration_ms <= 0:
        raise ConfigError(f"need >= 1 iteration per clock and a positive iteration time "
                          f"(got {requested}, {iteration_ms} ms)")
    return max(requested, math.ceil(min_window_s * 1e3 / iteration_ms))


@dataclass(frozen=True, slots=True)
class ProfilingCost:
    """What a profiling run costs, printed before it starts."""

    clocks: int
    iterations_per_clock: int
    iterations: int
    estimated_s: float

    def describe(self) -> str:
        """One line for the console."""
        per_clock = self.iterations // self.clocks
        total = f"{self.iterations} iterations, about {self.estimated_s:.0f} s"
        return f"{self.clocks} clocks x {per_clock} iterations = {total}"


def profiling_cost(candidates: Sequence[int], requested_iterations: int, iteration_ms: float, *,
                   warmup_iterations: int = 1, min_window_s: float = MIN_WINDOW_S) -> ProfilingCost:
    """Iterations and estimated seconds of profiling ``candidates`` (iteration time at the top clock).

    Lower clocks run slower; the estimate assumes a unit's time grows at most with 1/clock, so it is an upper
    bound for the compute part.
    """
    if not candidates:
        raise ConfigError("no candidate clocks to profile; widen the clock window")
    n = iterations_per_clock(requested_iterations, iteration_ms, min_window_s=min_window_s)
    top = max(candidates)
    seconds = sum((n + warmup_iterations) * iteration_ms * top / c for c in candidates) / 1e3
    return ProfilingCost(len(candidates), n, len(candidates) * (n + warmup_iterations), seconds)


def cost_model_from_profile(profile: dict[str, Any], *, stages: int | None = None, **options: float):
    """An ``envpipe.sim.CostModel`` whose curves are the profile's measurements.

    Args:
        profile: the profile JSON object.
        stages: pipeline stages (default: the profile's; a one-stage profile applies to every stage).
        **options: CostModel options (p2p latency, clock-switch latency, ...).
    """
    from envpipe.profile import profile_from_dict
    from envpipe.sim import CostModel

    measured = profile_from_dict(profile)
    return CostModel.build(stages or len(measured.stages), gpu=_card_name(measured.gpu_name), profile=measured,
                           **options)


def _card_name(gpu_name: str) -> str:
    """The short card name whose clock range fits a GPU name (the profile's own clocks are used anyway)."""
    from envpipe_agent.dvfs import CARDS

    lowered = gpu_name.lower()
    for short, card in CARDS.items():
        if short in lowered.replace(" ", "") or card.name.lower() in lowered:
            return short
    return "h100"
