"""Static and dynamic checks of a schedule: dependencies, deadlock-freedom under rendezvous sends, buffers.

Communication model (the strictest that gloo and NCCL may give): matching is FIFO per directed pair of
stages; a blocking send completes only when the peer has received it (no buffering at all); an async send
is posted at once and its wait completes when the peer has received it; receives block until the matching
send is posted. A schedule that runs here runs with any amount of transport buffering.

Compositionality (why the sweep over every r vector is cheap). Stages form a chain, so in a stuck state
each blocked stage waits on a neighbour, and following those waits either ends at a finished stage (a
count mismatch on one link) or cycles; a cycle on a chain has length 2, i.e. two neighbours each blocked on
their shared link. With deterministic programs and FIFO matching, two neighbours get stuck on their link in
the full pipeline exactly when they get stuck with all their other-link actions made free. So a schedule is
deadlock-free iff every link's two-stage projection (:func:`link_schedule`) is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from envpipe.errors import ScheduleError
from envpipe.ir import MATCHING, PEER_OFFSET, RECV_KINDS, SEND_KINDS, Action, ActionKind, Schedule
from envpipe.render import format_grid

K = ActionKind


@dataclass(frozen=True)
class VerifyReport:
    """What a passing schedule needs per stage.

    Attributes:
        max_outstanding_sends: most async sends posted and not yet waited, per stage.
        max_in_flight: most micro-batches forwarded and not yet backwarded (activation buffers), per stage.
    """

    max_outstanding_sends: tuple[int, ...]
    max_in_flight: tuple[int, ...]


def verify(
    schedule: Schedule, max_outstanding_sends: int | None = None, *, buffered_sends: bool = False
) -> VerifyReport:
    """Check a schedule; raise :class:`ScheduleError` (with the step x stage grid) on the first problem.

    Args:
        schedule: the schedule to check.
        max_outstanding_sends: if given, the most async sends a stage may have posted and not yet waited.
        buffered_sends: model unlimited transport buffering (every send completes at once) instead of
            rendezvous. Only for diagnosis: a schedule must pass with the default to be safe everywhere.

    Returns:
        The per-stage buffer needs of the schedule.
    """
    for stage in range(schedule.stages):
        positions = _positions(schedule.programs[stage])
        _check_units(schedule, stage, positions)
        _check_comms(schedule, stage, positions)
    for stage in range(schedule.stages - 1):
        _check_pairing(schedule, stage)
    report = _buffer_report(schedule, max_outstanding_sends)
    stuck = _rendezvous(schedule.programs, buffered_sends)
    if stuck is not None:
        raise ScheduleError(_deadlock_message(schedule, buffered_sends))
    return report


# ---------------------------------------------------------------------------------------------- static checks


def _fail(schedule: Schedule, stage: int, index: int | None, why: str) -> ScheduleError:
    marks = {stage: index} if index is not None else {}
    return ScheduleError(
        f"{schedule.name} S={schedule.stages} M={schedule.micro_batches}: {why}\n"
        + _program_grid(schedule, marks)
    )


def _positions(program: tuple[Action, ...]) -> dict[tuple[ActionKind, int, bool], list[int]]:
    found: dict[tuple[ActionKind, int, bool], list[int]] = defaultdict(list)
    for i, action in enumerate(program):
        kind = action.waits if action.kind is K.W else action.kind
        found[(kind, action.microbatch, action.kind is K.W)].append(i)
    return found


def _check_units(schedule: Schedule, stage: int, pos: dict[tuple[ActionKind, int, bool], list[int]]) -> None:
    for m in range(schedule.micro_batches):
        for kind in (K.F, K.B):
            where = pos.get((kind, m, False), [])
            if len(where) != 1:
                raise _fail(
                    schedule,
                    stage,
                    where[1] if where else None,
                    f"stage {stage} runs {kind}{m} {len(where)} times; every unit must run exactly once",
                )
        if pos[(K.B, m, False)][0] < pos[(K.F, m, False)][0]:
            raise _fail(schedule, stage, pos[(K.B, m, False)][0], f"stage {stage} runs B{m} before F{m}")
    extra = [a for a in schedule.units(stage) if a.microbatch >= schedule.micro_batches]
    if extra:
        raise _fail(schedule, stage, None, f"stage {stage} runs {extra[0]} but M={schedule.micro_batches}")


def _check_comms(schedule: Schedule, stage: int, pos: dict[tuple[ActionKind, int, bool], list[int]]) -> None:
    program = schedule.programs[stage]
    first, last = stage == 0, stage == schedule.stages - 1
    # (kind, present on this stage?, must come before (True) / after (False) the unit, unit kind)
    rules = (
        (K.RA, not first, True, K.F),
        (K.SG, not first, False, K.B),
        (K.SA, not last, False, K.F),
        (K.RG, not last, True, K.B),
    )
    for m in range(schedule.micro_batches):
        for kind, needed, before, unit in rules:
            where = pos.get((kind, m, False), [])
            if len(where) != int(needed):
                raise _fail(
                    schedule,
                    stage,
                    where[0] if where else None,
                    f"stage {stage} has {len(where)} {kind}{m}, needs {int(needed)}",
                )
            if needed and (where[0] < pos[(unit, m, False)][0]) != before:
                raise _fail(
                    schedule,
                    stage,
                    where[0],
                    f"stage {stage}: {kind}{m} must come "
                    f"{'before' if before else 'after'} {unit}{m} (it carries that unit's data)",
                )
    for i, action in enumerate(program):
        if action.kind is K.W:
            sends = [
                j for j in pos.get((action.waits, action.microbatch, False), []) if program[j].asynchronous
            ]
            if not sends or sends[0] > i:
                raise _fail(schedule, stage, i, f"stage {stage}: {action} waits on no earlier async send")
        elif action.asynchronous and len(pos.get((action.kind, action.microbatch, True), [])) != 1:
            raise _fail(schedule, stage, i, f"stage {stage}: async {action} must be waited exactly once")
        elif action.microbatch >= schedule.micro_batches:
            raise _fail(schedule, stage, i, f"stage {stage}: {action} but M={schedule.micro_batches}")


def _check_pairing(schedule: Schedule, stage: int) -> None:
    """FIFO matching must pair each send with the receive of the same micro-batch."""
    for send_kind, sender, receiver in ((K.SA, stage, stage + 1), (K.SG, stage + 1, stage)):
        sent = [a.microbatch for a in schedule.programs[sender] if a.kind is send_kind]
        recv_kind = MATCHING[send_kind]
        received = [a.microbatch for a in schedule.programs[receiver] if a.kind is recv_kind]
        for k, (m_sent, m_recv) in enumerate(zip(sent, received)):
            if m_sent != m_recv:
                raise _fail(
                    schedule,
                    receiver,
                    None,
                    f"link {sender}->{receiver}: send #{k} is {send_kind}{m_sent} but the receive it "
                    f"matches (FIFO) is {recv_kind}{m_recv}; order sends and receives alike",
                )


def _buffer_report(schedule: Schedule, limit: int | None) -> VerifyReport:
    outstanding_max, in_flight_max = [], []
    for stage, program in enumerate(schedule.programs):
        outstanding = in_flight = peak_out = peak_flight = 0
        waited_sa: set[int] = set()
        async_sa: set[int] = set()
        for i, action in enumerate(program):
            if action.asynchronous:
                outstanding += 1
                peak_out = max(peak_out, outstanding)
                if action.kind is K.SA:
                    async_sa.add(action.microbatch)
            elif action.kind is K.W:
                outstanding -= 1
                if action.waits is K.SA:
                    waited_sa.add(action.microbatch)
            elif action.kind is K.F:
                in_flight += 1
                peak_flight = max(peak_flight, in_flight)
            elif action.kind is K.B:
                in_flight -= 1
                if action.microbatch in async_sa and action.microbatch not in waited_sa:
                    raise _fail(
                        schedule,
                        stage,
                        i,
                        f"stage {stage}: B{action.microbatch} reuses the output "
                        f"of F{action.microbatch} before its async send is waited; add wSA"
                        f"{action.microbatch} before it",
                    )
            if limit is not None and outstanding > limit:
                raise _fail(
                    schedule,
                    stage,
                    i,
                    f"stage {stage} has {outstanding} async sends outstanding, "
                    f"more than max_outstanding_sends={limit}",
                )
        outstanding_max.append(peak_out)
        in_flight_max.append(peak_flight)
    return VerifyReport(tuple(outstanding_max), tuple(in_flight_max))


# ------------------------------------------------------------------------------------- rendezvous execution


def channel_index(programs: tuple[tuple[Action, ...], ...]) -> list[list[tuple[tuple[int, int], int]]]:
    """For every action: its directed channel (src, dst) and its FIFO index k on that channel."""
    result = []
    for stage, program in enumerate(programs):
        counts: dict[tuple[int, int], int] = defaultdict(int)
        send_index: dict[tuple[ActionKind, int], int] = {}
        row = []
        for action in program:
            kind = action.waits if action.kind is K.W else action.kind
            if kind in SEND_KINDS:
                ch = (stage, stage + PEER_OFFSET[kind])
                if action.kind is K.W:
                    k = send_index.get((kind, action.microbatch), -1)
                else:
                    k = send_index[(kind, action.microbatch)] = counts[ch]
                    counts[ch] += 1
            elif kind in RECV_KINDS:
                ch = (stage + PEER_OFFSET[kind], stage)
                k = counts[ch]
                counts[ch] += 1
            else:
                ch, k = (stage, stage), -1
            row.append((ch, k))
        result.append(row)
    return result


def _rendezvous(programs: tuple[tuple[Action, ...], ...], buffered: bool = False) -> list[int] | None:
    """Run the programs under rendezvous semantics; None if all finish, else each stage's stuck position."""
    index = channel_index(programs)
    posted: dict[tuple[int, int], int] = defaultdict(int)
    received: dict[tuple[int, int], int] = defaultdict(int)
    pcs = [0] * len(programs)
    work = list(range(len(programs)))
    while work:
        stage = work.pop()
        program, row, pc = programs[stage], index[stage], pcs[stage]
        while pc < len(program):
            action = program[pc]
            ch, k = row[pc]
            kind = action.kind
            if kind in SEND_KINDS:
                if posted[ch] <= k:
                    posted[ch] = k + 1
                    work.append(ch[1])
                if not (action.asynchronous or buffered) and received[ch] <= k:
                    break
            elif kind in RECV_KINDS:
                if posted[ch] <= k:
                    break
                received[ch] = k + 1
                work.append(ch[0])
            elif kind is K.W and not buffered and received[ch] <= k:
                break
            pc += 1
        pcs[stage] = pc
    if all(pc == len(p) for pc, p in zip(pcs, programs)):
        return None
    return pcs


def link_schedule(schedule: Schedule, stage: int) -> Schedule:
    """The two-stage projection of link (stage, stage+1): only the actions on that link, plus units."""

    def keep(action: Action, s: int, peer: int) -> bool:
        kind = action.waits if action.kind is K.W else action.kind
        return action.is_compute or s + PEER_OFFSET[kind] == peer

    programs = (
        tuple(a for a in schedule.programs[stage] if keep(a, stage, stage + 1)),
        tuple(a for a in schedule.programs[stage + 1] if keep(a, stage + 1, stage)),
    )
    return Schedule(f"{schedule.name}[link {stage}-{stage + 1}]", 2, schedule.micro_batches, (0, 0), programs)


def step_grid(schedule: Schedule, *, compute_only: bool = False) -> str:
    """The schedule as a step x stage grid: each stage runs its next action as soon as it can (unit steps).

    Raises:
        ScheduleError: when the schedule deadlocks (the grid is in the message).
    """
    columns, stuck_at = _lockstep(schedule.programs)
    if any(pc < len(p) for pc, p in zip(stuck_at, schedule.programs)):
        raise ScheduleError(_deadlock_message(schedule))
    if compute_only:
        columns = [[cell if cell[:1] in "FB" else "" for cell in col] for col in columns]
    keep = [i for i in range(len(columns[0])) if any(col[i] not in ("", ".") for col in columns)]
    return format_grid([[col[i] for i in keep] for col in columns], tail_rows=len(keep))


def deadlocks(programs: tuple[tuple[Action, ...], ...], *, buffered_sends: bool = False) -> bool:
    """True if the programs get stuck under rendezvous semantics (no static checks, no message)."""
    return _rendezvous(programs, buffered_sends) is not None


# ------------------------------------------------------------------------------------------------- messages


def _program_grid(schedule: Schedule, marks: dict[int, int]) -> str:
    columns = [[str(a) for a in prog] for prog in schedule.programs]
    error_row = max(marks.values()) if marks else None
    for stage, i in marks.items():
        columns[stage][i] = f"*{columns[stage][i]}*"
    return format_grid(columns, error_row=error_row, row_label="pos")


def _deadlock_message(schedule: Schedule, buffered: bool = False) -> str:
    """Replay in lockstep (one action per stage per step) to draw the step x stage grid of the deadlock."""
    columns, stuck_at = _lockstep(schedule.programs, buffered)
    reasons = []
    for stage, pc in enumerate(stuck_at):
        if pc < len(schedule.programs[stage]):
            action = schedule.programs[stage][pc]
            kind = action.waits if action.kind is K.W else action.kind
            peer = stage + PEER_OFFSET.get(kind, 0)
            reasons.append(f"stage {stage} blocked at {action} (on stage {peer})")
    return (
        f"{schedule.name} S={schedule.stages} M={schedule.micro_batches} r={list(schedule.r)} deadlocks "
        f"under {'buffered' if buffered else 'rendezvous'} sends: {'; '.join(reasons)}\n"
        + format_grid(columns, error_row=len(columns[0]) - 1, row_label="step")
    )


def _lockstep(
    programs: tuple[tuple[Action, ...], ...], buffered: bool = False
) -> tuple[list[list[str]], list[int]]:
    index = channel_index(programs)
    posted: dict[tuple[int, int], int] = defaultdict(int)
    received: dict[tuple[int, int], int] = defaultdict(int)
    pcs = [0] * len(programs)
    columns: list[list[str]] = [[] for _ in programs]
    while True:
        progressed = False
        for stage, program in enumerate(programs):
            pc = pcs[stage]
            cell = "" if pc >= len(program) else "."
            if pc < len(program):
                action = program[pc]
                ch, k = index[stage][pc]
                ok = True
                if action.kind in SEND_KINDS:
                    if posted[ch] <= k:  # posting a send is progress even when the sender must wait
                        posted[ch], progressed = k + 1, True
                    ok = action.asynchronous or buffered or received[ch] > k
                elif action.kind in RECV_KINDS:
                    ok = posted[ch] > k
                    if ok:
                        received[ch] = k + 1
                elif action.kind is K.W:
                    ok = buffered or received[ch] > k
                if ok:
                    pcs[stage], cell, progressed = pc + 1, str(action), True
            columns[stage].append(cell)
        if not progressed:
            break
    for stage, program in enumerate(programs):
        if pcs[stage] < len(program):
            columns[stage][-1] = f"*{program[pcs[stage]]}*"
    return columns, pcs
