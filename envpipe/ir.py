"""Pipeline schedule IR: actions (compute and point-to-point communication) and per-stage programs.

A :class:`Schedule` holds, for every stage, the ordered tuple of actions that stage executes in one
iteration. Actions print compactly and parse back exactly::

    F3        forward of micro-batch 3           B3      backward of micro-batch 3
    F3@1410   the same forward, run at 1410 MHz
    RA3       receive activation 3 (from stage-1)  RG3     receive gradient 3 (from stage+1)
    SA3       blocking send of activation 3       SG3     blocking send of gradient 3
    iSA3      async send (isend) of activation 3   wSA3    wait for that async send to complete

Semantics the verifier and the training engine share: a blocking send completes only when the peer has
posted the matching receive (rendezvous, as gloo ``send``); an async send returns at once and its ``w``
action blocks until the peer has received it; receives block until the data is there. Matching is FIFO
per directed pair of stages, so the k-th ``SA`` of stage s pairs with the k-th ``RA`` of stage s+1.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import Enum

from envpipe.errors import ScheduleError


class ActionKind(str, Enum):
    """What an action does; the value is its text prefix."""

    F = "F"
    B = "B"
    SA = "SA"
    RA = "RA"
    SG = "SG"
    RG = "RG"
    W = "W"

    def __str__(self) -> str:
        return self.value


COMPUTE_KINDS = frozenset({ActionKind.F, ActionKind.B})
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

_ACTION_RE = re.compile(r"^(?P<prefix>[iw]?)(?P<kind>SA|SG|RA|RG|F|B)(?P<mb>\d+)(?:@(?P<clock>\d+))?$")


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a stage's program.

    Attributes:
        kind: what the action does.
        microbatch: the micro-batch index (0-based).
        asynchronous: for sends only: True for isend (completed by a later ``W`` action).
        waits: for ``W`` only: the send kind (``SA`` or ``SG``) whose async send it completes.
        clock_mhz: for compute units only, optional: the SM clock the unit runs at (``F3@1410``).
    """

    kind: ActionKind
    microbatch: int
    asynchronous: bool = False
    waits: ActionKind | None = None
    clock_mhz: int | None = None

    def __post_init__(self) -> None:
        if self.microbatch < 0:
            raise ScheduleError(f"micro-batch index must be >= 0, got {self.microbatch} in {self.kind}")
        if self.asynchronous and self.kind not in SEND_KINDS:
            raise ScheduleError(f"only sends can be asynchronous, got async {self.kind}{self.microbatch}")
        if (self.kind is ActionKind.W) != (self.waits is not None):
            raise ScheduleError("a W action needs waits=SA or SG, and only W actions take waits")
        if self.waits is not None and self.waits not in SEND_KINDS:
            raise ScheduleError(f"W can only wait on SA or SG, got {self.waits}")
        if self.clock_mhz is not None and self.kind not in COMPUTE_KINDS:
            raise ScheduleError(f"only compute units carry a clock, got {self.kind}{self.microbatch}@...")

    def __str__(self) -> str:
        if self.kind is ActionKind.W:
            return f"w{self.waits}{self.microbatch}"
        prefix = "i" if self.asynchronous else ""
        clock = f"@{self.clock_mhz}" if self.clock_mhz is not None else ""
        return f"{prefix}{self.kind}{self.microbatch}{clock}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the text form (``F3``, ``B3@1410``, ``iSA3``, ``wSG2``, ``RA0``) back into an action."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ScheduleError(
                f"cannot parse action {text!r}; write e.g. F3, B3@1410, SA3, iSA3, wSA3, RA3, SG3, RG3"
            )
        prefix, kind = match["prefix"], ActionKind(match["kind"])
        mb, clock = int(match["mb"]), match["clock"]
        if prefix == "w":
            return cls(ActionKind.W, mb, waits=kind)
        return cls(kind, mb, asynchronous=prefix == "i", clock_mhz=int(clock) if clock else None)

    @property
    def is_compute(self) -> bool:
        """True for forward and backward units."""
        return self.kind in COMPUTE_KINDS

    @property
    def unit(self) -> str:
        """The unit name without a clock (``"F3"``), the key of a ClockPlan."""
        return f"{self.kind}{self.microbatch}"

    def with_clock(self, clock_mhz: int | None) -> Action:
        """The same compute unit at another clock."""
        return Action(self.kind, self.microbatch, clock_mhz=clock_mhz)


@functools.lru_cache(maxsize=1 << 16)
def act(
    kind: ActionKind, microbatch: int, asynchronous: bool = False, waits: ActionKind | None = None
) -> Action:
    """A shared (cached) action without a clock: generators build many identical immutable actions."""
    return Action(kind, microbatch, asynchronous, waits)


ClockPlan = dict[int, dict[str, int]]
"""Stage -> unit name (``"F3"``) -> SM clock in MHz."""


@dataclass(frozen=True)
class Schedule:
    """The per-stage programs of one training iteration.

    Attributes:
        name: generator name (``1f1b``, ``ours``, or anything for hand-written schedules).
        stages: number of pipeline stages S.
        micro_batches: number of micro-batches M.
        r: per-stage number of extra warm-up forwards (all zeros for 1F1B).
        programs: ``programs[s]`` is the ordered tuple of actions stage ``s`` executes.
    """

    name: str
    stages: int
    micro_batches: int
    r: tuple[int, ...]
    programs: tuple[tuple[Action, ...], ...]
    _units: tuple[tuple[Action, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.programs) != self.stages:
            raise ScheduleError(
                f"schedule {self.name!r} has {len(self.programs)} programs for {self.stages} stages"
            )
        if len(self.r) != self.stages:
            raise ScheduleError(f"r has {len(self.r)} entries for {self.stages} stages; give one per stage")
        units = tuple(tuple(a for a in prog if a.kind in COMPUTE_KINDS) for prog in self.programs)
        object.__setattr__(self, "_units", units)

    def units(self, stage: int) -> tuple[Action, ...]:
        """The compute actions (F/B) of ``stage`` in program order."""
        return self._units[stage]

    def warmup(self, stage: int) -> int:
        """How many forwards ``stage`` runs before its first backward."""
        count = 0
        for unit in self._units[stage]:
            if unit.kind is ActionKind.B:
                break
            count += 1
        return count

    def render(self, clocks: ClockPlan | None = None, *, compute_only: bool = False) -> str:
        """One line per stage, e.g. ``s0: F0 iSA0 RG0 wSA0 B0 ...``; with clocks units print ``F0@1410``."""
        lines = []
        for stage, program in enumerate(self.programs):
            words = []
            for action in program:
                if compute_only and not action.is_compute:
                    continue
                if clocks is not None and action.is_compute:
                    action = action.with_clock(clocks.get(stage, {}).get(action.unit))
                words.append(str(action))
            lines.append(f"s{stage}: " + " ".join(words))
        return "\n".join(lines)

    def with_clocks(self, clocks: ClockPlan) -> Schedule:
        """A copy whose compute units carry the clocks of ``clocks`` (``F3@1410``)."""
        programs = tuple(
            tuple(a.with_clock(clocks.get(s, {}).get(a.unit)) if a.is_compute else a for a in prog)
            for s, prog in enumerate(self.programs)
        )
        return Schedule(self.name, self.stages, self.micro_batches, self.r, programs)


def parse_programs(text: str) -> tuple[tuple[Action, ...], ...]:
    """Parse the output of :meth:`Schedule.render` (lines ``sN: A A A``) back into programs."""
    programs: list[tuple[Action, ...]] = []
    for number, line in enumerate(filter(None, (ln.strip() for ln in text.splitlines()))):
        label, sep, body = line.partition(":")
        if not sep or label.strip() != f"s{number}":
            raise ScheduleError(f"line {number + 1} must start with 's{number}:', got {line[:30]!r}")
        programs.append(tuple(Action.parse(word) for word in body.split()))
    return tuple(programs)


def schedule_from_text(text: str, *, name: str = "custom", r: tuple[int, ...] | None = None) -> Schedule:
    """Build a schedule from rendered text; the micro-batch count is inferred from the units."""
    programs = parse_programs(text)
    micro_batches = 1 + max((a.microbatch for prog in programs for a in prog), default=-1)
    return Schedule(name, len(programs), micro_batches, r or (0,) * len(programs), programs)


def clocks_from_schedule(schedule: Schedule) -> ClockPlan:
    """The ClockPlan carried by units written ``F3@1410`` (units without a clock are left out)."""
    return {
        s: {a.unit: a.clock_mhz for a in schedule.units(s) if a.clock_mhz is not None}
        for s in range(schedule.stages)
    }
