r"""One rank of a plain DeepSpeed pipeline through EnvPipe's adapter, started by any launcher, on any node.

    deepspeed --hostfile H --no_ssh --node_rank N --master_addr node0 -m benchmarks.multinode.pipeline --out D
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank N --master-addr node0 \
        -m benchmarks.multinode.pipeline --out D
    SLURM_PROCID=... python -m benchmarks.multinode.pipeline --out D         (variables as srun sets them)

The rank finds its place through :mod:`envpipe.dist_env` (inside ``setup_distributed``), its node's agent
through the default socket (``/run/envpipe/control.sock`` on that node), trains the tiny Llama with
``--steps`` 1F1B iterations at ``--clock-mhz`` on every unit (the agent locks the clock; the sim agent
integrates the energy), one agent energy window per iteration, and writes ``OUT/rank<R>.json``: host,
launcher, the GPU UUID its agent leased it, losses, energy per iteration (None where the agent did not
answer). Faults for the tests: ``--pause-at K`` waits at iteration K for ``OUT/resume`` (so a test can stop
an agent at a known point); ``--kill-rank R --kill-at K`` makes rank R SIGKILL itself before iteration K.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

MICRO_BATCH_SIZE = 2
SEQ_LEN = 16
DATA_SEED = 7


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks.multinode.pipeline")
    parser.add_argument("--out", required=True, help="folder for rank<R>.json (shared by the nodes)")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default: world size)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--clock-mhz", type=int, default=1410, help="clock of every unit (sim H100: 1980 top)"
    )
    parser.add_argument("--job", default="multinode")
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from envpipe import dist_env

    launcher = dist_env.detect()
    from envpipe.deepspeed import setup_distributed

    setup_distributed(timeout_s=60)
    rank = int(os.environ["RANK"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = _train(args, rank, out)
    except BaseException as exc:  # noqa: BLE001 - the test reads the reason from the file
        (out / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}")
        print(f"error: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    result["launcher"] = launcher.launcher if launcher else None
    result["dist"] = launcher.describe() if launcher else None
    tmp = out / f".rank{rank}.json"
    tmp.write_text(json.dumps(result))
    tmp.rename(out / f"rank{rank}.json")
    return 0


def _train(args: argparse.Namespace, rank: int, out: Path) -> dict[str, Any]:
    import torch.distributed as dist
    from envpipe_agent.client import AgentClient
    from envpipe_agent.errors import AgentError

    from envpipe.data import batches
    from envpipe.deepspeed import build_engine
    from envpipe.models.llama import build_pipeline, load_config
    from envpipe.schedules import get_schedule

    stages = args.stages or int(os.environ["WORLD_SIZE"])
    client = AgentClient(None, job_id=args.job, rank=rank, timeout_s=1.0)  # None: this node's socket
    engine = None
    try:
        info = client.hello()
        config = load_config("llama-tiny")
        module = build_pipeline(config, stages, seed=0)
        schedule = get_schedule("1f1b", stages, args.micro_batches)
        clocks = {s: {u.unit: args.clock_mhz for u in schedule.units(s)} for s in range(stages)}
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
            "gradient_accumulation_steps": args.micro_batches,
            "steps_per_print": 10**9,
            "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
        }
        engine = build_engine(module, ds_config, schedule, clocks, agent=client)
        grid = engine.grid
        data = batches(
            None,
            vocab_size=config.vocab_size,
            micro_batch_size=MICRO_BATCH_SIZE,
            seq_len=SEQ_LEN,
            dp_index=grid.data_parallel_id,
            dp_size=grid.data_parallel_size,
            seed=DATA_SEED,
        )
        losses, energy, lease_lost = [], [], False
        for step in range(args.steps):
            if step == args.pause_at:
                _pause(out, rank)
            if rank == args.kill_rank and step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            window = _try(client.window_begin, AgentError)
            losses.append(float(engine.train_batch(data)))
            done = _try(lambda w=window: client.window_end(w), AgentError) if window is not None else None
            energy.append(
                None
                if done is None
                else {"energy_j": done.energy_j, "duration_s": done.duration_s, "simulated": done.simulated}
            )
            lease_lost |= done is None
        gpu = engine.gpu
        return {
            "rank": rank,
            "world_size": dist.get_world_size(),
            "local_rank": int(os.environ["LOCAL_RANK"]),
            "stage": engine.stage_id,
            "hostname": socket.gethostname(),
            "agent": {"backend": info.backend, "simulated": info.simulated},
            "gpu_uuid": gpu.uuid if gpu is not None else None,
            "losses": losses,
            "energy": energy,
        }
    finally:
        if engine is not None:
            engine.close()
        client.close()  # releases the lease: the agent resets the clock
        if dist.is_initialized():
            dist.destroy_process_group()


def _try(call: Any, errors: type[BaseException]) -> Any:
    """``call()``, or None when the agent does not answer (it stopped): training goes on."""
    try:
        return call()
    except errors:
        return None


def _pause(out: Path, rank: int) -> None:
    (out / f"paused-rank{rank}").touch()
    while not (out / "resume").exists():
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
