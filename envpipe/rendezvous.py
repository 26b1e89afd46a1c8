"""The communication model every schedule is checked under: FIFO channels and rendezvous sends.

Matching is FIFO per directed pair of stages; a blocking send completes only when the peer has received it
(no buffering at all); an async send is posted at once and its wait completes when the peer has received
it; receives block until the matching send is posted. A schedule that runs here runs with any amount of
transport buffering. Programs are per rank (a rank may hold several stages); every action names its stage.
"""

from __future__ import annotations

from collections import defaultdict

from envpipe.ir import PEER_OFFSET, RECV_KINDS, SEND_KINDS, Action, ActionKind, stage_ranks

K = ActionKind
Channel = tuple[int, int]
"""A directed pair of stages (source stage, destination stage); ``(s, s)`` for actions on no channel."""


def talks_to(action: Action) -> int | None:
    """The peer stage of a communication action (a wait: of the send it waits for); None for units."""
    kind = action.waits if action.kind is K.WAIT else action.kind
    offset = PEER_OFFSET.get(kind)
    return None if offset is None else action.stage + offset


def channel_index(programs: tuple[tuple[Action, ...], ...]) -> list[list[tuple[Channel, int]]]:
    """For every action: its directed channel (src stage, dst stage) and its FIFO index k on that channel."""
    result = []
    for program in programs:
        # Sends and receives are counted apart: with a V placement (ZB-V) both ends of a channel can be
        # on one rank, and its k-th send must still pair with its k-th receive.
        counts: dict[tuple[Channel, bool], int] = defaultdict(int)
        send_index: dict[tuple[int, ActionKind, int], int] = {}
        row = []
        for action in program:
            kind = action.waits if action.kind is K.WAIT else action.kind
            stage = action.stage
            if kind in SEND_KINDS:
                ch = (stage, stage + PEER_OFFSET[kind])
                if action.kind is K.WAIT:
                    k = send_index.get((stage, kind, action.microbatch), -1)
                else:
                    k = send_index[(stage, kind, action.microbatch)] = counts[(ch, True)]
                    counts[(ch, True)] += 1
            elif kind in RECV_KINDS:
                ch = (stage + PEER_OFFSET[kind], stage)
                k = counts[(ch, False)]
                counts[(ch, False)] += 1
            else:
                ch, k = (stage, stage), -1
            row.append((ch, k))
        result.append(row)
    return result


def run(programs: tuple[tuple[Action, ...], ...], buffered: bool = False) -> list[int] | None:
    """Run the programs under rendezvous semantics; None if all finish, else each rank's stuck position."""
    index = channel_index(programs)
    owner = stage_ranks(programs)
    posted: dict[Channel, int] = defaultdict(int)
    received: dict[Channel, int] = defaultdict(int)
    pcs = [0] * len(programs)
    work = list(range(len(programs)))
    while work:
        rank = work.pop()
        program, row, pc = programs[rank], index[rank], pcs[rank]
        while pc < len(program):
            action = program[pc]
            ch, k = row[pc]
            done, posts = _step(action, ch, k, posted, received, buffered)
            if posts and ch[1] in owner:
                work.append(owner[ch[1]])
            if not done:
                break
            if action.kind in RECV_KINDS and ch[0] in owner:
                work.append(owner[ch[0]])
            pc += 1
        pcs[rank] = pc
    if all(pc == len(p) for pc, p in zip(pcs, programs)):
        return None
    return pcs


def _step(
    action: Action, ch: Channel, k: int, posted: dict[Channel, int], received: dict[Channel, int], buffered: bool
) -> tuple[bool, bool]:
    """Try ``action`` (the k-th on channel ``ch``): whether it completes, and whether it newly posted a send."""
    if action.kind in SEND_KINDS:
        posts = posted[ch] <= k
        if posts:
            posted[ch] = k + 1
        return action.asynchronous or buffered or received[ch] > k, posts
    if action.kind in RECV_KINDS:
        if posted[ch] <= k:
            return False, False
        received[ch] = k + 1
        return True, False
    if action.kind is K.WAIT:
        return buffered or received[ch] > k, False
    return True, False


def deadlocks(programs: tuple[tuple[Action, ...], ...], *, buffered_sends: bool = False) -> bool:
    """True if the programs get stuck under rendezvous semantics (no static checks, no message)."""
    return run(programs, buffered_sends) is not None


def lockstep(
    programs: tuple[tuple[Action, ...], ...], buffered: bool = False
) -> tuple[list[list[str]], list[int]]:
    """Replay with one action per rank per step: the text columns of the step x rank grid, and the pcs.

    A rank that cannot run its next action this step shows ``.``; a finished rank shows an empty cell. A
    rank stuck at the end has its blocking action marked ``*0SA4*``.
    """
    index = channel_index(programs)
    posted: dict[Channel, int] = defaultdict(int)
    received: dict[Channel, int] = defaultdict(int)
    pcs = [0] * len(programs)
    columns: list[list[str]] = [[] for _ in programs]
    while True:
        progressed = False
        for rank, program in enumerate(programs):
            pc = pcs[rank]
            cell = "" if pc >= len(program) else "."
            if pc < len(program):
                action = program[pc]
                ch, k = index[rank][pc]
                ok, posts = _step(action, ch, k, posted, received, buffered)
                progressed |= posts  # posting a send is progress even when the sender must wait
                if ok:
                    pcs[rank], cell, progressed = pc + 1, str(action), True
            columns[rank].append(cell)
        if not progressed:
            break
    for rank, program in enumerate(programs):
        if pcs[rank] < len(program):
            columns[rank][-1] = f"*{program[pcs[rank]]}*"
    return columns, pcs
