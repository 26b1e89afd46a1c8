"""Schedule generators: ``get_schedule(name, stages, micro_batches, r=None)`` (names: ``SCHEDULES``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from envpipe.errors import ConfigError
from envpipe.ir import Schedule
from envpipe.schedules import interleaved, one_f_one_b, ours, ours_w, zb_v, zero_bubble
from envpipe.schedules.ours import compute_r

__all__ = ["SCHEDULES", "VIRTUAL_STAGES", "compute_r", "get_schedule"]


def _no_r(name: str, r: Sequence[int] | None) -> None:
    if r is not None and any(r):
        raise ConfigError(
            f"{name} takes no r vector (got {list(r)}); use --scheduling ours for extra forwards"
        )


def _one_stage_per_rank(name: str, virtual_stages: int | None) -> None:
    if virtual_stages not in (None, 1):
        raise ConfigError(
            f"{name} holds one stage per rank (got virtual_stages={virtual_stages}); use interleaved"
        )


def _one_f_one_b(
    stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any, virtual_stages: int | None
) -> Schedule:
    _no_r("1f1b", r)
    _one_stage_per_rank("1f1b", virtual_stages)
    return one_f_one_b.build(stages, micro_batches)


def _ours(
    stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any, virtual_stages: int | None
) -> Schedule:
    _one_stage_per_rank("ours", virtual_stages)
    if r is None:
        r = compute_r(stages, micro_batches, costs)
    return ours.build(stages, micro_batches, r)


def _interleaved(
    stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any, virtual_stages: int | None
) -> Schedule:
    _no_r("interleaved", r)
    return interleaved.build(stages, micro_batches, virtual_stages or DEFAULT_VIRTUAL_STAGES)


def _ours_w(
    stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any, virtual_stages: int | None
) -> Schedule:
    _one_stage_per_rank("ours-w", virtual_stages)
    if r is None:
        r = compute_r(stages, micro_batches, costs)
    return ours_w.build(stages, micro_batches, r)


def _fixed(name: str, build: Callable[[int, int], Schedule]) -> Callable[..., Schedule]:
    """The builder of a one-stage-per-rank schedule without parameters (``build(stages, micro_batches)``)."""

    def builder(
        stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any, virtual_stages: int | None
    ) -> Schedule:
        _no_r(name, r)
        _one_stage_per_rank(name, virtual_stages)
        return build(stages, micro_batches)

    return builder


def _zb_v(
    stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any, virtual_stages: int | None
) -> Schedule:
    _no_r("zb-v", r)
    if virtual_stages not in (None, 2):
        raise ConfigError(f"zb-v holds exactly 2 stages per rank (got virtual_stages={virtual_stages})")
    return zb_v.build(stages, micro_batches)


DEFAULT_VIRTUAL_STAGES = 2

# Explicit registry (no auto-registration): name -> builder(stages, micro_batches, r, costs, virtual_stages).
SCHEDULES: dict[str, Callable[[int, int, Sequence[int] | None, Any, int | None], Schedule]] = {
    "1f1b": _one_f_one_b,
    "ours": _ours,
    "interleaved": _interleaved,
    "ours-w": _ours_w,
    "zb-h1": _fixed("zb-h1", zero_bubble.build_h1),
    "zb-h2": _fixed("zb-h2", zero_bubble.build_h2),
    "zb-v": _zb_v,
}
# Stages per rank of each schedule: ``stages`` counts model chunks, so S GPUs run S * v of them.
VIRTUAL_STAGES: dict[str, int | None] = {"interleaved": DEFAULT_VIRTUAL_STAGES, "zb-v": 2}


def get_schedule(
    name: str,
    stages: int,
    micro_batches: int,
    r: Sequence[int] | None = None,
    *,
    costs: Any = None,
    virtual_stages: int | None = None,
) -> Schedule:
    """Build a schedule by name.

    Args:
        name: ``1f1b`` (DeepSpeed TrainSchedule order), ``ours`` (EnvPipe rescheduling), ``interleaved``
            (Megatron-LM's interleaved 1F1B), ``ours-w`` (ours with split backwards, W deferred),
            ``zb-h1``, ``zb-h2``, ``zb-v`` (zero-bubble schedules, Qi et al.). All but 1f1b and ours are
            simulated and planned only: DeepSpeed's engine runs one stage per rank and full backwards.
            ``interleaved`` and ``zb-v`` put several of the ``stages`` on each rank.
        stages: number of pipeline stages S (>= 1).
        micro_batches: number of micro-batches M (>= 1).
        r: ``ours``/``ours-w`` only: per-stage extra warm-up forwards; None computes it (:func:`compute_r`).
        costs: optional ``envpipe.sim.CostModel`` used by :func:`compute_r` when ``r`` is None.
        virtual_stages: ``interleaved`` only: stages per rank v (default 2); the schedule has ``stages``
            stages on ``stages / v`` ranks.

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
    return builder(stages, micro_batches, r, costs, virtual_stages)
