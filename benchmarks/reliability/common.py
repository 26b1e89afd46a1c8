"""Helpers shared by the reliability scenarios: the fake NVML library, process figures, percentiles.

The fake ``libnvidia-ml.so.1`` is the agent tests' own (tests/agent/fake_nvml.c, state layout read by
``FakeNvmlState`` in tests/agent/conftest.py); both are loaded from there, not copied.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
AGENT_TESTS = REPO / "tests" / "agent"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def agent_test_helpers() -> ModuleType:
    """tests/agent/conftest.py as a module (``FakeNvmlState``, ``ThreadAgent``, ``wait_for``)."""
    name = "envpipe_agent_test_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, AGENT_TESTS / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def build_fake_nvml(out_dir: str) -> str:
    """Compile tests/agent/fake_nvml.c into ``out_dir/libnvidia-ml.so.1``; returns ``out_dir``.

    Raises:
        RuntimeError: no C compiler on PATH (install gcc, or run only the sim scenarios).
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the fake-NVML scenarios need gcc to build tests/agent/fake_nvml.c; install gcc")
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", os.path.join(out_dir, "libnvidia-ml.so.1"),
                    str(AGENT_TESTS / "fake_nvml.c")], check=True)
    return out_dir


@dataclass
class FakeNvml:
    """A built fake library, its shared state file and the environment that makes an agent load it."""

    lib_dir: str
    state: Any  # FakeNvmlState
    env: dict[str, str]

    def locked(self, index: int) -> bool:
        return bool(self.state.gpu(index)["locked"])


@contextmanager
def fake_nvml(gpus: int = 2, lib_dir: str | None = None) -> Iterator[FakeNvml]:
    """A fresh fake-NVML state of ``gpus`` GPUs (at most 8) in a short temporary directory.

    Raises:
        RuntimeError: this machine has NVIDIA GPUs. These scenarios lock clocks through NVML calls; should
            the fake library not be the one loaded, a real GPU would be re-clocked, so they never run there.
    """
    if os.path.exists("/dev/nvidiactl"):
        raise RuntimeError("this machine has NVIDIA GPUs (/dev/nvidiactl): the fake-NVML scenarios lock clocks, "
                           "so run them on a machine without GPUs (the sim scenarios are safe anywhere)")
    directory = tempfile.mkdtemp(prefix="ep-nvml-")
    try:
        lib = lib_dir or build_fake_nvml(directory)
        state_path = os.path.join(directory, "nvml.state")
        env = dict(os.environ, LD_LIBRARY_PATH=lib, ENVPIPE_FAKE_NVML_STATE=state_path,
                   ENVPIPE_FAKE_NVML_GPUS=str(gpus),
                   # UUIDs of their own: agents lock GPUs by UUID node-wide (runs in parallel stay apart)
                   ENVPIPE_FAKE_NVML_UUID_TAG=os.urandom(4).hex())
        yield FakeNvml(lib, agent_test_helpers().FakeNvmlState(state_path), env)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def short_dir(prefix: str = "ep-") -> Iterator[str]:
    """A short temporary directory (ipc socket paths must stay under ~100 characters)."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99, 100)) -> dict[str, float | None]:
    """``{"p50": ..., "p99": ..., "max": ...}`` by nearest rank (None for an empty list)."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for point in points:
        key = "max" if point == 100 else f"p{point}"
        if not ordered:
            out[key] = None
            continue
        rank = min(len(ordered) - 1, max(0, round(point / 100 * len(ordered)) - 1))
        out[key] = round(ordered[rank], 4)
    return out


def poll_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.001) -> float | None:
    """Poll ``predicate``; returns the monotonic time it first held, or None after ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline_s:
            return None
        time.sleep(interval_s)


def machine() -> dict[str, Any]:
    """Where a figure was measured: CPU model, cores, kernel, Python (for docs/reliability.md)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": os.uname().release,
            "python": sys.version.split()[0], "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
