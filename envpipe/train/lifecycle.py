"""The run's lifecycle around the training steps: checkpoints, evaluation, log records, monitor scalars, and
a clean stop on SIGTERM/SIGINT. Called after every step on every rank (:mod:`envpipe.train.loop`).

Every rank takes the same decisions at the same step: the step number decides saves, evaluations and log
records; one small all-reduce per step (:class:`envpipe.deepspeed.lifecycle.StopFlag`) carries a stop signal
received by any rank and rank 0's wish to refresh the at-plan energy figure. Checkpoints and evaluations run
outside the controller's energy windows: one falling inside a measured window is postponed until the window
ends; the at-plan window is closed before and reopened after (its energy stays the steps' own).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

from envpipe.train.config import TrainConfig


def log_line(record: dict[str, Any]) -> str:
    """One plain log line (never cut or wrapped: it goes to files and CI logs as is)."""
    parts = [f"step {record['step']}/{record['steps']}", f"loss {record['loss']:.4f}"]
    if record.get("lr") is not None:
        parts.append(f"lr {record['lr']:.3g}")
    parts += [f"{record['ms_per_it']:.1f} ms/it", f"{record['tokens_per_s']:.0f} tokens/s"]
    energy = record.get("energy_j_per_it")
    label = record.get("energy_label", "simulated")
    parts.append(f"{energy:.2f} J/it ({label})" if energy is not None else "J/it n/a")
    parts.append(f"state {record['state']}")
    return "  ".join(parts)


class Lifecycle:
    """Checkpoints, evaluation, logs, monitors and signals of one rank (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        engine: Any,
        *,
        start_step: int,
        data_position: int,
        eval_batches: Any,
        model_dir: str | None,
        emit: Any,
    ) -> None:
        from envpipe.deepspeed.lifecycle import StopFlag

        self.config, self.engine = config, engine
        self.controller = engine.controller
        self.step = start_step
        self.data_position = data_position
        self.eval_batches = eval_batches  # () -> iterator on the first/last stage, None elsewhere
        self.model_dir = model_dir
        self.emit = emit  # rank 0's progress events; None on other ranks
        self.stop = StopFlag()
        self.stop.install()
        self.pending: set[str] = set()
        self.saved_at = self.evaluated_at = -1
        self.last_tag: str | None = None
        self._log_from = (start_step, time.perf_counter())
        self._seen_window: Any = None
        self._seen_clocks: Any = None
        self._plan_changes = 0

    # -- after every step -------------------------------------------------------------------------------
    def after_step(self, loss: Any) -> int:
        """Account for the step just run; returns the signal that stops the run (0: go on)."""
        config, ctx = self.config, self.controller.ctx
        self.step += 1
        self.data_position += config.micro_batches
        due_log = self.step % config.log_interval == 0 or self.step == config.steps
        refresh = bool(due_log and ctx.is_rank0 and self._segment_age_s(ctx) >= config.min_window_s)
        signum, refresh = self.stop.agreed(refresh)
        if signum:
            if config.save_dir is not None:
                with self._outside_windows(force=True):
                    self.save()
            return signum
        if config.save_interval and self.step % config.save_interval == 0:
            self.pending.add("save")
        if config.eval_data and config.eval_interval and self.step % config.eval_interval == 0:
            self.pending.add("eval")
        if refresh:
            self.pending.add("refresh")
        if self.pending and not ctx.sync:  # not inside a measured window
            with self._outside_windows():
                if "save" in self.pending:
                    self.save()
                if "eval" in self.pending:
                    self.evaluate()
            self.pending.clear()
        self._monitor(ctx)
        if due_log:
            self._log(loss, ctx)
        return 0

    def finish(self) -> None:
        """At the end of the run: the last evaluation and the final checkpoint (collective)."""
        with self._outside_windows():
            if self.config.eval_data and self.evaluated_at != self.step:
                self.evaluate()
            if self.config.save_dir is not None and self.saved_at != self.step:
                self.save()
        self._monitor(self.controller.ctx)  # the window just closed: its energy reaches the monitors too

    # -- actions ----------------------------------------------------------------------------------------
    def save(self) -> None:
        """A checkpoint of this step (collective) with the plan, data position and settings."""
        from envpipe.deepspeed import checkpoint

        config = self.config
        settings = {
            name: getattr(config, name)
            for name in ("model", "data", "stages", "micro_batches", "micro_batch_size", "seq_len", "seed", "steps")
        }
        path = checkpoint.save(
            self.engine,
            config.save_dir,
            data_position=self.data_position,
            plan=self.controller.ctx.plan,
            settings=settings,
            model_dir=self.model_dir,
            keep_last=config.keep_last,
        )
        self.saved_at, self.last_tag = self.step, str(path)
        if self.emit:
            self.emit("checkpoint", step=self.step, path=str(path))

    def evaluate(self) -> None:
        """Eval loss and perplexity through the engine's ``eval_batch`` (collective)."""
        from envpipe.deepspeed.lifecycle import evaluate

        micro_batches = self.config.eval_micro_batches or self.config.micro_batches
        batches = self.eval_batches() if self.eval_batches is not None else None  # middle stages read no data
        result = evaluate(self.engine, batches, micro_batches)
        self.evaluated_at = self.step
        if self.emit:
            self.emit("eval", step=self.step, loss=result.loss, perplexity=result.perplexity)

    # -- helpers ----------------------------------------------------------------------------------------
    @contextmanager
    def _outside_windows(self, force: bool = False) -> Iterator[None]:
        """Close the at-plan energy window around lifecycle work and reopen it after (collective)."""
        from envpipe.controller.steady import close_segment, open_segment

        ctx = self.controller.ctx
        reopen = ctx.open_segment is not None
        if reopen:
            close_segment(ctx)
        try:
            yield
        finally:
            if reopen and not force:
                open_segment(ctx)

    @staticmethod
    def _segment_age_s(ctx: Any) -> float:
        return 0.0 if ctx.open_segment is None else time.perf_counter() - ctx.open_segment[1]

    def _latest_window(self, ctx: Any) -> Any:
        if ctx.at_plan:
            return ctx.at_plan[-1]
        return None if ctx.baseline_source is not None else ctx.baseline  # a stored one ran in another run

    def _monitor(self, ctx: Any) -> None:
        """New energy window or new plan: scalars to DeepSpeed's monitors (rank 0 writes)."""
        from envpipe.deepspeed.lifecycle import write_scalars

        window = self._latest_window(ctx)
        if window is not None and window is not self._seen_window:
            self._seen_window = window
            energy = window.energy_j
            write_scalars(
                self.engine,
                {
                    "envpipe_energy_j_per_iteration": energy,
                    "envpipe_power_w": None if energy is None else energy / (window.iteration_ms / 1e3),
                    "envpipe_iteration_ms": window.iteration_ms,
                },
            )
        if ctx.clocks and ctx.clocks is not self._seen_clocks:  # the controller set a new clock plan
            self._seen_clocks = ctx.clocks
            self._plan_changes += 1
            clocks = [mhz for units in ctx.clocks.values() for mhz in units.values() if mhz]
            write_scalars(
                self.engine,
                {
                    "envpipe_clock_plan_changes": self._plan_changes,
                    "envpipe_mean_clock_mhz": sum(clocks) / max(len(clocks), 1),
                    "envpipe_min_clock_mhz": min(clocks, default=None),
                },
            )

    def _log(self, loss: Any, ctx: Any) -> None:
        loss_value = float(loss)  # waits for the device: only at log steps
        start_step, start_s = self._log_from
        now = time.perf_counter()
        self._log_from = (self.step, now)
        if not self.emit:
            return
        config = self.config
        ms_per_it = (now - start_s) * 1e3 / max(self.step - start_step, 1)
        window = self._latest_window(ctx)
        lr = self.engine.get_lr()
        record = {
            "step": self.step,
            "steps": config.steps,
            "loss": loss_value,
            "lr": lr[0] if lr else None,
            "ms_per_it": ms_per_it,
            "tokens_per_s": config.tokens_per_iteration * self.engine.grid.data_parallel_size / (ms_per_it / 1e3),
            "energy_j_per_it": None if window is None else window.energy_j,
            "energy_label": "simulated" if window is None or window.simulated else "measured",
            "state": ctx.state,
        }
        self.emit("log", record=record, line=log_line(record))
