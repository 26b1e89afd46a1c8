"""The GPU's view of a schedule's p2p: streams, issue order and rendezvous. Would it hang under NCCL?

The rendezvous verifier (``envpipe.verify``) lets an async send progress on its own. On GPUs it does not:
PyTorch issues every NCCL transfer on a stream, and what a transport decides is which one
(``envpipe.transports``). This module models, per rank:

* one compute stream running the rank's units (F, I, W, B) in program order;
* one p2p stream per transport stream key (``link``: per direction of a link; ``pair``: per neighbour, both
  directions) running its transfers in issue order;
* each transfer is issued after the compute work issued before it (PyTorch makes the NCCL stream wait for
  the current stream), and a wait (a blocking send or receive, or ``wSA3``) makes the compute stream wait
  for the transfer: later units and later transfers of that rank come after it;
* rendezvous: a send completes only when its receive (FIFO per stream and direction) has started, and
  the receive completes with it; nothing is buffered (a Llama-7B activation at sequence 2048 is 16 MiB,
  four times NCCL's default staging buffer);
* a batched group (``batch_isend_irecv``) starts as one operation and completes when all its transfers
  have met their partners (the parts of a group never block each other, as NCCL documents).

The CPU issues everything without blocking (a CPU that blocks on a wait would only issue later work later,
which the stream dependencies above already impose). A schedule hangs when some operation never
completes; :func:`check` then names the cycle of operations waiting on each other.

NCCL matches transfers FIFO per communicator and direction, so on a stream shared by several stage links
(``pair`` with several stages per rank) the k-th send from rank a to rank b must carry the message the
k-th receive of b from a expects; per-stage pairing does not imply it. :func:`check_routes` checks it.

When the rendezvous run already passed, ``link`` cannot hang: each of its streams (one direction of one
stage link) holds only sends on one rank and only receives on the other, both in program order. So send k starts
once its rank's compute stream has passed the work issued before it (send k-1 completed with receive k-1,
which precedes receive k on the peer's stream), and receive k completes exactly when the sender has
reached send k: the rendezvous verifier's blocking receive. A send completes exactly when its receive has
started: the verifier's "received". Receives are always blocking in the IR, so a later send waiting for an
earlier one never delays anything the verifier lets run. ``envpipe.verify`` relies on this (the stream run
is kept for undirected transports and for :func:`check`; tests/envpipe/test_streams.py checks agreement).

Plain Python: no torch. Interleaved schedules (a rank holding several stages) are handled: peers are
found through the schedule's stage -> rank map.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from envpipe.errors import ScheduleError
from envpipe.ir import PEER_OFFSET, RECV_KINDS, SEND_KINDS, ActionKind, Schedule
from envpipe.transports import DEFAULT_TRANSPORT, get_transport

COMPUTE = "compute"


@dataclass(frozen=True)
class Part:
    """One transfer of a p2p operation: ``send`` from ``src`` to ``dst`` (global ranks), or the receive."""

    send: bool
    src: int
    dst: int


@dataclass
class Op:
    """An operation on one of a rank's streams.

    Attributes:
        rank: the issuing rank.
        stream: ``"compute"`` or the p2p stream's name.
        label: how messages name it: the IR action (printed only in a message) or a string; a wait is
            named after the operation it waits for.
        parts: the transfers of a p2p operation (several for a batched group); empty otherwise.
        after: id of the compute-stream operation this p2p operation was issued behind (None: none).
        waits_for: for a wait on the compute stream: id of the p2p operation it waits for.
        comm: the stream key the transfers match on (same on both ranks).
    """

    rank: int
    stream: str
    label: object
    parts: tuple[Part, ...] = ()
    after: int | None = None
    waits_for: int | None = None
    comm: tuple[int, int] | None = None


@dataclass
class Issue:
    """What the ranks issue, in order: ``ops`` by id, and each rank's streams as lists of ids."""

    ops: list[Op] = field(default_factory=list)
    streams: dict[tuple[int, str], list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, op: Op) -> int:
        """Append ``op`` to its stream; returns its id."""
        self.ops.append(op)
        self.streams[(op.rank, op.stream)].append(len(self.ops) - 1)
        return len(self.ops) - 1

    def compute(self, rank: int, label: object) -> int:
        """A unit on ``rank``'s compute stream."""
        return self.add(Op(rank, COMPUTE, label))

    def p2p(self, rank: int, stream: str, comm: tuple[int, int], label: object, parts: tuple[Part, ...]) -> int:
        """A transfer (or a batched group of them) on ``rank``'s stream ``stream``, behind its compute work;
        transfers match (FIFO) with those of the same ``comm`` key on the peer."""
        tail = self.streams.get((rank, COMPUTE))
        return self.add(Op(rank, stream, label, parts, after=tail[-1] if tail else None, comm=comm))

    def wait(self, rank: int, op_id: int) -> int:
        """Make ``rank``'s compute stream wait for operation ``op_id``."""
        return self.add(Op(rank, COMPUTE, "wait", waits_for=op_id))


def lower(schedule: Schedule, transport: str = DEFAULT_TRANSPORT) -> Issue:
    """What each rank issues for ``schedule`` on ``transport`` (unbatched isend/irecv, as the engine)."""
    kind_of = get_transport(transport)
    stage_rank = schedule.stage_rank
    issue = Issue()
    routes: dict[tuple[int, int, bool], tuple[str, tuple[int, int], tuple[Part, ...]]] = {}  # by stage pair
    for rank, program in enumerate(schedule.programs):
        # (stage, send kind, micro-batch) -> async send op; None for a local copy (nothing to wait for)
        pending: dict[tuple[int, str, int], int | None] = {}
        for action in program:
            stage = action.stage
            if action.kind is ActionKind.WAIT:  # wait for an earlier async send
                op = pending.pop((stage, action.waits.value, action.microbatch))
                if op is not None:
                    issue.wait(rank, op)
                continue
            if action.is_compute:
                issue.compute(rank, action)
                continue
            peer_stage = stage + PEER_OFFSET[action.kind]
            peer = stage_rank[peer_stage]
            send = action.kind in SEND_KINDS
            src, dst = (rank, peer) if send else (peer, rank)
            if peer == rank:  # both stages on one rank (ZB-V's turn): a local copy, no stream
                if send and action.asynchronous:
                    pending[(stage, action.kind.value, action.microbatch)] = None
                continue
            src_stage, dst_stage = (stage, peer_stage) if send else (peer_stage, stage)
            route = routes.get((src_stage, dst_stage, send))
            if route is None:  # stream name, stream key and the transfer, shared by every op of the route
                comm = kind_of.stream(src_stage, dst_stage, src, dst)
                arrow = "->" if kind_of.directed else "<->"
                name = f"p2p {'stage ' if kind_of.per_stage else ''}{comm[0]}{arrow}{comm[1]}"
                route = routes[(src_stage, dst_stage, send)] = (name, comm, (Part(send, src, dst),))
            op = issue.p2p(rank, route[0], route[1], action, route[2])
            if send and action.asynchronous:
                pending[(stage, action.kind.value, action.microbatch)] = op
            elif send or action.kind in RECV_KINDS:
                issue.wait(rank, op)
    return issue


def find_hang(issue: Issue) -> list[str] | None:
    """Run the streams; None if every operation completes, else the cycle of waits, one line per step."""
    ops = issue.ops
    partner = _partners(issue)
    started = [False] * len(ops)
    done = [False] * len(ops)
    heads = {key: 0 for key in issue.streams}
    progress = True
    while progress:
        progress = False
        for key, queue in issue.streams.items():
            while heads[key] < len(queue):
                i = queue[heads[key]]
                op = ops[i]
                if not started[i]:
                    if op.after is not None and not done[op.after]:
                        break
                    started[i] = progress = True
                if op.waits_for is not None:
                    done[i] = done[op.waits_for]
                elif op.parts:
                    done[i] = all(p is not None and started[p] for p in partner[i])
                else:
                    done[i] = True
                if not done[i]:
                    break
                heads[key] += 1
                progress = True
    if all(done):
        return None
    return _cycle(issue, partner, started, done, heads)


def check_routes(schedule: Schedule, transport: str = DEFAULT_TRANSPORT) -> None:
    """Raise :class:`ScheduleError` when the k-th transfer on one of ``transport``'s streams is not the
    message the k-th receive there expects (NCCL matches in order per communicator and direction).

    Per-stage pairing (``envpipe.verify``) implies it for ``link``; on ``pair`` the stages a rank holds share
    its streams, so their transfers must be ordered alike on both ranks.
    """
    kind_of = get_transport(transport)
    sent: dict[tuple, list] = defaultdict(list)
    received: dict[tuple, list] = defaultdict(list)
    stage_rank = schedule.stage_rank
    for rank, program in enumerate(schedule.programs):
        for action in program:
            if action.kind not in SEND_KINDS and action.kind not in RECV_KINDS:
                continue
            peer_stage = action.stage + PEER_OFFSET[action.kind]
            peer = stage_rank[peer_stage]
            if peer == rank:
                continue
            if action.kind in SEND_KINDS:  # message = (from stage, to stage, micro-batch)
                message = (action.stage, peer_stage, action.microbatch)
                sent[(kind_of.stream(*message[:2], rank, peer), rank, peer)].append((message, action))
            else:
                message = (peer_stage, action.stage, action.microbatch)
                received[(kind_of.stream(*message[:2], peer, rank), peer, rank)].append((message, action))
    for (comm, src, dst), sends in sent.items():
        for k, ((message, send), (expected, recv)) in enumerate(zip(sends, received.get((comm, src, dst), []))):
            if message != expected:
                raise ScheduleError(
                    f"{schedule.name}: on the {transport!r} transport, transfer #{k} from rank {src} to rank {dst} "
                    f"is {send} but the receive it meets on rank {dst} (NCCL matches in order per stream) is "
                    f"{recv}: on GPUs the data would be swapped or the streams hang; use the 'link' transport "
                    "(one stream per stage link) or order both stages' transfers alike on the two ranks"
                )


def check(schedule: Schedule, transport: str = DEFAULT_TRANSPORT) -> None:
    """Raise :class:`ScheduleError` when ``schedule`` can go wrong on ``transport``'s GPU streams: a transfer
    meets the wrong receive (:func:`check_routes`) or the streams hang (naming the cycle)."""
    check_routes(schedule, transport)
    cycle = find_hang(lower(schedule, transport))
    if cycle is not None:
        raise ScheduleError(
            f"{schedule.name} S={schedule.stages} M={schedule.micro_batches} r={list(schedule.r)} hangs on "
            f"GPUs with the {transport!r} p2p transport (NCCL streams, rendezvous sends); the cycle:\n  "
            + "\n  ".join(cycle)
            + "\nuse the 'link' transport (one stream per direction of each link)"
        )


# ------------------------------------------------------------------------------------------------ internals


def _partners(issue: Issue) -> list[list[int | None]]:
    """For each operation, the operation holding the partner of each of its transfers (FIFO per stream key
    and direction; None when the other rank never issues it)."""
    sends: dict[tuple, list[int]] = defaultdict(list)
    recvs: dict[tuple, list[int]] = defaultdict(list)
    position: list[list[tuple[tuple, int, bool]]] = []
    for i, op in enumerate(issue.ops):
        row = []
        for part in op.parts:
            channel = (op.comm, part.src, part.dst)
            book = sends if part.send else recvs
            row.append((channel, len(book[channel]), part.send))
            book[channel].append(i)
        position.append(row)
    result: list[list[int | None]] = []
    for row in position:
        found: list[int | None] = []
        for channel, k, send in row:
            other = recvs[channel] if send else sends[channel]
            found.append(other[k] if k < len(other) else None)
        result.append(found)
    return result


def _describe(issue: Issue, i: int) -> str:
    op = issue.ops[i]
    label = f"wait {issue.ops[op.waits_for].label}" if op.waits_for is not None else op.label
    return f"rank {op.rank} {op.stream}: {label}"


def _blocker(issue: Issue, partner, started, done, heads, i: int) -> tuple[str, int | None]:
    op = issue.ops[i]
    queue = issue.streams[(op.rank, op.stream)]
    head = queue[heads[(op.rank, op.stream)]] if heads[(op.rank, op.stream)] < len(queue) else None
    if head is not None and head != i:
        return "is queued behind", head
    if not started[i]:
        return "waits for the compute work issued before it,", op.after
    if op.waits_for is not None:
        return "waits for", op.waits_for
    for p, part in zip(partner[i], op.parts):
        if p is None:
            other = "receive" if part.send else "send"
            return f"has no matching {other} on rank {part.dst if part.send else part.src}", None
        if not started[p]:
            return f"waits for its {'receive' if part.send else 'send'}", p
    return "is stuck", None


def _cycle(issue: Issue, partner, started, done, heads) -> list[str]:
    """Follow "waits for" from a stuck operation until one repeats: that loop is the hang."""
    stuck = next(i for i, d in enumerate(done) if not d)
    seen: dict[int, int] = {}
    path: list[tuple[int, str]] = []
    i: int | None = stuck
    while i is not None and i not in seen:
        seen[i] = len(path)
        verb, nxt = _blocker(issue, partner, started, done, heads, i)
        path.append((i, verb))
        i = nxt
    loop = path[seen[i] :] if i is not None else path
    lines = [f"{_describe(issue, j)} {verb}" for j, verb in loop]
    if i is not None:
        lines.append(f"{_describe(issue, i)} (the start of the cycle)")
    return lines
