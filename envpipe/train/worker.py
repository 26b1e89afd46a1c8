"""The main of one training rank: ``python -m envpipe.train.worker --config-b64 ...``.

Started by :mod:`envpipe.train.launch` (CPU) or the DeepSpeed launcher (GPUs). It is a user script like any
other: it builds this rank's pipeline stage, calls :func:`envpipe.deepspeed.initialize` (the controller lives
in the engine) and runs ``--steps`` training steps (:mod:`envpipe.train.loop`); on global rank 0 it prints
progress and the result as markers. Any failure ends in one ``error: ...`` line on stderr (after the
traceback, which stays in the rank's log) and exit code 1.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from envpipe.train.config import TrainConfig

# torch.distributed timeout: a dead peer must end the job within a minute, not DeepSpeed's 30.
_DIST_TIMEOUT_S = 120.0


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
    """Set up this rank, train ``config.steps`` steps, and clean up (lease released) on every way out."""
    from envpipe.deepspeed import setup_distributed
    from envpipe.train.loop import run_steps
    from envpipe.train.progress import emit

    setup_distributed(timeout_s=_DIST_TIMEOUT_S)
    engine = None
    try:
        engine, data_iter, lifecycle = _build(config)
        placement = _placement_of_ranks(engine)  # one collective before training: where every rank runs
        result = run_steps(engine, data_iter, config, lifecycle=lifecycle)
        if result is not None and "stopped" in result:
            emit("stopped", **result)
        elif result is not None:
            emit("result", data={**result, "placement": placement})
    finally:
        if engine is not None:
            engine.close()
        _destroy_process_group()


def _build(config: TrainConfig) -> tuple[Any, Any, Any]:
    """This rank's engine (the controller inside, resumed from a checkpoint when asked), its data iterator
    (first and last stage only) and its :class:`~envpipe.train.lifecycle.Lifecycle`."""
    import torch.distributed as dist
    from envpipe_agent.client import AgentClient

    from envpipe.deepspeed import initialize, placement
    from envpipe.models.llama import build_pipeline, load_config
    from envpipe.train.lifecycle import Lifecycle
    from envpipe.train.progress import emit

    model_dir = config.model if Path(config.model).is_dir() else None
    llama = load_config(config.model)
    module = build_pipeline(llama, config.stages, model_dir=model_dir, seed=config.seed)
    client = AgentClient(config.agent, job_id=config.job_id or "envpipe-train", rank=dist.get_rank())
    ds_config = {**config.ds_config, "envpipe": config.controller_block()}
    listener = emit if dist.get_rank() == 0 else None
    try:
        engine, _, _, _ = initialize(model=module, config=ds_config, agent=client, listener=listener)
    except BaseException:
        client.close()
        raise
    engine.owned_client = client  # released and closed by engine.close()
    if not engine.controller.has_agent:
        # The launcher found (or started) this agent a moment ago; energy figures need it.
        raise RuntimeError(
            f"the agent at {client.endpoint} did not answer or refused this rank's GPU; "
            "check `envpipe status` and that no other job holds the GPU"
        )
    data_position = 0
    if config.resume_dir is not None:
        from envpipe.deepspeed import checkpoint

        data_position = checkpoint.load(engine, config.resume_dir).data_position
    stage, dp_index, dp_size = placement(engine)
    data_iter = eval_batches = None
    if stage in (0, config.stages - 1):
        from envpipe.data import batches

        def make(source: Any, start: int, flag: str) -> Any:
            return batches(
                source,
                vocab_size=llama.vocab_size,
                micro_batch_size=config.micro_batch_size,
                seq_len=config.seq_len,
                dp_index=dp_index,
                dp_size=dp_size,
                seed=config.seed,
                model_dir=model_dir,
                start=start,
                cache_dir=_token_cache(config),
                flag=flag,
            )

        data_iter = make(config.data, data_position, "--data")
        if config.eval_data:
            eval_batches = lambda: make(config.eval_data, 0, "--eval-data")  # noqa: E731 - same batches each time
    lifecycle = Lifecycle(
        config,
        engine,
        start_step=config.start_step,
        data_position=data_position,
        eval_batches=eval_batches,
        model_dir=model_dir,
        emit=listener,
    )
    return engine, data_iter, lifecycle


def _token_cache(config: TrainConfig) -> str | None:
    """Tokenised text is kept beside the checkpoints (reused by a resume), else in a private temporary file."""
    return str(Path(config.save_dir) / "tokens") if config.save_dir else None


def _placement_of_ranks(engine: Any) -> list[dict[str, Any]]:
    """Where every rank ran: its stage, its node's host name and the GPU that node's agent leased it."""
    import socket

    import torch.distributed as dist

    from envpipe.deepspeed import placement

    gpu = engine.gpu
    mine = {
        "rank": dist.get_rank(),
        "stage": placement(engine)[0],
        "host": socket.gethostname(),
        "gpu_uuid": gpu.uuid if gpu is not None else None,
    }
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
