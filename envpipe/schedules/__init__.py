"""Schedule generators: ``get_schedule(name, stages, micro_batches, r=None)`` for ``1f1b`` and ``ours``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from envpipe.errors import ConfigError
from envpipe.ir import Schedule
from envpipe.schedules import one_f_one_b, ours
from envpipe.schedules.ours import compute_r

__all__ = ["SCHEDULES", "compute_r", "get_schedule"]


def _one_f_one_b(stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any) -> Schedule:
    if r is not None and any(r):
        raise ConfigError(f"1f1b takes no r vector (got {list(r)}); use --scheduling ours for extra forwards")
    return one_f_one_b.build(stages, micro_batches)


def _ours(stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any) -> Schedule:
    if r is None:
        r = compute_r(stages, micro_batches, costs)
    return ours.build(stages, micro_batches, r)


# Explicit registry (no auto-registration): name -> builder(stages, micro_batches, r, costs).
SCHEDULES: dict[str, Callable[[int, int, Sequence[int] | None, Any], Schedule]] = {
    "1f1b": _one_f_one_b,
    "ours": _ours,
}


def get_schedule(
    name: str, stages: int, micro_batches: int, r: Sequence[int] | None = None, *, costs: Any = None
) -> Schedule:
    """Build a schedule by name.

    Args:
        name: ``1f1b`` (DeepSpeed TrainSchedule order) or ``ours`` (EnvPipe rescheduling).
        stages: number of pipeline stages S (>= 1).
        micro_batches: number of micro-batches M (>= 1).
        r: ``ours`` only: per-stage extra warm-up forwards; None computes it with :func:`compute_r`.
        costs: optional ``envpipe.sim.CostModel`` used by :func:`compute_r` when ``r`` is None.

    Raises:
        ConfigError: unknown name or bad sizes.
        ScheduleError: an r vector that cannot run (see ``envpipe.schedules.ours``).
    """
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"stages must be an integer >= 1, got {stages!r}")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    try:
        builder = SCHEDULES[name]
    except KeyError:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    return builder(stages, micro_batches, r, costs)
