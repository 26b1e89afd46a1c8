"""EnvPipe on stock DeepSpeed pipelines.

``initialize`` takes ``deepspeed.initialize``'s arguments and returns what it returns; the engine's
``train_batch`` then runs EnvPipe's controller (warm-up, baseline window, profiling, reconfiguration, then
every step at the plan). A user's script changes one line::

    engine, optimizer, _, lr_scheduler = envpipe.deepspeed.initialize(model=pipe, config="ds.json")

``build_engine`` is the lower level: an engine running a given schedule and clock plan, no controller.
Importing this package is cheap; torch and deepspeed load when a function here is called.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from envpipe.errors import ConfigError

log = logging.getLogger("envpipe.deepspeed")

__all__ = ["build_engine", "connect_agent", "initialize", "placement", "setup_distributed"]


def setup_distributed(timeout_s: float = 1800.0, backend: str | None = None) -> None:
    """Initialise torch.distributed for pipeline training, avoiding the known CPU traps.

    Reads the launcher's environment first (:mod:`envpipe.dist_env`: torchrun, the DeepSpeed launcher,
    ``srun``), sets up gloo on CPU (nccl on GPU), skips DeepSpeed's shm-comm JIT build (25–55 s, unused by pipelines),
    requires ``LOCAL_RANK`` (DeepSpeed's PipelineModule reads it), and on CPU without ``OMP_NUM_THREADS``
    shares the cores among the node's ranks.

    Args:
        timeout_s: process-group timeout; a dead peer surfaces as an error after at most this long.
        backend: force a backend ("gloo", "nccl").

    Raises:
        ConfigError: ``LOCAL_RANK`` missing in a multi-rank job, or a launcher's variables incomplete.
    """
    import datetime

    import deepspeed
    import torch

    from envpipe import dist_env

    dist_env.apply()  # srun sets only SLURM_* variables: fill in RANK, WORLD_SIZE, MASTER_ADDR, ...
    if "LOCAL_RANK" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "LOCAL_RANK is not set; start ranks with `envpipe train`, torchrun or the deepspeed launcher"
            )
        os.environ["LOCAL_RANK"] = "0"
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    elif "OMP_NUM_THREADS" not in os.environ:
        # Several CPU ranks each using every core thrash; the launchers set OMP_NUM_THREADS, others may not.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
    deepspeed.init_distributed(
        dist_backend=backend or ("nccl" if on_gpu else "gloo"),
        verbose=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def connect_agent(agent: Any, local_rank: int, *, claim: bool = True) -> tuple[Any, Any]:
    """Say hello to the agent and lease this rank's GPU; on failure warn once and return ``(None, None)``.

    On GPU the CUDA device is translated to the agent's UUID (never trusting indices); on CPU with the sim
    agent, rank ``local_rank`` takes simulated GPU ``local_rank mod n``.

    Returns:
        ``(agent, gpu_info)``, or ``(None, None)`` when no agent answered (training goes on).
    """
    if agent is None:
        return None, None
    import torch

    try:
        info = agent.hello()
        if torch.cuda.is_available():
            uuid = agent.gpu_uuid_for_cuda_index(torch.cuda.current_device())
            gpu = next(g for g in info.gpus if g.uuid == uuid)
        else:
            if not info.gpus:
                raise ConfigError("the agent manages no GPUs")
            gpu = info.gpus[local_rank % len(info.gpus)]
        if claim:
            agent.claim(gpu.uuid)
    except Exception as exc:  # noqa: BLE001 - any agent failure: train on without it, say so once
        log.warning("envpipe agent not usable (%s): training goes on at the card's default clocks", exc)
        return None, None
    return agent, gpu


def build_engine(
    model: Any,
    config: dict[str, Any],
    schedule: Any,
    clocks: dict[Any, dict[str, int]] | None = None,
    agent: Any = None,
    emulate_dvfs: bool = False,
    *,
    dvfs_model: Any = "central",
    max_clock_mhz: int | None = None,
    claim_gpu: bool = True,
    local_rank: int | None = None,
    **engine_kwargs: Any,
) -> Any:
    """Build an :class:`~envpipe.deepspeed.engine.EnvpipeEngine` for ``model`` running ``schedule``.

    Args:
        model: this rank's ``PipelineModule`` (``envpipe.models.llama.build_pipeline``).
        config: DeepSpeed config dict; ``gradient_accumulation_steps`` must equal ``schedule.micro_batches``.
            An ``"envpipe"`` block is ignored here (the CLI reads it).
        schedule: an ``envpipe.ir.Schedule`` (``envpipe.schedules.get_schedule``).
        clocks: ``ClockPlan`` (stage → unit → MHz); None runs every unit at the top clock.
        agent: an ``envpipe_agent.client.AgentClient`` or None; if it does not answer, training goes on.
        emulate_dvfs: stretch each unit by its clock's modelled slowdown (simulated; for CPU / sim agent).
        dvfs_model: the ``envpipe_agent.dvfs`` model name or object used to stretch.
        max_clock_mhz: the card's top clock; default the agent's GPU's, else 1980 (H100) when emulating.
        claim_gpu: lease this rank's GPU from the agent (set False if the caller already did).
        local_rank: default ``$LOCAL_RANK``.
        **engine_kwargs: passed to DeepSpeed's engine (``optimizer``, ``lr_scheduler``, ``training_data``,
            ``collate_fn``, ``args``, ``model_parameters``), as ``deepspeed.initialize`` does.

    Raises:
        ConfigError: mismatched schedule/config, or a clock plan naming units the stage does not run.
    """
    from deepspeed import set_optimizer_flags
    from deepspeed.runtime.config import DeepSpeedConfig

    from envpipe.deepspeed.engine import EnvpipeEngine

    ds_config = {k: v for k, v in config.items() if k != "envpipe"}
    accumulation = ds_config.get("gradient_accumulation_steps")
    if accumulation is not None and accumulation != schedule.micro_batches:
        raise ConfigError(
            f"gradient_accumulation_steps={accumulation} but the schedule has "
            f"{schedule.micro_batches} micro-batches; they must be equal"
        )
    ds_config.setdefault("gradient_accumulation_steps", schedule.micro_batches)
    mpu = model.mpu()
    config_class = DeepSpeedConfig(ds_config, mpu)
    set_optimizer_flags(config_class, model)  # as deepspeed.initialize: Muon needs its parameter flags
    engine_kwargs.setdefault("model_parameters", [p for p in model.parameters() if p.requires_grad])
    engine = EnvpipeEngine(
        model=model,
        mpu=mpu,
        config=ds_config,
        config_class=config_class,
        envpipe_schedule=schedule,
        **{"args": None, **engine_kwargs},
    )
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    agent, gpu = connect_agent(agent, rank, claim=claim_gpu)
    top_mhz = max_clock_mhz or (gpu.max_mhz if gpu is not None else None)
    stretcher = None
    if emulate_dvfs:
        from envpipe.deepspeed.dvfs_emulation import DvfsStretcher

        top_mhz = top_mhz or 1980
        stretcher = DvfsStretcher(dvfs_model, max_clock_mhz=top_mhz)
        if engine.device.type == "cuda":
            stretcher.calibrate_gpu()
    engine.attach(agent, max_clock_mhz=top_mhz, stretcher=stretcher)
    engine.set_clocks(clocks)
    engine.agent, engine.gpu = agent, gpu
    return engine


def initialize(
    args: Any = None,
    model: Any = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: dict[str, Any] | str | None = None,
    mesh_param: Any = None,
    config_params: dict[str, Any] | str | None = None,
    *,
    agent: Any = None,
    listener: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` for a ``PipelineModule``, with EnvPipe's controller inside the engine.

    Takes ``deepspeed.initialize``'s arguments and returns what it returns: ``(engine, optimizer,
    training_dataloader, lr_scheduler)``. The config (a dict or a JSON path) may carry an ``"envpipe"`` block
    (keys of :class:`envpipe.controller.ControllerConfig`; ``envpipe train``'s run keys are ignored). Each
    ``engine.train_batch()`` is one optimizer step; the first ones are the controller's warm-up, baseline,
    profiling and reconfiguration (all real training steps), every later one runs at the plan.

    Args:
        args, model, optimizer, model_parameters, training_data, lr_scheduler, distributed_port, mpu,
            dist_init_required, collate_fn, config, mesh_param, config_params: as ``deepspeed.initialize``
            (``model`` must be a ``PipelineModule``; ``mpu`` and ``mesh_param`` must be None, as DeepSpeed
            requires for pipelines).
        agent: an ``envpipe_agent.client.AgentClient``; default: one to the block's ``agent`` endpoint, else
            ``$ENVPIPE_AGENT`` and the default sockets. Without an answer training goes on at the card's
            default clocks (said once).
        listener: receives the controller's progress events on rank 0 (default: logging).

    Raises:
        ConfigError: not a PipelineModule, a bad config or ``"envpipe"`` block, a plan file that does not fit.
    """
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.config import DeepSpeedConfig

    from envpipe.controller import ControllerConfig
    from envpipe.deepspeed.control import attach_controller, job_id
    from envpipe.schedules import get_schedule

    if not isinstance(model, PipelineModule):
        raise ConfigError(
            f"envpipe.deepspeed.initialize needs a deepspeed.pipe.PipelineModule, got {type(model).__name__}; "
            "wrap the model's layers in a PipelineModule (see examples/own_script)"
        )
    if mpu is not None or mesh_param is not None:
        raise ConfigError("mpu and mesh_param must be None with pipeline parallelism (as in deepspeed.initialize)")
    ds_config, source = _load_config(args, config if config is not None else config_params)
    settings = ControllerConfig.from_block(ds_config.pop("envpipe", None), source=f'{source}: "envpipe" block')
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", str(distributed_port))
        setup_distributed()
    micro_batches = DeepSpeedConfig(dict(ds_config), model.mpu()).gradient_accumulation_steps
    ds_config["gradient_accumulation_steps"] = micro_batches
    owned = agent is None
    if owned:
        from envpipe_agent.client import AgentClient

        agent = AgentClient(settings.agent, job_id=job_id(), rank=dist.get_rank())
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    connected, gpu = connect_agent(agent, rank, claim=True)
    simulated = bool(connected is not None and _simulated(connected))
    emulate = settings.emulate_dvfs if settings.emulate_dvfs is not None else simulated
    engine = build_engine(
        model, ds_config, get_schedule("1f1b", model.num_stages, micro_batches), None, connected,
        emulate_dvfs=emulate and connected is not None, dvfs_model=settings.dvfs_model, claim_gpu=False,
        local_rank=rank, args=args, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, collate_fn=collate_fn,
    )
    if owned:
        engine.owned_client = agent
    attach_controller(engine, settings, client=connected, gpu=gpu, simulated=simulated, listener=listener)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _simulated(agent: Any) -> bool:
    try:
        return bool(agent.hello().simulated)
    except Exception:  # noqa: BLE001 - it answered a moment ago; treat a hiccup as a real agent
        return False


def _load_config(args: Any, config: dict[str, Any] | str | None) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config as a dict (a copy) and where it came from, like ``deepspeed.initialize``."""
    import json

    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ConfigError("no DeepSpeed config: pass config= (a dict or a JSON file), as to deepspeed.initialize")
    if isinstance(config, dict):
        return json.loads(json.dumps(config)), "config"
    path = str(config)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file; give a DeepSpeed JSON file or a dict") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a JSON object")
    return data, path


def placement(engine: Any) -> tuple[int, int, int]:
    """(stage, data-parallel index, data-parallel size) of this rank."""
    from envpipe.deepspeed.control import placement as grid_placement

    return grid_placement(engine)
