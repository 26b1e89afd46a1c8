"""``UnitSpan``: the one record of a unit's run, for simulated AND measured timelines (stdlib only).

The simulator produces them, the training engine measures them (``envpipe.deepspeed.timing``), the planner
reads them (``envpipe.planner.observe``) and the charts draw them (``envpipe.render``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class UnitSpan:
    """One unit on one stage: when it ran (ms from the iteration's start) and at which clock.

    ``clock_mhz`` is None when a measured unit ran at an unknown clock ("keep"). ``rank`` is the GPU that ran
    it when that differs from ``stage`` (several stages per rank); None means the rank is the stage.
    """

    stage: int
    unit: str
    start_ms: float
    end_ms: float
    clock_mhz: int | None
    rank: int | None = None

    @property
    def row(self) -> int:
        """The rank (GPU row of a chart) that ran the unit."""
        return self.stage if self.rank is None else self.rank

    @classmethod
    def of(cls, item: Any) -> UnitSpan:
        """A span from a ``UnitSpan``, any object with its fields, or a dict of them (a report's JSON)."""
        if isinstance(item, cls):
            return item
        get = item.get if isinstance(item, Mapping) else lambda key, default=None: getattr(item, key, default)
        clock = get("clock_mhz")
        rank = get("rank", None)
        return cls(
            int(get("stage")),
            str(get("unit")),
            float(get("start_ms")),
            float(get("end_ms")),
            None if clock is None else int(clock),
            None if rank is None else int(rank),
        )
