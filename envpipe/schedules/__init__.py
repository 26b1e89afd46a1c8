"""Schedule generators: ``get_schedule(name, stages, micro_batches, r=None)`` (names: ``SCHEDULES``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envpipe.errors import ConfigError
from envpipe.ir import Schedule
from envpipe.registry import Registry
from envpipe.schedules import interleaved, one_f_one_b, ours, ours_w, zb_v, zero_bubble
from envpipe.schedules.ours import compute_r
from envpipe.schedules.spec import ScheduleSpec

__all__ = ["SCHEDULES", "VIRTUAL_STAGES", "ScheduleSpec", "compute_r", "get_schedule", "trainable"]


# The registry: one line per generator (its module defines the SPEC), in the order --help lists them.
SCHEDULES: Registry[ScheduleSpec] = Registry(
    "schedule",
    [
        one_f_one_b.SPEC,
        ours.SPEC,
        interleaved.SPEC,
        ours_w.SPEC,
        zero_bubble.ZB_H1,
        zero_bubble.ZB_H2,
        zb_v.SPEC,
    ],
)


# Stages per rank of the schedules that hold several (derived): ``stages`` counts model chunks there.
VIRTUAL_STAGES: dict[str, int] = {name: s.virtual_stages for name, s in SCHEDULES.items() if s.virtual_stages > 1}


def trainable() -> tuple[str, ...]:
    """The schedules DeepSpeed's PipelineEngine runs (``envpipe train`` offers only these)."""
    return tuple(name for name, spec in SCHEDULES.items() if spec.runs_on_deepspeed)


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
        name: a name of ``SCHEDULES`` (docs/registries.md lists them). Only ``trainable()`` ones run on
            DeepSpeed's engine (one stage per rank, full backwards); the others are simulated and planned.
            ``interleaved`` and ``zb-v`` put several of the ``stages`` on each rank.
        stages: number of pipeline stages S (>= 1).
        micro_batches: number of micro-batches M (>= 1).
        r: schedules that take it (``ours``, ``ours-w``): per-stage extra warm-up forwards; None computes it
            (:func:`compute_r`).
        costs: optional ``envpipe.sim.CostModel`` used by :func:`compute_r` when ``r`` is None.
        virtual_stages: stages per rank v (default: the schedule's; only ``interleaved`` takes any); the
            schedule has ``stages`` stages on ``stages / v`` ranks.

    Raises:
        ConfigError: unknown name or bad sizes.
        ScheduleError: an r vector that cannot run (see ``envpipe.schedules.ours``).
    """
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"stages must be an integer >= 1, got {stages!r}")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    spec = SCHEDULES.lookup(name)
    if r is not None and any(r) and not spec.takes_r:
        raise ConfigError(
            f"{name} takes no r vector (got {list(r)}); use --scheduling ours for extra forwards"
        )
    if virtual_stages not in (None, spec.virtual_stages) and not spec.any_virtual_stages:
        held = "one stage" if spec.virtual_stages == 1 else f"exactly {spec.virtual_stages} stages"
        raise ConfigError(
            f"{name} holds {held} per rank (got virtual_stages={virtual_stages}); interleaved takes any"
        )
    return spec.build(
        stages, micro_batches, r if spec.takes_r else None, costs, virtual_stages or spec.virtual_stages
    )
