"""The profile format (``envpipe-profile/1`` JSON; docs/profile-format.md): building, writing and reading it.

``envpipe profile`` (and the profiling phase of ``envpipe train``) aggregates per-clock samples into the
JSON object with :func:`build_profile` (written as it is); ``envpipe simulate --profile`` and the planner
read it back with :func:`load_profile` / :func:`profile_from_dict` into a :class:`MeasuredProfile`.
"""

from __future__ import annotations

import bisect
import json
import logging
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError
from envpipe.profile_fit import repair_profile

FORMAT = "envpipe-profile/1"


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """One stage at one locked clock: unit times and energy per iteration (bubbles included)."""

    clock_mhz: int
    fwd_ms: float
    bwd_ms: float
    iteration_ms: float
    energy_j: float
    input_ms: float | None = None  # optional: the backward-input (I) part of bwd_ms; W is the rest


@dataclass(frozen=True)
class MeasuredProfile:
    """A measured (or sim-agent) profile: per stage, points sorted by descending clock."""

    source: str
    simulated: bool
    gpu_name: str
    idle_power_w: float
    micro_batches: int
    stages: tuple[tuple[ProfilePoint, ...], ...]

    @property
    def clocks_mhz(self) -> tuple[int, ...]:
        """Clocks profiled on every stage, descending."""
        common = set.intersection(*({p.clock_mhz for p in points} for points in self.stages))
        return tuple(sorted(common, reverse=True))

    def _interpolate(self, stage: int, clock_mhz: float, field: str) -> float:
        points = self.stages[stage]
        clocks = [p.clock_mhz for p in reversed(points)]  # ascending
        if not clocks[0] <= clock_mhz <= clocks[-1]:
            raise ConfigError(
                f"clock {clock_mhz} MHz is outside the profiled range {clocks[0]}-{clocks[-1]} MHz "
                f"of stage {stage}; profile more clocks or choose one inside"
            )
        i = bisect.bisect_left(clocks, clock_mhz)
        high = points[len(points) - 1 - i]
        if clocks[i] == clock_mhz or i == 0:
            return float(getattr(high, field))
        low = points[len(points) - i]
        share = (clock_mhz - low.clock_mhz) / (high.clock_mhz - low.clock_mhz)
        return float(getattr(low, field)) + share * (float(getattr(high, field)) - float(getattr(low, field)))

    def unit_ms(self, stage: int, forward: bool, clock_mhz: float) -> float:
        """Forward or backward time of ``stage`` at ``clock_mhz`` (linear between profiled clocks)."""
        return self._interpolate(stage, clock_mhz, "fwd_ms" if forward else "bwd_ms")

    def input_share(self, stage: int, clock_mhz: float) -> float | None:
        """Share of the backward that is backward-input (``I``) at ``clock_mhz``, if every point of the stage
        has ``input_ms``; else None (the cost model's default applies)."""
        if any(p.input_ms is None for p in self.stages[stage]):
            return None
        return self._interpolate(stage, clock_mhz, "input_ms") / self.unit_ms(stage, False, clock_mhz)

    def active_power_w(self, stage: int, clock_mhz: float) -> float:
        """Busy power: ``(energy_j - idle_power_w * idle_time) / busy_time`` with busy = M (fwd + bwd)."""
        busy_ms = self.micro_batches * (
            self.unit_ms(stage, True, clock_mhz) + self.unit_ms(stage, False, clock_mhz)
        )
        iteration_ms = self._interpolate(stage, clock_mhz, "iteration_ms")
        energy_j = self._interpolate(stage, clock_mhz, "energy_j")
        idle_ms = max(0.0, iteration_ms - busy_ms)
        return (energy_j - self.idle_power_w * idle_ms / 1e3) / (busy_ms / 1e3)

    def f_low_mhz(self, stage: int) -> int:
        """The profiled clock with the least energy per iteration (EnvPipe's energy-valley minimum)."""
        return f_low_mhz(self.stages[stage])

    def describe(self) -> str:
        """One line naming the profile, for labelling output."""
        kind = "simulated profile" if self.simulated else "measured profile"
        return f"{kind} ({self.source}; {self.gpu_name}; {len(self.stages)} stage(s), M={self.micro_batches})"

    def for_stages(self, stages: int) -> MeasuredProfile:
        """Return the profile for ``stages`` stages: a one-stage profile applies to every stage."""
        if len(self.stages) == stages:
            return self
        if len(self.stages) == 1:
            return MeasuredProfile(
                self.source,
                self.simulated,
                self.gpu_name,
                self.idle_power_w,
                self.micro_batches,
                self.stages * stages,
            )
        raise ConfigError(
            f"the profile has {len(self.stages)} stages but the pipeline has {stages}; "
            "profile this pipeline or use a one-stage profile"
        )


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


def f_low_mhz(points: Iterable[ProfilePoint | dict[str, Any]]) -> int:
    """The energy-valley minimum: the clock with the least energy per iteration (ties: the higher clock).

    ``points`` are :class:`ProfilePoint` s or their JSON objects.
    """
    pairs = [
        (p["energy_j"], p["clock_mhz"]) if isinstance(p, dict) else (p.energy_j, p.clock_mhz) for p in points
    ]
    if not pairs:
        raise ConfigError("no profile points to pick f_low from")
    return int(min(pairs, key=lambda pair: (pair[0], -pair[1]))[1])


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
        "format": FORMAT, "simulated": bool(simulated), "source": source,
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


def load_profile(path: str | Path, warn: Callable[[str], None] | None = None) -> MeasuredProfile:
    """Read and validate a profile JSON file, repaired to monotone unit times (never used raw).

    A unit time that falls as the clock falls is replaced by its monotone fit
    (:func:`envpipe.profile_fit.repair_profile`, the controller's repair); a fall beyond 2 % of the time
    (the file has no per-point noise) is reported in one warning line through ``warn`` (default: this
    module's logger).
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"profile {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path} must hold a JSON object; see docs/profile-format.md")
    profile_from_dict(data, origin=str(path))  # validate first: its errors name the bad field
    data, violations = repair_profile(data)
    if violations:
        (warn or logging.getLogger(__name__).warning)(
            f"warning: profile {path}: {'; '.join(violations)}; repaired with a monotone fit (time never "
            "falls as the clock falls) before use"
        )
    return profile_from_dict(data, origin=str(path))


def profile_from_dict(data: dict[str, Any], *, origin: str = "profile") -> MeasuredProfile:
    """Build a profile from its JSON object, with errors that name the bad field."""
    if data.get("format") != FORMAT:
        raise ConfigError(f"{origin}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    try:
        micro_batches = int(data["micro_batches"])
        idle_power_w = float(data["idle_power_w"])
        stages = tuple(
            _stage_points(entry, origin) for entry in sorted(data["stages"], key=lambda e: e["stage"])
        )
        gpu_name = str(data.get("gpu", {}).get("name", "unknown GPU"))
    except KeyError as exc:
        raise ConfigError(f"{origin}: missing field {exc}; see docs/profile-format.md") from None
    if micro_batches < 1 or not stages:
        raise ConfigError(f"{origin}: needs micro_batches >= 1 and at least one stage")
    if [e["stage"] for e in data["stages"]] != list(range(len(stages))) and len(stages) > 1:
        raise ConfigError(f"{origin}: stages must be numbered 0..{len(stages) - 1}")
    return MeasuredProfile(
        str(data.get("source", origin)),
        bool(data.get("simulated", False)),
        gpu_name,
        idle_power_w,
        micro_batches,
        stages,
    )


def _stage_points(entry: dict[str, Any], origin: str) -> tuple[ProfilePoint, ...]:
    points = tuple(
        ProfilePoint(
            int(p["clock_mhz"]),
            float(p["fwd_ms"]),
            float(p["bwd_ms"]),
            float(p["iteration_ms"]),
            float(p["energy_j"]),
            float(p["input_ms"]) if p.get("input_ms") is not None else None,
        )
        for p in entry["points"]
    )
    if not points or any(p.fwd_ms <= 0 or p.bwd_ms <= 0 or p.energy_j <= 0 for p in points):
        raise ConfigError(
            f"{origin}: stage {entry.get('stage')} needs points with positive fwd_ms, bwd_ms, energy_j"
        )
    if any(p.input_ms is not None and not 0 < p.input_ms < p.bwd_ms for p in points):
        raise ConfigError(
            f"{origin}: stage {entry.get('stage')}: input_ms (the backward-input part) must lie strictly "
            "between 0 and bwd_ms"
        )
    if len({p.clock_mhz for p in points}) != len(points):
        raise ConfigError(f"{origin}: stage {entry.get('stage')} lists a clock twice")
    return tuple(sorted(points, key=lambda p: -p.clock_mhz))
