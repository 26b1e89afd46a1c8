"""What the policy registry (``envpipe.planner.POLICIES``) holds about a reconfiguration policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PolicySpec:
    """One reconfiguration policy.

    Attributes:
        name: the ``--reconfig`` name.
        summary: one line for ``--help`` and docs/registries.md.
        make: ``make(schedule, costs)`` -> the policy object (its ``step(obs, target_ms, round_no)`` returns
            the next plan or None), or None for a policy that never changes the clocks.
        max_rounds: the default cap on reconfiguration rounds.
    """

    name: str
    summary: str
    make: Callable[[Any, Any], Any]
    max_rounds: int = 0
