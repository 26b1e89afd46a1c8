"""A user's own DeepSpeed pipeline script (an MLP stack, not a Llama), with EnvPipe.

Compared with the plain DeepSpeed script it differs in one line: ``deepspeed.initialize`` became
``envpipe.deepspeed.initialize``. The engine's ``train_batch`` then plans the clocks during the first steps
(warm-up, baseline window, profiling, reconfiguration; all of them real training steps) and runs every later
step at the plan. Start it as any DeepSpeed script::

    torchrun --nproc_per_node 2 examples/own_script/train.py --steps 200
    deepspeed --num_gpus 4 examples/own_script/train.py --steps 2000

The ``"envpipe"`` block of ``ds_config.json`` sets the controller (see the README next to this file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

import envpipe.deepspeed

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    """A pre-norm residual MLP block: x + W2(gelu(W1(norm(x))))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def build_model(stages: int, *, features: int, width: int, depth: int) -> PipelineModule:
    """Input projection, ``depth`` residual blocks, output head: balanced over ``stages`` by parameters."""
    layers = [LayerSpec(nn.Linear, features, width)]
    layers += [LayerSpec(Block, width) for _ in range(depth)]
    layers += [LayerSpec(nn.Linear, width, 1)]
    return PipelineModule(
        layers=layers, num_stages=stages, loss_fn=nn.MSELoss(), partition_method="parameters"
    )


def batches(micro_batch_size: int, features: int, seed: int):
    """An endless stream of (x, y) micro-batches of a fixed smooth regression target (same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(features, 1, generator=torch.Generator().manual_seed(0)) / features**0.5
    while True:
        x = torch.randn(micro_batch_size, features, generator=generator)
        yield x, torch.sin(x @ weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (train_batch calls)")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default: every rank)")
    parser.add_argument("--deepspeed-config", default=str(HERE / "ds_config.json"))
    parser.add_argument("--report", default=None, help="rank 0 writes EnvPipe's result here (JSON)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args()

    if not torch.cuda.is_available():  # CPU ranks: gloo, and skip a JIT build that pipelines never use
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    world = torch.distributed.get_world_size()
    config = json.loads(Path(args.deepspeed_config).read_text())
    model = build_model(args.stages or world, features=32, width=128, depth=6)

    engine, _, _, _ = envpipe.deepspeed.initialize(  # was: deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )

    data = batches(engine.train_micro_batch_size_per_gpu(), 32, seed=1 + engine.grid.data_parallel_id)
    losses = []
    for step in range(args.steps):
        loss = engine.train_batch(data_iter=data)
        if step % 10 == 0 or step == args.steps - 1:
            losses.append(float(loss))

    # Optional: EnvPipe's result (every rank calls finish; rank 0 gets the dict), then release the GPU.
    result = engine.controller.finish()
    if result is not None:
        result.update(losses=losses, optimizer_steps=engine.global_steps)
        print(
            f"{engine.global_steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
            f"EnvPipe state {result['controller']['state']}",
            flush=True,
        )
        if args.report:
            Path(args.report).write_text(json.dumps(result, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
