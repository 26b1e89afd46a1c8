"""The :class:`Controller`: drives one rank's training steps through the controller's states."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from envpipe.controller.config import ControllerConfig
from envpipe.controller.core import Context, Program, StepResult
from envpipe.controller.meter import EnergyMeter
from envpipe.controller.ports import Comm, EnginePort, Gpu, Listener, log_listener
from envpipe.controller.program import program
from envpipe.controller.result import build_result
from envpipe.controller.steady import close_segment
from envpipe.controller.windows import span_dict

log = logging.getLogger("envpipe.controller")


class Controller:
    """Drives one rank's training steps through the controller's states (see :mod:`envpipe.controller`).

    Args:
        config: the controller's settings.
        port: the engine (sets schedule and clocks, gives timelines).
        comm: collectives over every rank.
        client: this rank's agent client (None: no agent, training goes on unplanned and says so once).
        gpu: the card as the agent reports it.
        simulated: the agent is the sim agent (every energy figure is simulated).
        stages: pipeline stages; micro_batches: micro-batches per step.
        fingerprint: builds the plan fingerprint (called on rank 0 after the first step, when the input
            shape is known).
        listener: progress events (rank 0); default: logging.
    """

    def __init__(
        self,
        config: ControllerConfig,
        *,
        port: EnginePort,
        comm: Comm,
        client: Any,
        gpu: Gpu,
        simulated: bool,
        stages: int,
        micro_batches: int,
        fingerprint: Callable[[], dict[str, Any]],
        listener: Listener | None = None,
    ) -> None:
        listener = listener or log_listener(log)
        self.ctx = Context(
            config=config,
            port=port,
            comm=comm,
            meter=EnergyMeter(client, lambda t: None),
            gpu=gpu,
            simulated=simulated,
            stages=stages,
            micro_batches=micro_batches,
            listener=listener,
            fingerprint=fingerprint,
        )
        self.ctx.meter.warn = self.ctx.warn
        self.has_agent = client is not None
        self._program: Program | None = None
        self.finished = False  # the program ended (profile mode)
        self._hooks: list[Callable[[StepResult, Context], None]] = []

    @property
    def state(self) -> str:
        """The current state's name (``warm-up``, ``baseline``, ``profiling``, ``reconfiguration``,
        ``at-plan``, ``compare``, ``re-plan``, ``unplanned``)."""
        return self.ctx.state

    @property
    def steps(self) -> int:
        """Steps run so far (each one optimizer step)."""
        return self.ctx.steps_done

    @property
    def plan(self) -> dict[str, Any] | None:
        """The plan in use (the plan file's JSON object, fingerprint included), on every rank; None before
        planning. ``ctx.plan_version`` (in step hooks) grows with each new plan."""
        return self.ctx.plan

    def add_step_hook(self, hook: Callable[[StepResult, Context], None]) -> None:
        """Call ``hook(step_result, context)`` after every step (the run lifecycle's place: save, log)."""
        self._hooks.append(hook)

    def step(self, run: Callable[[], Any]) -> Any:
        """Run one training step through ``run()`` (returns its loss) at what the current state asks for."""
        ctx = self.ctx
        if self._program is None:
            self._program = program(ctx, has_agent=self.has_agent)
            next(self._program)  # the setup of the first step
        start = time.perf_counter()
        loss = run()
        if ctx.sync:
            loss = float(loss)
        result = StepResult(loss, (time.perf_counter() - start) * 1e3, ctx.steps_done)
        ctx.step_counts[ctx.state] += 1
        ctx.steps_done += 1
        if not self.finished:
            try:
                self._program.send(result)
            except StopIteration:
                self.finished = True
        for hook in self._hooks:
            hook(result, ctx)
        return loss

    def finish(self) -> dict[str, Any] | None:
        """Close what is open (a collective: every rank calls it) and return the result on rank 0."""
        close_segment(self.ctx)
        return build_result(self.ctx) if self.ctx.is_rank0 else None

    def last_timeline_dicts(self) -> list[dict[str, Any]]:
        """Every stage's spans of the last gathered step (JSON)."""
        return [span_dict(s) for s in self.ctx.last_timeline]
