"""Static and dynamic checks of a schedule: dependencies, deadlock-freedom under rendezvous sends, buffers.

The communication model is :mod:`envpipe.rendezvous` (FIFO per directed pair of stages, rendezvous sends:
the strictest that gloo and NCCL may give). A schedule that passes here runs with any transport buffering.

Units per micro-batch and stage: one forward ``F``, then either one full backward ``B`` or its two halves,
backward-input ``I`` then backward-weight ``W``. The gradient sent to the previous stage comes from ``B``
or ``I``; the received gradient is consumed by the same unit.

Compositionality (why the sweep over every r vector is cheap, one stage per rank). Stages form a chain,
so in a stuck state each blocked stage waits on a neighbour, and following those waits either ends at a
finished stage (a count mismatch on one link) or cycles; a cycle on a chain has length 2, i.e. two
neighbours each blocked on their shared link. With deterministic programs and FIFO matching, two neighbours
get stuck on their link in the full pipeline exactly when they get stuck with all their other-link actions
made free. So a one-stage-per-rank schedule is deadlock-free iff every link's two-stage projection
(:func:`link_schedule`) is. With several stages per rank (interleaved) the full run is the check.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from envpipe.errors import ScheduleError
from envpipe.grid import format_grid
from envpipe.ir import MATCHING, Action, ActionKind, Schedule
from envpipe.rendezvous import deadlocks, lockstep, run, talks_to
from envpipe.streams import check as check_streams, check_routes
from envpipe.transports import DEFAULT_TRANSPORT, get_transport

__all__ = ["VerifyReport", "deadlocks", "link_schedule", "step_grid", "verify"]

K = ActionKind
_Positions = dict[tuple[int, ActionKind, int, bool], list[int]]  # (stage, kind, mb, is_wait) -> indices


@dataclass(frozen=True)
class VerifyReport:
    """What a passing schedule needs per rank.

    Attributes:
        max_outstanding_sends: most async sends posted and not yet waited, per rank.
        max_in_flight: most micro-batches forwarded whose activations are still held, per rank.
    """

    max_outstanding_sends: tuple[int, ...]
    max_in_flight: tuple[int, ...]


def verify(
    schedule: Schedule,
    max_outstanding_sends: int | None = None,
    *,
    buffered_sends: bool = False,
    transport: str | None = DEFAULT_TRANSPORT,
) -> VerifyReport:
    """Check a schedule; raise :class:`ScheduleError` (with the step x rank grid) on the first problem.

    Args:
        schedule: the schedule to check.
        max_outstanding_sends: if given, the most async sends a rank may have posted and not yet waited.
        buffered_sends: model unlimited transport buffering (every send completes at once) instead of
            rendezvous. Only for diagnosis: a schedule must pass with the default to be safe everywhere.
        transport: also check the schedule on this p2p transport's GPU streams (``envpipe.streams``:
            NCCL's issue order per stream, rendezvous sends); None skips that check.

    Returns:
        The per-rank buffer needs of the schedule.
    """
    for rank in range(schedule.ranks):
        positions = _positions(schedule.programs[rank])
        for stage in schedule.rank_stages(rank):
            _check_units(schedule, rank, stage, positions)
            _check_comms(schedule, rank, stage, positions)
        _check_actions(schedule, rank, positions)
    for stage in range(schedule.stages - 1):
        _check_pairing(schedule, stage)
    report = _buffer_report(schedule, max_outstanding_sends)
    if run(schedule.programs, buffered_sends) is not None:
        raise ScheduleError(_deadlock_message(schedule, buffered_sends))
    if transport is not None and not buffered_sends:
        kind = get_transport(transport)
        if kind.directed and kind.per_stage:  # link's streams reduce to the run above (envpipe.streams docstring)
            check_routes(schedule, transport)
        else:
            check_streams(schedule, transport)
    return report


# ---------------------------------------------------------------------------------------------- static checks


def _fail(schedule: Schedule, rank: int, index: int | None, why: str) -> ScheduleError:
    marks = {rank: index} if index is not None else {}
    return ScheduleError(
        f"{schedule.name} S={schedule.stages} M={schedule.micro_batches}: {why}\n"
        + _program_grid(schedule, marks)
    )


def _positions(program: tuple[Action, ...]) -> _Positions:
    found: _Positions = defaultdict(list)
    for i, action in enumerate(program):
        kind = action.waits if action.kind is K.WAIT else action.kind
        found[(action.stage, kind, action.microbatch, action.kind is K.WAIT)].append(i)
    return found


def _gradient_unit(pos: _Positions, stage: int, m: int) -> ActionKind:
    """The unit that consumes the received gradient and sends the next: ``I`` when split, else ``B``."""
    return K.I if pos.get((stage, K.I, m, False)) else K.B


def _check_units(schedule: Schedule, rank: int, stage: int, pos: _Positions) -> None:
    for m in range(schedule.micro_batches):
        where = {kind: pos.get((stage, kind, m, False), []) for kind in (K.F, K.I, K.W, K.B)}
        split = bool(where[K.I] or where[K.W])
        if split and where[K.B]:
            raise _fail(
                schedule,
                rank,
                where[K.B][0],
                f"stage {stage} runs B{m} and I{m}/W{m}; run the full backward or its two halves",
            )
        for kind in (K.F, K.I, K.W) if split else (K.F, K.B):
            if len(where[kind]) != 1:
                raise _fail(
                    schedule,
                    rank,
                    where[kind][1] if where[kind] else None,
                    f"stage {stage} runs {kind}{m} {len(where[kind])} times; every unit runs exactly once",
                )
        grad = K.I if split else K.B
        if where[grad][0] < where[K.F][0]:
            raise _fail(schedule, rank, where[grad][0], f"stage {stage} runs {grad}{m} before F{m}")
        if split and where[K.W][0] < where[K.I][0]:
            raise _fail(schedule, rank, where[K.W][0], f"stage {stage} runs W{m} before I{m}")


def _check_comms(schedule: Schedule, rank: int, stage: int, pos: _Positions) -> None:
    first, last = stage == 0, stage == schedule.stages - 1
    for m in range(schedule.micro_batches):
        grad = _gradient_unit(pos, stage, m)
        # (kind, present on this stage?, must come before (True) / after (False) the unit, unit kind)
        rules = (
            (K.RA, not first, True, K.F),
            (K.SG, not first, False, grad),
            (K.SA, not last, False, K.F),
            (K.RG, not last, True, grad),
        )
        for kind, needed, before, unit in rules:
            where = pos.get((stage, kind, m, False), [])
            if len(where) != int(needed):
                raise _fail(
                    schedule,
                    rank,
                    where[0] if where else None,
                    f"stage {stage} has {len(where)} {kind}{m}, needs {int(needed)}",
                )
            if needed and (where[0] < pos[(stage, unit, m, False)][0]) != before:
                raise _fail(
                    schedule,
                    rank,
                    where[0],
                    f"stage {stage}: {kind}{m} must come "
                    f"{'before' if before else 'after'} {unit}{m} (it carries that unit's data)",
                )


def _check_actions(schedule: Schedule, rank: int, pos: _Positions) -> None:
    """Waits follow an async send, async sends are waited once, stages and micro-batches are in range."""
    program = schedule.programs[rank]
    for i, action in enumerate(program):
        stage = action.stage
        if action.microbatch >= schedule.micro_batches:
            raise _fail(schedule, rank, i, f"stage {stage}: {action} but M={schedule.micro_batches}")
        if action.kind is K.WAIT:
            sends = [
                j
                for j in pos.get((stage, action.waits, action.microbatch, False), [])
                if program[j].asynchronous
            ]
            if not sends or sends[0] > i:
                raise _fail(schedule, rank, i, f"stage {stage}: {action} waits on no earlier async send")
        elif action.asynchronous and len(pos.get((stage, action.kind, action.microbatch, True), [])) != 1:
            raise _fail(schedule, rank, i, f"stage {stage}: async {action} must be waited exactly once")


def _check_pairing(schedule: Schedule, stage: int) -> None:
    """FIFO matching must pair each send with the receive of the same micro-batch."""
    for send_kind, sender, receiver in ((K.SA, stage, stage + 1), (K.SG, stage + 1, stage)):
        recv_kind = MATCHING[send_kind]
        sent = [
            a.microbatch
            for a in schedule.programs[schedule.stage_rank[sender]]
            if a.kind is send_kind and a.stage == sender
        ]
        received = [
            a.microbatch
            for a in schedule.programs[schedule.stage_rank[receiver]]
            if a.kind is recv_kind and a.stage == receiver
        ]
        for k, (m_sent, m_recv) in enumerate(zip(sent, received)):
            if m_sent != m_recv:
                raise _fail(
                    schedule,
                    schedule.stage_rank[receiver],
                    None,
                    f"link {sender}->{receiver}: send #{k} is {send_kind}{m_sent} but the receive it "
                    f"matches (FIFO) is {recv_kind}{m_recv}; order sends and receives alike",
                )


def _buffer_report(schedule: Schedule, limit: int | None) -> VerifyReport:
    outstanding_max, in_flight_max = [], []
    for rank, program in enumerate(schedule.programs):
        outstanding = in_flight = peak_out = peak_flight = 0
        waited_sa: set[tuple[int, int]] = set()
        async_sa: set[tuple[int, int]] = set()
        for i, action in enumerate(program):
            key = (action.stage, action.microbatch)
            if action.asynchronous:
                outstanding += 1
                peak_out = max(peak_out, outstanding)
                if action.kind is K.SA:
                    async_sa.add(key)
            elif action.kind is K.WAIT:
                outstanding -= 1
                if action.waits is K.SA:
                    waited_sa.add(key)
            elif action.kind is K.F:
                in_flight += 1
                peak_flight = max(peak_flight, in_flight)
            elif action.kind in (K.B, K.W):  # the activations are held until the weight gradient
                in_flight -= 1
            if action.kind in (K.B, K.I) and key in async_sa and key not in waited_sa:
                raise _fail(
                    schedule,
                    rank,
                    i,
                    f"stage {action.stage}: {action.kind}{action.microbatch} reuses the output "
                    f"of F{action.microbatch} before its async send is waited; add wSA"
                    f"{action.microbatch} before it",
                )
            if limit is not None and outstanding > limit:
                raise _fail(
                    schedule,
                    rank,
                    i,
                    f"rank {rank} has {outstanding} async sends outstanding, "
                    f"more than max_outstanding_sends={limit}",
                )
        outstanding_max.append(peak_out)
        in_flight_max.append(peak_flight)
    return VerifyReport(tuple(outstanding_max), tuple(in_flight_max))


# -------------------------------------------------------------------------------------------- projections


def link_schedule(schedule: Schedule, stage: int) -> Schedule:
    """The two-stage projection of link (stage, stage+1): only the actions on that link, plus units.

    Raises:
        ScheduleError: a schedule with several stages on a rank (the projection argument needs a chain).
    """
    schedule.require_one_stage_per_rank("link_schedule")

    def keep(action: Action, peer: int) -> bool:
        return action.is_compute or talks_to(action) == peer

    def moved(action: Action) -> Action:  # stage s, s+1 -> 0, 1
        return replace(action, stage=action.stage - stage)

    programs = (
        tuple(moved(a) for a in schedule.programs[stage] if keep(a, stage + 1)),
        tuple(moved(a) for a in schedule.programs[stage + 1] if keep(a, stage)),
    )
    return Schedule(f"{schedule.name}[link {stage}-{stage + 1}]", 2, schedule.micro_batches, (0, 0), programs)


def step_grid(schedule: Schedule, *, compute_only: bool = False) -> str:
    """The schedule as a step x rank grid: each rank runs its next action as soon as it can (unit steps).

    Raises:
        ScheduleError: when the schedule deadlocks (the grid is in the message).
    """
    columns, stuck_at = lockstep(schedule.programs)
    if any(pc < len(p) for pc, p in zip(stuck_at, schedule.programs)):
        raise ScheduleError(_deadlock_message(schedule))
    if compute_only:
        columns = [[cell if _is_unit_text(cell) else "" for cell in col] for col in columns]
    keep = [i for i in range(len(columns[0])) if any(col[i] not in ("", ".") for col in columns)]
    return format_grid([[col[i] for i in keep] for col in columns], tail_rows=len(keep))


def _is_unit_text(cell: str) -> bool:
    return cell.lstrip("0123456789")[:1] in ("F", "I", "W", "B")


# ------------------------------------------------------------------------------------------------- messages


def _program_grid(schedule: Schedule, marks: dict[int, int]) -> str:
    columns = [[str(a) for a in prog] for prog in schedule.programs]
    error_row = max(marks.values()) if marks else None
    for rank, i in marks.items():
        columns[rank][i] = f"*{columns[rank][i]}*"
    return format_grid(columns, error_row=error_row, row_label="pos")


def _deadlock_message(schedule: Schedule, buffered: bool = False) -> str:
    """Replay in lockstep (one action per rank per step) to draw the step x rank grid of the deadlock."""
    columns, stuck_at = lockstep(schedule.programs, buffered)
    reasons = []
    for rank, pc in enumerate(stuck_at):
        if pc < len(schedule.programs[rank]):
            action = schedule.programs[rank][pc]
            peer = talks_to(action)
            reasons.append(
                f"rank {rank} blocked at {action} (stage {action.stage}, on stage "
                f"{peer if peer is not None else action.stage})"
            )
    return (
        f"{schedule.name} S={schedule.stages} M={schedule.micro_batches} r={list(schedule.r)} deadlocks "
        f"under {'buffered' if buffered else 'rendezvous'} sends: {'; '.join(reasons)}\n"
        + format_grid(columns, error_row=len(columns[0]) - 1, row_label="step")
    )
