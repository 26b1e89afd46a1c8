"""Time/energy simulator: ``simulate(schedule, costs, clocks) -> SimResult`` (every number simulated)."""

from envpipe.profile import MeasuredProfile, ProfilePoint, load_profile, profile_from_dict
from envpipe.sim.costs import CostModel
from envpipe.sim.engine import SimResult, UnitSpan, simulate

__all__ = [
    "CostModel",
    "MeasuredProfile",
    "ProfilePoint",
    "SimResult",
    "UnitSpan",
    "load_profile",
    "profile_from_dict",
    "simulate",
]
