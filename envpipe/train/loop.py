"""The training loop of ``envpipe train``: exactly ``--steps`` optimizer steps through the engine.

The controller inside the engine decides what each step runs; this loop only counts, shows progress and
hands each step to the run lifecycle (checkpoints, evaluation, logs). No torch import at module level.
"""

from __future__ import annotations

import time
from typing import Any

from envpipe.train.config import TrainConfig

# Steps whose loss is read (a read waits for the device): every LOSS_EVERY-th and the last.
LOSS_EVERY = 10
_PROGRESS_EVERY_S = 0.5

def run_steps(
    engine: Any,
    data_iter: Any,
    config: TrainConfig,
    lifecycle: Any,
) -> dict[str, Any] | None:
    """Train up to ``config.steps`` steps (``mode == "profile"``: until profiling is done); rank 0's result.

    The ``lifecycle`` (:class:`envpipe.train.lifecycle.Lifecycle`) starts the run at its step (a resumed
    run), saves, evaluates and logs after each step, and ends early on SIGTERM/SIGINT.

    Returns:
        On global rank 0 the controller's result with the loss curve and the engine's optimizer step count
        (or ``{"stopped": signal, ...}`` when a signal ended the run); None on other ranks.
    """
    controller = engine.controller
    losses: list[tuple[int, float]] = []
    progress = _Progress(controller)
    controller.add_step_hook(progress)
    if config.mode == "profile":
        while not controller.finished:
            engine.train_batch(data_iter)
    else:
        for step in range(config.start_step, config.steps):
            loss = engine.train_batch(data_iter)
            if step % LOSS_EVERY == 0 or step == config.steps - 1:
                losses.append((step, float(loss)))
            signum = lifecycle.after_step(loss)
            if signum:
                return _stopped(engine, lifecycle, signum)
        lifecycle.finish()
    result = controller.finish()
    if result is None:
        return None
    result["optimizer_steps"] = int(engine.global_steps)
    result["losses"] = [{"step": s, "loss": v} for s, v in losses]
    return result


def _stopped(engine: Any, lifecycle: Any, signum: int) -> dict[str, Any] | None:
    """The run was stopped by a signal after a step (a checkpoint of it saved if --save-dir)."""
    if engine.controller.ctx.is_rank0:
        return {"stopped": signum, "step": lifecycle.step, "checkpoint": lifecycle.last_tag}
    return None


class _Progress:
    """Advances the progress bar of the open-ended states (at-plan, unplanned) on rank 0, twice a second."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.last_s = 0.0

    def __call__(self, result: Any, ctx: Any) -> None:
        if not ctx.is_rank0 or ctx.state not in ("at-plan", "unplanned"):
            return
        now = time.monotonic()
        if now - self.last_s < _PROGRESS_EVERY_S:
            return
        self.last_s = now
        ctx.emit(
            "advance",
            phase=ctx.state,
            completed=ctx.steps_done - ctx.state_started_at,
            info=f"{result.wall_ms:.0f} ms/it",
        )
