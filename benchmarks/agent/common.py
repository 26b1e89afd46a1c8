"""Shared helpers of the agent benchmarks: percentiles, machine description, the fake NVML build."""

from __future__ import annotations

import mmap
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE_NVML_SOURCE = REPO / "tests" / "agent" / "fake_nvml.c"
# struct fake_state in fake_nvml.c: 16-byte header, then 64 bytes per GPU; last_set_ns is the 8th field.
_LAST_SET_NS = struct.Struct("<Q")
_LAST_SET_OFFSET = 16 + 4 * 4 + 3 * 8


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_us(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/max of nanosecond samples, in microseconds."""
    us = [s / 1000.0 for s in samples_ns]
    return {
        "n": len(us),
        "p50_us": round(percentile(us, 0.5), 2),
        "p99_us": round(percentile(us, 0.99), 2),
        "max_us": round(max(us), 2),
    }


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {system}"


def build_fake_nvml() -> str:
    """Compile the tests' fake libnvidia-ml.so.1 into a temporary directory; returns the directory."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("needs gcc to build the fake libnvidia-ml.so.1")
    out_dir = tempfile.mkdtemp(prefix="ep-fakenvml-")
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", f"{out_dir}/libnvidia-ml.so.1", str(FAKE_NVML_SOURCE)],
        check=True,
    )
    return out_dir


class FakeNvmlClock:
    """Reads the fake GPU's last-lock time (CLOCK_MONOTONIC ns, 0 = never) from the mmap'd state file."""

    def __init__(self, state_path: str, gpu: int = 0) -> None:
        with open(state_path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        self._offset = _LAST_SET_OFFSET + 64 * gpu

    def last_set_ns(self) -> int:
        return _LAST_SET_NS.unpack_from(self._map, self._offset)[0]
