"""Pipeline schedule IR: actions (compute and point-to-point communication) and per-rank programs.

A :class:`Schedule` holds, for every rank, the ordered tuple of actions that rank executes in one
iteration. A rank may hold several pipeline stages (interleaved schedules); every action names its stage,
as in torch's pipelining (``2F0``: stage 2, forward of micro-batch 0). Actions print compactly and parse
back exactly::

    0F3       stage 0: forward of micro-batch 3        0B3     full backward (input and weight gradients)
    0I3       backward-input only (gradient of the stage's input)     0W3     backward-weight only
    0F3@1410  the same forward, run at 1410 MHz
    1RA3      stage 1 receives activation 3 (from stage 0)   0RG3    stage 0 receives gradient 3 (from 1)
    0SA3      blocking send of activation 3 (to stage 1)     1SG3    blocking send of gradient 3 (to 0)
    0iSA3     async send (isend) of activation 3             0wSA3   wait for that async send (kind WAIT)

Semantics the verifier and the training engine share: a blocking send completes only when the peer has
posted the matching receive (rendezvous, as gloo ``send``); an async send returns at once and its wait
action blocks until the peer has received it; receives block until the data is there. Matching is FIFO
per directed pair of stages, so the k-th ``SA`` of stage s pairs with the k-th ``RA`` of stage s+1 (one
stage per rank: per directed pair of ranks, which is what gloo and NCCL give).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import Enum

from envpipe.errors import ScheduleError


class ActionKind(str, Enum):
    """What an action does; the value is its text form (torch's pipelining names the compute kinds alike)."""

    F = "F"  # forward
    I = "I"  # backward-input: the gradient of the stage's input only (torch: I)
    W = "W"  # backward-weight: the weight gradients only (torch: W)
    B = "B"  # full backward: input and weight gradients in one unit (torch: B)
    SA = "SA"  # send activation (to stage+1)
    RA = "RA"  # receive activation (from stage-1)
    SG = "SG"  # send gradient (to stage-1)
    RG = "RG"  # receive gradient (from stage+1)
    WAIT = "WAIT"  # wait for an earlier async send (text: ``wSA3`` / ``wSG3``)

    def __str__(self) -> str:
        return self.value


COMPUTE_KINDS = frozenset({ActionKind.F, ActionKind.I, ActionKind.W, ActionKind.B})
BACKWARD_KINDS = frozenset({ActionKind.I, ActionKind.W, ActionKind.B})
SEND_KINDS = frozenset({ActionKind.SA, ActionKind.SG})
RECV_KINDS = frozenset({ActionKind.RA, ActionKind.RG})
# Which neighbour each communication kind talks to, as a stage offset.
PEER_OFFSET = {ActionKind.SA: +1, ActionKind.RG: +1, ActionKind.RA: -1, ActionKind.SG: -1}
# The receive that matches each send kind, and the reverse.
MATCHING = {
    ActionKind.SA: ActionKind.RA,
    ActionKind.SG: ActionKind.RG,
    ActionKind.RA: ActionKind.SA,
    ActionKind.RG: ActionKind.SG,
}

_ACTION_RE = re.compile(
    r"^(?P<stage>\d+)(?P<prefix>[iw]?)(?P<kind>SA|SG|RA|RG|F|I|W|B)(?P<mb>\d+)(?:@(?P<clock>\d+))?$"
)


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a rank's program.

    Attributes:
        stage: the pipeline stage the action belongs to (0-based; a rank may hold several).
        kind: what the action does.
        microbatch: the micro-batch index (0-based).
        asynchronous: for sends only: True for isend (completed by a later ``WAIT`` action).
        waits: for ``WAIT`` only: the send kind (``SA`` or ``SG``) whose async send it completes.
        clock_mhz: for compute units only, optional: the SM clock the unit runs at (``0F3@1410``).
    """

    stage: int
    kind: ActionKind
    microbatch: int
    asynchronous: bool = False
    waits: ActionKind | None = None
    clock_mhz: int | None = None

    def __post_init__(self) -> None:
        if self.stage < 0:
            raise ScheduleError(
                f"stage index must be >= 0, got {self.stage} in {self.kind}{self.microbatch}"
            )
        if self.microbatch < 0:
            raise ScheduleError(f"micro-batch index must be >= 0, got {self.microbatch} in {self.kind}")
        if self.asynchronous and self.kind not in SEND_KINDS:
            raise ScheduleError(f"only sends can be asynchronous, got async {self.kind}{self.microbatch}")
        if (self.kind is ActionKind.WAIT) != (self.waits is not None):
            raise ScheduleError("a WAIT action needs waits=SA or SG, and only WAIT actions take waits")
        if self.waits is not None and self.waits not in SEND_KINDS:
            raise ScheduleError(f"WAIT can only wait on SA or SG, got {self.waits}")
        if self.clock_mhz is not None and self.kind not in COMPUTE_KINDS:
            raise ScheduleError(f"only compute units carry a clock, got {self.kind}{self.microbatch}@...")

    def __str__(self) -> str:
        return f"{self.stage}{self.label}" + (f"@{self.clock_mhz}" if self.clock_mhz is not None else "")

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the text form (``0F3``, ``1B3@1410``, ``0I2``, ``0W2``, ``0iSA3``, ``1wSG2``)."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ScheduleError(
                f"cannot parse action {text!r}; write stage, kind, micro-batch: 0F3, 1B3@1410, 0I3, 0W3, "
                "0SA3, 0iSA3, 0wSA3, 1RA3, 1SG3, 0RG3"
            )
        prefix, kind = match["prefix"], ActionKind(match["kind"])
        stage, mb, clock = int(match["stage"]), int(match["mb"]), match["clock"]
        if prefix == "w":
            if clock:
                raise ScheduleError(f"only compute units carry a clock, got {text!r}")
            return cls(stage, ActionKind.WAIT, mb, waits=kind)
        return cls(stage, kind, mb, asynchronous=prefix == "i", clock_mhz=int(clock) if clock else None)

    @property
    def is_compute(self) -> bool:
        """True for forward and backward (full, input, weight) units."""
        return self.kind in COMPUTE_KINDS

    @property
    def unit(self) -> str:
        """The unit name without stage or clock (``"F3"``): the key of a ClockPlan's stage entry."""
        return f"{self.kind}{self.microbatch}"

    @property
    def label(self) -> str:
        """The text without stage and clock (``"F3"``, ``"iSA3"``, ``"wSG2"``), for per-stage listings."""
        if self.kind is ActionKind.WAIT:
            return f"w{self.waits}{self.microbatch}"
        return f"{'i' if self.asynchronous else ''}{self.kind}{self.microbatch}"

    def with_clock(self, clock_mhz: int | None) -> Action:
        """The same compute unit at another clock."""
        return Action(self.stage, self.kind, self.microbatch, clock_mhz=clock_mhz)


@functools.lru_cache(maxsize=1 << 16)
def act(
    stage: int,
    kind: ActionKind,
    microbatch: int,
    asynchronous: bool = False,
    waits: ActionKind | None = None,
) -> Action:
    """A shared (cached) action without a clock: generators build many identical immutable actions."""
    return Action(stage, kind, microbatch, asynchronous, waits)


ClockPlan = dict[int, dict[str, int]]
"""Stage -> unit name (``"F3"``) -> SM clock in MHz."""


@dataclass(frozen=True)
class Schedule:
    """The per-rank programs of one training iteration.

    Attributes:
        name: generator name (``1f1b``, ``ours``, ``interleaved``, or anything for hand-written schedules).
        stages: number of pipeline stages S (model chunks).
        micro_batches: number of micro-batches M.
        r: per-stage number of extra warm-up forwards (all zeros for 1F1B).
        programs: ``programs[rank]`` is the ordered tuple of actions that rank executes. Every stage lives
            on exactly one rank; with one stage per rank (1f1b, ours), rank s holds stage s.
    """

    name: str
    stages: int
    micro_batches: int
    r: tuple[int, ...]
    programs: tuple[tuple[Action, ...], ...]
    stage_rank: tuple[int, ...] = field(init=False, compare=False)
    _units: tuple[tuple[Action, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.r) != self.stages:
            raise ScheduleError(f"r has {len(self.r)} entries for {self.stages} stages; give one per stage")
        owner = stage_ranks(self.programs)
        missing = [s for s in range(self.stages) if s not in owner]
        extra = sorted(s for s in owner if s >= self.stages)
        if extra or (missing and len(self.programs) != self.stages):
            raise ScheduleError(
                f"schedule {self.name!r} has {len(self.programs)} programs for {self.stages} stages; stages "
                f"{extra or missing} {'out of range' if extra else 'appear on no rank'}"
            )
        ranks = tuple(owner.get(s, s) for s in range(self.stages))  # an empty program keeps its stage
        object.__setattr__(self, "stage_rank", ranks)
        units = tuple(tuple(a for a in prog if a.kind in COMPUTE_KINDS) for prog in self.programs)
        object.__setattr__(self, "_units", units)

    @property
    def ranks(self) -> int:
        """Number of ranks (programs); equals ``stages`` when every rank holds one stage."""
        return len(self.programs)

    @property
    def one_stage_per_rank(self) -> bool:
        """True when rank s holds exactly stage s (the layout DeepSpeed's PipelineEngine runs)."""
        return self.stage_rank == tuple(range(self.stages))

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        """The stages held by ``rank``, ascending."""
        return tuple(s for s, r in enumerate(self.stage_rank) if r == rank)

    def require_one_stage_per_rank(self, what: str) -> None:
        """Raise ScheduleError naming ``what`` when a rank holds several stages."""
        if not self.one_stage_per_rank:
            raise ScheduleError(
                f"{what} needs one stage per rank, but schedule {self.name!r} puts {self.stages} stages on "
                f"{self.ranks} ranks; use 1f1b or ours"
            )

    def units(self, rank: int) -> tuple[Action, ...]:
        """The compute actions (F/I/W/B) of ``rank`` in program order (= stage ``rank``'s, one per rank)."""
        return self._units[rank]

    def warmup(self, rank: int) -> int:
        """How many forwards ``rank`` runs before its first backward."""
        count = 0
        for unit in self._units[rank]:
            if unit.kind in BACKWARD_KINDS:
                break
            count += 1
        return count

    def render(self, clocks: ClockPlan | None = None, *, compute_only: bool = False) -> str:
        """One line per rank, e.g. ``r0: 0F0 0iSA0 0RG0 0wSA0 0B0 ...``; with clocks: ``0F0@1410``."""
        lines = []
        for rank, program in enumerate(self.programs):
            words = []
            for action in program:
                if compute_only and not action.is_compute:
                    continue
                if clocks is not None and action.is_compute:
                    action = action.with_clock(clocks.get(action.stage, {}).get(action.unit))
                words.append(str(action))
            lines.append(f"r{rank}: " + " ".join(words))
        return "\n".join(lines)

    def with_clocks(self, clocks: ClockPlan) -> Schedule:
        """A copy whose compute units carry the clocks of ``clocks`` (``0F3@1410``)."""
        programs = tuple(
            tuple(a.with_clock(clocks.get(a.stage, {}).get(a.unit)) if a.is_compute else a for a in prog)
            for prog in self.programs
        )
        return Schedule(self.name, self.stages, self.micro_batches, self.r, programs)


def stage_ranks(programs: tuple[tuple[Action, ...], ...]) -> dict[int, int]:
    """Stage -> the rank whose program holds it.

    Raises:
        ScheduleError: a stage that appears in two ranks' programs.
    """
    owner: dict[int, int] = {}
    for rank, program in enumerate(programs):
        for action in program:
            if owner.setdefault(action.stage, rank) != rank:
                raise ScheduleError(
                    f"stage {action.stage} appears on rank {owner[action.stage]} and on rank {rank} "
                    f"({action}); every stage lives on exactly one rank"
                )
    return owner


def parse_programs(text: str) -> tuple[tuple[Action, ...], ...]:
    """Parse the output of :meth:`Schedule.render` (lines ``rN: A A A``) back into programs."""
    programs: list[tuple[Action, ...]] = []
    for number, line in enumerate(filter(None, (ln.strip() for ln in text.splitlines()))):
        label, sep, body = line.partition(":")
        if not sep or label.strip() != f"r{number}":
            raise ScheduleError(f"line {number + 1} must start with 'r{number}:', got {line[:30]!r}")
        programs.append(tuple(Action.parse(word) for word in body.split()))
    return tuple(programs)


def schedule_from_text(text: str, *, name: str = "custom", r: tuple[int, ...] | None = None) -> Schedule:
    """Build a schedule from rendered text; stage and micro-batch counts are inferred from the actions."""
    programs = parse_programs(text)
    stages = max(1 + max((a.stage for prog in programs for a in prog), default=-1), len(programs))
    micro_batches = 1 + max((a.microbatch for prog in programs for a in prog), default=-1)
    return Schedule(name, stages, micro_batches, r or (0,) * stages, programs)


def uniform_plan(schedule: Schedule, clock_mhz: int) -> ClockPlan:
    """Every compute unit of every stage at ``clock_mhz`` (the baseline's plan at the top clock)."""
    plan: ClockPlan = {s: {} for s in range(schedule.stages)}
    for rank in range(schedule.ranks):
        for a in schedule.units(rank):
            plan[a.stage][a.unit] = clock_mhz
    return plan


def clocks_from_schedule(schedule: Schedule) -> ClockPlan:
    """The ClockPlan carried by units written ``0F3@1410`` (units without a clock are left out)."""
    plan: ClockPlan = {s: {} for s in range(schedule.stages)}
    for rank in range(schedule.ranks):
        for a in schedule.units(rank):
            if a.clock_mhz is not None:
                plan[a.stage][a.unit] = a.clock_mhz
    return plan
