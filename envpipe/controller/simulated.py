"""A simulated pipeline for the controller: rank threads in one process, the simulator as the engine.

Tests and the drift-guard benchmark (``benchmarks/controller``) drive the real :class:`Controller` with it:
``SimPipeline`` runs every step through :func:`envpipe.sim.simulate` at the plan the ranks set (unit times
follow the DVFS model at each unit's clock, as emulated DVFS stretches real units), ``SimMeter`` hands each
rank its stage's simulated energy (the card and DVFS model the sim agent uses), and ``ThreadComm`` gives the
ranks real collectives (a barrier with a timeout, so a rank that leaves the lockstep fails instead of
hanging). Every number it produces is simulated. No torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from envpipe.controller.config import ControllerConfig
from envpipe.controller.driver import Controller
from envpipe.controller.ports import Gpu

BARRIER_TIMEOUT_S = 120.0


class ThreadComm:
    """Collectives between the rank threads of one process."""

    def __init__(self, shared: dict, rank: int, world_size: int) -> None:
        """``shared`` holds the ranks' barrier and exchange slots (see :func:`run_pipeline`)."""
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def barrier(self) -> None:
        """Wait for every rank thread."""
        self.shared["barrier"].wait(BARRIER_TIMEOUT_S)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order."""
        slots = self.shared["slots"]
        self.barrier()
        slots[self.rank] = obj
        self.barrier()
        out = list(slots)
        self.barrier()
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``."""
        return self.all_gather(obj)[0]


@dataclass
class SimPipeline:
    """Every rank's step at once: the simulator on the plan the ranks run (they all run the same plan).

    Attributes:
        slow_from_step: from this step on, ``slow_stage`` runs ``slow_factor`` times slower (emulated drift).
        noise: clock -> factor on the unit times that stages report at that clock (a noisy profile).
        plans: per step, (schedule name, every unit at the top clock?).
    """

    stages: int
    micro_batches: int
    fwd_ms: list[float]
    bwd_ms: list[float]
    card: str = "h100"
    dvfs_model: str = "central"
    slow_from_step: int | None = None
    slow_stage: int = 0
    slow_factor: float = 1.0
    noise: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    plans: list[tuple[str, bool]] = field(default_factory=list)
    result: Any = None
    rank_plans: dict = field(default_factory=dict)  # every rank's controller.plan at the end
    step_ms: list[float] = field(default_factory=list)  # simulated iteration time of each step
    step_states: list[str] = field(default_factory=list)  # the controller state each step ran in
    _costs: dict = field(default_factory=dict)

    def run(self, schedule: Any, clocks: dict) -> None:
        """Simulate one step of ``schedule`` at ``clocks``."""
        from envpipe.sim import simulate

        slow = self.slow_from_step is not None and self.steps >= self.slow_from_step
        self.result = simulate(schedule, self.costs(slow), clocks)
        self.step_ms.append(self.result.iteration_time_ms)
        top = self.costs(False).max_clock_mhz
        self.plans.append((schedule.name, all(c == top for units in clocks.values() for c in units.values())))
        self.steps += 1

    def costs(self, slow: bool) -> Any:
        """The cost model, with the slowed stage when ``slow`` (built once each)."""
        if slow not in self._costs:
            from envpipe.sim import CostModel

            fwd, bwd = list(self.fwd_ms), list(self.bwd_ms)
            if slow:
                fwd[self.slow_stage] *= self.slow_factor
                bwd[self.slow_stage] *= self.slow_factor
            self._costs[slow] = CostModel.build(
                self.stages, gpu=self.card, model=self.dvfs_model, fwd_ms=fwd, bwd_ms=bwd
            )
        return self._costs[slow]


class SimPort:
    """One rank's engine: its stage of the shared simulated step."""

    def __init__(self, pipeline: SimPipeline, comm: ThreadComm) -> None:
        """Rank ``comm.rank`` runs stage ``comm.rank``."""
        self.pipeline, self.comm = pipeline, comm
        self.stage = comm.rank
        self.schedule = None
        self.clocks = None
        self.energy_j = 0.0  # this stage's simulated energy so far (its SimMeter reads it)
        self.optimizer_steps = 0

    def set_plan(self, schedule: Any, clocks: dict | None) -> None:
        """Run ``schedule`` at ``clocks`` from the next step."""
        self.schedule, self.clocks = schedule, clocks

    def run(self) -> float:
        """One training step of every rank in lockstep (rank 0 runs the shared simulation); a falling loss."""
        self.comm.barrier()
        if self.stage == 0:
            self.pipeline.run(self.schedule, self.clocks)
        self.comm.barrier()
        self.energy_j += self.pipeline.result.stage_energy_j[self.stage]
        self.optimizer_steps += 1
        return 5.0 / (1 + 0.01 * self.optimizer_steps)

    def last_timeline(self) -> list[Any]:
        """This stage's simulated spans of the last step (times scaled by ``noise`` at their clock)."""
        from envpipe.sim import UnitSpan

        noise = self.pipeline.noise
        return [
            UnitSpan(
                s.stage,
                s.unit,
                s.start_ms,
                s.start_ms + (s.end_ms - s.start_ms) * noise.get(s.clock_mhz, 1.0),
                s.clock_mhz,
            )
            for s in self.pipeline.result.timeline
            if s.stage == self.stage
        ]

    def timeline_record(self) -> list[Any]:
        """The last step's spans (already on the common time axis)."""
        return self.last_timeline()

    def gather_timelines(self, records: list[Any]) -> list[list[Any]]:
        """Every stage's spans of each recorded step."""
        every = self.comm.all_gather(records)
        return [[span for rank in every for span in rank[i]] for i in range(len(records))]


@dataclass
class SimEnergy:
    """An energy window's answer (the agent client's ``EnergyWindow`` fields)."""

    energy_j: float
    duration_s: float
    simulated: bool = True


class SimMeter:
    """A rank's agent client as far as energy windows go: its stage's simulated energy between the marks."""

    def __init__(self, port: SimPort, idle_power_w: float) -> None:
        """``idle_power_w``: what a window without a step (the idle-power probe) draws for 0.2 s."""
        self.port, self.idle_power_w = port, idle_power_w
        self.marks: dict[int, float] = {}

    def window_begin(self) -> int:
        """Mark the energy so far."""
        self.marks[len(self.marks)] = self.port.energy_j
        return len(self.marks) - 1

    def window_end(self, window_id: int) -> SimEnergy:
        """The stage's energy since the mark."""
        energy = self.port.energy_j - self.marks.pop(window_id)
        return SimEnergy(energy if energy > 0 else self.idle_power_w * 0.2, 0.2)


def run_pipeline(
    config: ControllerConfig,
    steps: int,
    *,
    stages: int = 2,
    micro_batches: int = 4,
    fwd_ms: list[float] | None = None,
    bwd_ms: list[float] | None = None,
    agent: bool = True,
    fingerprint: dict | None = None,
    **pipeline_options: Any,
) -> tuple[dict, SimPipeline, list[SimPort]]:
    """Run ``steps`` steps on ``stages`` rank threads; rank 0's result, the pipeline and every rank's port."""
    from envpipe_agent.dvfs import get_card

    from envpipe.controller.planfile import fingerprint as make_fingerprint

    pipeline = SimPipeline(
        stages, micro_batches, fwd_ms or [10.0] * stages, bwd_ms or [20.0] * stages, **pipeline_options
    )
    card = get_card(pipeline.card)
    shared = {"barrier": threading.Barrier(stages), "slots": [None] * stages}
    results: list[Any] = [None] * stages
    errors: list[BaseException] = []
    ports: list[SimPort] = []
    print_ = fingerprint or make_fingerprint(
        model="simulated",
        stages=stages,
        micro_batches=micro_batches,
        micro_batch_size=2,
        seq_len=[64],
        card=card.name,
        clocks_mhz=list(card.clocks_mhz),
        dvfs_model=pipeline.dvfs_model,
        envpipe_version="sim",
    )

    def rank_main(rank: int) -> None:
        try:
            comm = ThreadComm(shared, rank, stages)
            port = SimPort(pipeline, comm)
            ports.append(port)
            controller = Controller(
                config,
                port=port,
                comm=comm,
                client=SimMeter(port, card.idle_power_w) if agent else None,
                gpu=Gpu(card.name, card.clocks_mhz),
                simulated=True,
                stages=stages,
                micro_batches=micro_batches,
                fingerprint=lambda: print_,
                listener=lambda event, **fields: None,
            )
            for _ in range(steps):
                if rank == 0:
                    pipeline.step_states.append(controller.state)
                controller.step(port.run)
            results[rank] = controller.finish()
            pipeline.rank_plans[rank] = controller.plan
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(stages)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results[0], pipeline, sorted(ports, key=lambda p: p.stage)
