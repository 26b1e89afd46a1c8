"""Verifier: 0 deadlocks for 1f1b and ours over the whole sweep; the artifact's ours order deadlocks."""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from envpipe.errors import ScheduleError
from envpipe.ir import Action, ActionKind, Schedule, schedule_from_text
from envpipe.schedules import get_schedule
from envpipe.schedules.one_f_one_b import step_unit
from envpipe.verify import deadlocks, link_schedule, step_grid, verify

K = ActionKind


def artifact_ours(stages: int, micro_batches: int, r: tuple[int, ...], *, kisti: bool = False) -> Schedule:
    """The ATC'23 artifact's ``steps_ours`` order (DeepSpeed 0.7.4 fork), every send blocking.

    Forward step: RecvActivation(m), SendGrad(previous step's micro-batch). Backward step: SendActivation of
    the oldest queued forward output, RecvGrad(m). Forward outputs are queued after each ForwardPass.
    ``kisti``: the KISTI fork's variant (read from its source): the queued activation goes out as an isend
    that is never waited; modelled as waited at the very end of the program.
    """
    programs = []
    for stage in range(stages):
        program: list[Action] = []
        queue: deque[int] = deque()
        never_waited: list[int] = []
        prev = -1
        for step in range(2 * (micro_batches + stages - 1 + max(r))):
            mb, forward = step_unit(step, stage, stages, r[stage])
            valid, prev_valid = 0 <= mb < micro_batches, 0 <= prev < micro_batches
            if forward:
                if valid and stage > 0:
                    program.append(Action(stage, K.RA, mb))
                if prev_valid and stage > 0:
                    program.append(Action(stage, K.SG, prev))
                if valid:
                    program.append(Action(stage, K.F, mb))
                    if stage < stages - 1:
                        queue.append(mb)
            else:
                if queue and stage < stages - 1:
                    program.append(Action(stage, K.SA, queue[0], asynchronous=kisti))
                    never_waited.append(queue.popleft())
                if valid and stage < stages - 1:
                    program.append(Action(stage, K.RG, mb))
                if valid:
                    program.append(Action(stage, K.B, mb))
            prev = mb
        if kisti:
            program += [Action(stage, K.WAIT, mb, waits=K.SA) for mb in never_waited]
        programs.append(tuple(program))
    return Schedule(
        "kisti-ours" if kisti else "artifact-ours", stages, micro_batches, tuple(r), tuple(programs)
    )


def admissible_r(stages: int, micro_batches: int) -> list[tuple[int, ...]]:
    """Every r within the caps (0 <= r_s <= M-(S-s), r_{S-1} = 0) whose warm-up counts do not increase."""
    ranges = [range(0, max(0, micro_batches - (stages - s)) + 1) for s in range(stages - 1)]
    result = []
    for head in itertools.product(*ranges):
        r = (*head, 0)
        w = [min(micro_batches, stages - s + r[s]) for s in range(stages)]
        if all(w[s] <= w[s - 1] for s in range(1, stages)):
            result.append(r)
    return result


def r_for_link(stages: int, micro_batches: int, stage: int, w_here: int, w_next: int) -> tuple[int, ...]:
    """An admissible r whose warm-up counts are ``w_here`` on ``stage`` and ``w_next`` on ``stage + 1``."""
    w = [min(micro_batches, max(w_here, stages - s)) for s in range(stage)] + [w_here, w_next]
    w += [min(micro_batches, stages - s) for s in range(stage + 2, stages)]
    return tuple(max(0, w[s] - (stages - s)) for s in range(stages))


def test_1f1b_never_deadlocks() -> None:
    for stages in range(2, 9):
        for micro_batches in range(stages, 4 * stages + 1):
            report = verify(get_schedule("1f1b", stages, micro_batches))
            assert report.max_outstanding_sends == (0,) * stages
            assert report.max_in_flight == tuple(min(micro_batches, stages - s) for s in range(stages))


def test_ours_every_admissible_r_never_deadlocks() -> None:
    """S 2..8, M S..4S, every r within the caps, through the link decomposition (module docstring of verify).

    A link's two-stage projection depends only on (M, w_s, w_{s+1}), so each is verified once and reused.
    """
    checked: dict[tuple[int, int, int], int] = {}
    for stages in range(2, 9):
        for micro_batches in range(stages, 4 * stages + 1):
            for stage in range(stages - 1):
                for w_here in range(min(micro_batches, stages - stage), micro_batches + 1):
                    low_next = min(micro_batches, stages - stage - 1)
                    highs = [1] if stage + 1 == stages - 1 else range(low_next, w_here + 1)
                    for w_next in highs:
                        key = (micro_batches, w_here, w_next)
                        if key in checked:
                            continue
                        r = r_for_link(stages, micro_batches, stage, w_here, w_next)
                        schedule = get_schedule("ours", stages, micro_batches, r)
                        report = verify(link_schedule(schedule, stage))
                        # Bounded async sends: activations <= w_s on stage s, gradients <= w_s on stage s+1.
                        sa_outstanding, sg_outstanding = report.max_outstanding_sends
                        assert sa_outstanding <= w_here and sg_outstanding <= w_here, (key, report)
                        checked[key] = sg_outstanding
    assert len(checked) > 5000


def test_link_decomposition_agrees_with_the_whole_pipeline() -> None:
    """Exhaustively for small pipelines: global result == all links' results, deadlocking orders included."""
    for stages in range(2, 5):
        for micro_batches in range(stages, 2 * stages + 1):
            for r in admissible_r(stages, micro_batches):
                for schedule in (
                    get_schedule("ours", stages, micro_batches, r),
                    artifact_ours(stages, micro_batches, r),
                ):
                    links = [deadlocks(link_schedule(schedule, s).programs) for s in range(stages - 1)]
                    assert deadlocks(schedule.programs) == any(links), (schedule.name, r)
                verify(get_schedule("ours", stages, micro_batches, r))


def test_artifact_ours_order_deadlocks_with_blocking_sends() -> None:
    schedule = artifact_ours(4, 8, (4, 3, 1, 0))
    with pytest.raises(ScheduleError) as caught:
        verify(schedule)
    message = str(caught.value)
    assert "deadlocks under rendezvous sends" in message
    assert "<-- ERROR HERE" in message and "*0SA4*" in message and "rank 3" in message
    # With r = 0 it is DeepSpeed 0.7.4's receive-first 1F1B, which is deadlock-free.
    verify(artifact_ours(4, 8, (0, 0, 0, 0)))
    # Every r > 0 of the sweep's small corner deadlocks there; ours never does.
    assert all(deadlocks(artifact_ours(3, 6, r).programs) for r in admissible_r(3, 6) if any(r))


def test_facing_blocking_sends_deadlock_with_grid() -> None:
    schedule = schedule_from_text("r0: 0F0 0SA0 0RG0 0B0\nr1: 1RA0 1F0 1B0 1SG0")
    verify(schedule)
    bad = schedule_from_text(
        "r0: 0F0 0F1 0SA0 0SA1 0RG0 0B0 0RG1 0B1\nr1: 1RA0 1F0 1B0 1SG0 1RA1 1F1 1B1 1SG1"
    )
    with pytest.raises(ScheduleError, match="rank 0 blocked at 0SA1.*rank 1 blocked at 1SG0") as caught:
        verify(bad)
    assert "<-- ERROR HERE" in str(caught.value)
    # The same order with async sends waited late runs.
    fixed = schedule_from_text(
        "r0: 0F0 0iSA0 0F1 0iSA1 0RG0 0wSA0 0B0 0RG1 0wSA1 0B1\n"
        "r1: 1RA0 1F0 1B0 1iSG0 1RA1 1F1 1B1 1iSG1 1wSG0 1wSG1"
    )
    assert verify(fixed).max_outstanding_sends == (2, 2)
    with pytest.raises(ScheduleError, match="more than max_outstanding_sends=1"):
        verify(fixed, max_outstanding_sends=1)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("r0: 0F0 0SA0 0RG0 0B0\nr1: 1F0 1B0 1SG0", "stage 1 has 0 RA0"),
        ("r0: 0F0 0SA0 0RG0 0B0\nr1: 1RA0 1F0 1B0 1SG0 1F0", "runs F0 2 times"),
        ("r0: 0F0 0SA0 0RG0 0B0\nr1: 1RA0 1B0 1F0 1SG0", "runs B0 before F0"),
        ("r0: 0SA0 0F0 0RG0 0B0\nr1: 1RA0 1F0 1B0 1SG0", "SA0 must come after F0"),
        (
            "r0: 0F0 0SA0 0F1 0SA1 0RG0 0B0 0RG1 0B1\nr1: 1RA1 1F1 1RA0 1F0 1B0 1SG0 1B1 1SG1",
            "send #0 is SA0 but",
        ),
        ("r0: 0F0 0iSA0 0RG0 0B0\nr1: 1RA0 1F0 1B0 1SG0", "must be waited exactly once"),
        ("r0: 0F0 0iSA0 0RG0 0B0 0wSA0\nr1: 1RA0 1F0 1B0 1SG0", "before its async send is waited"),
        ("r0: 0F0 0SA0 0RG0 0wSA0 0B0\nr1: 1RA0 1F0 1B0 1SG0", "waits on no earlier async send"),
    ],
)
def test_static_errors_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ScheduleError, match=why) as caught:
        verify(schedule_from_text(text))
    assert "rank 0" in str(caught.value)  # the grid is attached


def test_step_grid_shows_a_runnable_schedule_step_by_step() -> None:
    grid = step_grid(get_schedule("1f1b", 2, 2))
    lines = grid.splitlines()
    assert lines[0].split() == ["step", "|", "rank", "0", "rank", "1"]
    assert lines[2].split() == ["0", "|", "0F0", "."]
    assert lines[-1].split() == ["9", "|", "0B1"]
    compute = step_grid(get_schedule("ours", 3, 4), compute_only=True)
    assert "RA" not in compute and compute.count("F") == 12 and compute.count("B") == 12
    with pytest.raises(ScheduleError, match="<-- ERROR HERE"):
        step_grid(artifact_ours(2, 4, (1, 0)))


def test_published_orders_fail_where_their_authors_saw_it() -> None:
    """The artifact relies on transport buffering; the KISTI fork deadlocks for non-monotone r regardless."""
    artifact = artifact_ours(4, 8, (4, 3, 1, 0))
    assert deadlocks(artifact.programs) and not deadlocks(artifact.programs, buffered_sends=True)
    for r in admissible_r(4, 8):
        kisti = artifact_ours(4, 8, r, kisti=True)
        # Monotone in effect: r_s <= r_{s-1} wherever stage s is not at the M cap (warm-up w_s = M).
        warm = [min(8, 4 - s + r[s]) for s in range(4)]
        monotone = all(warm[s] < warm[s - 1] or warm[s] == 8 for s in range(1, 4))
        assert deadlocks(kisti.programs) != monotone, r
        if not monotone:
            assert deadlocks(kisti.programs, buffered_sends=True), r
        verify(get_schedule("ours", 4, 8, r))
        verify(get_schedule("ours", 4, 8, r), buffered_sends=True)
    # KISTI's never-waited isends also free activations that may still be in flight.
    with pytest.raises(ScheduleError, match="B0 reuses the output of F0 before its async send is waited"):
        verify(artifact_ours(3, 6, (0, 1, 0), kisti=True), buffered_sends=True)
    # Waiting for a gradient before sending the activation it needs deadlocks with any buffering.
    with pytest.raises(ScheduleError, match="deadlocks under buffered sends"):
        verify(schedule_from_text("r0: 0F0 0RG0 0SA0 0B0\nr1: 1RA0 1F0 1B0 1SG0"), buffered_sends=True)
