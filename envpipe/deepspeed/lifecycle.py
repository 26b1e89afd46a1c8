"""The engine side of a run's lifecycle: evaluation, DeepSpeed monitor scalars, and agreeing to stop.

All three are collective or rank-0-only in the same way DeepSpeed's own calls are, so the training loop can
call them from a step hook on every rank.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Any

# Scalars EnvPipe adds to DeepSpeed's monitors, under DeepSpeed's own "Train/Samples/" prefix (csv_monitor
# writes one file per name: Train_Samples_envpipe_energy_j_per_iteration.csv, ...).
MONITOR_PREFIX = "Train/Samples/"


@dataclass(frozen=True)
class EvalResult:
    """Mean loss over the evaluation micro-batches and its perplexity (``exp(loss)``)."""

    loss: float
    perplexity: float


def evaluate(engine: Any, data_iter: Any, micro_batches: int) -> EvalResult:
    """Run ``micro_batches`` evaluation micro-batches through the engine's own ``eval_batch`` (collective).

    The first and the last stage read ``data_iter``; the loss is broadcast to every stage. DeepSpeed's
    monitors get ``Train/Samples/eval_loss`` from ``eval_batch`` itself.
    """
    loss = float(engine.eval_batch(data_iter, num_micro_batches=micro_batches))
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)))


def write_scalars(engine: Any, scalars: dict[str, float | None]) -> int:
    """Send EnvPipe's scalars to the monitors enabled in the DeepSpeed config (global rank 0, as DeepSpeed).

    Args:
        engine: the engine (its ``monitor`` is DeepSpeed's ``MonitorMaster``).
        scalars: name -> value; None values (e.g. energy unavailable) are left out, never written as 0.

    Returns:
        The number of scalars written (0 where no monitor is enabled or on other ranks).
    """
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled or engine.global_rank != 0:
        return 0
    events = [
        (MONITOR_PREFIX + name, float(value), engine.global_samples)
        for name, value in scalars.items()
        if value is not None
    ]
    if events:
        monitor.write_events(events)
    return len(events)


class StopFlag:
    """SIGTERM/SIGINT set a flag; :meth:`agreed` tells every rank, at the same step, whether any rank got one.

    The check is one all-reduce of a CPU integer on a gloo group of its own (never on the GPU, never waiting
    for the device), so every rank stops after the same step and can save one consistent checkpoint.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.signal: int = 0
        self._group = dist.new_group(backend="gloo")

    def install(self) -> None:
        """Replace the SIGTERM/SIGINT handlers with one that only records the signal."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self.signal = self.signal or signum

    def agreed(self, wish: bool = False) -> tuple[int, bool]:
        """``(signal, wish)``: the signal any rank received (the largest number, 0 for none) and whether any
        rank passed ``wish`` (collective: every rank, every step; one all-reduce of two integers)."""
        import torch
        import torch.distributed as dist

        flags = torch.tensor([self.signal, int(wish)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        return int(flags[0]), bool(flags[1])
