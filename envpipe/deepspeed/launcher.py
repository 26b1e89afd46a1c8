"""The one local rank launcher: N CPU ranks on one machine, gloo over loopback (stdlib only at import).

``envpipe train`` on CPU spawns its ranks with :func:`start_rank` (``envpipe.train.launch``), and the
engine's tests and benchmarks run a function on N ranks with :func:`run_ranks`. Every rank gets the
environment torchrun or DeepSpeed's launcher would set (:func:`rank_env`: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) plus ``OMP_NUM_THREADS=1`` (several ranks share few cores) and no visible GPU. Each rank
runs in its own process group, so :func:`stop_ranks` also stops what a rank started. GPU and multi-node
jobs go through DeepSpeed's own launcher (``deepspeed.launcher.runner``; :func:`hostfile_hosts` reads its
hostfile with its own parser).

:func:`run_ranks` starts ``python -m envpipe.deepspeed.launcher TARGET KWARGS RESULT`` per rank: the target
function gets its keyword arguments from JSON and returns a JSON-able value, written to a per-rank file.
When one rank fails, the others get a grace period to fail on their own (that is what the "killed rank"
test checks) and are then stopped; every process started here is gone when it returns.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TERM_GRACE_S = 5.0  # after SIGTERM, how long a rank may take to exit before SIGKILL


@dataclass(frozen=True)
class RankResult:
    """What one rank left behind: exit code, its function's return value (None if it failed), stderr tail."""

    rank: int
    returncode: int
    value: Any
    stderr_tail: str


def free_port() -> int:
    """A TCP port free on loopback right now (the rendezvous of the local ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(
    rank: int, world_size: int, port: int, *, agent: str | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of one local CPU rank (what torchrun or the DeepSpeed launcher would set)."""
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
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
    )
    if agent:
        env["ENVPIPE_AGENT"] = agent
    env.update(extra or {})
    return env


def start_rank(
    argv: Sequence[str], env: dict[str, str], *, stdout: int | IO[Any] | None, stderr: int | IO[Any] | None
) -> subprocess.Popen:
    """Start ``python ARGV`` as one rank, in its own process group (text mode).

    The rank dies with its launcher, even one killed with SIGKILL (``PR_SET_PDEATHSIG``, set from the main
    thread: the signal follows the creating thread, not the process).
    """
    from envpipe_agent.embedded import die_with_parent

    on_main = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(
        [sys.executable, *argv],
        env=env,
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent if on_main else None,
    )


def stop_ranks(processes: Sequence[subprocess.Popen], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM every running rank's process group, then SIGKILL what is left after ``grace_s``."""
    alive = [p for p in processes if p.poll() is None]
    for process in alive:
        signal_rank(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in alive:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_rank(process, signal.SIGKILL)
            process.wait()


def signal_rank(process: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to a rank's process group (the rank and what it started); a gone group is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def hostfile_hosts(hostfile: str) -> dict[str, int]:
    """Host -> slots of a DeepSpeed hostfile, read by DeepSpeed's own parser (its launcher starts those)."""
    from deepspeed.launcher.runner import fetch_hostfile

    return dict(fetch_hostfile(hostfile) or {})


def run_ranks(
    world_size: int,
    target: str,
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float = 120.0,
    grace_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> list[RankResult]:
    """Start ``world_size`` ranks running ``target`` and wait for all of them.

    Args:
        world_size: number of ranks.
        target: "package.module:function" or "/path/to/file.py:function"; called as ``function(**kwargs)``
            in every rank.
        kwargs: JSON-able keyword arguments (every rank gets the same; read ``RANK`` for the rank).
        timeout_s: stop everything after this long.
        grace_s: after the first failure, wait this long for the other ranks before stopping them.
        env: extra environment variables.

    Returns:
        One ``RankResult`` per rank, in rank order.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="envpipe-ranks-") as tmp:
        folder = Path(tmp)
        processes = []
        for rank in range(world_size):
            argv = ["-m", __name__, target, json.dumps(kwargs or {}), str(folder / f"rank{rank}.json")]
            with open(folder / f"rank{rank}.stderr", "wb") as stderr:
                rank_environment = rank_env(rank, world_size, port, extra=env)
                processes.append(start_rank(argv, rank_environment, stdout=subprocess.DEVNULL, stderr=stderr))
        try:
            _wait_all(processes, timeout_s, grace_s)
        finally:
            stop_ranks(processes, grace_s=0.0)
        return [_collect(rank, process, folder) for rank, process in enumerate(processes)]


def _wait_all(processes: list[subprocess.Popen], timeout_s: float, grace_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [process.poll() for process in processes]
        if all(code is not None for code in codes):
            return
        if any(code not in (None, 0) for code in codes):
            deadline = min(deadline, time.monotonic() + grace_s)
        time.sleep(0.05)


def _collect(rank: int, process: subprocess.Popen, folder: Path) -> RankResult:
    result_path = folder / f"rank{rank}.json"
    value = json.loads(result_path.read_text()) if result_path.is_file() else None
    stderr = (folder / f"rank{rank}.stderr").read_text(errors="replace")
    return RankResult(rank, process.returncode, value, stderr[-4000:])


def _load_module(name: str) -> Any:
    """Import a dotted module name, or a ``.py`` file by path (test workers live outside packages)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(Path(name).stem, name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(argv: list[str]) -> int:
    target, kwargs_json, result_path = argv
    module_name, _, func_name = target.rpartition(":")
    func = getattr(_load_module(module_name), func_name)
    value = func(**json.loads(kwargs_json))
    Path(result_path).write_text(json.dumps(value))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
