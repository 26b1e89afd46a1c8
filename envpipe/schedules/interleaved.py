"""Interleaved 1F1B (Megatron-LM, Narayanan et al., SC'21, "Efficient Large-Scale Language Model Training
on GPU Clusters Using Megatron-LM", section 2.2.2): each of P ranks holds v stages (model chunks), stage s
on rank s mod P, so the pipeline has S = P*v stages and the bubble shrinks by a factor v.

Unit order per rank r (Megatron's ``forward_backward_pipelining_with_interleaving``): the rank's M*v
forwards are taken in groups of P micro-batches per chunk, chunk 0 first; backwards alike with the chunks
reversed. The rank runs ``min(M*v, 2(P-r-1) + (v-1)P)`` warm-up forwards (all of them when M == P), then
alternates one forward and one backward, then runs the remaining backwards. Megatron requires M to be a
multiple of P, and so do we. Communication comes from :func:`envpipe.schedules.lower.lower`.

Verified deadlock-free under rendezvous sends and simulated; not run on DeepSpeed, whose PipelineEngine
holds one stage per rank.
"""

from __future__ import annotations

from envpipe.errors import ConfigError
from envpipe.ir import ActionKind, Schedule
from envpipe.schedules.lower import Unit, lower
from envpipe.schedules.spec import ScheduleSpec

K = ActionKind


def build(stages: int, micro_batches: int, virtual_stages: int) -> Schedule:
    """Interleaved 1F1B with ``stages`` stages, ``virtual_stages`` of them on each rank.

    Raises:
        ConfigError: ``stages`` not a multiple of ``virtual_stages``, fewer than 2 ranks, or M not a
            multiple of the rank count.
    """
    if virtual_stages < 1 or stages % virtual_stages:
        raise ConfigError(
            f"interleaved needs stages ({stages}) to be a multiple of virtual_stages ({virtual_stages})"
        )
    ranks = stages // virtual_stages
    if ranks < 2:
        raise ConfigError(
            f"interleaved needs at least 2 ranks; {stages} stages / {virtual_stages} per rank is 1"
        )
    if micro_batches % ranks:
        raise ConfigError(
            f"interleaved needs micro_batches ({micro_batches}) to be a multiple of the ranks ({ranks}), "
            f"as Megatron-LM does; use {micro_batches + ranks - micro_batches % ranks}"
        )
    orders = [unit_order(rank, ranks, micro_batches, virtual_stages) for rank in range(ranks)]
    return Schedule("interleaved", stages, micro_batches, (0,) * stages, lower(stages, orders))


def unit_order(rank: int, ranks: int, micro_batches: int, virtual_stages: int) -> list[Unit]:
    """Megatron's interleaved order of rank ``rank``'s compute units as (stage, kind, micro-batch)."""
    total = micro_batches * virtual_stages
    group = ranks * virtual_stages

    def unit(k: int, forward: bool) -> Unit:
        chunk = (k % group) // ranks
        if not forward:
            chunk = virtual_stages - 1 - chunk
        microbatch = (k // group) * ranks + k % ranks
        return (chunk * ranks + rank, K.F if forward else K.B, microbatch)

    if micro_batches == ranks:
        warmup = total
    else:
        warmup = min(total, 2 * (ranks - rank - 1) + (virtual_stages - 1) * ranks)
    order = [unit(k, True) for k in range(warmup)]
    for i in range(total - warmup):
        order += [unit(warmup + i, True), unit(i, False)]
    order += [unit(k, False) for k in range(total - warmup, total)]
    return order


SPEC = ScheduleSpec(
    "interleaved",
    "Megatron-LM's interleaved 1F1B: v stages per rank, stage s on rank s mod P (simulator only)",
    lambda stages, micro_batches, r, costs, virtual_stages: build(stages, micro_batches, virtual_stages),
    virtual_stages=2,
    any_virtual_stages=True,
)
