"""Start the ranks of an ``envpipe train`` run, follow their progress, and collect rank 0's result.

On CPU our own spawner starts one process per stage (gloo over loopback, a free port, ``LOCAL_RANK`` /
``RANK`` / ``WORLD_SIZE`` set, ``OMP_NUM_THREADS=1``). On GPUs, and across nodes, the DeepSpeed launcher
starts them (``--num-gpus``/``--hostfile``/``--num-nodes`` forwarded). Either way rank 0 reports progress
as marker lines on its stdout (:mod:`envpipe.train.progress`), which survive the launcher's prefixes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from envpipe.errors import EnvpipeError
from envpipe.train.config import TrainConfig
from envpipe.train.progress import MARKER, ProgressDisplay, parse_marker

# How long ranks get to exit after SIGTERM before SIGKILL (they release their agent lease on the way out).
_TERM_GRACE_S = 5.0
# How long ranks get to shut down (release the lease, leave the process group) after rank 0's result.
_SHUTDOWN_GRACE_S = 60.0
_LOG_TAIL_LINES = 15


class RunError(EnvpipeError):
    """A rank failed or the run could not start; the message names the rank and where its log is kept."""


@dataclass(frozen=True)
class AgentForRun:
    """The agent a run talks to: its endpoint and whether it is the embedded sim agent we started."""

    endpoint: str
    simulated: bool
    embedded: bool
    description: str
    read_only: bool = False


@dataclass
class _Rank:
    """One spawned process (a rank, or the DeepSpeed launcher) and its log file."""

    name: str
    process: subprocess.Popen
    log_path: Path


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
    report = report_mod.build_report(result.pop("run_config"), result)
    report_mod.print_summary(report, console)
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
        config.agent, gpus=world_size, console=console, dvfs_model=config.dvfs_model, multi_node=multi_node
    ) as agent:
        emulate = config.emulate_dvfs if config.emulate_dvfs is not None else agent.simulated
        run_config = dataclasses.replace(
            config,
            agent=agent.endpoint,
            emulate_dvfs=emulate,
            device=device,
            job_id=f"envpipe-{config.mode}-{os.getpid()}-{int(time.time())}",
        )
        how = (
            f"{config.stages} CPU ranks (gloo over loopback)"
            if device == "cpu"
            else "the ranks through the DeepSpeed launcher"
        )
        console.print(
            f"starting {how}: {config.model}, {config.stages} stages, {config.micro_batches} "
            f"micro-batches of {config.micro_batch_size} x {config.seq_len} tokens"
        )
        if device == "cpu":
            _warn_shared_cores(config.stages, console)
        result = run_ranks(run_config, console=console)
    result["agent"] = {
        "endpoint": agent.endpoint,
        "simulated": agent.simulated,
        "embedded": agent.embedded,
        "description": agent.description,
    }
    result["run_config"] = run_config
    return result


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
        if config.hostfile is not None or (config.num_nodes or 1) > 1:
            raise RunError(
                "--hostfile/--num-nodes start ranks on other nodes through the DeepSpeed launcher, "
                "which needs GPUs; on CPU every rank runs on this machine (drop those options)"
            )
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


@contextlib.contextmanager
def agent_for_run(
    endpoint: str | None, *, gpus: int, console: Any, dvfs_model: str = "central", multi_node: bool = False
) -> Iterator[AgentForRun]:
    """The agent at ``endpoint`` (or the default endpoints); none reachable: start the embedded sim agent.

    The embedded agent is stopped when the block exits, also on errors. Ranks on other nodes cannot reach
    an embedded agent, so a multi-node run needs the node agents running.
    """
    found = probe_agent(endpoint)
    if found is not None:
        console.print(f"agent: {found.description} at {found.endpoint}")
        if found.read_only:
            console.print(
                "[yellow]the agent is read-only: it measures energy but never sets clocks, so every unit "
                "runs at the card's default clock whatever the plan says[/]"
            )
        yield found
        return
    if multi_node:
        raise RunError(
            f"no agent reachable at {endpoint or 'the default endpoints'}: a multi-node run needs "
            "envpipe-agent running on every node (see systemd/README.md); start it, or pass --agent"
        )
    from envpipe_agent.embedded import start_agent

    where = endpoint or "the default endpoints"
    # Same DVFS curve as the ranks' emulation; warnings only, so its log does not bury the progress display.
    running = start_agent(
        backend="sim", gpus=gpus, extra_args=["--model", dvfs_model, "--log-level", "warning"]
    )
    console.print(
        f"[yellow]no agent reachable at {where}: started an embedded sim agent ({gpus} simulated GPUs) "
        "for this run; energy figures are simulated[/]"
    )
    try:
        yield AgentForRun(
            running.endpoint,
            simulated=True,
            embedded=True,
            description=f"embedded sim agent, {gpus} simulated GPUs, {dvfs_model} DVFS model",
        )
    finally:
        running.stop()


def probe_agent(endpoint: str | None, timeout_s: float = 1.0) -> AgentForRun | None:
    """Say hello to an agent; ``None`` when none answers within ``timeout_s``."""
    from envpipe_agent.client import AgentClient, AgentUnavailable

    client = AgentClient(endpoint, job_id=f"envpipe-probe-{os.getpid()}", rank=-1, timeout_s=timeout_s)
    try:
        info = client.hello()
    except AgentUnavailable:
        return None
    finally:
        client.close()
    names = sorted({gpu.name for gpu in info.gpus}) or ["no GPUs"]
    kind = "sim agent (simulated)" if info.simulated else f"{info.backend} agent"
    read_only = bool(getattr(info, "read_only", False))
    return AgentForRun(
        client.endpoint,
        simulated=bool(info.simulated),
        embedded=False,
        description=f"{kind}{' (read-only)' if read_only else ''} {info.version}, {len(info.gpus)} x "
        f"{', '.join(names)}",
        read_only=read_only,
    )


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _warn_shared_cores(ranks: int, console: Any) -> None:
    """Say when CPU ranks outnumber the cores: unit times then include waiting for a core.

    A rank that is descheduled mid-unit stretches that unit, the sim agent counts the stretch as busy
    (simulated) energy, and a schedule that overlaps more units (``ours``) is charged for the sharing
    itself; the saving then measures the CPU's contention, not the plan.
    """
    cores = usable_cores()
    if ranks > cores:
        console.print(
            f"[yellow]warning: {ranks} CPU ranks share {cores} cores: unit times include waiting for a core, "
            f"so timings and simulated energy are noisy and biased against overlapping schedules; "
            f"use --stages {max(cores, 1)} or fewer on this machine[/]",
            highlight=False,
        )


def run_ranks(config: TrainConfig, *, console: Any) -> dict[str, Any]:
    """Spawn the ranks, show their progress and return rank 0's result dict.

    The run folder (config, one log per rank) is removed on success and kept, and named, on failure.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="envpipe-train-"))
    ok = False
    try:
        ranks, progress_stream = _start(config, run_dir)
        with ProgressDisplay(console) as display:
            result = _follow(ranks, progress_stream, display, run_dir)
        ok = "shutdown_warning" not in result  # keep the logs that the warning points to
        return result
    finally:
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)


def _start(config: TrainConfig, run_dir: Path) -> tuple[list[_Rank], IO[str]]:
    encoded = base64.b64encode(config.to_json().encode()).decode()
    worker = ["-m", "envpipe.train.worker", "--config-b64", encoded]
    if config.device == "cpu":
        return _spawn_cpu(config, worker, run_dir)
    return _spawn_deepspeed(config, encoded, run_dir)


def _spawn_cpu(config: TrainConfig, worker: list[str], run_dir: Path) -> tuple[list[_Rank], IO[str]]:
    port = free_port()
    ranks = []
    for rank in range(config.stages):
        env = rank_env(rank, config.stages, port, agent=config.agent)
        log_path = run_dir / f"rank{rank}.log"
        log = log_path.open("a")  # append: rank 0's stdout reader appends to the same file
        # Rank 0's stdout carries the progress markers; every rank's stderr goes to its own log.
        stdout = subprocess.PIPE if rank == 0 else log
        process = subprocess.Popen(
            [sys.executable, *worker], env=env, stdout=stdout, stderr=log, text=True, start_new_session=True
        )
        log.close()
        ranks.append(_Rank(f"rank {rank}", process, log_path))
    return ranks, ranks[0].process.stdout


def rank_env(rank: int, world_size: int, port: int, *, agent: str | None) -> dict[str, str]:
    """The environment of one CPU rank (what torchrun or the DeepSpeed launcher would set)."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
    )
    if agent:
        env["ENVPIPE_AGENT"] = agent
    return env


def free_port() -> int:
    """A TCP port free on loopback right now (the rendezvous of the CPU ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(config: TrainConfig, encoded_config: str, port: int) -> list[str]:
    """The DeepSpeed launcher command line, with our launcher options forwarded."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
    if config.num_gpus is not None:
        cmd += ["--num_gpus", str(config.num_gpus)]
    if config.hostfile is not None:
        cmd += ["--hostfile", config.hostfile]
    if config.num_nodes is not None:
        cmd += ["--num_nodes", str(config.num_nodes)]
    return cmd + ["--module", "envpipe.train.worker", "--config-b64", encoded_config]


def _spawn_deepspeed(config: TrainConfig, encoded: str, run_dir: Path) -> tuple[list[_Rank], IO[str]]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if config.agent:
        env["ENVPIPE_AGENT"] = config.agent
    log_path = run_dir / "launcher.log"
    log = log_path.open("a")  # append: rank 0's stdout reader appends to the same file
    process = subprocess.Popen(
        deepspeed_command(config, encoded, free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log.close()
    return [_Rank("DeepSpeed launcher", process, log_path)], process.stdout


def _follow(ranks: list[_Rank], stream: IO[str], display: ProgressDisplay, run_dir: Path) -> dict[str, Any]:
    """Feed markers to the display until every rank exits; the first failure stops the others.

    Once rank 0 has sent the result, a rank that fails or hangs while shutting down no longer costs the
    run: it is stopped, the result is kept and a warning names its log (the run folder is then kept).
    """
    events: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_markers, args=(stream, ranks[0].log_path, events), daemon=True)
    reader.start()
    result: dict[str, Any] | None = None
    result_at = 0.0
    try:
        while True:
            had_result = result is not None
            result = _drain(events, display, result)
            if result is not None and not had_result:
                result_at = time.monotonic()
            failed = [r for r in ranks if r.process.poll() not in (None, 0)]
            late = result is not None and time.monotonic() - result_at > _SHUTDOWN_GRACE_S
            if failed or late:
                _stop_all(ranks)
                if result is None:
                    raise RunError(_failure_message(failed[0], run_dir))
                what = _failure_message(failed[0], run_dir) if failed else "a rank did not exit after the run"
                from rich.markup import escape  # a rank's error line may quote "[/path.cc:78]"

                display.console.print(
                    f"[yellow]warning: the run finished, but {escape(what)}[/]", highlight=False
                )
                result["shutdown_warning"] = what
                return result
            if all(r.process.poll() == 0 for r in ranks):
                reader.join(timeout=5.0)
                result = _drain(events, display, result)
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop_all(ranks)
        raise RunError(f"interrupted: every rank was stopped; their logs are kept in {run_dir}") from None
    if result is None:
        raise RunError(f"the ranks exited without a result; their logs are kept in {run_dir}")
    return result


def _read_markers(stream: IO[str], log_path: Path, events: queue.Queue) -> None:
    """Marker lines go to the queue; everything else is appended to rank 0's (or the launcher's) log."""
    with log_path.open("a") as log:
        for line in stream:
            event = parse_marker(line)
            if event is None:
                log.write(line)
                log.flush()
            else:
                events.put(event)


def _drain(events: queue.Queue, display: ProgressDisplay, result: dict | None) -> dict | None:
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return result
        if event.get("event") == "result":
            result = event["data"]
        else:
            display.handle(event)


def _stop_all(ranks: list[_Rank]) -> None:
    """SIGTERM every still-running rank's process group, then SIGKILL what is left after a grace period."""
    alive = [r for r in ranks if r.process.poll() is None]
    for rank in alive:
        _signal_group(rank.process, signal.SIGTERM)
    deadline = time.monotonic() + _TERM_GRACE_S
    for rank in alive:
        try:
            rank.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(rank.process, signal.SIGKILL)
            rank.process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _failure_message(rank: _Rank, run_dir: Path) -> str:
    code = rank.process.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    reason = _last_error_line(rank.log_path)
    return (
        f"{rank.name} {how}{': ' + reason if reason else ''}; the job was stopped. "
        f"Logs are kept in {run_dir} (see {rank.log_path.name})"
    )


def _last_error_line(log_path: Path) -> str:
    """The last line that looks like an error (an exception or our own 'error:' line) in a rank's log."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("error:") or (
            ":" in text and text.split(":", 1)[0].endswith(("Error", "Exception"))
        ):
            text = text.removeprefix("error:").strip()
            # The worker writes "error: rank N: ..."; the caller names the rank already.
            if text.startswith("rank ") and ": " in text:
                text = text.split(": ", 1)[1]
            return text
    return ""


__all__ = ["MARKER", "RunError", "agent_for_run", "deepspeed_command", "free_port", "probe_agent", "train"]
