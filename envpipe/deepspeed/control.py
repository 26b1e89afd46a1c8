"""The DeepSpeed side of the controller: the engine and torch.distributed behind the controller's ports.

:func:`attach_controller` is what :func:`envpipe.deepspeed.initialize` calls: after it, every
``engine.train_batch()`` runs through :class:`envpipe.controller.Controller`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

from envpipe.controller import Controller, ControllerConfig, Gpu
from envpipe.controller.planfile import fingerprint as make_fingerprint


class TorchComm:
    """The controller's collectives over every rank of the job (torch.distributed's default group)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order."""
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        self._dist.barrier()


class DeepSpeedPort:
    """An :class:`~envpipe.deepspeed.engine.EnvpipeEngine` as the controller's engine port."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.stage = engine.stage_id

    def set_plan(self, schedule: Any, clocks: dict[int, dict[str, int]] | None) -> None:
        """Switch schedule (only when it changes: buffers are rebuilt) and clocks from the next step on."""
        if schedule is not self.engine.schedule:
            self.engine.set_schedule(schedule)
        self.engine.set_clocks(clocks)

    def last_timeline(self) -> list[Any]:
        """This stage's spans of the last step."""
        return self.engine.last_timeline()

    def timeline_record(self) -> Any:
        """The last step's record, to gather after a window."""
        return self.engine.timeline_record()

    def gather_timelines(self, records: list[Any]) -> list[list[Any]]:
        """Every stage's spans of the recorded steps (a collective over the pipeline group)."""
        return self.engine.gather_timelines(records)


def placement(engine: Any) -> tuple[int, int, int]:
    """(stage, data-parallel index, data-parallel size) of this rank, from DeepSpeed's process grid."""
    grid = engine.grid
    return engine.stage_id, grid.data_parallel_id, grid.data_parallel_size


def model_fingerprint(module: Any, comm: TorchComm) -> str:
    """A hash of every stage's parameter names, shapes and dtypes (a collective: every rank calls it)."""
    mine = [(name, list(p.shape), str(p.dtype)) for name, p in module.named_parameters()]
    every = comm.all_gather((int(getattr(module, "stage_id", 0)), mine))
    by_stage = dict(every)  # data-parallel replicas of a stage hold the same parameters
    text = json.dumps(sorted(by_stage.items()), sort_keys=True)
    count = sum(math.prod(shape) for params in by_stage.values() for _, shape, _ in params)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]} ({count:,} parameters)"


def attach_controller(
    engine: Any, config: ControllerConfig, *, client: Any, gpu: Any, simulated: bool, listener: Any = None
) -> Controller:
    """Create the controller of ``engine`` (every rank, collectively) and make ``train_batch`` run through it.

    Args:
        engine: the EnvpipeEngine.
        config: the ``"envpipe"`` block, resolved.
        client: the connected agent client, or None (no agent: the run stays unplanned, at default clocks).
        gpu: the agent's ``GpuInfo`` of this rank's card (None without an agent).
        simulated: the agent is the sim agent.
        listener: progress events on rank 0 (default: logging).
    """
    import envpipe

    comm = TorchComm()
    model_hash = model_fingerprint(engine.module, comm)
    card = (
        Gpu(gpu.name, tuple(gpu.clocks_mhz))
        if gpu is not None
        else Gpu("no agent", (engine.max_clock_mhz or 0,))
    )

    def fingerprint() -> dict[str, Any]:
        shape = engine.input_shape
        return make_fingerprint(
            model=model_hash,
            stages=engine.num_stages,
            micro_batches=engine.micro_batches,
            micro_batch_size=engine.train_micro_batch_size_per_gpu(),
            seq_len=None if shape is None else list(shape[1:]),
            card=card.name,
            clocks_mhz=list(card.clocks_mhz),
            dvfs_model=config.dvfs_model,
            envpipe_version=envpipe.__version__,
        )

    controller = Controller(
        config,
        port=DeepSpeedPort(engine),
        comm=comm,
        client=client,
        gpu=card,
        simulated=simulated,
        stages=engine.num_stages,
        micro_batches=engine.micro_batches,
        fingerprint=fingerprint,
        listener=listener,
    )
    engine.controller = controller
    return controller


def job_id() -> str:
    """The agent lease's job name: ``$ENVPIPE_JOB_ID``, else one per launch (the master port and pid of rank 0
    differ between jobs; every rank of one job shares MASTER_PORT)."""
    return os.environ.get("ENVPIPE_JOB_ID") or f"envpipe-{os.environ.get('MASTER_PORT', '0')}"
