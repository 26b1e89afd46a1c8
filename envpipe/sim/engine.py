"""Discrete-event simulation of a schedule's programs (compute and p2p actions) under a cost model.

Timing semantics are the verifier's rendezvous model with durations: a transfer starts when both the send
and the matching receive are posted and takes ``costs.transfer_ms``; a blocking send and the receive
complete when it ends; an async send returns at once and its wait completes when the transfer ends.
Because matching is FIFO and programs are deterministic, every action's time is fixed by its predecessors,
so stages can be advanced in any order (a Kahn-style dataflow evaluation).

The critical path is read from the event times: from the action that ends last, step back to whatever
set its start (the previous action on its rank, or the peer whose arrival started a transfer).

A rank may hold several stages (interleaved schedules): units take their stage's cost, the clock and the
energy belong to the rank's GPU, so the per-"stage" energy, busy and idle lists of :class:`SimResult` are per
rank (the same thing when every rank holds one stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envpipe.errors import SimulationError
from envpipe.ir import RECV_KINDS, SEND_KINDS, ActionKind, ClockPlan, Schedule
from envpipe.rendezvous import channel_index
from envpipe.sim.costs import CostModel
from envpipe.sim.energy import idle_energy_j, unit_cost
from envpipe.spans import UnitSpan

K = ActionKind


@dataclass(frozen=True)
class SimResult:
    """Outcome of one simulated iteration. Every number here is simulated by ``model``.

    Attributes:
        iteration_time_ms: makespan of the iteration (all stages, communication included).
        energy_j: total energy of all stages over the makespan.
        stage_energy_j: per-rank energy (busy units + idle gaps); per stage with one stage per rank.
        stage_busy_ms: per-rank time spent in units.
        timeline: every unit as a :class:`UnitSpan`, in start order per stage.
        critical_path: the units (stage, unit) that determine the makespan, in time order.
        model: the cost model's description.
        critical_chain: the critical path with the binding transfers (``(stage, "RA3")``) included.
        stage_idle_ms: per-rank idle time over the makespan.
    """

    iteration_time_ms: float
    energy_j: float
    stage_energy_j: tuple[float, ...]
    stage_busy_ms: tuple[float, ...]
    timeline: list[UnitSpan]
    critical_path: list[tuple[int, str]]
    model: str
    simulated: bool = True
    critical_chain: list[tuple[int, str]] = field(default_factory=list)
    stage_idle_ms: tuple[float, ...] = ()

    @property
    def iteration_time_s(self) -> float:
        """Makespan in seconds."""
        return self.iteration_time_ms / 1e3

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (timeline included)."""
        return {
            "simulated": True,
            "model": self.model,
            "iteration_time_s": self.iteration_time_s,
            "energy_j": self.energy_j,
            "stage_energy_j": list(self.stage_energy_j),
            "stage_busy_ms": list(self.stage_busy_ms),
            "stage_idle_ms": list(self.stage_idle_ms),
            "critical_path": [[s, u] for s, u in self.critical_path],
            "timeline": [[t.stage, t.unit, t.start_ms, t.end_ms, t.clock_mhz] for t in self.timeline],
        }


class _State:
    """Mutable per-run state of the event evaluation."""

    def __init__(self, stages: int, programs: Any) -> None:
        self.pcs = [0] * stages
        self.now = [0.0] * stages
        self.ends = [[0.0] * len(p) for p in programs]
        self.binds: list[list[tuple[int, int] | None]] = [[None] * len(p) for p in programs]
        self.posted: dict[tuple[tuple[int, int], int], tuple[float, int, int]] = {}
        self.recv_posted: dict[tuple[tuple[int, int], int], tuple[float, int, int]] = {}


def simulate(schedule: Schedule, costs: CostModel, clocks: ClockPlan | None = None) -> SimResult:
    """Simulate one iteration of ``schedule`` with per-unit ``clocks`` (missing units: top clock).

    Raises:
        SimulationError: stage count mismatch, unsupported clock, or a schedule that deadlocks.
    """
    if costs.stages != schedule.stages:
        raise SimulationError(
            f"costs describe {costs.stages} stages but the schedule has {schedule.stages}; "
            "give one forward/backward time per stage"
        )
    clocks = clocks or {}
    programs = schedule.programs
    state = _State(schedule.ranks, programs)
    spans: list[list[UnitSpan]] = [[] for _ in programs]
    busy_energy = [0.0] * schedule.ranks
    _run(schedule, costs, clocks, state, spans, busy_energy)
    makespan = max(state.now)
    stage_energy, idle = [], []
    for rank in range(schedule.ranks):
        idle_ms, idle_j = idle_energy_j(
            costs,
            schedule.rank_stages(rank)[0],  # the GPU's idle power: every stage of a rank shares the card
            [(u.start_ms, u.end_ms, u.clock_mhz) for u in spans[rank]],
            makespan,
        )
        idle.append(idle_ms)
        stage_energy.append(busy_energy[rank] + idle_j)
    chain = _critical_chain(schedule, state)
    return SimResult(
        iteration_time_ms=makespan,
        energy_j=sum(stage_energy),
        stage_energy_j=tuple(stage_energy),
        stage_busy_ms=tuple(sum(u.end_ms - u.start_ms for u in row) for row in spans),
        timeline=[u for row in spans for u in row],
        critical_path=[(s, u) for s, u in chain if u[0] in "FIWB"],
        model=f"simulated: {costs.describe()}",
        critical_chain=chain,
        stage_idle_ms=tuple(idle),
    )


def _run(
    schedule: Schedule,
    costs: CostModel,
    clocks: ClockPlan,
    state: _State,
    spans: list[list[UnitSpan]],
    busy_energy: list[float],
) -> None:
    programs, index = schedule.programs, channel_index(schedule.programs)
    owner = schedule.stage_rank
    one_per_rank = schedule.one_stage_per_rank
    top, xfer = costs.max_clock_mhz, costs.transfer_ms(0, 1)
    cache: dict[tuple[int, str, int, int], tuple[float, float]] = {}
    current = [  # the clock each rank's GPU holds: its first unit's
        clocks.get(u.stage, {}).get(u.unit, top) if (u := next(iter(schedule.units(r)), None)) else top
        for r in range(schedule.ranks)
    ]
    work = list(range(schedule.ranks))
    while work:
        rank = work.pop()
        program, row = programs[rank], index[rank]
        pc, now = state.pcs[rank], state.now[rank]
        while pc < len(program):
            action = program[pc]
            kind = action.kind
            bind: tuple[int, int] | None = None
            if action.is_compute:
                stage = action.stage
                clock = clocks.get(stage, {}).get(action.unit, top)
                key = (stage, kind.value, clock, current[rank])
                if key not in cache:
                    cache[key] = unit_cost(costs, stage, kind.value, clock, current[rank])
                duration, energy = cache[key]
                spans[rank].append(
                    UnitSpan(stage, action.unit, now, now + duration, clock, None if one_per_rank else rank)
                )
                busy_energy[rank] += energy
                current[rank] = clock
                now += duration
            else:
                ch, k = row[pc]
                msg = (ch, k)
                if kind in SEND_KINDS and msg not in state.posted:
                    state.posted[msg] = (now, rank, pc)
                    work.append(owner[ch[1]])
                elif kind in RECV_KINDS and msg not in state.recv_posted:
                    state.recv_posted[msg] = (now, rank, pc)
                    work.append(owner[ch[0]])
                if kind in SEND_KINDS and action.asynchronous:
                    pass
                elif msg not in state.posted or msg not in state.recv_posted:
                    break
                else:
                    sent, received = state.posted[msg], state.recv_posted[msg]
                    later = sent if sent[0] > received[0] else received
                    done = later[0] + xfer
                    if done > now:
                        now, bind = done, (later[1], later[2])
            state.ends[rank][pc] = now
            state.binds[rank][pc] = bind
            pc += 1
        state.pcs[rank], state.now[rank] = pc, now
    stuck = [r for r in range(schedule.ranks) if state.pcs[r] < len(programs[r])]
    if stuck:
        where = ", ".join(f"rank {r} at {programs[r][state.pcs[r]]}" for r in stuck)
        raise SimulationError(
            f"the schedule deadlocks under rendezvous sends ({where}); run envpipe.verify.verify "
            "on it for the grid"
        )


def _critical_chain(schedule: Schedule, state: _State) -> list[tuple[int, str]]:
    """Walk back from the last-ending action through whatever set each start: (stage, ``F3``/``RA3``)."""
    rank = max(range(schedule.ranks), key=lambda r: state.now[r])
    pc = len(schedule.programs[rank]) - 1
    chain: list[tuple[int, str]] = []
    while pc >= 0:
        action = schedule.programs[rank][pc]
        bind = state.binds[rank][pc]
        if action.is_compute or bind is not None:
            chain.append((action.stage, action.label))
        if bind is not None and bind != (rank, pc):
            rank, pc = bind
            peer = schedule.programs[rank][pc]
            chain.append((peer.stage, peer.label))
        pc -= 1
    chain.reverse()
    return chain
