"""EnvPipe's ``ours`` schedule: extra warm-up forwards fill the 1F1B bubble, with a deadlock-free comm order.

Units. Stage s runs ``w_s = min(M, S - s + r_s)`` forwards before its first backward, then alternates
B, F, and finishes the remaining backwards (B_m at step 2(m+S+r_s)-s-1 in DeepSpeed's step numbering).
The vector is admissible when ``w_s <= w_{s-1}`` for every s >= 1: otherwise stage s needs, before B_m,
a forward that stage s-1 runs only after B_m -- a dependency cycle that no communication order can fix.
(The artifact's non-monotone vectors, e.g. [4, 5, 2, 0] for S=4, M=8, are admissible: both stages hit M.)

Communication (why this order). Every send is an isend posted right after the unit that produced it, and
every receive is a blocking receive posted right before the unit that consumes it. So no stage ever waits
for anything but the data it needs: the execution is the dataflow of the units, no gating is added to the
critical path (the KISTI fork's gated isends added some), and nothing relies on NCCL_BUFFSIZE.
Each isend is waited at the earliest point where its completion is already guaranteed, so the wait
never blocks:

* ``wSA_m`` right after ``RG_m``: stage s+1 sent gradient m after B_m, hence after receiving activation m.
  The activation buffer of F_m is needed by B_m anyway, so it is waited before its reuse.
* ``wSG_m`` right after ``RA_{m + w_{s-1}}``: stage s-1 sends activation m+w_{s-1} after its B_m, hence
  after receiving gradient m. When no such activation exists (cool-down), the wait goes at the end of the
  program, where the stage has nothing left to do and blocking costs no time.

Outstanding async sends per stage are therefore bounded by ``w_s`` activations plus
``w_{s-1} - w_s + 1`` gradients in the steady state (``w_{s-1}`` in the cool-down).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from envpipe.errors import ConfigError, ScheduleError
from envpipe.ir import Action, ActionKind, Schedule, act
from envpipe.schedules.spec import Builder, ScheduleSpec

K = ActionKind


def warmups(stages: int, micro_batches: int, r: Sequence[int]) -> list[int]:
    """Forwards before the first backward per stage: ``min(M, S - s + r_s)``."""
    return [min(micro_batches, stages - s + r[s]) for s in range(stages)]


def check_r(stages: int, micro_batches: int, r: Sequence[int]) -> tuple[int, ...]:
    """Validate an r vector and return it as a tuple.

    Raises:
        ScheduleError: wrong length, negative entries, r on the last stage, or a dependency cycle.
    """
    r = tuple(int(x) for x in r)
    if len(r) != stages:
        raise ScheduleError(
            f"r has {len(r)} entries for {stages} stages; give one per stage, e.g. {[0] * stages}"
        )
    if any(x < 0 for x in r):
        raise ScheduleError(f"r entries must be >= 0, got {list(r)}")
    if r[-1] != 0:
        raise ScheduleError(
            f"r of the last stage must be 0 (its backward is on the critical path), got {list(r)}"
        )
    w = warmups(stages, micro_batches, r)
    for s in range(1, stages):
        if w[s] > w[s - 1]:
            raise ScheduleError(
                f"r={list(r)} cannot run: stage {s} would run {w[s]} forwards before its first backward but "
                f"stage {s - 1} only {w[s - 1]}, a dependency cycle; lower r[{s}] to at most "
                f"{w[s - 1] - (stages - s)} or raise r[{s - 1}]"
            )
    return r


def build(stages: int, micro_batches: int, r: Sequence[int]) -> Schedule:
    """The ``ours`` schedule for S stages, M micro-batches and an admissible r vector."""
    r = check_r(stages, micro_batches, r)
    w = warmups(stages, micro_batches, r)
    programs = tuple(
        stage_program(s, s == stages - 1, micro_batches, w[s], w[s - 1] if s else 0)
        for s in range(stages)
    )
    return Schedule("ours", stages, micro_batches, r, programs)


def unit_order(micro_batches: int, warmup: int) -> list[tuple[ActionKind, int]]:
    """Warm-up forwards, then B/F alternation, then the remaining backwards."""
    order = [(K.F, m) for m in range(warmup)]
    for m in range(micro_batches):
        order.append((K.B, m))
        if m + warmup < micro_batches:
            order.append((K.F, m + warmup))
    return order


@functools.lru_cache(maxsize=4096)
def stage_program(
    stage: int, last: bool, micro_batches: int, warmup: int, warmup_prev: int
) -> tuple[Action, ...]:
    """One stage's program; it depends only on these five values, so it is cached (sweeps reuse it)."""
    first = stage == 0
    prog: list[Action] = []
    grad_waits_after_ra: dict[int, int] = {}  # activation index j -> gradient m whose wait follows RA_j
    end_waits: list[int] = []
    for kind, m in unit_order(micro_batches, warmup):
        if kind is K.F:
            if not first:
                prog.append(act(stage, K.RA, m))
                if m in grad_waits_after_ra:
                    prog.append(act(stage, K.WAIT, grad_waits_after_ra.pop(m), waits=K.SG))
            prog.append(act(stage, K.F, m))
            if not last:
                prog.append(act(stage, K.SA, m, True))
            continue
        if not last:
            prog += [act(stage, K.RG, m), act(stage, K.WAIT, m, waits=K.SA)]
        prog.append(act(stage, K.B, m))
        if not first:
            prog.append(act(stage, K.SG, m, True))
            if m + warmup_prev < micro_batches:
                grad_waits_after_ra[m + warmup_prev] = m
            else:
                end_waits.append(m)
    prog += [act(stage, K.WAIT, m, waits=K.SG) for m in end_waits]
    return tuple(prog)


def r_from_times(
    micro_batches: int,
    bwd_max_ms: Sequence[float],
    fwd_low_ms: Sequence[float],
    memory_cap: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """EnvPipe's r: ``floor(T_bwd(s, f_max) * (S-s-1) / T_fwd(s, f_low))`` with the paper's caps.

    Caps: ``memory_cap[s]`` (extra activations that fit in free memory), ``M - (S - s)``, r_{S-1} = 0; then
    each r_s is lowered so that stage s never runs more warm-up forwards than stage s-1 (admissibility;
    the artifact's "r_{i+1} <= r_i unless stage i is at its cap" rule, stated on warm-up counts).
    """
    stages = len(bwd_max_ms)
    if len(fwd_low_ms) != stages or (memory_cap is not None and len(memory_cap) != stages):
        raise ConfigError("bwd_max_ms, fwd_low_ms and memory_cap need one entry per stage")
    r: list[int] = []
    for s in range(stages):
        if fwd_low_ms[s] <= 0:
            raise ConfigError(f"forward time of stage {s} must be > 0 ms, got {fwd_low_ms[s]}")
        value = math.floor(bwd_max_ms[s] * (stages - s - 1) / fwd_low_ms[s] + 1e-9)
        value = min(value, max(0, micro_batches - (stages - s)))
        if memory_cap is not None:
            value = min(value, memory_cap[s])
        if s:
            prev_warmup = min(micro_batches, stages - s + 1 + r[s - 1])
            value = min(value, prev_warmup - (stages - s))
        r.append(max(0, value))
    return tuple(r)


# Without costs: backward = 2 x forward, slow forwards at the central model's energy-optimal clock.
_DEFAULT_BWD_OVER_FWD = 2.0


def compute_r(
    stages: int, micro_batches: int, costs: Any = None, *, memory_cap: Sequence[int] | None = None
) -> tuple[int, ...]:
    """EnvPipe's r vector from a cost model (``envpipe.sim.CostModel``) or from the default assumption.

    With ``costs``: T_bwd at the top clock and T_fwd at each stage's energy-optimal clock f_low(s).
    Without: backward twice the forward and forwards slowed by the central DVFS model at its optimum.
    """
    if costs is None:
        from envpipe_agent.dvfs import get_model

        slow = _optimal_time_ratio(get_model("central"))
        bwd = [_DEFAULT_BWD_OVER_FWD] * stages
        fwd_low = [slow] * stages
    else:
        top = costs.max_clock_mhz
        bwd = [costs.unit_duration_ms(s, K.B, top) for s in range(stages)]
        fwd_low = [costs.unit_duration_ms(s, K.F, costs.f_low_mhz(s)) for s in range(stages)]
    return r_from_times(micro_batches, bwd, fwd_low, memory_cap)


def _optimal_time_ratio(model: Any) -> float:
    best = min((model.energy_ratio(x / 1000), x / 1000) for x in range(300, 1001))
    return model.time_ratio(best[1])


def r_builder(build_r: Callable[[int, int, Sequence[int]], Schedule]) -> Builder:
    """The registry builder of a generator that takes an r vector: r=None computes it (:func:`compute_r`)."""

    def _build(
        stages: int, micro_batches: int, r: Sequence[int] | None, costs: Any, virtual_stages: int
    ) -> Schedule:
        return build_r(stages, micro_batches, compute_r(stages, micro_batches, costs) if r is None else r)

    return _build


SPEC = ScheduleSpec(
    "ours",
    "EnvPipe: extra warm-up forwards fill the 1F1B bubble (r per stage), async sends",
    r_builder(build),
    takes_r=True,
    runs_on_deepspeed=True,
)
