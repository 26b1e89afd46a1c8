"""ZB-V (Qi et al., ICLR 2024, "Zero Bubble Pipeline Parallelism", section 6): two stages per rank in a V.

The model is cut into S = 2P stages on P ranks; rank r holds stage r (chunk 0, on the way down) and stage
2P-1-r (chunk 1, on the way back), so rank 0 holds the first and the last stage and every forward turns
around on rank P-1. Backwards are split into ``I`` and ``W`` (see ``envpipe.schedules.zero_bubble``). Per
rank r the paper's phases, as torch's pipelining also orders them (``c0``/``c1`` the two chunks):

1. ``2(P-r)-1`` forwards of c0;
2. ``r`` times: F of c1, F of c0;
3. ``P-r`` times: F, I, W of c1;
4. steady state, while c0 has forwards left or c1 trails c0: [F of c0], I and W of c0, F, I, W of c1;
5. cool-down: ``r`` times I of c0, I of c1; ``P-r`` times I and W of c0; then the W units still owed, c1's
   first.

With ``T_F = T_I = T_W`` the bubble is (almost) zero and each rank holds at most 2P chunk activations of
half a 1F1B stage each: 1F1B's peak. The phases need ``M >= 2P - 1``; for fewer micro-batches the order
of ``2P - 1`` is built and the units of the missing micro-batches are left out (dependencies only shrink).

Verified deadlock-free under rendezvous sends (tests); simulated and planned, not run on DeepSpeed.
"""

from __future__ import annotations

from collections import Counter

from envpipe.errors import ConfigError
from envpipe.ir import ActionKind, Schedule
from envpipe.schedules.lower import Unit, lower
from envpipe.schedules.spec import ScheduleSpec

K = ActionKind


def stage_rank(stage: int, ranks: int) -> int:
    """The rank of ``stage`` in the V: stages 0..P-1 on ranks 0..P-1, stages P..2P-1 back on P-1..0."""
    return stage if stage < ranks else 2 * ranks - 1 - stage


def build(stages: int, micro_batches: int) -> Schedule:
    """ZB-V with ``stages`` (even, >= 4) stages on ``stages / 2`` ranks.

    Raises:
        ConfigError: an odd stage count or fewer than 2 ranks.
    """
    if stages % 2 or stages < 4:
        raise ConfigError(
            f"zb-v puts 2 stages on each of at least 2 ranks: stages must be even and >= 4 (2 GPUs), got {stages}"
        )
    ranks = stages // 2
    orders = [unit_order(rank, ranks, micro_batches) for rank in range(ranks)]
    return Schedule("zb-v", stages, micro_batches, (0,) * stages, lower(stages, orders))


def unit_order(rank: int, ranks: int, micro_batches: int) -> list[Unit]:
    """The phases of the module docstring for ``rank`` of ``ranks``, as (stage, kind, micro-batch)."""
    padded = max(micro_batches, 2 * ranks - 1)
    chunk_stage = (rank, 2 * ranks - 1 - rank)
    done: Counter[tuple[int, ActionKind]] = Counter()
    order: list[Unit] = []

    def run(chunk: int, *kinds: ActionKind) -> None:
        for kind in kinds:
            m = done[(chunk, kind)]
            done[(chunk, kind)] += 1
            if m < micro_batches:
                order.append((chunk_stage[chunk], kind, m))

    for _ in range(2 * (ranks - rank) - 1):
        run(0, K.F)
    for _ in range(rank):
        run(1, K.F)
        run(0, K.F)
    for _ in range(ranks - rank):
        run(1, K.F, K.I, K.W)
    while done[(0, K.F)] < padded or done[(1, K.F)] < done[(0, K.F)]:
        if done[(0, K.F)] < padded:
            run(0, K.F)
        run(0, K.I, K.W)
        run(1, K.F, K.I, K.W)
    for _ in range(rank):
        run(0, K.I)
        run(1, K.I)
    for _ in range(ranks - rank):
        run(0, K.I, K.W)
    for chunk in (1, 0):
        while done[(chunk, K.W)] < done[(chunk, K.I)]:
            run(chunk, K.W)
    return order


SPEC = ScheduleSpec(
    "zb-v",
    "zero-bubble ZB-V (Qi et al.): 2 stages per rank in a V, split backwards (simulator only)",
    lambda stages, micro_batches, r, costs, virtual_stages: build(stages, micro_batches),
    virtual_stages=2,
)
