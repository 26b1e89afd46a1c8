"""Clock planning: which SM clock each unit runs at, so energy falls and the iteration stays within the bound.

* ``plan_clocks(schedule, costs, policy)`` plans offline on the simulator (``envpipe.sim.simulate``).
* ``Reconfigurer(schedule, costs, policy).update(clocks, timeline)`` is the online form: the training job
  calls it once per iteration with the spans of that iteration (``UnitSpan``, gathered from all stages) and
  applies the plan it returns, until it returns None. ``plan_clocks`` is the same loop on simulated spans.

Policies (``POLICIES``): ``default`` (no change), ``greedy`` and ``balanced`` (the paper's intent with its
defects fixed), ``optimal`` (the whole DAG at once), and ``paper`` / ``paper-greedy`` (the ATC'23 algorithm,
reference only). Every policy runs under the same guard: the iteration may be at most ``1 + slowdown_bound``
times the baseline (1F1B, every unit at the top clock) measured at the start, and the round cap ends every
run on a plan that meets it (the latest one seen that did, or the top clocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envpipe.errors import ConfigError
from envpipe.ir import ClockPlan, Schedule, uniform_plan
from envpipe.planner import balanced, greedy, optimal, paper
from envpipe.planner.observe import Observation, critical_path, observe
from envpipe.planner.spec import PolicySpec
from envpipe.registry import Registry

__all__ = ["POLICIES", "PlanResult", "Reconfigurer", "critical_path", "plan_clocks", "top_plan"]

# The registry: one line per policy (its module defines the SPEC), in the order --help lists them.
POLICIES: Registry[PolicySpec] = Registry(
    "reconfiguration policy",
    [
        PolicySpec("default", "no reconfiguration: the clock type's plan as it is", lambda sched, costs: None),
        greedy.SPEC,
        balanced.SPEC,
        optimal.SPEC,
        paper.SPEC,
        paper.GREEDY_SPEC,
    ],
)
DEFAULT_MAX_ROUNDS = {name: spec.max_rounds for name, spec in POLICIES.items() if spec.max_rounds}


def top_plan(schedule: Schedule, costs) -> ClockPlan:
    """Every unit at the top clock (the baseline's clocks)."""
    return uniform_plan(schedule, costs.max_clock_mhz)


class Reconfigurer:
    """Online reconfiguration: one ``update`` per iteration until it returns None.

    Args:
        schedule: the schedule being run.
        costs: the cost model (the profile's, in training): predicts a unit's time at other clocks.
        policy: one of ``POLICIES``.
        slowdown_bound: allowed slowdown against the baseline (0.01 = 1 %).
        max_rounds: cap on updates (default per policy); at the cap a plan that misses the bound is replaced
            once by the latest plan that met it (the top clocks if none did), then the Reconfigurer stops.
        baseline_ms: the baseline iteration time measured at the start (1F1B, top clocks). Without it the
            simulated baseline is scaled by measured / simulated time of the first update's plan.
        reference: the baseline's (schedule, costs) in the model, default 1F1B on ``costs``. A schedule with
            several stages per rank is compared against the pipeline of its GPUs (``envpipe.planner.joint``).
    """

    def __init__(self, schedule: Schedule, costs, policy: str, *, slowdown_bound: float = 0.01,
                 max_rounds: int | None = None, baseline_ms: float | None = None,
                 reference: tuple[Schedule, Any] | None = None) -> None:
        spec = POLICIES.lookup(policy)
        if policy.startswith("paper") and schedule.name not in ("1f1b", "ours"):
            raise ConfigError(f"the {policy} policy (the ATC'23 algorithm) runs on 1f1b and ours only, not "
                              f"{schedule.name!r}; use optimal, balanced or greedy")
        if not 0 <= slowdown_bound < 1:
            raise ConfigError(f"slowdown_bound is a fraction in [0, 1), e.g. 0.01 for 1%; got {slowdown_bound}")
        if max_rounds is not None and max_rounds < 0:
            raise ConfigError(f"max_rounds must be >= 0, got {max_rounds}")
        if baseline_ms is not None and baseline_ms <= 0:
            raise ConfigError(f"baseline_ms must be > 0 ms, got {baseline_ms}")
        self.schedule, self.costs, self.policy = schedule, costs, policy
        self.slowdown_bound = slowdown_bound
        self.max_rounds = spec.max_rounds if max_rounds is None else max_rounds
        self.baseline_ms = baseline_ms
        self.reference = reference
        self.target_ms: float | None = None
        self.bound_reachable = True
        self.rounds = 0
        self._rule = spec.make(schedule, costs)
        self._fell_back = False
        self._last_within: ClockPlan | None = None

    def update(self, clocks: ClockPlan | None, timeline: list[Any]) -> ClockPlan | None:
        """The plan for the next iteration, given this iteration's clocks and spans; None = keep (stable)."""
        if self._rule is None:
            return None
        obs = observe(self.schedule, self.costs, clocks, timeline)
        if self.target_ms is None:
            self._calibrate(obs, clocks)
        assert self.target_ms is not None
        self.rounds += 1
        if obs.iteration_ms <= self.target_ms * (1 + 1e-9) and clocks is not None:
            self._last_within = clocks
        if self.rounds > self.max_rounds:
            return self._at_cap(obs)
        return self._rule.step(obs, self.target_ms, self.rounds)

    def _calibrate(self, obs: Observation, clocks: ClockPlan | None) -> None:
        from envpipe.schedules import get_schedule
        from envpipe.sim import simulate

        stages, micro_batches = self.schedule.stages, self.schedule.micro_batches
        reference = self.reference or (get_schedule("1f1b", stages, micro_batches), self.costs)
        model_baseline_ms = simulate(*reference).iteration_time_ms
        if self.baseline_ms is None:
            # Measured and simulated time differ (overheads, model error): compare like with like.
            scale = obs.iteration_ms / simulate(self.schedule, self.costs, clocks).iteration_time_ms
            self.baseline_ms = model_baseline_ms * scale
        self.target_ms = self.baseline_ms * (1 + self.slowdown_bound)
        # Whether this schedule can meet the bound at all is judged as a ratio in the model's own frame: one
        # noisy measured sample must not raise the target for the whole run (the guard raises clocks instead).
        fastest_ratio = simulate(self.schedule, self.costs).iteration_time_ms / model_baseline_ms
        if fastest_ratio > 1 + self.slowdown_bound:  # this schedule cannot meet the bound at any clocks
            self.bound_reachable = False
            self.target_ms = self.baseline_ms * fastest_ratio

    def _at_cap(self, obs: Observation) -> ClockPlan | None:
        assert self.target_ms is not None
        if obs.iteration_ms <= self.target_ms * (1 + 1e-9) or self._fell_back or self.policy.startswith("paper"):
            return None
        self._fell_back = True
        # The latest plan that met the bound (lower clocks than the top, usually), else the top clocks.
        return self._last_within or top_plan(self.schedule, self.costs)


@dataclass(frozen=True)
class PlanResult:
    """An offline plan and its simulated outcome (every number simulated)."""

    clocks: ClockPlan
    sim: Any  # envpipe.sim.SimResult of the final plan
    rounds: int
    policy: str
    baseline_ms: float
    target_ms: float
    bound_reachable: bool
    solver: str | None = None  # optimal policy: "lp-rounded" (scipy HiGHS) or "heuristic"; else None

    @property
    def met_bound(self) -> bool:
        """True when the simulated iteration is within the bound."""
        return self.sim.iteration_time_ms <= self.target_ms * (1 + 1e-9)


def plan_clocks(schedule: Schedule, costs, policy: str, *, slowdown_bound: float = 0.01,
                start: ClockPlan | None = None, max_rounds: int | None = None,
                baseline_ms: float | None = None,
                reference: tuple[Schedule, Any] | None = None) -> PlanResult:
    """Run ``policy`` on simulated iterations from ``start`` (default: top clocks) until it is stable.

    Returns:
        The final plan with its simulation, the rounds taken and the bound used.
    """
    from envpipe.sim import simulate

    reconfigurer = Reconfigurer(schedule, costs, policy, slowdown_bound=slowdown_bound, max_rounds=max_rounds,
                                baseline_ms=baseline_ms, reference=reference)
    clocks = start if start is not None else top_plan(schedule, costs)
    rounds = 0
    while True:
        sim = simulate(schedule, costs, clocks)
        new = reconfigurer.update(clocks, sim.timeline)
        if new is None:
            break
        clocks, rounds = new, rounds + 1
    if reconfigurer.target_ms is None:  # default policy: still report the bound
        reconfigurer._calibrate(observe(schedule, costs, clocks, sim.timeline), clocks)
    return PlanResult(clocks, sim, rounds, policy, float(reconfigurer.baseline_ms or 0.0),
                      float(reconfigurer.target_ms or 0.0), reconfigurer.bound_reachable,
                      getattr(reconfigurer._rule, "solver", None))
