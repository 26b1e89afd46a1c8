"""Issue 15, item 11 in one device call: a production ``envpipe train`` run with its lifecycle on one GPU.

    python3 benchmarks/gpu_validation/lifecycle.py --out "$OUT" [--budget-s 540]

1. ``envpipe-agent --backend nvml --read-only`` (never sets a clock: the card runs at its own clocks);
2. ``envpipe train`` on 1 stage: warm-up, baseline window, profiling at the card's own clock (one candidate,
   ``profile_clocks: 1``), steps at the plan, a checkpoint every ``--save-interval`` steps (``--save-dir``);
3. ``envpipe train --resume`` to ``--steps2`` (the checkpoint's plan: no profiling), ``--eval-data``,
   ``--export-hf``;
4. the exported folder through ``AutoModelForCausalLM.from_pretrained``: its loss on the evaluation batches
   against the pipeline's ``eval_batch`` loss of the same batches (the report's last evaluation).

Every command, its output and ``results.json`` go under ``--out``. Without a CUDA GPU it runs the same
commands on CPU with the embedded sim agent and llama-tiny (a *CPU smoke run*: the numbers say the script
works, nothing about a GPU). Never changes clocks, power limits or modes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import Driver  # noqa: E402 - the shims, the log and results.json of the issue 7 script

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in the old green tree".split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--model", default=None, help="default: llama-160m on GPU, llama-tiny on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 1024 on GPU, 32 on CPU")
    parser.add_argument("--steps1", type=int, default=None, help="steps of the first run (default 160 / 60)")
    parser.add_argument("--steps2", type=int, default=None, help="total after the resume (default 240 / 90)")
    parser.add_argument("--save-interval", type=int, default=None, help="default: steps1 // 2")
    parser.add_argument("--tf32", action="store_true", help="fp32 matmuls on tensor cores")
    args = parser.parse_args(argv)
    driver = Driver(args)
    gpu = driver.on_gpu
    model = args.model or ("llama-160m" if gpu else "llama-tiny")
    seq_len = args.seq_len or (1024 if gpu else 32)
    steps1 = args.steps1 or (160 if gpu else 60)
    steps2 = args.steps2 or (240 if gpu else 90)
    out = driver.out
    _texts(out)
    block = {"profile_clocks": 1, "min_window_s": 10.0 if gpu else 0.0, "baseline_steps": 5}
    (out / "ds.json").write_text(json.dumps({"envpipe": block}))
    common = ["--model", model, "--stages", "1", "--micro-batches", "4", "--micro-batch-size", "2",
              "--seq-len", str(seq_len), "--data", str(out / "train.txt"), "--eval-data", str(out / "held.txt"),
              "--deepspeed-config", str(out / "ds.json"), "--save-dir", str(out / "ck"), "--log-interval", "20"]
    if gpu:
        common += ["--device", "cuda", "--num-gpus", "1"]
    agent = _start_agent(driver) if gpu else None
    if agent is not None:
        common += ["--agent", agent[1]]
    driver.results.update(model=model, seq_len=seq_len, steps1=steps1, steps2=steps2, command_common=common)
    try:
        driver.part("train", lambda: _train(driver, common, steps1, args.save_interval or steps1 // 2))
        driver.part("resume", lambda: _resume(driver, common, steps1, steps2))
        driver.part("export", lambda: _check_export(driver, model, seq_len))
    finally:
        if agent is not None:
            agent[0].terminate()
            agent[0].wait(timeout=30)
    driver.save()
    return 0 if all("error" not in p for p in driver.results["parts"].values()) else 1


def _texts(out: Path) -> None:
    rng = random.Random(0)
    for name, lines in (("train.txt", 20000), ("held.txt", 2000)):
        with open(out / name, "w") as handle:
            for _ in range(lines):
                handle.write(" ".join(rng.choice(WORDS) for _ in range(14)) + "\n")


def _start_agent(driver: Driver) -> tuple[subprocess.Popen, str]:
    runtime = driver.tmp / "agent"
    cmd = ["envpipe-agent", "--config", "", "--backend", "nvml", "--runtime-dir", str(runtime), "--read-only"]
    driver.log(f"$ {' '.join(cmd)} &")
    log = open(driver.out / "agent.log", "w")  # noqa: SIM115 - the agent's own log, closed with the process
    process = subprocess.Popen(cmd, env=driver.env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"ipc://{runtime / 'control.sock'}"
    deadline = time.monotonic() + 30
    while not (runtime / "control.sock").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the read-only agent did not start (see {driver.out / 'agent.log'})")
        time.sleep(0.2)
    status = driver.run(["envpipe", "status", "--json", "--endpoint", endpoint], 30, "envpipe status")
    driver.results["agent_status"] = json.loads(status.stdout)
    return process, endpoint


def _train(driver: Driver, common: list[str], steps: int, save_interval: int) -> dict[str, Any]:
    report = driver.out / "train1.json"
    cmd = ["envpipe", "train", *common, "--steps", str(steps), "--save-interval", str(save_interval),
           "--keep-last", "2", "--report", str(report)]
    driver.run(cmd, driver.remaining_s(120), "envpipe train")
    data = json.loads(report.read_text())
    return {"command": " ".join(cmd), **_summary(data), "tags": sorted(p.name for p in (driver.out / "ck").iterdir())}


def _resume(driver: Driver, common: list[str], steps1: int, steps2: int) -> dict[str, Any]:
    report = driver.out / "train2.json"
    cmd = ["envpipe", "train", *common, "--resume", "--steps", str(steps2), "--export-hf", str(driver.out / "hf"),
           "--report", str(report)]
    proc = driver.run(cmd, driver.remaining_s(60), "envpipe train --resume")
    data = json.loads(report.read_text())
    return {
        "command": " ".join(cmd),
        "resumed_at": steps1,
        "profiling_skipped": "profiling" not in data["summary"]["step_counts"],
        "plan_reused": "plan reused" in proc.stdout,
        **_summary(data),
    }


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    summary = report["summary"]
    return {
        "optimizer_steps": summary["optimizer_steps"],
        "step_counts": summary["step_counts"],
        "energy_label": summary["energy_label"],
        "baseline": summary["baseline"],
        "at_plan": summary["at_plan"],
        "loss_first": summary["loss_first"],
        "loss_last": summary["loss_last"],
        "eval": report.get("eval"),
        "checkpoints": report.get("checkpoints"),
        "software": report.get("software"),
    }


def _check_export(driver: Driver, model: str, seq_len: int) -> dict[str, Any]:
    """The exported folder's loss on the evaluation batches = the pipeline's last ``eval_batch`` loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from envpipe.data import batches

    report = json.loads((driver.out / "train2.json").read_text())
    pipeline = report["eval"][-1]
    device = "cuda" if driver.on_gpu else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(driver.out / "hf", local_files_only=True).to(device).eval()
    data = batches(driver.out / "held.txt", vocab_size=hf.config.vocab_size, micro_batch_size=2, seq_len=seq_len)
    with torch.no_grad():
        losses = [float(hf(input_ids=ids.to(device), labels=labels.to(device)).loss)
                  for ids, labels in (next(data) for _ in range(4))]
    loss = sum(losses) / len(losses)
    return {
        "hf_loss": loss,
        "pipeline_eval_loss": pipeline["loss"],
        "relative_difference": abs(loss - pipeline["loss"]) / abs(pipeline["loss"]),
        "files": sorted(p.name for p in (driver.out / "hf").iterdir()),
    }


if __name__ == "__main__":
    sys.exit(main())
