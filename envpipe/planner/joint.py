"""Joint search: the schedule family, its parameters and every unit's clock, chosen together.

Given a pipeline of S GPUs (``costs`` per GPU stage, as 1F1B cuts the model), M micro-batches, a deadline
(an absolute time, or a slowdown bound against a named reference schedule at the top clocks) and a memory
cap (activations of one micro-batch of a GPU's share of the model, per GPU), :func:`search` builds every
candidate of every family in the schedule registry with its parameters --

* ``ours``: EnvPipe's r, capped by the memory (``envpipe.schedules.compute_r``);
* ``ours-w``: the same r with W placements (lag per stage 0, s or 2s; the memory they leave caps r);
* ``interleaved``: v virtual stages per GPU (:data:`INTERLEAVED_V`, where Megatron's M % S == 0 holds);
* ``1f1b``, ``zb-h1``, ``zb-h2``, ``zb-v``: no parameters --

drops those over the memory cap or slower than the deadline even at the top clocks, and plans the clocks
of the rest with a planner policy (``optimal``, ``balanced`` or ``greedy``: ``envpipe.planner.plan_clocks``
on the simulator). With scipy, the LP relaxation of each candidate's DAG (a lower bound on its energy,
``envpipe.planner.lp_bound``) orders the candidates: the first ``planned`` are planned, later ones only
while their bound is below the best plan's energy on the same DAG model (one that cannot win there is
not planned; the DAG model leaves out clock-switch latency and lower idle power at low clocks, so this
pruning is exact on the DAG model and a close approximation on the simulator).

Schedules with v stages per GPU run on ``costs.chunked(v)``: the same layers cut into v times as many
contiguous chunks. Every number is simulated (``envpipe.sim``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envpipe.errors import ConfigError, EnvpipeError
from envpipe.ir import ClockPlan, Schedule
from envpipe.planner import POLICIES as PLANNER_POLICIES

INTERLEAVED_V = (2, 3)
LAG_RULES = {"none": lambda s: 0, "zb-h1": lambda s: s, "2s": lambda s: 2 * s}
# The guarded planner policies of the one registry (``default`` plans nothing; ``paper*`` walk a chain only).
POLICIES = tuple(p for p in PLANNER_POLICIES if p != "default" and not p.startswith("paper"))


@dataclass(frozen=True)
class Candidate:
    """One schedule the search may choose, with what it needs before any clock is planned.

    Attributes:
        family: the registry name (``envpipe.schedules.SCHEDULES``).
        label: family and parameters, e.g. ``ours-w r=[4, 3, 1, 0] W lag=zb-h1``.
        params: the parameters (``r``, ``virtual_stages``, ``lag``) as JSON-ready values.
        schedule: the schedule (``stages`` counts model chunks: S * v).
        costs: its cost model (the GPU costs, chunked for v > 1).
        peak_activations: per GPU, the most micro-batch activations held, in units of a GPU's share of the
            model (``envpipe.verify``'s in-flight count / v).
        top_ms: the simulated iteration at the top clocks.
    """

    family: str
    label: str
    params: dict[str, Any]
    schedule: Schedule
    costs: Any
    peak_activations: tuple[float, ...]
    top_ms: float

    @functools.cached_property
    def planned_dag(self) -> Any:
        """The planner's DAG of the schedule on its costs (``envpipe.planner.build.build_dag``), built once
        for the LP bound at every deadline and the plan."""
        from envpipe.planner.build import build_dag

        return build_dag(self.schedule, self.costs)


@dataclass(frozen=True)
class Choice:
    """A planned candidate (every number simulated)."""

    candidate: Candidate
    clocks: ClockPlan
    energy_j: float
    iteration_ms: float
    saving: float  # against the reference at the top clocks
    slowdown: float  # against the reference at the top clocks
    met_deadline: bool
    lp_bound_j: float | None  # the LP relaxation on the DAG model (no clock-switch latency, top-clock idle)
    dag_energy_j: float  # the plan's energy on that same DAG model (comparable with lp_bound_j)
    policy: str
    solver: str | None = None


@dataclass(frozen=True)
class JointResult:
    """The search's outcome: the best choice and the runner-ups, and why the others were left out."""

    reference: str
    reference_ms: float
    reference_energy_j: float
    deadline_ms: float
    memory_cap: float | None
    ranked: list[Choice]  # planned and within the deadline, least energy first
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (label, why)
    model: str = ""

    @property
    def best(self) -> Choice | None:
        """The least-energy choice within the deadline (None when no candidate meets it)."""
        return self.ranked[0] if self.ranked else None


def reference_run(name: str, stages: int, micro_batches: int, costs: Any) -> tuple[Schedule, Any, Any]:
    """The reference schedule (its registry defaults), its costs and its simulation at the top clocks."""
    from envpipe.schedules import VIRTUAL_STAGES, get_schedule
    from envpipe.sim import simulate

    v = VIRTUAL_STAGES.get(name) or 1
    ref_costs = costs.chunked(v)
    schedule = get_schedule(name, stages * v, micro_batches, costs=ref_costs,
                            virtual_stages=v if v > 1 else None)
    return schedule, ref_costs, simulate(schedule, ref_costs)


def candidates(stages: int, micro_batches: int, costs: Any, *, families: Sequence[str] | None = None,
               memory_cap: float | None = None) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Every candidate of ``families`` (default: the whole registry), and the (label, why) left out."""
    from envpipe.schedules import SCHEDULES

    names = list(SCHEDULES) if families is None else list(families)
    unknown = [n for n in names if n not in SCHEDULES]
    if unknown:
        raise ConfigError(f"unknown schedule family {unknown[0]!r}; choose from {', '.join(SCHEDULES)}")
    found: list[Candidate] = []
    rejected: list[tuple[str, str]] = []
    for name in names:
        for label, params in _grid(name, stages, micro_batches, costs, memory_cap):
            try:
                candidate = _candidate(name, label, params, stages, micro_batches, costs)
            except EnvpipeError as err:
                rejected.append((label, str(err).splitlines()[0]))
                continue
            if memory_cap is not None and max(candidate.peak_activations) > memory_cap + 1e-9:
                rejected.append((label, f"holds {max(candidate.peak_activations):g} activations on a GPU, "
                                        f"over the memory cap {memory_cap:g}"))
                continue
            found.append(candidate)
    return found, rejected


def _grid(name: str, stages: int, micro_batches: int, costs: Any,
          memory_cap: float | None) -> list[tuple[str, dict[str, Any]]]:
    """The parameter sets tried for family ``name`` (label, params)."""
    from envpipe.schedules import VIRTUAL_STAGES, compute_r

    def r_for(lag: list[int]) -> list[int]:
        # The memory left after the 1F1B warm-up and the W lag bounds the extra forwards (EnvPipe's cap).
        cap = None if memory_cap is None else [max(0, int(memory_cap) - (stages - s) - lag[s])
                                               for s in range(stages)]
        return list(compute_r(stages, micro_batches, costs, memory_cap=cap))

    if name == "ours":
        r = r_for([0] * stages)
        return [(f"ours r={r}", {"r": r})]
    if name == "ours-w":
        out = []
        for rule, lag_of in LAG_RULES.items():
            lag = [lag_of(s) for s in range(stages)]
            r = r_for(lag)
            out.append((f"ours-w r={r} W lag={rule}", {"r": r, "lag": lag}))
        return out
    if name == "interleaved":
        return [(f"interleaved v={v}", {"virtual_stages": v}) for v in INTERLEAVED_V]
    v = VIRTUAL_STAGES.get(name)
    return [(name, {"virtual_stages": v} if v else {})]


def _candidate(name: str, label: str, params: dict[str, Any], stages: int, micro_batches: int,
               costs: Any) -> Candidate:
    from envpipe.schedules import get_schedule, ours_w
    from envpipe.sim import simulate
    from envpipe.verify import verify

    v = params.get("virtual_stages") or 1
    chunked = costs.chunked(v)
    if name == "ours-w":
        schedule = ours_w.build(stages, micro_batches, params["r"], params["lag"])
    else:
        schedule = get_schedule(name, stages * v, micro_batches, params.get("r"), costs=chunked,
                                virtual_stages=params.get("virtual_stages"))
    report = verify(schedule)
    peak = tuple(n / v for n in report.max_in_flight)
    return Candidate(name, label, params, schedule, chunked, peak, simulate(schedule, chunked).iteration_time_ms)


def search(stages: int, micro_batches: int, costs: Any, *, reference: str = "1f1b",
           slowdown_bound: float = 0.01, deadline_ms: float | None = None, memory_cap: float | None = None,
           policy: str = "optimal", families: Sequence[str] | None = None, planned: int = 3) -> JointResult:
    """Choose family, parameters and clocks with the least energy within the deadline and the memory cap.

    Args:
        stages: GPUs in the pipeline (S); ``costs`` describes their stages as 1F1B cuts the model.
        micro_batches: M.
        costs: ``envpipe.sim.CostModel`` with S stages.
        reference: the schedule (registry name, default parameters) whose top-clock time sets the deadline.
        slowdown_bound: deadline = reference time x (1 + bound), unless ``deadline_ms`` is given.
        deadline_ms: an absolute deadline (ms) instead.
        memory_cap: most activations per GPU (micro-batches of a GPU's share of the model); None = no cap.
        policy: the clock planner: ``optimal``, ``balanced`` or ``greedy``.
        families: the families to try (default: every schedule in the registry).
        planned: candidates always planned (best LP bounds first); later ones only if they can still win.

    Raises:
        ConfigError: a bad bound, cap, policy or family.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown planner policy {policy!r} for the joint search; choose one of "
                          f"{', '.join(POLICIES)}")
    if memory_cap is not None and memory_cap < 1:
        raise ConfigError(f"--memory-cap is in activations per GPU and must be >= 1, got {memory_cap:g}")
    if deadline_ms is None and not -1 < slowdown_bound < 1:
        raise ConfigError(f"the slowdown bound is a fraction, e.g. 0.01 for 1%; got {slowdown_bound}")
    _, _, ref = reference_run(reference, stages, micro_batches, costs)
    deadline = ref.iteration_time_ms * (1 + slowdown_bound) if deadline_ms is None else float(deadline_ms)
    if deadline <= 0:
        raise ConfigError(f"the deadline must be > 0 ms, got {deadline:g}")
    found, rejected = candidates(stages, micro_batches, costs, families=families, memory_cap=memory_cap)
    fast = []
    for cand in found:
        if cand.top_ms > deadline * (1 + 1e-9):
            rejected.append((cand.label, f"takes {cand.top_ms:.1f} ms at the top clocks, over the deadline "
                                         f"{deadline:.1f} ms"))
        else:
            fast.append(cand)
    bounds = {id(c): lp_bound_j(c, deadline) for c in fast}
    fast.sort(key=lambda c: (bounds[id(c)] is None, bounds[id(c)] or 0.0, c.top_ms))
    ranked: list[Choice] = []
    for k, cand in enumerate(fast):
        bound = bounds[id(cand)]
        best = min((c.dag_energy_j for c in ranked if c.met_deadline), default=None)
        if k >= planned and bound is not None and best is not None and bound >= best:
            rejected.append((cand.label, f"not planned: its LP bound {bound:.1f} J is above the best plan "
                                         f"{best:.1f} J"))
            continue
        ranked.append(plan(cand, deadline, policy, ref, bound))
    met = sorted((c for c in ranked if c.met_deadline), key=lambda c: c.energy_j)
    rejected += [(c.candidate.label, f"planned {c.iteration_ms:.1f} ms, over the deadline") for c in ranked
                 if not c.met_deadline]
    return JointResult(reference, ref.iteration_time_ms, ref.energy_j, deadline, memory_cap, met, rejected,
                       f"simulated: {costs.describe()}")


def plan(cand: Candidate, deadline_ms: float, policy: str, ref: Any, bound: float | None = None) -> Choice:
    """Plan the clocks of one candidate for ``deadline_ms`` (simulated); ``ref`` is the reference's SimResult."""
    from envpipe.planner import plan_clocks

    result = plan_clocks(cand.schedule, cand.costs, policy, slowdown_bound=0.0, baseline_ms=deadline_ms,
                         reference=(cand.schedule, cand.costs))
    sim = result.sim
    pdag = cand.planned_dag
    dag_j = pdag.dag.evaluate(pdag.choice(result.clocks))[1]
    return Choice(cand, result.clocks, sim.energy_j, sim.iteration_time_ms, 1 - sim.energy_j / ref.energy_j,
                  sim.iteration_time_ms / ref.iteration_time_ms - 1, result.met_bound, bound, dag_j, policy,
                  result.solver)


def lp_bound_j(cand: Candidate, deadline_ms: float) -> float | None:
    """The LP relaxation's energy on the candidate's DAG (a lower bound), or None without scipy."""
    try:
        from envpipe.planner.lp_bound import solve_bound

        return solve_bound(cand.planned_dag.dag, deadline_ms).energy_j
    except ImportError:
        return None
