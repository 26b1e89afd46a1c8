"""Profiling logic (pure, no I/O): candidate clocks, the cost of a profiling run, the profile JSON, f_low.

``envpipe profile`` measures, per stage and per candidate clock, the forward/backward time and the energy
per iteration (bubbles included) and turns the samples into the profile JSON of docs/architecture.md with
:func:`build_profile`. Energy comes from agent windows: the NVML counter updates about every 100 ms, so a
window shorter than ~1 s is mostly quantisation noise -- :func:`iterations_per_clock` lengthens short ones.
f_low(s) is EnvPipe's energy-valley minimum: the candidate clock with the least energy per iteration.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from envpipe.errors import ConfigError

PROFILE_FORMAT = "envpipe-profile/1"
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
        return (f"{self.clocks} clocks x {self.iterations_per_clock} iterations = {self.iterations} iterations, "
                f"about {self.estimated_s:.0f} s")


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


@dataclass(frozen=True)
class ClockSample:
    """What one stage measured while every unit ran at ``clock_mhz``.

    Attributes:
        stage: the pipeline stage.
        clock_mhz: the locked SM clock.
        fwd_ms: forward unit times (any number of samples; the median is used).
        bwd_ms: backward unit times.
        iteration_ms: iteration times seen in the window.
        energy_j: the window's energy on this stage's GPU.
        iterations: iterations inside the window.
    """

    stage: int
    clock_mhz: int
    fwd_ms: Sequence[float]
    bwd_ms: Sequence[float]
    iteration_ms: Sequence[float]
    energy_j: float
    iterations: int
    extra: dict[str, Any] = field(default_factory=dict)


def f_low_mhz(points: Iterable[dict[str, Any]]) -> int:
    """The energy-valley minimum: the clock with the least energy per iteration (ties: the higher clock)."""
    points = list(points)
    if not points:
        raise ConfigError("no profile points to pick f_low from")
    return int(min(points, key=lambda p: (p["energy_j"], -p["clock_mhz"]))["clock_mhz"])


def build_profile(samples: Iterable[ClockSample], *, gpu_name: str, supported_mhz: Sequence[int],
                  idle_power_w: float, micro_batches: int, simulated: bool, source: str) -> dict[str, Any]:
    """Aggregate samples into the profile JSON (``envpipe-profile/1``), with f_low per stage.

    Raises:
        ConfigError: a sample without iterations, or a stage that lacks a clock another stage has.
    """
    by_stage: dict[int, dict[int, ClockSample]] = {}
    for sample in samples:
        if sample.iterations < 1 or not sample.fwd_ms or not sample.bwd_ms or not sample.iteration_ms:
            raise ConfigError(f"stage {sample.stage} at {sample.clock_mhz} MHz has no measurements; "
                              "run at least one iteration per clock")
        by_stage.setdefault(sample.stage, {})[sample.clock_mhz] = sample
    if not by_stage:
        raise ConfigError("no profiling samples; profile at least one clock")
    clock_sets = {frozenset(points) for points in by_stage.values()}
    if len(clock_sets) != 1:
        raise ConfigError("stages were profiled at different clocks; profile every stage at every candidate")
    stages = []
    for stage in sorted(by_stage):
        points = [_point(by_stage[stage][c]) for c in sorted(by_stage[stage], reverse=True)]
        stages.append({"stage": stage, "f_low_mhz": f_low_mhz(points), "points": points})
    return {
        "format": PROFILE_FORMAT, "simulated": bool(simulated), "source": source,
        "gpu": {"name": gpu_name, "clocks_mhz": sorted({int(c) for c in supported_mhz}, reverse=True)},
        "idle_power_w": float(idle_power_w), "micro_batches": int(micro_batches), "stages": stages,
    }


def _point(sample: ClockSample) -> dict[str, Any]:
    return {
        "clock_mhz": int(sample.clock_mhz),
        "fwd_ms": statistics.median(sample.fwd_ms),
        "bwd_ms": statistics.median(sample.bwd_ms),
        "iteration_ms": statistics.median(sample.iteration_ms),
        "energy_j": sample.energy_j / sample.iterations,
    }


def cost_model_from_profile(profile: dict[str, Any], *, stages: int | None = None, **options: float):
    """An ``envpipe.sim.CostModel`` whose curves are the profile's measurements.

    Args:
        profile: the profile JSON object.
        stages: pipeline stages (default: the profile's; a one-stage profile applies to every stage).
        **options: CostModel options (p2p latency, clock-switch latency, ...).
    """
    from envpipe.sim import CostModel, profile_from_dict

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
