"""Measured per-stage, per-clock profiles (``envpipe-profile/1`` JSON; see docs/profile-format.md)."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envpipe.errors import ConfigError

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
        return min(self.stages[stage], key=lambda p: (p.energy_j, -p.clock_mhz)).clock_mhz

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


def load_profile(path: str | Path) -> MeasuredProfile:
    """Read and validate a profile JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"profile {path} is not valid JSON: {exc}") from None
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
