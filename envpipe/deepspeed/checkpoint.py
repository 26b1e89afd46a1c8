"""Save and resume an :class:`~envpipe.deepspeed.engine.EnvpipeEngine` through DeepSpeed's own checkpointing.

DeepSpeed's ``save_checkpoint`` / ``load_checkpoint`` carry the weights (one file per pipe layer), the
optimizer and the LR scheduler of every stage, whatever the schedule and r (they hold no state between
iterations). EnvPipe adds what a resumed run needs to continue exactly: every rank's RNG states, the data
position and the plan (see :mod:`envpipe.checkpoints` for the folder layout). Every rank calls
:func:`save` and :func:`load` together (they are collective, as DeepSpeed's are).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envpipe import checkpoints
from envpipe.errors import ConfigError


@dataclass(frozen=True)
class ResumeState:
    """What :func:`load` restored besides the engine: continue training from here.

    Attributes:
        step: iterations done (also ``engine.global_steps``).
        data_position: micro-batches this pipeline's data iterator had consumed (build it with ``start=``).
        plan: the plan stored with the checkpoint (schedule, clocks, fingerprint), or None.
        meta: the whole ``envpipe.json``.
        path: the tag folder loaded.
    """

    step: int
    data_position: int
    plan: dict[str, Any] | None
    meta: dict[str, Any]
    path: Path


def topology(engine: Any) -> dict[str, int]:
    """The layout a checkpoint is valid for: stages, data-parallel replicas and micro-batches."""
    return {
        "stages": engine.num_stages,
        "data_parallel": engine.grid.data_parallel_size,
        "micro_batches": engine.micro_batches,
    }


def save(
    engine: Any,
    save_dir: str | Path,
    *,
    data_position: int,
    plan: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    model_dir: str | Path | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save a checkpoint of ``engine`` after ``engine.global_steps`` iterations (collective: every rank).

    Args:
        engine: the EnvPipe engine (any schedule).
        save_dir: the save folder; the tag is ``global_step<N>``.
        data_position: micro-batches this pipeline's data iterator has consumed so far.
        plan: the plan in use (a JSON-able dict: schedule, clocks, fingerprint), stored for the resume.
        settings: the run's settings (JSON-able), stored for reference and checks at resume.
        model_dir: the Hugging Face folder the model came from: its tokenizer files are copied along.
        keep_last: keep only this many newest checkpoints (None or 0 = all).

    Returns:
        The tag folder written.
    """
    import torch.distributed as dist

    save_dir = Path(save_dir)
    tag = checkpoints.tag_for_step(engine.global_steps)
    tag_path = save_dir / tag
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    (tag_path / "rng").mkdir(exist_ok=True)
    _save_rng(tag_path / "rng" / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        engine.module.llama_config.save_pretrained(str(tag_path))
        meta = {
            "step": engine.global_steps,
            "data_position": data_position,
            "world_size": dist.get_world_size(),
            **topology(engine),
            "schedule": {"name": engine.schedule.name, "r": list(getattr(engine.schedule, "r", None) or [])},
            "plan": plan,
            "settings": settings or {},
            "model_files": checkpoints.copy_model_files(model_dir, tag_path),
        }
        if plan is not None and plan.get("format"):  # a plan file's object: a resumed run adopts it
            from envpipe.controller.planfile import write_plan

            write_plan(plan, tag_path / checkpoints.PLAN_FILE)
        checkpoints.write_meta(tag_path, meta)
        checkpoints.mark_latest(save_dir, tag)
        checkpoints.prune(save_dir, keep_last)
    dist.barrier()
    return tag_path


def load(engine: Any, checkpoint: str | Path, *, tag: str | None = None, source: str = "--resume") -> ResumeState:
    """Restore ``engine`` (weights, optimizer, LR scheduler, step) and this rank's RNG states.

    Args:
        engine: a freshly built engine with the same stages, replicas and micro-batches as the saved one.
        checkpoint: a save folder (its ``latest``) or a tag folder.
        tag: a tag inside the save folder.
        source: what to call ``checkpoint`` in errors.

    Raises:
        ConfigError: no complete checkpoint there, or one saved with another topology.
    """
    import torch.distributed as dist

    info = checkpoints.find(checkpoint, tag=tag, source=source)
    check_topology(info.meta, topology(engine), dist.get_world_size(), source=f"{source} {info.path}")
    load_path, _ = engine.load_checkpoint(str(info.save_dir), tag=info.tag)
    if load_path is None:
        raise ConfigError(f"{source} {info.path}: DeepSpeed found no checkpoint to load there")
    _load_rng(info.path / "rng" / f"rank{dist.get_rank()}.pt", source=f"{source} {info.path}")
    return ResumeState(
        step=info.step,
        data_position=int(info.meta["data_position"]),
        plan=info.meta.get("plan"),
        meta=info.meta,
        path=info.path,
    )


def check_topology(meta: dict[str, Any], current: dict[str, int], world_size: int, *, source: str) -> None:
    """Raise ``ConfigError`` naming the first layout field in which the checkpoint differs from this run."""
    for name, value in {**current, "world_size": world_size}.items():
        if meta.get(name) != value:
            raise ConfigError(
                f"{source} was saved with {name}={meta.get(name)}, this run has {name}={value}; "
                f"resume with the same {name.replace('_', ' ')} (the optimizer state is split that way)"
            )


def _save_rng(path: Path) -> None:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with transformers
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, path)


def _load_rng(path: Path, *, source: str) -> None:
    import torch

    if not path.is_file():
        raise ConfigError(f"{source} has no RNG state for this rank ({path.name}); the checkpoint is incomplete")
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
