"""A pipeline without torch for the controller's tests: one thread per rank, the simulator as the engine.

``SimPipeline`` runs every step on ``envpipe.sim.simulate`` at the plan the ranks set (central DVFS model,
H100 clocks), so unit times react to clocks exactly as emulated DVFS does; ``FakeAgent`` hands each rank its
stage's simulated energy. ``ThreadComm`` gives the ranks real collectives (a barrier with a timeout, so a
rank that leaves the lockstep fails the test instead of hanging it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from envpipe_agent.dvfs import get_card

from envpipe.controller import Controller, ControllerConfig, Gpu
from envpipe.controller.planfile import fingerprint
from envpipe.sim import CostModel, UnitSpan, simulate

CARD = get_card("h100")
TIMEOUT_S = 60.0


class ThreadComm:
    """Collectives between the rank threads of one process."""

    def __init__(self, shared: dict, rank: int, world_size: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, world_size

    def barrier(self) -> None:
        self.shared["barrier"].wait(TIMEOUT_S)

    def all_gather(self, obj: Any) -> list[Any]:
        slots = self.shared["slots"]
        self.barrier()
        slots[self.rank] = obj
        self.barrier()
        out = list(slots)
        self.barrier()
        return out

    def broadcast(self, obj: Any) -> Any:
        return self.all_gather(obj)[0]


@dataclass
class SimPipeline:
    """Every rank's step at once: the simulator on the plan rank 0 runs (all ranks run the same plan)."""

    stages: int
    micro_batches: int
    fwd_ms: list[float]
    bwd_ms: list[float]
    slow_from_step: int | None = None  # from this step on, stage slow_stage runs slow_factor times slower
    slow_stage: int = 0
    slow_factor: float = 1.0
    noise: dict[int, float] = field(default_factory=dict)  # clock -> factor on unit times at that clock
    steps: int = 0
    plans: list[tuple[str, bool]] = field(default_factory=list)  # per step: (schedule, all units at top?)
    result: Any = None

    def run(self, schedule: Any, clocks: dict) -> None:
        fwd, bwd = list(self.fwd_ms), list(self.bwd_ms)
        if self.slow_from_step is not None and self.steps >= self.slow_from_step:
            fwd[self.slow_stage] *= self.slow_factor
            bwd[self.slow_stage] *= self.slow_factor
        costs = CostModel.build(self.stages, fwd_ms=fwd, bwd_ms=bwd)
        self.result = simulate(schedule, costs, clocks)
        at_top = all(c == CARD.max_clock_mhz for units in clocks.values() for c in units.values())
        self.plans.append((schedule.name, at_top))
        self.steps += 1


class FakePort:
    """One rank's engine: its stage of the shared simulated step."""

    def __init__(self, pipeline: SimPipeline, comm: ThreadComm, shared: dict) -> None:
        self.pipeline, self.comm, self.shared = pipeline, comm, shared
        self.stage = comm.rank
        self.schedule = None
        self.clocks = None
        self.energy_j = 0.0  # this stage's simulated energy so far (the fake agent reads it)
        self.optimizer_steps = 0

    def set_plan(self, schedule: Any, clocks: dict | None) -> None:
        self.schedule, self.clocks = schedule, clocks

    def run(self) -> float:
        """One training step of every rank in lockstep; rank 0 runs the shared simulation."""
        self.comm.barrier()
        if self.stage == 0:
            self.pipeline.run(self.schedule, self.clocks)
        self.comm.barrier()
        self.energy_j += self.pipeline.result.stage_energy_j[self.stage]
        self.optimizer_steps += 1
        return 5.0 / (1 + 0.01 * self.optimizer_steps)

    def last_timeline(self) -> list[Any]:
        result = self.pipeline.result
        spans = [s for s in result.timeline if s.stage == self.stage]
        return [
            UnitSpan(
                s.stage,
                s.unit,
                s.start_ms,
                s.start_ms + (s.end_ms - s.start_ms) * self.pipeline.noise.get(s.clock_mhz, 1.0),
                s.clock_mhz,
            )
            for s in spans
        ]

    def timeline_record(self) -> list[Any]:
        return self.last_timeline()

    def gather_timelines(self, records: list[Any]) -> list[list[Any]]:
        every = self.comm.all_gather(records)
        return [[span for rank in every for span in rank[i]] for i in range(len(records))]


@dataclass
class _Energy:
    energy_j: float
    duration_s: float
    simulated: bool = True


class FakeAgent:
    """Energy windows of one rank: its stage's simulated energy between the marks."""

    def __init__(self, port: FakePort) -> None:
        self.port = port
        self.marks: dict[int, float] = {}

    def window_begin(self) -> int:
        self.marks[len(self.marks)] = self.port.energy_j
        return len(self.marks) - 1

    def window_end(self, window_id: int) -> _Energy:
        # Idle windows (no step) still draw idle power: 0.2 s at the card's idle power.
        energy = self.port.energy_j - self.marks[window_id]
        return _Energy(energy if energy > 0 else CARD.idle_power_w * 0.2, 0.2)


def run_pipeline(
    config: ControllerConfig,
    steps: int,
    *,
    stages: int = 2,
    micro_batches: int = 4,
    fwd_ms: list[float] | None = None,
    bwd_ms: list[float] | None = None,
    agent: bool = True,
    print_fingerprint: dict | None = None,
    **pipeline_options: Any,
) -> tuple[dict, SimPipeline, list]:
    """Run ``steps`` steps on ``stages`` rank threads; rank 0's result, the pipeline and every rank's port."""
    pipeline = SimPipeline(
        stages, micro_batches, fwd_ms or [10.0] * stages, bwd_ms or [20.0] * stages, **pipeline_options
    )
    shared = {"barrier": threading.Barrier(stages), "slots": [None] * stages}
    results: list[Any] = [None] * stages
    errors: list[BaseException] = []
    ports: list[FakePort] = []

    def rank_main(rank: int) -> None:
        try:
            comm = ThreadComm(shared, rank, stages)
            port = FakePort(pipeline, comm, shared)
            ports.append(port)
            controller = Controller(
                config,
                port=port,
                comm=comm,
                client=FakeAgent(port) if agent else None,
                gpu=Gpu(CARD.name, CARD.clocks_mhz),
                simulated=True,
                stages=stages,
                micro_batches=micro_batches,
                fingerprint=lambda: print_fingerprint or default_fingerprint(stages, micro_batches),
                listener=(lambda event, **fields: None),
            )
            for _ in range(steps):
                controller.step(port.run)
            results[rank] = controller.finish()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(stages)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results[0], pipeline, ports


def default_fingerprint(stages: int, micro_batches: int, **changes: Any) -> dict:
    fields = dict(
        model="sha256:fake",
        stages=stages,
        micro_batches=micro_batches,
        micro_batch_size=2,
        seq_len=64,
        card=CARD.name,
        clocks_mhz=list(CARD.clocks_mhz),
        dvfs_model="central",
        envpipe_version="0.1.0",
    )
    fields.update(changes)
    return fingerprint(**fields)
