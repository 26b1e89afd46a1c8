"""What the schedule registry holds about a generator: its builder and what it can run on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from envpipe.ir import Schedule

Builder = Callable[[int, int, "Sequence[int] | None", Any, int], Schedule]
"""(stages, micro_batches, r or None, costs or None, virtual_stages) -> Schedule."""


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule generator.

    Attributes:
        name: the ``--scheduling`` name.
        summary: one line for ``--help`` and docs/registries.md.
        build: the builder; it gets a validated r (only when ``takes_r``) and ``virtual_stages``.
        takes_r: takes EnvPipe's r vector (extra warm-up forwards per stage; None: computed from costs).
        virtual_stages: stages per rank by default (1: one stage per rank).
        any_virtual_stages: any number of stages per rank may be asked for (else exactly the default).
        runs_on_deepspeed: DeepSpeed's PipelineEngine can run it (one stage per rank, full backwards), so
            ``envpipe train`` offers it; the others are verified, simulated and planned only.
    """

    name: str
    summary: str
    build: Builder
    takes_r: bool = False
    virtual_stages: int = 1
    any_virtual_stages: bool = False
    runs_on_deepspeed: bool = False
