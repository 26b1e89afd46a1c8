"""Turn a Schedule and a CostModel into the planner's ClockDag, with the simulator's timing semantics.

Every action of every program is a node. Compute units take their unit's duration at the chosen clock;
communication actions take no time themselves but complete only when their transfer has: a transfer node
(``transfer_ms``) starts once both the send and the matching receive are posted (the end of the action
before each), and a blocking send, a receive or a wait ``WAIT`` ends no earlier than it. An async send returns
at once. With no clock-switch latency and constant idle power this is exactly ``envpipe.sim.simulate``.

A rank may hold several stages (interleaved, ZB-V): a unit's options are its stage's, while the DAG's
"stage" of a node (the row whose idle power it saves) is the rank, the GPU that runs it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from envpipe.ir import RECV_KINDS, SEND_KINDS, ClockPlan, Schedule
from envpipe.planner.dag import ClockDag, ClockOption
from envpipe.rendezvous import channel_index

UnitKey = tuple[int, str]  # (stage, "F3")


@dataclass(frozen=True)
class PipelineDag:
    """The DAG of one schedule plus the map between its nodes and the schedule's units."""

    dag: ClockDag
    unit_nodes: dict[UnitKey, int]

    def plan(self, choice: list[int]) -> ClockPlan:
        """The ClockPlan of a choice of option indices."""
        plan: ClockPlan = {}
        for (stage, unit), node in self.unit_nodes.items():
            plan.setdefault(stage, {})[unit] = self.dag.options[node][choice[node]].clock_mhz
        return plan

    def choice(self, clocks: ClockPlan | None) -> list[int]:
        """Option indices of a ClockPlan (missing units: top clock; a pruned clock maps to the nearest kept)."""
        out = [0] * len(self.dag)
        for (stage, unit), node in self.unit_nodes.items():
            clock = (clocks or {}).get(stage, {}).get(unit)
            if clock is None:
                continue
            opts = self.dag.options[node]
            exact = _clock_index(opts).get(clock)
            out[node] = exact if exact is not None else min(
                range(len(opts)), key=lambda c: (abs(opts[c].clock_mhz - clock), -opts[c].clock_mhz))
        return out


_INDEX_CACHE: dict[int, tuple[tuple[ClockOption, ...], dict[int, int]]] = {}


def _clock_index(options: tuple[ClockOption, ...]) -> dict[int, int]:
    """Clock -> option index, cached per (shared, cached) option tuple."""
    hit = _INDEX_CACHE.get(id(options))
    if hit is None or hit[0] is not options:
        if len(_INDEX_CACHE) > 8192:
            _INDEX_CACHE.clear()
        hit = (options, {o.clock_mhz: c for c, o in enumerate(options)})
        _INDEX_CACHE[id(options)] = hit
    return hit[1]


def build_dag(schedule: Schedule, costs, *, unit_scale: Mapping[UnitKey, float] | None = None,
              prune: bool = True, idle_clock_mhz: int | None = None) -> PipelineDag:
    """The clock-assignment DAG of ``schedule`` under ``costs`` (an ``envpipe.sim.CostModel``).

    Args:
        schedule: the per-stage programs.
        costs: the cost model (durations, power, idle power at the top clock, transfer time).
        unit_scale: optional per-unit factor on duration and energy, e.g. measured / predicted time.
        prune: drop clocks that are slower without saving energy (they can never help).
        idle_clock_mhz: the clock whose idle power the DAG charges (default: the top clock). The lowest
            clock gives the least idle power, hence a valid lower bound on the simulator's energy.

    Returns:
        The DAG with its unit map.
    """
    idle_clock = costs.max_clock_mhz if idle_clock_mhz is None else idle_clock_mhz
    idle_w = [costs.idle_power_w(schedule.rank_stages(r)[0], idle_clock) for r in range(schedule.ranks)]
    xfer_ms = costs.transfer_ms(0, 1)
    dag = ClockDag(idle_power_w=list(idle_w))
    skeleton = _skeleton(schedule)
    for key, rank, stage, unit, preds in skeleton.nodes:
        if stage is None:
            options: tuple[ClockOption, ...] = (ClockOption(0, xfer_ms, 0.0),)
        else:
            # Scales are rounded to 0.1% (far below timing noise) so that scaled option sets can be cached.
            scale = round((unit_scale or {}).get((stage, unit), 1.0), 3)
            options = _scaled_options(costs, stage, unit[0], prune and idle_clock_mhz is None, scale)
        dag.add_node(key, rank, options)
        for p in preds:
            dag.add_edge(p, key)
    return PipelineDag(dag, dict(skeleton.unit_nodes))


@dataclass(frozen=True)
class _Skeleton:
    """The DAG's structure without costs: (key, rank, stage, unit, preds) per node in topological order
    (rank and stage None for transfers)."""

    nodes: tuple[tuple[Hashable, int | None, int | None, str, tuple[Hashable, ...]], ...]
    unit_nodes: tuple[tuple[UnitKey, int], ...]


@lru_cache(maxsize=16)
def _skeleton(schedule: Schedule) -> _Skeleton:
    nodes: dict[Hashable, tuple[int | None, bool, list[Hashable]]] = {}  # key -> (stage, zero-time?, preds)
    index = channel_index(schedule.programs)
    posts: dict[tuple[tuple[int, int], int], list[Hashable]] = {}
    completions: list[tuple[Hashable, tuple[tuple[int, int], int]]] = []
    for rank, program in enumerate(schedule.programs):
        previous: Hashable | None = None
        for pc, action in enumerate(program):
            key: Hashable = (rank, pc)
            preds = [previous] if previous is not None else []
            kind = action.kind
            if action.is_compute:
                nodes[key] = (rank, False, preds)
            else:
                msg = index[rank][pc]
                if kind in SEND_KINDS or kind in RECV_KINDS:
                    # The transfer may start once this side has reached the action (previous one ended).
                    posts.setdefault(msg, []).append(previous)
                if not (kind in SEND_KINDS and action.asynchronous):
                    completions.append((key, msg))
                nodes[key] = (None, True, preds)
            previous = key
    for msg, sides in posts.items():
        nodes[("xfer", msg)] = (None, False, [p for p in sides if p is not None])
    for key, msg in completions:
        if ("xfer", msg) not in nodes:
            raise ValueError(f"action at {key} waits for a message that is never sent; verify the schedule")
        nodes[key][2].append(("xfer", msg))
    return _topological(schedule, nodes)


@lru_cache(maxsize=4096)
def _scaled_options(costs, stage: int, kind: str, prune: bool, scale: float) -> tuple[ClockOption, ...]:
    options = _unit_options(costs, stage, kind, prune)
    if scale == 1.0:
        return options
    return tuple(ClockOption(o.clock_mhz, o.duration_ms * scale, o.energy_j * scale) for o in options)


@lru_cache(maxsize=64)
def _unit_options(costs, stage: int, kind: str, prune: bool) -> tuple[ClockOption, ...]:
    idle_w = costs.idle_power_w(stage, costs.max_clock_mhz)
    options, best_reduced = [], float("inf")
    for clock in costs.clocks_mhz:  # descending
        duration = costs.unit_duration_ms(stage, kind, clock)
        energy = costs.unit_power_w(stage, kind, clock) * duration / 1e3
        reduced = energy - idle_w * duration / 1e3
        if prune and reduced >= best_reduced - 1e-12:
            continue  # slower and no cheaper than a faster clock: never useful
        best_reduced = min(best_reduced, reduced)
        options.append(ClockOption(int(clock), duration, energy))
    return tuple(options)


def _topological(schedule: Schedule, nodes) -> _Skeleton:
    """Order the nodes topologically (Kahn); zero-time communication actions are contracted away."""
    indegree = {k: len(set(p)) for k, (_, _, p) in nodes.items()}
    succs: dict[Hashable, list[Hashable]] = {k: [] for k in nodes}
    for k, (_, _, preds) in nodes.items():
        for p in set(preds):
            succs[p].append(k)
    ready = [k for k, d in indegree.items() if d == 0]
    order: list[tuple[Hashable, int | None, int | None, str, tuple[Hashable, ...]]] = []
    position: dict[Hashable, int] = {}
    unit_nodes: list[tuple[UnitKey, int]] = []
    via: dict[Hashable, set[Hashable]] = {}  # contracted node -> the kept nodes it stands for
    seen = 0
    while ready:
        key = ready.pop()
        seen += 1
        rank, zero_time, preds = nodes[key]
        direct: set[Hashable] = set()
        for p in set(preds):
            direct |= via.get(p, {p})
        if zero_time:
            via[key] = direct
        else:
            action = schedule.programs[rank][key[1]] if rank is not None else None
            stage, unit = (action.stage, action.unit) if action is not None else (None, "")
            if stage is not None:
                unit_nodes.append(((stage, unit), len(order)))
            position[key] = len(order)
            order.append((key, rank, stage, unit, tuple(sorted(direct, key=position.__getitem__))))
        for s in succs[key]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    if seen != len(nodes):
        raise ValueError("the schedule's dependencies form a cycle (it deadlocks); run envpipe.verify.verify on it")
    return _Skeleton(tuple(order), tuple(unit_nodes))
