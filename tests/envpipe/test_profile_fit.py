"""The monotone repair of a noisy profile (envpipe.profile_fit), shared by the controller and load_profile."""

from __future__ import annotations

from envpipe.profile_fit import decreasing_fit, repair_profile


def test_decreasing_fit_pools_violators():
    assert decreasing_fit([3.0, 2.0, 1.0]) == [3.0, 2.0, 1.0]
    assert decreasing_fit([3.0, 1.0, 2.0]) == [3.0, 1.5, 1.5]


def test_profile_repair_warns_only_beyond_the_noise():
    def profile(fwd_at_1320):
        points = [
            {"clock_mhz": c, "fwd_ms": f, "bwd_ms": 2 * f, "iteration_ms": 10 * f, "energy_j": 5.0}
            for c, f in ((1980, 1.0), (1650, 1.2), (1320, fwd_at_1320), (990, 2.0))
        ]
        return {"stages": [{"stage": 0, "f_low_mhz": 1320, "points": points}]}

    spread = {(0, c): {"fwd_ms": 0.1, "bwd_ms": 0.2, "iteration_ms": 1.0} for c in (1980, 1650, 1320, 990)}
    repaired, warnings = repair_profile(profile(1.15), spread)  # 0.05 ms faster than 1650: within noise
    assert warnings == [] and repaired["stages"][0]["repaired"]
    fwd = [p["fwd_ms"] for p in sorted(repaired["stages"][0]["points"], key=lambda p: p["clock_mhz"])]
    assert fwd == sorted(fwd, reverse=True)
    _, warnings = repair_profile(profile(0.6), spread)  # 0.6 ms faster than 1650 MHz: beyond its noise
    assert any("stage 0 fwd time fell as the clock fell (1650 MHz -> 1320 MHz" in w for w in warnings)
    untouched, warnings = repair_profile(profile(1.5), spread)
    assert warnings == [] and "repaired" not in untouched["stages"][0]
