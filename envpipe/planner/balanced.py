"""The ``balanced`` and ``greedy`` policies: the paper's reconfiguration intent, with its defects fixed.

Paper (ATC'23): raise clocks along the critical path until the iteration is fast enough. Fixed here:

* the critical path is read from start/end times of units and transfers (``envpipe.planner.observe``),
  not from a receive-wait threshold;
* an explicit guard: the iteration must stay within ``(1 + bound)`` of the baseline measured at the start;
* clocks also go *down* where slack appears (never on a unit raised in the last few rounds, so a plan
  does not oscillate), and a round cap in the Reconfigurer ends every run on a plan that meets the bound;
* nothing assumes the last stage is the heaviest.

``balanced`` raises every critical unit at the path's lowest clock by ``raise_mhz`` (30 MHz, as the paper;
more when the iteration is far over the bound: the excess share of the top clock)
and, once within the bound, lowers every unit with slack by ``lower_mhz`` at a time, sharing each path's
slack between the units on it (``envpipe.planner.greedy`` is the one-unit-per-round variant).
"""

from __future__ import annotations

from envpipe.ir import ClockPlan
from envpipe.planner.moves import critical_nodes, faster, lower_into_slack
from envpipe.planner.observe import Observation
from envpipe.planner.spec import PolicySpec

TABU_ROUNDS = 5  # a unit raised this recently is not lowered again
_PRICE_DECAY = 0.6  # balanced: lowering first takes the moves that save the most per ms, then cheaper ones


class Balanced:
    """Raise the critical path's slowest units when too slow; lower units with slack when within the bound."""

    name = "balanced"

    def __init__(self, schedule, costs, *, raise_mhz: int = 30, lower_mhz: int = 15) -> None:
        self.schedule, self.costs = schedule, costs
        self.raise_mhz, self.lower_mhz = raise_mhz, lower_mhz
        self.raised: dict[int, int] = {}  # DAG node -> round it was last raised
        self.price: float | None = None

    def step(self, obs: Observation, target_ms: float, round_no: int) -> ClockPlan | None:
        """One round: the next plan, or None when nothing should change."""
        dag, choice = obs.pdag.dag, list(obs.choice)
        units = list(obs.pdag.unit_nodes.values())
        if obs.iteration_ms > target_ms:
            crit = [u for u in critical_nodes(dag, choice, dag.succs(), units) if choice[u] > 0]
            if not crit:
                return None  # the critical path is at the top clock: the Reconfigurer's cap handles it
            lowest = min(dag.options[u][choice[u]].clock_mhz for u in crit)
            # Far over the bound, 30 MHz a round takes hundreds of rounds: step by the excess share instead.
            top_mhz = dag.options[crit[0]][0].clock_mhz
            step = max(self.raise_mhz, int((obs.iteration_ms / target_ms - 1) * top_mhz))
            for u in crit:
                if dag.options[u][choice[u]].clock_mhz == lowest:
                    choice[u] = faster(dag, u, choice[u], step)
                    self.raised[u] = round_no
            self.price = None
            return obs.pdag.plan(choice)
        frozen = {u for u, r in self.raised.items() if round_no - r < TABU_ROUNDS}
        deadline = obs.dag_deadline_ms(target_ms)
        while True:
            moved = lower_into_slack(dag, choice, deadline, units, self.lower_mhz, frozen=frozen,
                                     min_rate=self._price(dag, units))
            if moved:
                return obs.pdag.plan(choice)
            if self.price == 0.0:
                return None
            self.price = self.price * _PRICE_DECAY if self.price > 1e-3 else 0.0

    def _price(self, dag, units: list[int]) -> float:
        if self.price is None:  # start at the best saving rate of any one-step move (J per ms)
            rates = []
            for u in units:
                opts = dag.options[u]
                for c in range(len(opts) - 1):
                    grow = opts[c + 1].duration_ms - opts[c].duration_ms
                    if grow > 0:
                        rates.append((dag.reduced_j(u, c) - dag.reduced_j(u, c + 1)) / grow)
            self.price = max(rates, default=0.0)
        return self.price


SPEC = PolicySpec(
    "balanced", "the paper's intent, defects fixed: raise critical units, lower the rest in steps", Balanced, 200
)
