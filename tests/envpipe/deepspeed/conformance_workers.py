"""Rank-side functions of the conformance and NCCL-emulation tests (run by ``envpipe.deepspeed.launcher.run_ranks``).

Each case trains the same tiny model from the same seed twice: once with stock DeepSpeed
(``deepspeed.initialize`` -> ``PipelineEngine``) and once with ``EnvpipeEngine``, and returns both runs'
losses and a digest of the parameters, so the test can require bitwise equality in fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MICRO_BATCH_SIZE = 2
FAN = 14  # tensors crossing the stage boundary in the many-tensors case: a 73-slot header (> 64)


def _config(micro_batches: int, optimizer: dict[str, Any] | None = None, **pipeline: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "gradient_accumulation_steps": micro_batches,
        "steps_per_print": 10**9,
        "optimizer": optimizer or {"type": "SGD", "params": {"lr": 0.05}},
        "pipeline": {"use_reentrant": False, **pipeline},
    }


def _llama(stages: int, topology: Any = None) -> Any:
    from envpipe.models.llama import build_pipeline, load_config

    config = load_config("llama-tiny")
    return build_pipeline(config, None if topology else stages, topology=topology, seed=3)


def _tokens(seq_lens: list[int], per: int = 1, seed: int = 11) -> Any:
    """Endless (input_ids, labels) micro-batches cycling through ``seq_lens``, each for ``per`` micro-batches."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    i = 0
    while True:
        ids = torch.randint(0, 256, (MICRO_BATCH_SIZE, seq_lens[(i // per) % len(seq_lens)]), generator=gen)
        i += 1
        yield ids, ids.clone()


def _engine(module: Any, config: dict[str, Any], schedule: Any) -> Any:
    if schedule is None:
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=module, config=config, model_parameters=params)
        return engine
    from envpipe.deepspeed import build_engine

    return build_engine(module, config, schedule)


def _digest(engine: Any) -> list[list[float]]:
    """Every parameter as exact float values of a few fixed statistics (enough to see any bit change)."""
    return [[float(p.double().sum()), float(p.double().abs().max())] for p in engine.module.parameters()]


def _run(build: Any, config: dict[str, Any], schedule: Any, data: Any, steps: int, between: Any = None) -> Any:
    engine = _engine(build(), config, schedule)
    batches, losses = data(), []
    for step in range(steps):
        if between is not None:
            between(engine, step)
        losses.append(float(engine.train_batch(batches)))
    partitioned = [bool(engine.is_pipe_partitioned), bool(engine.is_grad_partitioned)]
    return {"losses": losses, "params": _digest(engine), "micro_batches": engine.micro_batches, "partitioned": partitioned}


def _pair(build: Any, config: dict[str, Any], schedule: Any, data: Any, steps: int, between: Any = None) -> Any:
    """Stock and EnvPipe on the same case: {"stock": ..., "envpipe": ...}."""
    return {
        "stock": _run(build, config, None, data, steps, between),
        "envpipe": _run(build, config, schedule, data, steps, between),
    }


class _Fan:
    """Layer classes of a model whose stage boundary carries FAN tensors of shape [batch, 4, 8]."""

    @staticmethod
    def classes() -> tuple[Any, Any]:
        import torch

        class Spread(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(5)
                self.proj = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(FAN))

            def forward(self, x: Any) -> Any:
                return tuple(p(x) for p in self.proj)

        class Gather(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(6)
                self.out = torch.nn.Linear(8, 8)

            def forward(self, parts: Any) -> Any:
                return self.out(torch.stack(parts).tanh().sum(0))

        return Spread, Gather


def _fan_module() -> Any:
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule

    spread, gather = _Fan.classes()
    return PipelineModule(
        [LayerSpec(spread), LayerSpec(gather)], num_stages=2, loss_fn=torch.nn.functional.mse_loss,
        partition_method="uniform",
    )


def _fan_data() -> Any:
    import torch

    gen = torch.Generator().manual_seed(4)
    while True:
        yield torch.randn(MICRO_BATCH_SIZE, 4, 8, generator=gen), torch.randn(MICRO_BATCH_SIZE, 4, 8, generator=gen)


def two_ranks(out_dir: str) -> dict[str, Any]:
    """Stock vs EnvPipe (1f1b and ours), set_train_batch_size, dynamic shapes, 14 tensors, Muon; then the
    NCCL emulation: ``ours`` on ``link`` trains like 1F1B, ``ours`` on ``pair`` stalls (the process ends)."""
    from envpipe.deepspeed import setup_distributed
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=60)
    one_f = get_schedule("1f1b", 2, 4)
    ours = get_schedule("ours", 2, 4, [2, 0])
    llama = lambda: _llama(2)  # noqa: E731
    result: dict[str, Any] = {"rank": int(os.environ["RANK"])}
    fixed = lambda: _tokens([16])  # noqa: E731 - a fresh, identical stream per run
    result["plain_1f1b"] = _pair(llama, _config(4), one_f, fixed, 2)

    def grow(engine: Any, step: int) -> None:
        if step == 1:
            engine.set_train_batch_size(MICRO_BATCH_SIZE * 6)

    result["batch_size"] = _pair(llama, _config(4), ours, fixed, 2, grow)
    result["refused"] = _refused_batch_size(llama)

    def dynamic() -> Any:
        module = _llama(2)
        module.dynamic_shape = True  # PipelineModule(dynamic_shape=True)
        return module

    result["dynamic"] = _pair(dynamic, _config(4), ours, lambda: _tokens([16, 24, 8]), 2)

    def reshape(engine: Any, step: int) -> None:
        if step == 1:
            engine.reset_activation_shape()

    result["reset_shape"] = _pair(llama, _config(4), ours, lambda: _tokens([16, 24], per=4), 2, reshape)
    result["fan"] = _pair(_fan_module, _config(4), get_schedule("ours", 2, 4, [2, 0]), _fan_data, 2)
    muon = {"type": "Muon", "params": {"lr": 0.02}}
    result["muon"] = _pair(llama, _config(4, muon), one_f, fixed, 2)
    result["emulated"] = _emulated(llama, 2, 4, [2, 0])
    _stall(result, out_dir, llama)
    return result


def _refused_batch_size(build: Any) -> dict[str, Any]:
    """A hand-written schedule cannot be rebuilt for another micro-batch count: refused, nothing changed."""
    from envpipe.deepspeed import build_engine
    from envpipe.errors import ConfigError
    from envpipe.ir import schedule_from_text
    from envpipe.schedules import get_schedule

    handmade = schedule_from_text(get_schedule("1f1b", 2, 4).render(), name="handmade")
    engine = build_engine(build(), _config(4), handmade)
    try:
        engine.set_train_batch_size(MICRO_BATCH_SIZE * 6)
        error = None
    except ConfigError as exc:
        error = str(exc)
    return {"error": error, "kept": [engine.micro_batches, engine.train_batch_size(), engine.schedule.name]}


def _emulated(build: Any, stages: int, micro_batches: int, r: list[int]) -> dict[str, Any]:
    """``ours`` and ``1f1b`` on the ``link`` transport with NCCL's stream semantics emulated."""
    from envpipe.deepspeed import build_engine
    from envpipe.schedules import get_schedule

    out = {}
    for name, r_vector in (("1f1b", None), ("ours", r)):
        engine = build_engine(build(), _config(micro_batches), get_schedule(name, stages, micro_batches, r_vector))
        engine.set_transport("link", emulate_timeout_s=60.0)
        batches = _tokens([16])
        out[name] = [float(engine.train_batch(batches)) for _ in range(2)]
    return out


def _stall(result: dict[str, Any], out_dir: str, build: Any) -> None:
    """``ours`` (S=2, M=2) on the ``pair`` transport under emulation; writes the result and ends the process,
    since a stalled stream's worker never returns (as a hung GPU stream)."""
    from envpipe.deepspeed import build_engine
    from envpipe.deepspeed.nccl_emulation import P2PStalled
    from envpipe.schedules import get_schedule

    engine = build_engine(build(), _config(2), get_schedule("ours", 2, 2, [0, 0]))
    engine.set_transport("pair", emulate_timeout_s=3.0)
    try:
        engine.train_batch(_tokens([16]))
        result["pair_stalled"] = None
    except P2PStalled as exc:
        result["pair_stalled"] = str(exc)
    Path(out_dir, f"rank{result['rank']}.json").write_text(json.dumps(result))
    os._exit(0)


def four_ranks() -> dict[str, Any]:
    """4 stages: ``ours`` on the emulated ``link`` transport trains like 1F1B; then pipe 2 x model 2 with
    partitioned activations and gradients, stock vs EnvPipe."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from envpipe.deepspeed import setup_distributed
    from envpipe.schedules import get_schedule

    setup_distributed(timeout_s=60)
    result: dict[str, Any] = {"rank": int(os.environ["RANK"])}
    result["emulated"] = _emulated(lambda: _llama(4), 4, 8, [1, 2, 0, 0])
    topology = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
    llama = lambda: _llama(2, topology)  # noqa: E731
    result["mp2"] = _pair(llama, _config(4), get_schedule("ours", 2, 4, [2, 0]), lambda: _tokens([16]), 2)
    return result
