"""The clock-assignment problem on a plain DAG: nodes with per-clock options, precedence edges, idle power.

Every planner works on this abstraction, so the hard part (which clock for which unit) is independent of how
a schedule is written. A node is a compute unit (several clock options) or a fixed-duration event such as a
transfer (one option, no stage). Energy of an assignment over one iteration::

    E = sum_u active_energy_u(clock_u) + sum_s idle_power_s * (makespan - busy_s)

so a plan that stretches the makespan pays idle energy on every stage. Rewritten per node, with
``reduced_j = energy_j - idle_power_s * duration`` (the "reduced cost"), ``E = sum_u reduced_u +
makespan * sum_s idle_power_s``: the planners minimise the first sum under a makespan deadline.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class ClockOption(NamedTuple):
    """One way to run a node: at ``clock_mhz`` it takes ``duration_ms`` and uses ``energy_j`` (active).

    A NamedTuple rather than a dataclass: the online planner builds tens of thousands of them per round.
    """

    clock_mhz: int
    duration_ms: float
    energy_j: float


@dataclass(slots=True)
class ClockDag:
    """Nodes in topological order with their options (fastest clock first), edges and per-stage idle power.

    Attributes:
        keys: one hashable key per node, e.g. ``(stage, "F3")`` or ``("xfer", 0, "SA3")``.
        stages: the stage a node keeps busy, or ``None`` for events that are not compute (transfers).
        options: per node, its options sorted by descending clock; fixed nodes have exactly one.
        preds: per node, the indices of the nodes that must finish before it starts.
        idle_power_w: per stage, the power drawn while that stage is not computing.
    """

    keys: list[Hashable] = field(default_factory=list)
    stages: list[int | None] = field(default_factory=list)
    options: list[tuple[ClockOption, ...]] = field(default_factory=list)
    preds: list[list[int]] = field(default_factory=list)
    idle_power_w: list[float] = field(default_factory=list)
    _index: dict[Hashable, int] = field(default_factory=dict)

    def add_node(self, key: Hashable, stage: int | None, options: Sequence[ClockOption]) -> int:
        """Add a node after all of its predecessors; returns its index."""
        if key in self._index:
            raise ValueError(f"node {key!r} added twice; every unit and transfer needs a unique key")
        if not options:
            raise ValueError(f"node {key!r} has no clock options; give at least one (clock, duration, energy)")
        if stage is not None and not 0 <= stage < len(self.idle_power_w):
            raise ValueError(f"node {key!r} is on stage {stage} but idle power is known for "
                             f"{len(self.idle_power_w)} stages; set idle_power_w first")
        self._index[key] = len(self.keys)
        self.keys.append(key)
        self.stages.append(stage)
        if not isinstance(options, tuple):  # the builder passes sorted tuples; sort anything else
            options = tuple(sorted(options, key=lambda o: -o.clock_mhz))
        self.options.append(options)
        self.preds.append([])
        return len(self.keys) - 1

    def add_edge(self, before: Hashable, after: Hashable) -> None:
        """``after`` may start only once ``before`` has finished (both must exist, ``before`` added first)."""
        i, j = self.index(before), self.index(after)
        if i >= j:
            raise ValueError(f"edge {before!r} -> {after!r} goes backwards; add nodes in topological order")
        if i not in self.preds[j]:
            self.preds[j].append(i)

    def index(self, key: Hashable) -> int:
        """The index of the node named ``key``."""
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"no node {key!r} in the DAG") from None

    def __len__(self) -> int:
        return len(self.keys)

    def succs(self) -> list[list[int]]:
        """Successor lists (computed, since edges are stored on the later node)."""
        out: list[list[int]] = [[] for _ in self.keys]
        for j, ps in enumerate(self.preds):
            for i in ps:
                out[i].append(j)
        return out

    def reduced_j(self, node: int, option: int) -> float:
        """Active energy minus the idle energy the stage would have drawn in the same time (J)."""
        opt = self.options[node][option]
        stage = self.stages[node]
        idle_w = 0.0 if stage is None else self.idle_power_w[stage]
        return opt.energy_j - idle_w * opt.duration_ms / 1000.0

    def durations(self, choice: Sequence[int]) -> list[float]:
        """Per-node duration (ms) under a choice of option indices."""
        return [self.options[u][c].duration_ms for u, c in enumerate(choice)]

    def heads(self, durations: Sequence[float]) -> list[float]:
        """Earliest start of every node (ms), i.e. the longest path from the start to it."""
        head = [0.0] * len(durations)
        finish = [0.0] * len(durations)
        for j, ps in enumerate(self.preds):
            h = 0.0
            for i in ps:  # explicit loop: this is the planners' inner loop
                h = max(h, finish[i])
            head[j] = h
            finish[j] = h + durations[j]
        return head

    def tails(self, durations: Sequence[float], succs: list[list[int]] | None = None) -> list[float]:
        """Longest path from the end of every node to the end of the iteration (ms)."""
        succs = self.succs() if succs is None else succs
        tail = [0.0] * len(durations)
        for i in range(len(durations) - 1, -1, -1):
            t = 0.0
            for j in succs[i]:
                v = tail[j] + durations[j]
                t = max(t, v)
            tail[i] = t
        return tail

    def makespan_ms(self, durations: Sequence[float]) -> float:
        """Iteration time (ms) when every node starts as early as possible."""
        head = self.heads(durations)
        return max((h + d for h, d in zip(head, durations)), default=0.0)

    def evaluate(self, choice: Sequence[int]) -> tuple[float, float]:
        """Makespan (ms) and energy (J) of an assignment, idle energy of every stage included."""
        durations = self.durations(choice)
        makespan = self.makespan_ms(durations)
        return makespan, self.energy_j(choice, makespan)

    def energy_j(self, choice: Sequence[int], makespan_ms: float) -> float:
        """Energy (J) of an assignment run in ``makespan_ms``: active + idle of every stage."""
        reduced = sum(self.reduced_j(u, c) for u, c in enumerate(choice))
        return reduced + sum(self.idle_power_w) * makespan_ms / 1000.0

    def clocks(self, choice: Sequence[int]) -> dict[Hashable, int]:
        """The clock chosen for every compute node, by key."""
        return {k: self.options[u][c].clock_mhz for u, (k, c) in enumerate(zip(self.keys, choice))
                if self.stages[u] is not None}


def slack_ms(dag: ClockDag, durations: Sequence[float], deadline_ms: float,
             succs: list[list[int]]) -> tuple[list[float], list[float], list[float]]:
    """Earliest starts, tails and slack of every node against ``deadline_ms`` (slack = how much it may grow)."""
    head = dag.heads(durations)
    tail = dag.tails(durations, succs)
    slack = [deadline_ms - h - d - t for h, d, t in zip(head, durations, tail)]
    return head, tail, slack


def mover_counts(dag: ClockDag, movers: Sequence[bool], succs: list[list[int]]) -> list[int]:
    """The largest number of movers on any path through each node.

    If every mover ``u`` grows by at most ``slack_u / count_u``, no path grows by more than its own slack
    (each mover's slack is at most the slack of every path through it), so the deadline still holds.
    """
    n = len(movers)
    before = [0] * n
    for j, ps in enumerate(dag.preds):
        best = 0
        for i in ps:
            best = max(best, before[i])
        before[j] = best + movers[j]
    after = [0] * n
    for i in range(n - 1, -1, -1):
        best = 0
        for j in succs[i]:
            best = max(best, after[j])
        after[i] = best + movers[i]
    return [b + a - m for b, a, m in zip(before, after, movers)]
