"""The GPU stream model: which schedule + transport hangs under NCCL, and the cycle it names."""

from __future__ import annotations

import pytest

from envpipe.errors import ConfigError, ScheduleError
from envpipe.schedules import get_schedule
from envpipe.ir import schedule_from_text
from envpipe.streams import Issue, Part, check, check_routes, find_hang, lower
from envpipe.transports import TRANSPORTS, get_transport
from envpipe.verify import deadlocks
from tests.envpipe.test_verify import admissible_r


def test_the_issue_example_hangs_on_pair_with_its_cycle() -> None:
    """S=2, M=2: stage 0's pair stream holds SA0 SA1 RG0 RG1, stage 1's RA0 SG0 RA1 SG1."""
    with pytest.raises(ScheduleError) as err:
        check(get_schedule("ours", 2, 2, [0, 0]), "pair")
    text = str(err.value)
    assert "hangs on GPUs with the 'pair' p2p transport" in text
    cycle = text.split("the cycle:\n")[1].splitlines()
    assert [line.strip() for line in cycle[:4]] == [
        "rank 0 p2p 0<->1: 0iSA1 waits for its receive",
        "rank 1 p2p 0<->1: 1RA1 is queued behind",
        "rank 1 p2p 0<->1: 1iSG0 waits for its receive",
        "rank 0 p2p 0<->1: 0RG0 is queued behind",
    ]
    assert "use the 'link' transport" in text


def test_1f1b_passes_on_every_transport_and_ours_only_on_link() -> None:
    for stages in range(2, 5):
        for micro_batches in range(stages, 2 * stages + 1):
            for transport in TRANSPORTS:
                check(get_schedule("1f1b", stages, micro_batches), transport)
            for r in admissible_r(stages, micro_batches):
                ours = get_schedule("ours", stages, micro_batches, r)
                check(ours, "link")
                # today's transport: every ours with M >= 2 hangs (here M >= S >= 2)
                assert find_hang(lower(ours, "pair")) is not None, r


def test_verify_checks_the_transport_and_link_reduces_to_its_rendezvous_sweep() -> None:
    """``envpipe.verify.verify`` checks ``link`` by default: its routes, and its streams through the
    reduction to the rendezvous run (streams module docstring), so the sweep over every admissible r
    (S 2..8, M S..4S, tests/envpipe/test_verify.py) covers ``link``. Here the stream run itself confirms
    it on the full pipelines at the extremes of r, and ``pair`` is simulated and refused."""
    import inspect

    from envpipe.verify import verify

    assert inspect.signature(verify).parameters["transport"].default == "link"
    with pytest.raises(ScheduleError, match="hangs on GPUs with the 'pair' p2p transport"):
        verify(get_schedule("ours", 3, 6, [1, 0, 0]), transport="pair")
    for stages in range(2, 9):
        for micro_batches in (stages, 2 * stages, 4 * stages):
            most = [micro_batches - (stages - s) for s in range(stages - 1)] + [0]  # w_s = M everywhere
            for r in ([0] * stages, most):
                assert find_hang(lower(get_schedule("ours", stages, micro_batches, r), "link")) is None


def test_routes_a_shared_stream_must_carry_messages_in_the_order_they_are_received() -> None:
    """Two stages per rank: rank 0 sends stage 0's activation, then stage 2's, but rank 1 receives stage 2's
    first. Per stage both pairings are fine, and on ``link`` (a stream per stage link) so is the order; on
    ``pair`` both share one stream, NCCL matches in order, so the data would be swapped."""
    swapped = schedule_from_text("r0: 0F0 0iSA0 2F0 2iSA0\nr1: 3RA0 3F0 1RA0 1F0")
    check_routes(swapped, "link")
    with pytest.raises(ScheduleError, match="transfer #0 from rank 0 to rank 1 is 0iSA0 but the receive it meets"):
        check_routes(swapped, "pair")
    check_routes(schedule_from_text("r0: 0F0 0iSA0 2F0 2iSA0\nr1: 1RA0 1F0 3RA0 3F0"), "pair")


def test_on_link_the_stream_model_agrees_with_the_rendezvous_verifier() -> None:
    """One stream per direction holds only sends on one side and receives on the other, in the same order:
    exactly the rendezvous model. Checked on orders that do deadlock (blocking sends facing each other)."""
    verdicts = []
    for stages in range(2, 5):
        for micro_batches in range(stages, 2 * stages + 1):
            for r in admissible_r(stages, micro_batches)[:6]:
                schedule = get_schedule("ours", stages, micro_batches, r)
                blocking = tuple(
                    tuple(type(a)(a.stage, a.kind, a.microbatch) if a.asynchronous else a for a in prog if a.waits is None)
                    for prog in schedule.programs
                )
                blocked = type(schedule)("blocking", stages, micro_batches, schedule.r, blocking)
                for candidate in (blocked, get_schedule("1f1b", stages, micro_batches)):
                    hangs = find_hang(lower(candidate, "link")) is not None
                    assert hangs == deadlocks(candidate.programs), (candidate.name, r)
                    verdicts.append(hangs)
    assert True in verdicts and False in verdicts


def test_a_batched_group_progresses_as_one() -> None:
    """Two ranks exchanging (each sends, then receives): unbatched on one stream it hangs; as one
    ``batch_isend_irecv`` group on each rank it completes, as NCCL documents for sendrecv."""

    def exchange(batched: bool) -> Issue:
        issue = Issue()
        for rank, peer in ((0, 1), (1, 0)):
            send, recv = Part(True, rank, peer), Part(False, peer, rank)
            if batched:
                issue.wait(rank, issue.p2p(rank, "group", (0, 1), "sendrecv", (send, recv)))
            else:
                first = issue.p2p(rank, "pair", (0, 1), "send", (send,))
                issue.p2p(rank, "pair", (0, 1), "recv", (recv,))
                issue.wait(rank, first)
        return issue

    cycle = find_hang(exchange(batched=False))
    assert cycle is not None and "send waits for its receive" in cycle[0]
    assert find_hang(exchange(batched=True)) is None


def test_a_transfer_waits_for_the_compute_issued_before_it() -> None:
    """Rank 0 sends after a unit that waits for rank 1, which sends only after rank 0's send: a cycle
    through the compute stream, even on separate p2p streams."""
    issue = Issue()
    recv0 = issue.p2p(0, "in", (1, 0), "RG0", (Part(False, 1, 0),))
    issue.wait(0, recv0)
    issue.compute(0, "B0")
    issue.p2p(0, "out", (0, 1), "SA1", (Part(True, 0, 1),))
    recv1 = issue.p2p(1, "in", (0, 1), "RA1", (Part(False, 0, 1),))
    issue.wait(1, recv1)
    issue.p2p(1, "out", (1, 0), "SG0", (Part(True, 1, 0),))
    cycle = find_hang(issue)
    assert cycle is not None
    assert any("waits for the compute work issued before it" in line for line in cycle)


def test_unknown_transport_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown p2p transport 'nccl'; choose one of link, pair"):
        get_transport("nccl")


def test_interleaved_ranks_holding_several_stages_pass_on_link() -> None:
    """Interleaved 1F1B (v stages per rank, the wrap-around link from the last rank back to rank 0): safe on
    ``link``; on ``pair`` a rank's two chunks share one stream per neighbour and it hangs."""
    hangs_on_pair = []
    for ranks in (2, 3, 4):
        for virtual in (2, 3):
            for micro_batches in (ranks, 2 * ranks):
                schedule = get_schedule("interleaved", ranks * virtual, micro_batches, virtual_stages=virtual)
                check(schedule, "link")
                hangs_on_pair.append(find_hang(lower(schedule, "pair")) is not None)
    assert any(hangs_on_pair)
    cycle = find_hang(lower(get_schedule("interleaved", 4, 2, virtual_stages=2), "pair"))
    assert cycle is not None and cycle[0] == "rank 0 p2p 0<->1: 0iSA1 waits for its receive"
    assert "2RA0 is queued behind" in cycle[3]  # stage 2 (rank 0's second chunk) behind stage 0's send


def test_a_send_between_two_stages_of_one_rank_is_a_local_copy_with_nothing_to_wait_for() -> None:
    """ZB-V's turn: stages 1 and 2 both on rank 1; the async send 1iSA0 and its wait 1wSA0 have no stream."""
    schedule = schedule_from_text(
        "r0: 0F0 0iSA0 0RG0 0wSA0 0B0\n"
        "r1: 1RA0 1F0 1iSA0 2RA0 2F0 2B0 2iSG0 1RG0 1wSA0 1B0 1iSG0 2wSG0 1wSG0\n"
    )
    assert not deadlocks(schedule.programs)
    issue = lower(schedule, "link")
    assert all(str(op.label) != "1iSA0" for op in issue.ops if op.parts)  # no p2p operation for it
    check(schedule, "link")
    check(schedule, "pair")
