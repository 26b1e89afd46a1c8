"""Lowering: per-rank orders of compute units -> per-rank programs with their communication.

The same communication discipline as ``ours`` (see ``envpipe/schedules/ours.py``), for any placement of
stages on ranks and for split backwards (``I``/``W``):

* every send is an isend posted right after the unit that produced it (``iSA`` after ``F``, ``iSG`` after the
  gradient unit ``B`` or ``I``);
* every receive is a blocking receive right before the unit that consumes it (``RA`` before ``F``; ``RG``
  and then ``wSA`` before the gradient unit: the peer sent that gradient after receiving the activation, so
  the wait never blocks and the activation buffer is free before its reuse);
* ``wSG_m`` goes right after the first later ``RA`` that the previous stage sends after its own gradient
  unit of m (receiving it proves the gradient m arrived), else at the end of the program.

So execution is the dataflow of the units: a unit order with acyclic dependencies lowers to programs that
are deadlock-free under rendezvous sends (``envpipe.verify.verify`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

from envpipe.errors import ScheduleError
from envpipe.ir import Action, ActionKind, act

K = ActionKind
Unit = tuple[int, ActionKind, int]  # (stage, kind, micro-batch)


def lower(stages: int, orders: Sequence[Sequence[Unit]]) -> tuple[tuple[Action, ...], ...]:
    """Programs for ``orders[rank]`` (compute units in execution order) of a pipeline of ``stages`` stages.

    Raises:
        ScheduleError: a stage placed on two ranks, or outside 0..stages-1.
    """
    owner: dict[int, int] = {}
    for rank, order in enumerate(orders):
        for stage, _, _ in order:
            if not 0 <= stage < stages or owner.setdefault(stage, rank) != rank:
                raise ScheduleError(
                    f"stage {stage} cannot be on rank {rank}: outside 0..{stages - 1} or on two ranks"
                )
    split = {(s, m) for order in orders for s, kind, m in order if kind is K.I}
    grad_kind = {(s, m): K.I if (s, m) in split else K.B for order in orders for s, _, m in order}
    # For each stage s >= 1 and micro-batch m: the first activation m' that stage s-1 sends after its
    # gradient unit of m (receiving m' on stage s proves gradient m has arrived).
    proof: dict[tuple[int, int], int] = {}
    for order in orders:
        pending: dict[int, list[int]] = {}
        for s, kind, m in order:
            if kind is grad_kind.get((s, m)) and s + 1 < stages:
                pending.setdefault(s, []).append(m)
            elif kind is K.F and s + 1 < stages:
                for waiting in pending.pop(s, []):
                    proof[(s + 1, waiting)] = m
    return tuple(_program(stages, order, grad_kind, proof) for order in orders)


def _program(
    stages: int,
    order: Sequence[Unit],
    grad_kind: dict[tuple[int, int], ActionKind],
    proof: dict[tuple[int, int], int],
) -> tuple[Action, ...]:
    prog: list[Action] = []
    waits_after_ra: dict[tuple[int, int], list[int]] = {}  # (stage, activation m') -> gradient waits
    end_waits: list[tuple[int, int]] = []
    for stage, kind, m in order:
        first, last = stage == 0, stage == stages - 1
        if kind is K.F:
            if not first:
                prog.append(act(stage, K.RA, m))
                prog += [act(stage, K.WAIT, g, waits=K.SG) for g in waits_after_ra.pop((stage, m), [])]
            prog.append(act(stage, K.F, m))
            if not last:
                prog.append(act(stage, K.SA, m, True))
            continue
        gradient_unit = kind is grad_kind[(stage, m)]
        if gradient_unit and not last:
            prog += [act(stage, K.RG, m), act(stage, K.WAIT, m, waits=K.SA)]
        prog.append(act(stage, kind, m))
        if gradient_unit and not first:
            prog.append(act(stage, K.SG, m, True))
            if (stage, m) in proof:
                waits_after_ra.setdefault((stage, proof[(stage, m)]), []).append(m)
            else:
                end_waits.append((stage, m))
    prog += [act(stage, K.WAIT, m, waits=K.SG) for stage, m in end_waits]
    return tuple(prog)
