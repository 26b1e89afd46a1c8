"""Which pipeline p2p hangs under NCCL: ``ours`` on the old (``pair``) and new (``link``) transport, with stock
DeepSpeed and EnvPipe's ``1f1b`` as controls, at S=2, M=4 with activations of about 64 MiB per micro-batch
(16x NCCL's default 4 MiB staging buffer, so no send can complete before its receive runs).

Each case is its own 2-rank job under a wall-clock timeout: a case that does not finish in time is recorded
as hung and its ranks are killed. Every finished case reports its losses, which must equal 1F1B's.

On GPUs (one device call, 2 GPUs; NCCL):

    python benchmarks/nccl_p2p/run.py --out benchmarks/nccl_p2p/result_gpu.json

On CPU (gloo never hangs on its own, so the EnvPipe cases run on the NCCL stream emulation of
``envpipe.deepspeed.nccl_emulation``; stock DeepSpeed runs on plain gloo):

    python benchmarks/nccl_p2p/run.py --emulate --mib 8 --out benchmarks/nccl_p2p/result_cpu.json

The model is two stages of elementwise layers (``tanh(x * w + b)``), so compute is negligible and the
transfers are what is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

CASES = {  # name -> (engine, schedule, r, transport)
    "stock": ("stock", "1f1b", None, None),
    "1f1b-link": ("envpipe", "1f1b", None, "link"),
    "ours-link": ("envpipe", "ours", [2, 0], "link"),
    "ours-pair": ("envpipe", "ours", [2, 0], "pair"),
}
MICRO_BATCHES, ROWS = 4, 256


def _module(hidden: int) -> Any:
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule

    class Elementwise(torch.nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(seed)
            self.w = torch.nn.Parameter(1.0 + 0.01 * torch.randn(hidden, generator=gen))
            self.b = torch.nn.Parameter(0.01 * torch.randn(hidden, generator=gen))

        def forward(self, x: Any) -> Any:
            return torch.tanh(x * self.w + self.b)

    layers = [LayerSpec(Elementwise, seed) for seed in range(4)]
    return PipelineModule(layers, num_stages=2, loss_fn=torch.nn.functional.mse_loss, partition_method="uniform")


def _data(hidden: int, device: str) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(1, ROWS, hidden, generator=gen)
        yield x.to(device), (0.5 * x).to(device)


def rank_case(case: str, mib: int, steps: int, emulate: bool, stall_s: float, out_dir: str) -> dict[str, Any]:
    """One rank of one case: train ``steps`` iterations, write ``rank<N>.json`` into ``out_dir``."""
    import torch

    from envpipe.deepspeed import build_engine, setup_distributed
    from envpipe.deepspeed.nccl_emulation import P2PStalled
    from envpipe.schedules import get_schedule

    engine_kind, schedule_name, r, transport = CASES[case]
    hidden = mib * 2**20 // 4 // ROWS  # fp32 activation [1, ROWS, hidden] of `mib` MiB
    setup_distributed(timeout_s=600)
    rank = int(os.environ["RANK"])
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    }
    module = _module(hidden)
    if engine_kind == "stock":
        import deepspeed

        engine, *_ = deepspeed.initialize(model=module, config=config, model_parameters=list(module.parameters()))
    else:
        engine = build_engine(module, config, get_schedule(schedule_name, 2, MICRO_BATCHES, r))
        engine.set_transport(transport, emulate_timeout_s=stall_s if emulate else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = _data(hidden, device)
    result: dict[str, Any] = {"rank": rank, "losses": [], "activation_mib": 4 * ROWS * hidden / 2**20}
    start = time.perf_counter()
    try:
        for _ in range(steps):
            result["losses"].append(float(engine.train_batch(data)))
        result["outcome"] = "finished"
    except P2PStalled as exc:
        result["outcome"], result["detail"] = "stalled (emulated NCCL stream)", str(exc)
    except Exception as exc:  # noqa: BLE001 - recorded: a transport error
        result["outcome"], result["detail"] = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    result["seconds"] = time.perf_counter() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # a stalled stream's worker (or a hung NCCL call) never returns: leave at once


def run_case(case: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run one case as its own 2-rank job; 'hung' when it is still running at the timeout."""
    from envpipe.deepspeed.launcher import run_ranks

    out_dir = tmp / case
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"case": case, "mib": args.mib, "steps": args.steps, "emulate": args.emulate,
              "stall_s": args.stall_s, "out_dir": str(out_dir)}
    start = time.monotonic()
    results = run_ranks(2, f"{__file__}:rank_case", kwargs, timeout_s=args.timeout_s, grace_s=10)
    wall_s = time.monotonic() - start
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    if len(ranks) < 2:
        outcome = "hung" if wall_s >= args.timeout_s - 1 else "failed"
        tails = [r.stderr_tail.strip().splitlines()[-1:] for r in results]
        return {"outcome": f"{outcome} (wall {wall_s:.0f} s, timeout {args.timeout_s} s)", "stderr": tails}
    outcomes = {r["outcome"] for r in ranks}  # a stall ends its rank, so its peer then sees a lost peer
    return {
        "outcome": next(o for o in ("stalled (emulated NCCL stream)", "failed", "finished") if o in outcomes),
        "detail": sorted({r["detail"] for r in ranks if "detail" in r}),
        "losses": ranks[-1]["losses"],  # the last stage computes the loss; every rank reports it
        "activation_mib": ranks[0]["activation_mib"],
        "seconds": max(r["seconds"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="activation size per micro-batch, MiB (fp32)")
    parser.add_argument("--steps", type=int, default=2, help="iterations per case")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="wall clock per case before 'hung'")
    parser.add_argument("--emulate", action="store_true", help="CPU: NCCL stream emulation for EnvPipe's cases")
    parser.add_argument("--stall-s", type=float, default=20.0, help="emulation: a transfer stuck this long stalls")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)
    import tempfile

    import torch

    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"error: --cases names {unknown}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    device = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    )
    report: dict[str, Any] = {
        "command": "python benchmarks/nccl_p2p/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device, "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "emulated_nccl_streams": args.emulate, "stages": 2, "micro_batches": MICRO_BATCHES, "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="nccl-p2p-") as tmp:
        for case in cases:
            report["cases"][case] = run_case(case, args, Path(tmp))
            print(f"{case:10s} {report['cases'][case]['outcome']}  losses={report['cases'][case].get('losses')}",
                  flush=True)
    reference = report["cases"].get("1f1b-link", {}).get("losses")
    for case in report["cases"].values():
        if case.get("losses") and reference:
            case["equals_1f1b"] = case["losses"] == reference
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
