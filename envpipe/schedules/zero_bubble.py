"""Zero-bubble schedules with one stage per rank: ZB-H1 and ZB-H2 (Qi et al., ICLR 2024, "Zero Bubble
Pipeline Parallelism", section 3), and the split-backward unit order they share with ``ours-w``.

Every backward is split into ``I`` (the gradient of the stage's input: on the critical path, it is what the
previous stage waits for) and ``W`` (the weight gradients: nobody waits for them, so they can move into
bubbles). Stage s runs

    w_s warm-up forwards, then per micro-batch m:  I_m  [W_{m - lag_s}]  [F_{m + w_s}]
    and finally the W units still owed,

i.e. ``W_m`` is deferred until ``lag_s`` later input-gradient units have run (torch's pipelining orders its
ZB-H1 the same way: the W before the next forward, so the forward never raises the peak).
Activations of micro-batch m are held from ``F_m`` to ``W_m``, so a stage holds at most
``min(M, w_s + lag_s)`` micro-batches (``envpipe.verify`` reports it as ``max_in_flight``).

* ZB-H1: the 1F1B warm-up ``w_s = S - s`` and ``lag_s = s``: every stage holds at most S micro-batches,
  1F1B's peak (stage 0's), and the last stages, whose I units the others wait for, defer the most W units:
  the cool-down bubble shrinks to about a third of 1F1B's when ``T_F = T_I = T_W``.
* ZB-H2: the warm-up bubble is filled with forwards, ``w_s = 2(S - s) - 1`` (the first gradient reaches
  stage s after ``2(S - s) - 1`` forward times when ``T_F = T_I``), and ``lag_s = 2s``: every stage holds at
  most ``2S - 1`` micro-batches, the paper's ZB-H2 peak.

Communication comes from :func:`envpipe.schedules.lower.lower`; verified deadlock-free under rendezvous
sends (tests). Simulated and planned only: DeepSpeed's engine runs full backwards (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from envpipe.errors import ConfigError
from envpipe.ir import ActionKind, Schedule
from envpipe.schedules.lower import Unit, lower
from envpipe.schedules.spec import ScheduleSpec

K = ActionKind


def split_order(stage: int, micro_batches: int, warmup: int, lag: int) -> list[Unit]:
    """One stage's units: ``warmup`` forwards, then ``I_m W_{m-lag} F_{m+warmup}``, then the rest."""
    if warmup < 1 or lag < 0:
        raise ConfigError(
            f"stage {stage}: warm-up forwards must be >= 1 and the W lag >= 0, got {warmup}, {lag}"
        )
    warmup = min(warmup, micro_batches)
    order: list[Unit] = [(stage, K.F, m) for m in range(warmup)]
    owed = 0  # the next micro-batch whose W has not run
    for m in range(micro_batches):
        order.append((stage, K.I, m))
        if m - lag >= owed:
            order.append((stage, K.W, owed))
            owed += 1
        if m + warmup < micro_batches:
            order.append((stage, K.F, m + warmup))
    order += [(stage, K.W, m) for m in range(owed, micro_batches)]
    return order


def build_split(
    name: str, stages: int, micro_batches: int, warmups: Sequence[int], lags: Sequence[int],
    r: Sequence[int] | None = None,
) -> Schedule:
    """A one-stage-per-rank split-backward schedule from per-stage warm-ups and W lags.

    Raises:
        ConfigError: a warm-up that grows along the pipeline (stage s would wait for a forward that stage
            s-1 runs only after a gradient that needs it: a dependency cycle), or bad lengths.
    """
    if len(warmups) != stages or len(lags) != stages:
        raise ConfigError(f"{name}: give one warm-up and one W lag per stage ({stages}), got "
                          f"{len(warmups)} and {len(lags)}")
    capped = [min(w, micro_batches) for w in warmups]
    for s in range(1, stages):
        if capped[s] > capped[s - 1]:
            raise ConfigError(f"{name}: stage {s} runs {capped[s]} warm-up forwards but stage {s - 1} only "
                              f"{capped[s - 1]}; warm-ups must not grow along the pipeline")
    orders = [split_order(s, micro_batches, warmups[s], lags[s]) for s in range(stages)]
    return Schedule(name, stages, micro_batches, tuple(r or (0,) * stages), lower(stages, orders))


def build_h1(stages: int, micro_batches: int) -> Schedule:
    """ZB-H1: 1F1B's warm-up, stage s defers its W units by s (peak S micro-batches on every stage)."""
    warm = [stages - s for s in range(stages)]
    return build_split("zb-h1", stages, micro_batches, warm, list(range(stages)))


def build_h2(stages: int, micro_batches: int) -> Schedule:
    """ZB-H2: ``2(S-s)-1`` warm-up forwards, W deferred by 2s (peak ``2S-1`` micro-batches per stage)."""
    return build_split("zb-h2", stages, micro_batches, [2 * (stages - s) - 1 for s in range(stages)],
                       [2 * s for s in range(stages)])


ZB_H1 = ScheduleSpec(
    "zb-h1",
    "zero-bubble ZB-H1 (Qi et al.): split backwards, 1F1B's memory (simulator only)",
    lambda stages, micro_batches, r, costs, virtual_stages: build_h1(stages, micro_batches),
)
ZB_H2 = ScheduleSpec(
    "zb-h2",
    "zero-bubble ZB-H2 (Qi et al.): split backwards, more warm-up, about no bubble (simulator only)",
    lambda stages, micro_batches, r, costs, virtual_stages: build_h2(stages, micro_batches),
)
