"""The ranks of an ``envpipe train`` run: spawned (CPU: own spawner; GPUs: the DeepSpeed launcher), followed
through rank 0's progress markers, and stopped together when one fails.

On CPU one process per stage (gloo over loopback, a free port, ``LOCAL_RANK`` / ``RANK`` / ``WORLD_SIZE``
set, ``OMP_NUM_THREADS=1``). On GPUs, and across nodes, the DeepSpeed launcher starts them
(``--num-gpus``/``--hostfile``/``--num-nodes`` forwarded). Rank 0 reports progress as marker lines on its
stdout (:mod:`envpipe.train.progress`), which survive the launcher's prefixes.
"""

from __future__ import annotations

import base64
import contextlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from envpipe.train.agents import RunError
from envpipe.train.config import TrainConfig
from envpipe.train.progress import ProgressDisplay, parse_marker

# How long ranks get to exit after SIGTERM before SIGKILL (they release their agent lease on the way out).
_TERM_GRACE_S = 5.0
# How long ranks get to shut down (release the lease, leave the process group) after rank 0's result.
_SHUTDOWN_GRACE_S = 60.0


@dataclass
class _Rank:
    """One spawned process (a rank, or the DeepSpeed launcher) and its log file."""

    name: str
    process: subprocess.Popen
    log_path: Path


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def warn_shared_cores(ranks: int, console: Any) -> None:
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


