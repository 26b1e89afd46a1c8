"""Repair of a measured profile whose unit times fall as the clock falls (noise, never physics).

The planner predicts a unit's time at other clocks from the profile; a profile in which a lower clock runs
faster would make it lower clocks for free (one such profile gave a 61.8 % "saving" at -42.9 % time). Each
stage's forward, backward and iteration times are replaced by their closest monotone fit (time never falls
as the clock falls); a violation larger than the measurement's own noise (the spread between the down and
the up pass at each clock) is reported as a warning, smaller ones are repaired silently.

Every reader of a profile repairs it here: the controller's profiling phase (``envpipe train``) and
:func:`envpipe.profile.load_profile` (``envpipe simulate --profile``). Plain Python, below the controller
and the simulator.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

FIELDS = ("fwd_ms", "bwd_ms", "iteration_ms")
# A violation must exceed this share of the time too: two passes that agree exactly (the sim agent without
# load) have no spread, and a 0.1 % wiggle is not worth a warning.
MIN_RELATIVE_NOISE = 0.02


def repair_profile(
    profile: dict[str, Any], spread_ms: dict[tuple[int, int], dict[str, float]] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The profile with monotone unit times, and one violation per stage and field repaired beyond its noise.

    Args:
        profile: the profile JSON (``envpipe-profile/1``); not modified.
        spread_ms: ``(stage, clock_mhz) -> {field: |pass 1 - pass 2|}``, the noise of each point.

    Returns:
        ``(repaired profile, violations)``; each violation is a phrase such as ``stage 0 fwd time fell as the
        clock fell (1650 MHz -> 1320 MHz: 0.60 ms faster, noise 0.10 ms)`` for the caller's warning; the
        repaired profile records ``"repaired": [...]`` and the ``raw_points`` per stage.
    """
    out = copy.deepcopy(profile)
    violations = []
    for stage in out["stages"]:
        points = sorted(stage["points"], key=lambda p: p["clock_mhz"])  # low clock first
        repaired = []
        for name in FIELDS:
            raw = [float(p[name]) for p in points]
            fitted = decreasing_fit(raw)
            if fitted == raw:
                continue
            repaired.append(name)
            worst = _worst_violation(points, raw, name, stage["stage"], spread_ms or {})
            if worst is not None:
                low, high, drop_ms, noise_ms = worst
                violations.append(
                    f"stage {stage['stage']} {name.removesuffix('_ms')} time fell as the clock fell "
                    f"({high} MHz -> {low} MHz: {drop_ms:.2f} ms faster, noise {noise_ms:.2f} ms)"
                )
            for point, value in zip(points, fitted):
                point[name] = value
        if repaired:
            stage["repaired"] = repaired
            stage["raw_points"] = copy.deepcopy(
                next(s for s in profile["stages"] if s["stage"] == stage["stage"])["points"]
            )
    return out, violations


def decreasing_fit(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """The closest non-increasing sequence (least squares, pool adjacent violators).

    Profile points are ordered by clock from low to high here, so a unit's time must not increase.
    """
    w = list(weights) if weights is not None else [1.0] * len(values)
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, w):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            mean2, w2, c2 = blocks.pop()
            mean1, w1, c1 = blocks.pop()
            total = w1 + w2
            blocks.append([(mean1 * w1 + mean2 * w2) / total, total, c1 + c2])
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([mean] * count)
    return out


def _worst_violation(
    points: list[dict[str, Any]], raw: list[float], name: str, stage: int, spread: dict
) -> tuple[int, int, float, float] | None:
    """The largest drop (lower clock faster than a higher one) that exceeds both points' noise, or None."""
    worst = None
    for i, low in enumerate(points):
        for j in range(i + 1, len(points)):
            high = points[j]
            drop_ms = raw[j] - raw[i]  # the higher clock's time minus the lower clock's: > 0 is wrong
            noise_ms = spread.get((stage, low["clock_mhz"]), {}).get(name, 0.0) + spread.get(
                (stage, high["clock_mhz"]), {}
            ).get(name, 0.0)
            noise_ms = max(noise_ms, MIN_RELATIVE_NOISE * raw[j])
            if drop_ms > noise_ms and (worst is None or drop_ms > worst[2]):
                worst = (low["clock_mhz"], high["clock_mhz"], drop_ms, noise_ms)
    return worst
