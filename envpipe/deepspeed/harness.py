"""Run a function on N local CPU ranks (gloo over loopback): the engine's tests and benchmark use it.

Each rank is a fresh ``python -m envpipe.deepspeed.harness`` subprocess with the environment DeepSpeed
expects (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and ``OMP_NUM_THREADS=1`` (several ranks share few
cores). The target function gets its keyword arguments from JSON and returns a JSON-able value, written to
a per-rank file. When one rank fails, the others get a grace period to fail on their own (that is what the
"killed rank" test checks) and are then killed; every process started here is gone when this returns.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RankResult:
    """What one rank left behind: exit code, its function's return value (None if it failed), stderr tail."""

    rank: int
    returncode: int
    value: Any
    stderr_tail: str


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    world_size: int,
    target: str,
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float = 120.0,
    grace_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> list[RankResult]:
    """Start ``world_size`` ranks running ``target`` ("package.module:function") and wait for all of them.

    Args:
        world_size: number of ranks.
        target: "package.module:function" or "/path/to/file.py:function"; called as ``function(**kwargs)`` in every rank.
        kwargs: JSON-able keyword arguments (every rank gets the same; read ``RANK`` for the rank).
        timeout_s: kill everything after this long.
        grace_s: after the first failure, wait this long for the other ranks before killing them.
        env: extra environment variables.

    Returns:
        One ``RankResult`` per rank, in rank order.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="envpipe-ranks-") as tmp:
        procs = [
            _start_rank(rank, world_size, port, target, kwargs or {}, Path(tmp), env)
            for rank in range(world_size)
        ]
        try:
            _wait_all(procs, timeout_s, grace_s)
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        return [_collect(rank, proc, Path(tmp)) for rank, (proc, _) in enumerate(procs)]


def _start_rank(
    rank: int,
    world_size: int,
    port: int,
    target: str,
    kwargs: dict[str, Any],
    tmp: Path,
    extra_env: dict[str, str] | None,
) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra_env or {})
    stderr_path = tmp / f"rank{rank}.stderr"
    cmd = [
        sys.executable,
        "-m",
        "envpipe.deepspeed.harness",
        target,
        json.dumps(kwargs),
        str(tmp / f"rank{rank}.json"),
    ]
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    return proc, stderr_path


def _wait_all(procs: list[tuple[subprocess.Popen, Path]], timeout_s: float, grace_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc, _ in procs]
        if all(code is not None for code in codes):
            return
        if any(code not in (None, 0) for code in codes):
            deadline = min(deadline, time.monotonic() + grace_s)
        time.sleep(0.05)


def _collect(rank: int, proc: subprocess.Popen, tmp: Path) -> RankResult:
    result_path = tmp / f"rank{rank}.json"
    value = json.loads(result_path.read_text()) if result_path.is_file() else None
    stderr = (tmp / f"rank{rank}.stderr").read_text(errors="replace")
    return RankResult(rank, proc.returncode, value, stderr[-4000:])


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
