"""benchmarks/nccl_p2p/run.py (the GPU confirmation script of the NCCL-safe p2p issue) runs end to end on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "nccl_p2p" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("nccl_p2p_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nccl_p2p_run"] = module
    spec.loader.exec_module(module)
    return module


def test_unknown_case_is_one_error_line(capsys) -> None:
    assert _load().main(["--cases", "ours-pair,nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --cases names ['nope']; choose from stock, 1f1b-link, ours-link, ours-pair"
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_old_transport_case_stalls_under_the_emulation(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    args = ["--emulate", "--mib", "1", "--steps", "1", "--stall-s", "3", "--cases", "ours-pair", "--out", str(out)]
    assert _load().main(args) == 0
    case = json.loads(out.read_text())["cases"]["ours-pair"]
    assert case["outcome"] == "stalled (emulated NCCL stream)" and case["losses"] == []
    assert any("made no progress in 3 s" in line for line in case["detail"])
