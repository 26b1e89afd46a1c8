"""``python -m benchmarks.multinode [--out results.json]``: the two-node matrix, as a report.

Brings up two emulated nodes (:mod:`benchmarks.multinode.nodes`), a sim agent on each, and runs the tiny
Llama pipeline (2 stages one per node; 4 stages two per node) under each launcher of
:data:`benchmarks.multinode.launch.LAUNCHES`, plus the same shapes on one node. For every run it records
which node each stage ran on, the GPU UUID its node's agent leased it (and which agent has that UUID),
energy per node (sum of the ranks' agent windows; simulated) and the losses next to the single-node ones.
Prints a markdown table (docs/multinode.md keeps the latest) and writes the JSON.
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

from benchmarks.multinode.launch import LAUNCHES, JobResult, run_job
from benchmarks.multinode.nodes import Cluster, unavailable_reason

STEPS = 4
CLOCK_MHZ = 1410


def _record(cluster: Cluster, job: JobResult, per_node: int, reference: list[float]) -> dict[str, Any]:
    owners = {uuid: node.name for node in cluster.nodes for uuid in {g["uuid"] for g in node.hello()["gpus"]}}
    stages, energy = [], {node.name: 0.0 for node in cluster.nodes}
    for rank in sorted(job.ranks):
        result = job.ranks[rank]
        joules = sum(e["energy_j"] for e in result["energy"] if e is not None)
        energy[result["hostname"]] += joules
        stages.append(
            {
                "stage": result["stage"],
                "rank": rank,
                "node": result["hostname"],
                "gpu_uuid": result["gpu_uuid"],
                "uuid_owner": owners.get(result["gpu_uuid"]),
                "energy_j": round(joules, 3),
            }
        )
    losses = job.losses()
    return {
        "launcher": job.how,
        "stages": 2 * per_node,
        "ranks_per_node": per_node,
        "codes": job.codes,
        "wall_s": round(job.wall_s, 1),
        "placement": stages,
        "node_energy_j_simulated": {k: round(v, 3) for k, v in energy.items()},
        "losses": losses,
        "single_node_losses": reference,
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses, reference)),
    }


def run(steps: int = STEPS) -> dict[str, Any]:
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"error: {reason}")
    args = ["--steps", str(steps), "--clock-mhz", str(CLOCK_MHZ)]
    runs, port = [], 29400
    with Cluster(2) as cluster:
        for node in cluster.nodes:
            node.start_agent(gpus=4)
        for per_node in (1, 2):
            port += 1
            single = run_job(cluster, "torchrun", cluster.nodes[:1], 2 * per_node, args, port=port)
            if any(single.codes):
                raise SystemExit(f"error: single-node reference failed:\n{single.failure()}")
            for how in LAUNCHES:
                port += 1
                job = run_job(cluster, how, cluster.nodes, per_node, args, port=port)
                if any(job.codes):
                    raise SystemExit(f"error: {how} {2 * per_node} stages failed:\n{job.failure()}")
                runs.append(_record(cluster, job, per_node, single.losses()))
    return {
        "format": "envpipe-multinode/1",
        "simulated": True,
        "steps": steps,
        "clock_mhz": CLOCK_MHZ,
        "machine": f"{platform.node()} ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        (
            "| launcher | stages | stage: node, GPU UUID (agent that has it) "
            "| energy per node, J (simulated) | losses (single node) | max diff |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        placement = "<br>".join(
            f"{p['stage']}: {p['node']}, {p['gpu_uuid'][:12]}… ({p['uuid_owner']})" for p in r["placement"]
        )
        energy = ", ".join(f"{k} {v:.1f}" for k, v in r["node_energy_j_simulated"].items())
        losses = " ".join(f"{x:.6f}" for x in r["losses"])
        ref = " ".join(f"{x:.6f}" for x in r["single_node_losses"])
        lines.append(
            f"| {r['launcher']} | {r['stages']} | {placement} | {energy} | {losses} ({ref}) "
            f"| {r['max_abs_loss_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multinode")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    report = run(args.steps)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
