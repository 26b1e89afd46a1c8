"""``python -m benchmarks.reliability --scenario NAME [limits]``: run reliability scenarios at full size.

Run from the repository root. Every scenario prints its figures as JSON (and adds them to ``--out``);
docs/reliability.md records the figures of a full run with the exact command. Defaults are the issue's sizes.

    python -m benchmarks.reliability --scenario all --out benchmarks/reliability/results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.reliability.common import machine

SCENARIOS = ("holders", "restart", "fuzz", "flood", "authz", "load", "latency", "training", "systemd")


def _holders(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.reliability import holders

    backends = ("nvml", "sim") if args.backend == "both" else (args.backend,)
    hows = ("kill", "hang") if args.how == "both" else (args.how,)
    return [holders.run(holders=args.holders, backend=b, gpus=args.gpus, lease_timeout_s=args.lease_timeout_s,
                        how=h, seed=args.seed) for b in backends for h in hows]


def _run(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.reliability import authz, flood, fuzz, latency, load, restart, systemd_unit, training

    if name == "holders":
        return _holders(args)
    if name == "restart":
        return [restart.run(rounds=args.rounds, gpus=args.gpus, lease_timeout_s=args.lease_timeout_s)]
    if name == "fuzz":
        return [fuzz.run(frames=args.frames, seed=args.seed)]
    if name == "flood":
        return [flood.run(connections=args.connections)]
    if name == "authz":
        return [authz.run(attempts=args.attempts, seed=args.seed)]
    if name == "load":
        return [load.run(ranks=args.ranks, events_per_s=args.events_per_s, duration_s=args.duration_s,
                         procs=args.procs)]
    if name == "latency":
        return [latency.run(events_per_s=args.events_per_s, duration_s=args.duration_s)]
    if name == "training":
        modes = ("client", "engine") if args.mode == "both" else (args.mode,)
        return [training.run(mode=m, phase_s=args.phase_s) for m in modes]
    return [systemd_unit.run()]


def build_parser() -> argparse.ArgumentParser:
    """Flags: which scenario, and the size of each."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--scenario", choices=(*SCENARIOS, "all"), required=True)
    add("--out", help="JSON file that collects every run's figures (one entry per scenario)")
    add("--append", action="store_true", help="add to the scenario's earlier runs in --out instead of replacing them")
    add("--seed", type=int, default=0)
    add("--holders", type=int, default=100, help="holders: processes killed in all")
    add("--backend", choices=("nvml", "sim", "both"), default="both", help="holders: fake NVML and/or sim")
    add("--how", choices=("kill", "hang", "both"), default="both", help="holders: SIGKILL and/or SIGSTOP")
    add("--gpus", type=int, default=4, help="holders/restart: GPUs (holders in flight at once)")
    add("--lease-timeout-s", type=float, default=2.0, help="holders/restart: the agent's lease timeout")
    add("--rounds", type=int, default=20, help="restart: SIGKILL rounds and SIGTERM rounds")
    add("--frames", type=int, default=100_000, help="fuzz: hostile frames")
    add("--connections", type=int, default=2000, help="flood: idle connections opened to the agent")
    add("--attempts", type=int, default=1000, help="authz: forged lease ids")
    add("--ranks", type=int, default=64, help="load: simulated ranks")
    add("--events-per-s", type=float, default=1000.0, help="load/latency: events per second per rank")
    add("--duration-s", type=float, default=60.0, help="load/latency: seconds")
    add("--procs", type=int, default=8, help="load: processes the ranks are spread over")
    add("--phase-s", type=float, default=6.0, help="training: seconds per agent phase")
    add("--mode", choices=("client", "engine", "both"), default="both", help="training: loop kind")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios, print their figures, collect them in ``--out``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    console = Console(stderr=True)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    collected: dict[str, Any] = {}
    if args.out and Path(args.out).exists():
        collected = json.loads(Path(args.out).read_text())
    collected["machine"] = machine()
    command = "python -m benchmarks.reliability " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in names:
        console.print(f"[bold]{name}[/bold] …")
        try:
            results = _run(name, args)
        except RuntimeError as exc:
            console.print(f"[red]{name}: {exc}[/red]")
            results = [{"scenario": name, "error": str(exc)}]
        for result in results:
            result["command"] = command
        collected[name] = (collected.get(name, []) if args.append else []) + results
        print(json.dumps(results, indent=1, default=str), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(collected, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
