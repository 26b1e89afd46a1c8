"""The ranks of an ``envpipe train`` run: spawned (CPU: own spawner; GPUs: the DeepSpeed launcher), followed
through rank 0's progress markers, and stopped together when one fails.

On CPU one process per stage, started by the one local launcher (``envpipe.deepspeed.launcher``: gloo over
loopback, a free port, ``LOCAL_RANK`` / ``RANK`` / ``WORLD_SIZE`` set, ``OMP_NUM_THREADS=1``, each rank
dying with the launcher). On GPUs, and across nodes, the DeepSpeed launcher starts them
(``--num-gpus``/``--hostfile``/``--num-nodes`` forwarded). Rank 0 reports progress as marker lines on its
stdout (:mod:`envpipe.train.progress`), which survive the launcher's prefixes.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from envpipe.deepspeed.launcher import (
    TERM_GRACE_S,
    free_port,
    hostfile_hosts,
    rank_env,
    signal_rank,
    start_rank,
    stop_ranks,
)
from envpipe.train.agents import RunError
from envpipe.train.config import TrainConfig
from envpipe.train.progress import ProgressDisplay, parse_marker

# How long ranks get to exit after SIGTERM before SIGKILL (they release their agent lease on the way out).
_TERM_GRACE_S = TERM_GRACE_S
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


class RunStopped(RunError):
    """SIGTERM/SIGINT stopped the run: every rank was stopped (after saving a checkpoint when asked)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def run_ranks(config: TrainConfig, *, console: Any, log_dir: str | Path | None = None) -> dict[str, Any]:
    """Spawn the ranks, show their progress and return rank 0's result dict (with the log/eval records).

    The ranks' logs go to ``log_dir`` (kept); without one to a temporary folder that is removed on success
    and kept, and named, on failure. SIGTERM/SIGINT are passed to every rank's process group, which saves a
    checkpoint (with ``--save-dir``) and exits; after ``config.grace_s`` what is left is killed.

    Raises:
        RunError: a rank failed (the message names the root cause and the log folder).
        RunStopped: a signal stopped the run.
    """
    run_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="envpipe-train-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        ranks, progress_stream = _start(config, run_dir)
        with ProgressDisplay(console) as display, _Signals() as signals:
            # Rank 0 runs on the hostfile's first node: the other nodes' runs end without a result.
            expect = not config.node_rank
            result = _follow(
                ranks, progress_stream, display, run_dir, signals, config.grace_s, expect_result=expect
            )
        result["records"] = display.records
        ok = "shutdown_warning" not in result  # keep the logs that the warning points to
        return result
    finally:
        if ok and log_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)


class _Signals:
    """While following the ranks, SIGTERM and SIGINT are recorded instead of ending the launcher."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _start(config: TrainConfig, run_dir: Path) -> tuple[list[_Rank], IO[str]]:
    encoded = base64.b64encode(config.to_json().encode()).decode()
    worker = ["-m", "envpipe.train.worker", "--config-b64", encoded]
    if config.device == "cpu" and config.hostfile is None:
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
        process = start_rank(worker, env, stdout=stdout, stderr=log)  # dies with the launcher
        log.close()
        ranks.append(_Rank(f"rank {rank}", process, log_path))
    return ranks, ranks[0].process.stdout


def deepspeed_command(config: TrainConfig, encoded_config: str, port: int) -> list[str]:
    """The DeepSpeed launcher command line, with our launcher options forwarded."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
    if config.num_gpus is not None:
        cmd += ["--num_gpus", str(config.num_gpus)]
    if config.hostfile is not None:
        cmd += ["--hostfile", config.hostfile]
    if config.num_nodes is not None:
        cmd += ["--num_nodes", str(config.num_nodes)]
    if config.node_rank is not None:  # every node starts its own ranks; they meet at the first host
        cmd += ["--no_ssh", "--node_rank", str(config.node_rank)]
        cmd += ["--master_addr", first_host(config.hostfile)]
    return cmd + ["--module", "envpipe.train.worker", "--config-b64", encoded_config]


def _spawn_deepspeed(config: TrainConfig, encoded: str, run_dir: Path) -> tuple[list[_Rank], IO[str]]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if config.agent:
        env["ENVPIPE_AGENT"] = config.agent
    log_path = run_dir / "launcher.log"
    log = log_path.open("a")  # append: rank 0's stdout reader appends to the same file
    # Without ssh every node's launcher must name the same port: $MASTER_PORT, else torch's default.
    port = int(os.environ.get("MASTER_PORT", "29500")) if config.node_rank is not None else free_port()
    command = deepspeed_command(config, encoded, port)  # sys.executable -m deepspeed.launcher.runner ...
    process = start_rank(command[1:], env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log.close()
    return [_Rank("DeepSpeed launcher", process, log_path)], process.stdout


def first_host(hostfile: str) -> str:
    """The hostfile's first host (read as DeepSpeed reads it): where rank 0 and the rendezvous are."""
    hosts = hostfile_hosts(hostfile)
    if not hosts:
        raise RunError(f"--hostfile {hostfile}: no hosts in it; one line per node, e.g. 'node0 slots=2'")
    return next(iter(hosts))


def _follow(
    ranks: list[_Rank],
    stream: IO[str],
    display: ProgressDisplay,
    run_dir: Path,
    signals: _Signals | None = None,
    grace_s: float = 30.0,
    *,
    expect_result: bool = True,
) -> dict[str, Any]:
    """Feed markers to the display until every rank exits; the first failure stops the others.

    Once rank 0 has sent the result, a rank that fails or hangs while shutting down no longer costs the
    run: it is stopped, the result is kept and a warning names its log (the run folder is then kept).
    """
    signals = signals or _Signals()  # not entered: no signal handling (tests)
    events: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_markers, args=(stream, ranks[0].log_path, events), daemon=True)
    reader.start()
    result: dict[str, Any] | None = None
    result_at = 0.0
    stop_deadline: float | None = None
    while True:
        had_result = result is not None
        result = _drain(events, display, result)
        if result is not None and not had_result:
            result_at = time.monotonic()
        if signals.received and stop_deadline is None:
            for rank in ranks:  # every rank's process group: the ranks save, release their lease, exit
                signal_rank(rank.process, signals.received[0])
            stop_deadline = time.monotonic() + grace_s
        if stop_deadline is not None and (len(signals.received) > 1 or time.monotonic() > stop_deadline):
            _kill_all(ranks)
        failed = [r for r in ranks if r.process.poll() not in (None, 0)]
        if stop_deadline is not None and all(r.process.poll() is not None for r in ranks):
            reader.join(timeout=5.0)
            raise RunStopped(*_stop_message(signals.received[0], _drain(events, display, result), run_dir))
        late = result is not None and time.monotonic() - result_at > _SHUTDOWN_GRACE_S
        if (failed or late) and stop_deadline is None:
            root = _root_cause(ranks, failed) if failed else None
            _stop_all(ranks)
            if result is None:
                raise RunError(_failure_message(root, run_dir))
            what = _failure_message(root, run_dir) if root else "a rank did not exit after the run"
            from rich.markup import escape  # a rank's error line may quote "[/path.cc:78]"

            display.console.print(f"[yellow]warning: the run finished, but {escape(what)}[/]", highlight=False)
            result["shutdown_warning"] = what
            return result
        if all(r.process.poll() == 0 for r in ranks):
            reader.join(timeout=5.0)
            result = _drain(events, display, result)
            break
        time.sleep(0.05)
    if result is not None and "stopped" in result:  # a signal reached the ranks, not this process
        raise RunStopped(*_stop_message(int(result["stopped"]), result, run_dir))
    if result is None and expect_result:
        raise RunError(f"the ranks exited without a result; their logs are kept in {run_dir}")
    return result or {}


def _stop_message(signum: int, stopped: dict[str, Any] | None, run_dir: Path) -> tuple[str, int]:
    """The one line a stopped run prints, and the signal."""
    name = signal.Signals(signum).name
    if stopped and "stopped" in stopped:
        saved = f"; checkpoint saved to {stopped['checkpoint']} (continue with --resume)" if stopped.get("checkpoint") else ""
        return f"stopped by {name} after step {stopped['step']}{saved}; every rank has exited", signum
    return f"stopped by {name}: every rank was stopped (no checkpoint was saved); logs in {run_dir}", signum


def _kill_all(ranks: list[_Rank]) -> None:
    for rank in ranks:
        if rank.process.poll() is None:
            signal_rank(rank.process, signal.SIGKILL)


# A rank that only lost a peer is a consequence: the root cause is the rank that failed first for itself.
_PEER_LOST = ("connection closed", "connection reset", "peerlosterror", "broken pipe", "another rank has probably died")


def _root_cause(ranks: list[_Rank], failed: list[_Rank], wait_s: float = 3.0) -> _Rank:
    """The failed rank whose error is its own (not a lost peer), waiting briefly for it to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        failed = [r for r in ranks if r.process.poll() not in (None, 0)] or failed
        own = [r for r in failed if not any(h in _last_error_line(r.log_path).lower() for h in _PEER_LOST)]
        if own or time.monotonic() > deadline or all(r.process.poll() is not None for r in ranks):
            return own[0] if own else failed[0]
        time.sleep(0.05)


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
        elif event.get("event") == "stopped":
            result = {k: v for k, v in event.items() if k != "event"}
        else:
            display.handle(event)


def _stop_all(ranks: list[_Rank]) -> None:
    """Stop every still-running rank (SIGTERM to its process group, SIGKILL after a grace period)."""
    stop_ranks([r.process for r in ranks], _TERM_GRACE_S)


def _failure_message(rank: _Rank, run_dir: Path) -> str:
    code = rank.process.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    reason = _last_error_line(rank.log_path)
    return (
        f"{rank.name} {how}{': ' + reason if reason else ''}; the job was stopped. "
        f"Logs are kept in {run_dir} (see {rank.log_path.name})"
    )


# deepspeed.launcher.launch logs "[cmd] exits with return code = -9" when one of its ranks fails.
_DS_RANK_EXIT = re.compile(r"exits with return code = (-\d+)\s*$")


def _last_error_line(log_path: Path) -> str:
    """The last line that looks like an error (an exception or our own 'error:' line) in a rank's log.

    In a DeepSpeed launcher's log a rank killed by a signal comes first: it is the cause, the others'
    errors (a lost peer) follow from it.
    """
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    for line in lines:
        killed = _DS_RANK_EXIT.search(line)
        if killed:
            return f"a rank on this node was killed by signal {-int(killed.group(1))}"
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


