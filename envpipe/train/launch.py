"""``envpipe train`` and ``envpipe profile`` end to end: find or start the agent, run the ranks
(:mod:`envpipe.train.ranks`), then the summary, ``--report`` and ``--plot`` (:mod:`envpipe.train.report`)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from envpipe.train.agents import RunError, agent_for_run
from envpipe.train.config import TrainConfig
from envpipe.train.ranks import run_ranks, warn_shared_cores


def train(config: TrainConfig, *, console: Any) -> dict[str, Any]:
    """Run the whole job: agent, ranks, progress, summary, ``--report`` and ``--plot``.

    Args:
        config: the resolved run configuration.
        console: a rich console for the progress display and the summary.

    Returns:
        The report dict (what ``--report`` writes).

    Raises:
        RunError: a rank failed (the logs are kept and named in the message).

    """
    from envpipe.train import report as report_mod

    result = _run_with_agent(config, console)
    if config.node_rank:  # not the first node: rank 0 (on the first node) gathers and reports
        console.print(f"node {config.node_rank}: its ranks finished; the first node's run prints the summary")
        return {}
    run_config = result.pop("run_config")
    records = result.pop("records", {})
    report = report_mod.build_report(run_config, result)
    report.update(run_facts(run_config, records))
    report_mod.print_summary(report, console)
    if report["eval"]:
        last = report["eval"][-1]
        console.print(
            f"eval at step {last['step']}: loss {last['loss']:.4f}, perplexity {last['perplexity']:.2f}",
            highlight=False,
        )
    if config.export_hf:
        _export(run_config, config.export_hf, console)
    if config.report:
        report_mod.write_json(report, config.report)
        console.print(f"report written to {config.report}")
    if config.plot:
        try:
            report_mod.draw_plot(report, config.plot)
        except Exception as exc:  # noqa: BLE001 - the run is done; say what failed, keep the rest
            kept = f"; the report is complete in {config.report}" if config.report else ""
            raise RunError(
                f"could not draw --plot {config.plot} ({type(exc).__name__}: {exc}){kept}"
            ) from None
        console.print(f"Gantt chart of the last iteration drawn to {config.plot}")
    return report


def run_facts(config: TrainConfig, records: dict[str, list]) -> dict[str, Any]:
    """What the report adds to the controller's result: the log, eval and checkpoint records, the effective
    optimizer and learning rate, and the versions of the software that trained."""
    import importlib.metadata

    versions = {}
    for name in ("envpipe", "torch", "deepspeed", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    optimizer = config.ds_config.get("optimizer") or {}
    return {
        "log": records.get("log", []),
        "eval": records.get("eval", []),
        "checkpoints": records.get("checkpoint", []),
        "optimizer": {
            "type": optimizer.get("type"),
            "lr": (optimizer.get("params") or {}).get("lr"),
            "scheduler": (config.ds_config.get("scheduler") or {}).get("type"),
            "precision": config.precision,
        },
        "software": versions,
    }


def _export(config: TrainConfig, out_dir: str, console: Any) -> None:
    """``--export-hf``: the final checkpoint as a Hugging Face folder (a temporary checkpoint is removed)."""
    import shutil

    from envpipe.export import export_hf

    try:
        result = export_hf(config.save_dir, out_dir, source="--save-dir")
    finally:
        if config.save_dir and Path(config.save_dir).name.startswith(_EXPORT_TMP):
            shutil.rmtree(config.save_dir, ignore_errors=True)
    console.print(f"model of step {result.step} exported to {result.path} (Hugging Face folder)", highlight=False)


_EXPORT_TMP = "envpipe-export-"


def profile(config: TrainConfig, output: str | Path, *, console: Any) -> dict[str, Any]:
    """Run the profiling phase only and write the profile JSON (``envpipe profile``).

    Returns:
        The profile dict (docs/architecture.md, "Profile JSON").

    """
    from envpipe.train.report import write_json

    if not Path(output).resolve().parent.is_dir():
        raise RunError(f"--output {output}: its folder does not exist; create it first")
    result = _run_with_agent(dataclasses.replace(config, mode="profile"), console)
    profile_data = result["profile"]
    if profile_data is None:
        raise RunError("no energy was measured while profiling (the agent did not answer): no profile written")
    write_json(profile_data, output)
    label = "simulated" if profile_data.get("simulated") else "measured"
    lows = ", ".join(f"stage {s['stage']}: {s['f_low_mhz']} MHz" for s in profile_data["stages"])
    console.print(f"profile ({label}) written to {output}; energy-valley clocks: {lows}")
    return profile_data


def _run_with_agent(config: TrainConfig, console: Any) -> dict[str, Any]:
    """Find or start the agent, run the ranks, and return rank 0's result (with the agent described)."""
    _require_training_stack()
    device = resolve_device(config)
    world_size = _local_world_size(config, device)
    multi_node = config.hostfile is not None and (config.num_nodes or 2) > 1
    with agent_for_run(
        config.agent,
        gpus=world_size,
        console=console,
        dvfs_model=config.dvfs_model,
        multi_node=multi_node,
        explicit=config.agent is not None,
    ) as agent:
        emulate = config.emulate_dvfs if config.emulate_dvfs is not None else agent.simulated
        run_config = dataclasses.replace(
            config,
            agent=agent.endpoint,
            emulate_dvfs=emulate,
            device=device,
            job_id=f"envpipe-{config.mode}-{os.getpid()}-{int(time.time())}",
            **_lifecycle_settings(config, console),
        )
        how = (
            f"{config.stages} CPU ranks (gloo over loopback)"
            if device == "cpu" and config.hostfile is None
            else "the ranks through the DeepSpeed launcher"
        )
        console.print(
            f"starting {how}: {config.model}, {config.stages} stages, {config.micro_batches} "
            f"micro-batches of {config.micro_batch_size} x {config.seq_len} tokens"
        )
        if device == "cpu" and config.hostfile is None:
            warn_shared_cores(config.stages, console)
        result = run_ranks(run_config, console=console, log_dir=_log_dir(run_config))
    result["agent"] = {
        "endpoint": agent.endpoint,
        "simulated": agent.simulated,
        "embedded": agent.embedded,
        "description": agent.description,
    }
    result["run_config"] = run_config
    return result


def _lifecycle_settings(config: TrainConfig, console: Any) -> dict[str, Any]:
    """Resume (start step, the checkpoint's plan) and a temporary checkpoint for ``--export-hf`` alone."""
    import tempfile

    from envpipe import checkpoints

    changes: dict[str, Any] = {}
    if config.resume_dir is not None:
        info = checkpoints.find(config.resume_dir, source="--resume")
        changes["start_step"] = info.step
        changes["resume"] = str(info.path)
        plan = info.path / checkpoints.PLAN_FILE
        if config.plan is None and plan.is_file():
            changes["plan"] = str(plan)
        console.print(
            f"resuming from {info.path} at step {info.step}"
            + (" with its plan (no profiling)" if "plan" in changes else ""),
            highlight=False,
        )
    if config.export_hf and config.save_dir is None:
        changes["save_dir"] = tempfile.mkdtemp(prefix=_EXPORT_TMP)
    return changes


def _log_dir(config: TrainConfig) -> str | None:
    """The ranks' log folder: ``--log-dir``, else ``<--save-dir>/logs`` (None: a temporary folder)."""
    if config.log_dir:
        return config.log_dir
    if config.save_dir and not Path(config.save_dir).name.startswith(_EXPORT_TMP):
        return str(Path(config.save_dir) / "logs")
    return None


def resolve_device(config: TrainConfig) -> str:
    """``cpu`` or ``cuda``: ``auto`` takes CUDA when torch sees a GPU (torch is imported only here)."""
    if config.device != "auto":
        if config.device == "cuda" and not _cuda_available():
            raise RunError("--device cuda: torch sees no CUDA GPU here; use --device cpu (gloo ranks on CPU)")
        return config.device
    return "cuda" if _cuda_available() else "cpu"


def _cuda_available() -> bool:
    _require_training_stack()
    import torch

    return torch.cuda.is_available()


def _require_training_stack() -> None:
    """Fail with the install command when the [train] extra (torch, deepspeed, transformers) is missing."""
    import importlib.util

    missing = [
        name for name in ("torch", "deepspeed", "transformers") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise RunError(
            f"envpipe train needs {', '.join(missing)}: install the training extra, e.g. "
            "DS_BUILD_OPS=0 pip install torch 'envpipe[train]'"
        )


def _local_world_size(config: TrainConfig, device: str) -> int:
    """Ranks (and so GPUs) on this node: the stages on CPU, --num-gpus or all visible GPUs on CUDA."""
    if device == "cpu":
        if config.hostfile is not None:
            return config.stages  # the DeepSpeed launcher starts the hostfile's slots (gloo between nodes)
        if config.num_gpus is not None:
            raise RunError(
                f"--num-gpus {config.num_gpus} with CPU ranks: on CPU there is one rank per stage; "
                "drop --num-gpus or run on GPUs"
            )
        return config.stages
    import torch

    visible = torch.cuda.device_count()
    gpus = config.num_gpus or visible
    if gpus > visible:
        raise RunError(f"--num-gpus {gpus}: only {visible} GPU(s) visible; lower --num-gpus")
    if config.hostfile is None and gpus < config.stages:
        raise RunError(
            f"--stages {config.stages} needs {config.stages} GPUs on this node, {gpus} available; "
            "lower --stages, or give --hostfile for more nodes"
        )
    if config.hostfile is None and gpus % config.stages:
        raise RunError(
            f"{gpus} GPU(s) cannot hold {config.stages} stages evenly; "
            "set --num-gpus to a multiple of --stages"
        )
    return gpus


__all__ = ["RunError", "agent_for_run", "profile", "train"]
