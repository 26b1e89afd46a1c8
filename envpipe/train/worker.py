"""The main of one training rank: ``python -m envpipe.train.worker --config-b64 ...``.

Started by :mod:`envpipe.train.launch` (CPU) or the DeepSpeed launcher (GPUs). Sets up torch.distributed,
builds this rank's pipeline stage, connects to the node agent, runs the phases and, on global rank 0,
prints the result as a progress marker. Any failure ends in one ``error: ...`` line on stderr (after the
traceback, which stays in the rank's log) and exit code 1.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envpipe.train.config import TrainConfig

# torch.distributed timeout: a dead peer must end the job within a minute, not DeepSpeed's 30.
_DIST_TIMEOUT_S = 120.0


@dataclass
class RankContext:
    """What the phases need on every rank."""

    config: TrainConfig
    engine: Any
    client: Any
    data_iter: Any
    rank: int
    world_size: int
    stage: int
    dp_index: int
    dp_size: int
    clocks_mhz: tuple[int, ...]
    gpu_name: str
    agent_simulated: bool

    @property
    def is_rank0(self) -> bool:
        """Rank 0 plans, prints progress and writes the result."""
        return self.rank == 0

    @property
    def max_clock_mhz(self) -> int:
        """This rank's top SM clock."""
        return max(self.clocks_mhz)


def main(argv: list[str] | None = None) -> int:
    """Run one rank; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="envpipe.train.worker")
    parser.add_argument("--config-b64", required=True, help="the TrainConfig as base64-encoded JSON")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args(argv)
    config = TrainConfig.from_json(base64.b64decode(args.config_b64).decode())
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    # SIGTERM from the launcher (another rank failed) unwinds through finally: the lease is released.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run(config)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end as one readable line
        traceback.print_exc()
        print(f"error: rank {os.environ.get('RANK', '?')}: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def run(config: TrainConfig) -> None:
    """Set up this rank, run the phases, and clean up (lease released, engine closed) on every way out."""
    from envpipe.deepspeed import setup_distributed
    from envpipe.train.phases import run_phases
    from envpipe.train.progress import emit

    setup_distributed(timeout_s=_DIST_TIMEOUT_S)
    client = _agent_client(config)
    engine = None
    try:
        ctx = _build(config, client)
        engine = ctx.engine
        result = run_phases(ctx)
        if ctx.is_rank0:
            emit("result", data=result)
    finally:
        if engine is not None:
            engine.close()
        _close_client(client)
        _destroy_process_group()


def _agent_client(config: TrainConfig) -> Any:
    from envpipe_agent.client import AgentClient

    rank = int(os.environ.get("RANK", "0"))
    return AgentClient(config.agent, job_id=config.job_id or "envpipe-train", rank=rank)


def _build(config: TrainConfig, client: Any) -> RankContext:
    """Model, data and engine of this rank (the engine starts on 1F1B at the top clock)."""
    import torch.distributed as dist

    from envpipe.deepspeed import connect_agent, initialize
    from envpipe.models.llama import build_pipeline, load_config
    from envpipe.schedules import get_schedule

    model_dir = config.model if Path(config.model).is_dir() else None
    llama = load_config(config.model)
    module = build_pipeline(llama, config.stages, model_dir=model_dir, seed=config.seed)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    agent, gpu = connect_agent(client, local_rank, claim=True)
    if agent is None:
        # The launcher found (or started) this agent a moment ago; energy figures need it.
        raise RuntimeError(
            f"the agent at {client.endpoint} did not answer or refused this rank's GPU; "
            "check `envpipe status` and that no other job holds the GPU"
        )
    info = client.hello()
    schedule = get_schedule("1f1b", config.stages, config.micro_batches)
    engine = initialize(
        module,
        dict(config.ds_config),
        schedule,
        top_clock_plan(schedule, gpu.max_mhz),
        agent=client,
        emulate_dvfs=bool(config.emulate_dvfs),
        dvfs_model=config.dvfs_model,
        max_clock_mhz=gpu.max_mhz,
        claim_gpu=False,
        local_rank=local_rank,
    )
    stage, dp_index, dp_size = _placement(engine)
    data_iter = None
    if stage in (0, config.stages - 1):
        from envpipe.data import batches

        data_iter = batches(
            config.data,
            vocab_size=llama.vocab_size,
            micro_batch_size=config.micro_batch_size,
            seq_len=config.seq_len,
            dp_index=dp_index,
            dp_size=dp_size,
            seed=config.seed,
            model_dir=model_dir,
        )
    return RankContext(
        config=config,
        engine=engine,
        client=client,
        data_iter=data_iter,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        stage=stage,
        dp_index=dp_index,
        dp_size=dp_size,
        clocks_mhz=tuple(gpu.clocks_mhz),
        gpu_name=gpu.name,
        agent_simulated=bool(info.simulated),
    )


def top_clock_plan(schedule: Any, clock_mhz: int) -> dict[int, dict[str, int]]:
    """Every compute unit of every stage at ``clock_mhz`` (the baseline)."""
    return {s: {unit.unit: clock_mhz for unit in schedule.units(s)} for s in range(schedule.stages)}


def _placement(engine: Any) -> tuple[int, int, int]:
    """(stage, data-parallel index, data-parallel size) of this rank, from DeepSpeed's grid."""
    grid = engine.grid
    return engine.stage_id, grid.data_parallel_id, grid.data_parallel_size


def _close_client(client: Any) -> None:
    try:
        client.release()
    except Exception:  # noqa: BLE001 - the agent may be gone; its lease expiry resets the GPU then
        pass
    client.close()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
