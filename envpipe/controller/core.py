"""What the controller's states share: the per-rank :class:`Context` and the measuring steps.

Each state is a generator function (:mod:`envpipe.controller.states`, :mod:`.planning`, :mod:`.steady`);
every ``yield`` in it is exactly one real training step (the engine's ``train_batch``: one optimizer step),
and the code between two yields runs between those steps on every rank in lockstep (window marks, the
collectives that gather timings, rank 0's decisions and their broadcast). So planning never adds hidden
iterations: ``--steps N`` is N optimizer steps whatever the controller does.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from envpipe.controller.config import ControllerConfig
from envpipe.controller.meter import EnergyMeter
from envpipe.controller.ports import Comm, EnginePort, Gpu, Listener
from envpipe.controller.windows import Window, median_timeline, sum_by_stage
from envpipe.ir import uniform_plan

log = logging.getLogger("envpipe.controller")

# Steps per reconfiguration round and per drift check: the planner sees their per-unit median timeline,
# since one step of short CPU units is a noisy sample (a descheduled rank stretches a unit several times).
SAMPLES = 3


@dataclass(frozen=True)
class StepResult:
    """What the controller learns from one step: its loss (a tensor or a float) and its duration."""

    loss: Any
    wall_ms: float
    index: int


Program = Generator[None, StepResult, None]


@dataclass
class Context:
    """Everything the states share on one rank. Rank 0 holds the planner's objects; every rank holds the
    schedule and clocks it runs."""

    config: ControllerConfig
    port: EnginePort
    comm: Comm
    meter: EnergyMeter
    gpu: Gpu
    simulated: bool
    stages: int
    micro_batches: int
    listener: Listener
    fingerprint: Callable[[], dict[str, Any]]
    schedule: Any = None
    clocks: dict[int, dict[str, int]] | None = None
    state: str = "warm-up"
    steps_done: int = 0
    state_started_at: int = 0  # steps_done when the current state was entered
    sync: bool = False  # measured steps wait for their loss (the step's duration then includes all its work)
    step_counts: Counter = field(default_factory=Counter)
    phases: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    iteration_s: float = 0.0
    baseline: Window | None = None
    baseline_source: dict[str, Any] | None = None  # the plan file's stored baseline, when ctx.baseline is it
    profile: dict[str, Any] | None = None
    costs: Any = None
    plan: dict[str, Any] | None = None  # the plan file's object once planned (every rank)
    plan_version: int = 0  # plans made so far (a re-plan adds one): step hooks can tell a new plan
    target_ms: float | None = None
    baseline_ms: float | None = None
    unit_history: list[dict[int, dict[str, float]]] = field(default_factory=list)  # per check at this plan
    predicted: dict[str, Any] | None = None
    at_plan: list[Window] = field(default_factory=list)
    rounds: list[tuple[Window, Window]] = field(default_factory=list)
    drift: dict[str, Any] = field(default_factory=lambda: {"checks": 0, "over_bound": 0, "replans": []})
    last_timeline: list[Any] = field(default_factory=list)
    unavailable_windows: int = 0
    open_segment: Any = None  # an at-plan energy window in progress
    planned: bool = False

    @property
    def is_rank0(self) -> bool:
        """Rank 0 decides, prints progress and builds the result."""
        return self.comm.rank == 0

    def one_f_one_b(self) -> Any:
        """The baseline's schedule: DeepSpeed's 1F1B order."""
        from envpipe.schedules import get_schedule

        return get_schedule("1f1b", self.stages, self.micro_batches)

    def top_clocks(self, schedule: Any, clock_mhz: int | None = None) -> dict[int, dict[str, int]]:
        """Every unit of ``schedule`` at ``clock_mhz`` (default the top clock)."""
        clock = self.gpu.max_clock_mhz if clock_mhz is None else clock_mhz
        return uniform_plan(schedule, clock)

    def use(self, schedule: Any, clocks: dict[int, dict[str, int]] | None) -> None:
        """Run ``schedule`` at ``clocks`` from the next step on."""
        self.port.set_plan(schedule, clocks)
        self.schedule, self.clocks = schedule, clocks

    def use_baseline(self) -> None:
        """1F1B with every unit at the top clock."""
        schedule = self.one_f_one_b()
        self.use(schedule, self.top_clocks(schedule))

    def emit(self, event: str, **fields: Any) -> None:
        """A progress event (rank 0 only)."""
        if self.is_rank0:
            self.listener(event, **fields)

    def warn(self, text: str) -> None:
        """A warning: on rank 0 shown and kept for the report, on other ranks logged."""
        if self.is_rank0:
            self.warnings.append(text)
            self.listener("message", text=text)
        else:
            log.warning("%s", text)

    def enter(self, state: str, label: str, total: int | None) -> None:
        """Enter ``state`` (a progress bar of ``total`` steps, or open-ended with None)."""
        self.state, self.state_started_at = state, self.steps_done
        self.emit("phase", phase=state, label=label, total=total)

    def done(self, state: str, info: str, **fields: Any) -> None:
        """The state's progress bar is finished."""
        self.emit("phase_done", phase=state, info=info, **fields)


def measure(
    ctx: Context,
    n: int,
    *,
    phase: str,
    spans: bool = False,
    settle: bool = False,
    info: str = "",
    offset: int = 0,
    total: int = 0,
) -> Generator[None, StepResult, Window]:
    """Run ``n`` steps in one energy window (every rank opens its own); every rank returns the same Window.

    ``settle`` runs one unmeasured step first: the first step after a switch of schedule or clocks (new
    buffers, the agent applying the clock) is typical of neither side. With ``spans`` the steps' timelines
    are gathered once the window is closed (no collective inside a window: a collective per step added its
    time to the windows that gathered and not to the others).
    """
    if settle:
        yield
    ctx.comm.barrier()
    window_id = ctx.meter.begin()
    start = time.perf_counter()
    step_ms, losses, records, units = [], [], [], {"F": [], "B": []}
    ctx.sync = True
    for i in range(n):
        result = yield
        losses.append(float(result.loss))
        step_ms.append(result.wall_ms)
        records.append(ctx.port.timeline_record())
        _collect_unit_ms(ctx.port.last_timeline(), units)
        if total:
            ctx.emit(
                "advance",
                phase=phase,
                completed=offset + i + 1,
                info=f"{info}loss {losses[-1]:.3f} · {step_ms[-1]:.0f} ms/it",
            )
    ctx.sync = False
    ctx.comm.barrier()
    wall_ms = (time.perf_counter() - start) * 1e3
    energy = ctx.meter.end(window_id)
    return _window(ctx, n, wall_ms, step_ms, losses, units, energy, records if spans else None)


def _window(
    ctx: Context,
    n: int,
    wall_ms: float,
    step_ms: list[float],
    losses: list[float],
    units: dict,
    energy: Any,
    records: list[Any] | None,
) -> Window:
    import statistics

    from envpipe.controller.windows import span_iteration_ms

    timelines = ctx.port.gather_timelines(records) if records else []
    if timelines:
        ctx.last_timeline = timelines[-1]
    local_units = {k: statistics.median(v) for k, v in units.items() if v}
    energy_j = None if energy is None else energy.energy_j / n
    simulated = ctx.simulated if energy is None else bool(energy.simulated)
    gathered = ctx.comm.all_gather((ctx.port.stage, energy_j, simulated, local_units))
    window = Window(
        iterations=n,
        iteration_ms=wall_ms / n,
        iteration_ms_median=statistics.median(step_ms) if step_ms else wall_ms / n,
        stage_energy_j=sum_by_stage([(g[0], g[1]) for g in gathered]),
        simulated=all(g[2] for g in gathered),
        losses=losses,
        stage_unit_ms={g[0]: g[3] for g in gathered},
        span_iteration_ms=statistics.median(span_iteration_ms(t) for t in timelines) if timelines else None,
    )
    if window.energy_j is None:
        ctx.unavailable_windows += 1
    return window


def sample_timeline(ctx: Context, n: int = SAMPLES) -> Generator[None, StepResult, tuple[float, list[Any]]]:
    """Run ``n`` steps; their last loss and every stage's per-unit median timeline (one collective after)."""
    records, loss = [], 0.0
    for _ in range(n):
        result = yield
        loss = result.loss
        records.append(ctx.port.timeline_record())
    timeline = median_timeline(ctx.port.gather_timelines(records))
    ctx.last_timeline = timeline
    return float(loss), timeline


def _collect_unit_ms(spans: list[Any], into: dict[str, list[float]]) -> None:
    """Mean forward and backward unit time of one step on this stage."""
    import statistics

    for kind in ("F", "B"):
        durations = [s.end_ms - s.start_ms for s in spans if str(s.unit).startswith(kind)]
        if durations:
            into[kind].append(statistics.fmean(durations))
