"""Start one job of :mod:`benchmarks.multinode.pipeline` across emulated nodes, the way users start it.

Each launcher in :data:`LAUNCHES` turns (nodes, ranks per node, rendezvous port, worker arguments) into the
processes to start on each node, exactly the command lines a user types there:

- ``deepspeed``: ``deepspeed --hostfile H --no_ssh --node_rank N --master_addr node0 ...`` on every node
  (DeepSpeed's multi-node mode without ssh; with ssh it would start the same thing on each host);
- ``torchrun``: ``torchrun --nnodes K --nproc-per-node R --node-rank N --master-addr node0 ...`` (static
  rendezvous);
- ``slurm``: one process per rank with the variables ``srun`` sets (``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_JOB_NODELIST``, ...) and nothing else: the rank's
  :mod:`envpipe.dist_env` makes torch.distributed's variables of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.multinode.nodes import Cluster, Node, stop

WORKER = ["-m", "benchmarks.multinode.pipeline"]
Start = tuple[Node, list[str], dict[str, str]]  # where, what, extra environment


def _deepspeed(
    cluster: Cluster, nodes: Sequence[Node], per_node: int, port: int, args: list[str]
) -> list[Start]:
    hostfile = cluster.workdir / f"hostfile-{len(nodes)}x{per_node}"
    hostfile.write_text("".join(f"{node.name} slots={per_node}\n" for node in nodes))
    return [
        (
            node,
            [
                "deepspeed",
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(i),
                "--master_addr",
                nodes[0].name,
                "--master_port",
                str(port),
                "--module",
                "benchmarks.multinode.pipeline",
                *args,
            ],
            {},
        )
        for i, node in enumerate(nodes)
    ]


def _torchrun(
    cluster: Cluster, nodes: Sequence[Node], per_node: int, port: int, args: list[str]
) -> list[Start]:
    return [
        (
            node,
            [
                "torchrun",
                "--nnodes",
                str(len(nodes)),
                "--nproc-per-node",
                str(per_node),
                "--node-rank",
                str(i),
                "--master-addr",
                nodes[0].name,
                "--master-port",
                str(port),
                *WORKER,
                *args,
            ],
            {},
        )
        for i, node in enumerate(nodes)
    ]


def _slurm(cluster: Cluster, nodes: Sequence[Node], per_node: int, port: int, args: list[str]) -> list[Start]:
    first, last = nodes[0].index, nodes[-1].index
    nodelist = f"node[{first}-{last}]" if len(nodes) > 1 else nodes[0].name
    starts = []
    for node_id, node in enumerate(nodes):
        for local in range(per_node):
            env = {
                "SLURM_JOB_ID": "4242",
                "SLURM_PROCID": str(node_id * per_node + local),
                "SLURM_NTASKS": str(len(nodes) * per_node),
                "SLURM_LOCALID": str(local),
                "SLURM_NODEID": str(node_id),
                "SLURM_JOB_NODELIST": nodelist,
                "SLURM_NNODES": str(len(nodes)),
                "SLURM_TASKS_PER_NODE": f"{per_node}(x{len(nodes)})",
                "MASTER_PORT": str(port),
            }
            starts.append((node, ["python", *WORKER, *args], env))
    return starts


LAUNCHES: dict[str, Callable[..., list[Start]]] = {
    "deepspeed": _deepspeed,
    "torchrun": _torchrun,
    "slurm": _slurm,
}


@dataclass
class JobResult:
    """Exit codes of the started processes, each rank's ``rank<R>.json`` / ``.error``, and the logs."""

    how: str
    codes: list[int | None]
    ranks: dict[int, dict[str, Any]]
    errors: dict[int, str]
    logs: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    def losses(self) -> list[float]:
        """The losses every rank agrees on (the last stage computes them; DeepSpeed broadcasts)."""
        return self.ranks[max(self.ranks)]["losses"]

    def failure(self) -> str:
        """Everything a failed assertion should show."""
        return json.dumps(
            {
                "codes": self.codes,
                "errors": self.errors,
                "logs": {k: v[-3000:] for k, v in self.logs.items()},
            },
            indent=1,
        )


def run_job(
    cluster: Cluster,
    how: str,
    nodes: Sequence[Node],
    per_node: int,
    args: Sequence[str],
    *,
    port: int = 29400,
    timeout_s: float = 240.0,
    out: Path | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> JobResult:
    """Start the job on ``nodes`` with launcher ``how``, wait for every process, collect what ranks wrote.

    ``on_start(out)`` runs once everything is started (a test's fault injection); processes still running at
    ``timeout_s`` are stopped and reported with exit code None.
    """
    out = out or cluster.workdir / f"job-{how}-{len(nodes)}x{per_node}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    starts = LAUNCHES[how](cluster, nodes, per_node, port, ["--out", str(out), *args])
    began = time.monotonic()
    logs = [out / f"{node.name}-{i}.log" for i, (node, _, _) in enumerate(starts)]
    processes = [node.popen(argv, env=env, log=log) for (node, argv, env), log in zip(starts, logs)]
    if on_start is not None:
        on_start(out)
    codes: list[int | None] = []
    for process in processes:
        try:
            codes.append(process.wait(max(0.1, timeout_s - (time.monotonic() - began))))
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: stopped below, reported as None
            codes.append(None)
    wall_s = time.monotonic() - began
    stop(processes)
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    errors = {int(p.stem[4:]): p.read_text() for p in out.glob("rank*.error")}
    texts = {log.stem: log.read_text(errors="replace") for log in logs if log.exists()}
    return JobResult(how, codes, ranks, errors, texts, wall_s)
