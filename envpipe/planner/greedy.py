"""The ``greedy`` policy: the paper's greedy reconfiguration with its defects fixed (see ``balanced``).

Too slow: raise the last non-top unit of the critical path (read from start/end times) by 90 MHz, one unit
per round, as the paper (by the excess share of the top clock when that is more). Within the bound: lower
the one unit whose next step down saves the most energy and fits in its slack. The Reconfigurer's guard and
round cap apply as for every policy; one unit per round is slow on big pipelines (S=8, M=32 from f_low
clocks does not reach the bound in 400 rounds, so the cap falls back to the top clocks).
"""

from __future__ import annotations

from envpipe.ir import ClockPlan
from envpipe.planner.balanced import TABU_ROUNDS
from envpipe.planner.moves import faster, lower_into_slack
from envpipe.planner.observe import Observation, observed_critical_path
from envpipe.planner.spec import PolicySpec


class Greedy:
    """Raise the last non-top unit of the critical path by ``raise_mhz``; lower one unit per round."""

    name = "greedy"

    def __init__(self, schedule, costs, *, raise_mhz: int = 90, lower_mhz: int = 90) -> None:
        self.schedule, self.costs = schedule, costs
        self.raise_mhz, self.lower_mhz = raise_mhz, lower_mhz
        self.raised: dict[int, int] = {}

    def step(self, obs: Observation, target_ms: float, round_no: int) -> ClockPlan | None:
        """One round: the next plan, or None when nothing should change."""
        dag, choice = obs.pdag.dag, list(obs.choice)
        units = list(obs.pdag.unit_nodes.values())
        if obs.iteration_ms > target_ms:
            path = observed_critical_path(obs)
            for key in reversed(path):
                u = obs.pdag.unit_nodes[key]
                if choice[u] > 0:
                    # Far over the bound, step by the excess share of the top clock rather than 90 MHz.
                    top_mhz = dag.options[u][0].clock_mhz
                    step = max(self.raise_mhz, int((obs.iteration_ms / target_ms - 1) * top_mhz))
                    choice[u] = faster(dag, u, choice[u], step)
                    self.raised[u] = round_no
                    return obs.pdag.plan(choice)
            return None
        frozen = {u for u, r in self.raised.items() if round_no - r < TABU_ROUNDS}
        moved = lower_into_slack(dag, choice, obs.dag_deadline_ms(target_ms), units, self.lower_mhz,
                                 frozen=frozen, single=True)
        return obs.pdag.plan(choice) if moved else None


SPEC = PolicySpec("greedy", "raise the critical path, lower everything else, in big steps", Greedy, 400)
