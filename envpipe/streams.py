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
        label: how messages name it (the IR action's text, or ``wait <label>``).
        parts: the transfers of a p2p operation (several for a batched group); empty otherwise.
        after: id of the compute-stream operation this p2p operation was issued behind (None: none).
        waits_for: for a wait on the compute stream: id of the p2p operation it waits for.
        comm: the stream key the transfers match on (same on both ranks).
    """

    rank: int
    stream: str
    label: str
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

    def compute(self, rank: int, label: str) -> int:
        """A unit on ``rank``'s compute stream."""
        return self.add(Op(rank, COMPUTE, label))

    def p2p(self, rank: int, stream: str, comm: tuple[int, int], label: str, parts: tuple[Part, ...]) -> int:
        """A transfer (or a batched group of them) on ``rank``'s stream ``stream``, behind its compute work;
        transfers match (FIFO) with those of the same ``comm`` key on the peer."""
        tail = self.streams.get((rank, COMPUTE))
        return self.add(Op(rank, stream, label, parts, after=tail[-1] if tail else None, comm=comm))

    def wait(self, rank: int, op_id: int) -> int:
        """Make ``rank``'s compute stream wait for operation ``op_id``."""
        return self.add(Op(rank, COMPUTE, f"wait {self.ops[op_id].label}", waits_for=op_id))


def lower(schedule: Schedule, transport: str = DEFAULT_TRANSPORT) -> Issue:
    """What each rank issues for ``schedule`` on ``transport`` (unbatched isend/irecv, as the engine)."""
    kind_of = get_transport(transport)
    stage_rank = schedule.stage_rank
    issue = Issue()
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
                issue.compute(rank, str(action))
                continue
            peer = stage_rank[stage + PEER_OFFSET[action.kind]]
            send = action.kind in SEND_KINDS
            src, dst = (rank, peer) if send else (peer, rank)
            if peer == rank:  # both stages on one rank (ZB-V's turn): a local copy, no stream
                if send and action.asynchronous:
                    pending[(stage, action.kind.value, action.microbatch)] = None
                continue
            comm = kind_of.stream(src, dst)
            name = f"p2p {comm[0]}{'->' if kind_of.directed else '<->'}{comm[1]}"
            op = issue.p2p(rank, name, comm, str(action), (Part(send, src, dst),))
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


def check(schedule: Schedule, transport: str = DEFAULT_TRANSPORT) -> None:
    """Raise :class:`ScheduleError` naming the cycle when ``schedule`` can hang on ``transport`` on GPUs."""
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
    return f"rank {op.rank} {op.stream}: {op.label}"


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
