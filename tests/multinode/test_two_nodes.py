"""A DeepSpeed pipeline across two emulated nodes (benchmarks/multinode): launchers, agents, faults.

Each node is its own network/mount/UTS/pid namespace with its own agent (sim backend) behind its own
``/run/envpipe``; ranks find their node's agent through the default socket, as on real nodes. Runs as root
where namespaces can be made (CI); skips with the reason elsewhere.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.multinode.launch import LAUNCHES, JobResult, run_job
from benchmarks.multinode.nodes import Cluster, Node, unavailable_reason

pytestmark = pytest.mark.slow

GPUS_PER_NODE = 4  # the single-node reference of the 4-stage shape holds 4 ranks on node0
STEPS = 4
CLOCK_MHZ = 1410  # every unit's clock: below the sim H100's 1980, so a held lease shows as a lock
SHAPES = {1: "2-stages-one-per-node", 2: "4-stages-two-per-node"}
_ports = itertools.count(29400)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Cluster(2) as nodes:
        for node in nodes.nodes:
            node.start_agent(gpus=GPUS_PER_NODE)
        yield nodes


def _job(cluster: Cluster, how: str, nodes: list[Node], per_node: int, *args: str, **kwargs) -> JobResult:
    return run_job(
        cluster,
        how,
        nodes,
        per_node,
        ["--steps", str(STEPS), "--clock-mhz", str(CLOCK_MHZ), *args],
        port=next(_ports),
        **kwargs,
    )


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> dict[int, list[float]]:
    """Losses of the same pipeline shapes with every rank on node0 (torchrun, one node)."""
    losses = {}
    for per_node in SHAPES:
        job = _job(cluster, "torchrun", cluster.nodes[:1], 2 * per_node)
        assert job.codes == [0], job.failure()
        losses[per_node] = job.losses()
    return losses


def _agent_uuids(node: Node) -> set[str]:
    return {gpu["uuid"] for gpu in node.hello()["gpus"]}


def _wait_released(nodes: list[Node], timeout_s: float = 15.0) -> list[dict]:
    """Every GPU of every node without a lease holder and unlocked at its top clock (or the last state)."""
    deadline = time.monotonic() + timeout_s
    while True:
        gpus = [gpu for node in nodes for gpu in node.agent_status()["gpus"]]
        if all(g["holder"] is None and not g["locked"] and g["clock_mhz"] == g["max_mhz"] for g in gpus):
            return gpus
        if time.monotonic() > deadline:
            return gpus
        time.sleep(0.2)


def _unreleased(gpus: list[dict]) -> list[dict]:
    return [g for g in gpus if g["holder"] is not None or g["locked"] or g["clock_mhz"] != g["max_mhz"]]


@pytest.mark.parametrize("per_node", list(SHAPES), ids=list(SHAPES.values()))
@pytest.mark.parametrize("how", list(LAUNCHES))
def test_pipeline_across_two_nodes(cluster: Cluster, reference: dict, how: str, per_node: int) -> None:
    job = _job(cluster, how, cluster.nodes, per_node)
    assert job.codes == [0] * len(job.codes), job.failure()
    stages = 2 * per_node
    assert sorted(job.ranks) == list(range(stages)), job.failure()
    for rank, result in job.ranks.items():
        node = cluster.nodes[rank // per_node]
        assert (result["hostname"], result["stage"], result["launcher"]) == (node.name, rank, how)
        # The GPU this stage leased came from the agent of the node it ran on, and no other node has it.
        assert result["gpu_uuid"] in _agent_uuids(node)
        assert all(
            result["gpu_uuid"] not in _agent_uuids(other) for other in cluster.nodes if other is not node
        )
        assert all(e is not None and e["simulated"] and e["energy_j"] > 0 for e in result["energy"]), result
    assert len({r["gpu_uuid"] for r in job.ranks.values()}) == stages
    assert job.losses() == pytest.approx(reference[per_node], rel=1e-6, abs=1e-6)
    assert _unreleased(_wait_released(cluster.nodes)) == []


def test_agent_of_one_node_stops_mid_run(cluster: Cluster, reference: dict) -> None:
    node1 = cluster.nodes[1]

    def stop_node1_agent(out: Path) -> None:
        deadline = time.monotonic() + 180
        while not all((out / f"paused-rank{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline, "the ranks never reached the pause"
            time.sleep(0.05)
        assert node1.stop_agent(signal.SIGTERM) == 0
        (out / "resume").touch()

    try:
        job = _job(cluster, "torchrun", cluster.nodes, 1, "--pause-at", "2", on_start=stop_node1_agent)
    finally:
        node1.start_agent(gpus=GPUS_PER_NODE)
    assert job.codes == [0, 0], job.failure()  # training went on
    node0_energy, node1_energy = job.ranks[0]["energy"], job.ranks[1]["energy"]
    assert all(e is not None and e["energy_j"] > 0 for e in node0_energy)  # node0 still measured
    assert all(e is not None for e in node1_energy[:2]) and node1_energy[2:] == [None] * (STEPS - 2)
    assert job.losses() == pytest.approx(reference[1], rel=1e-6, abs=1e-6)
    assert _unreleased(_wait_released(cluster.nodes)) == []


def test_killed_rank_stops_the_job_and_every_lease_is_released(cluster: Cluster) -> None:
    job = _job(cluster, "deepspeed", cluster.nodes, 2, "--kill-rank", "3", "--kill-at", "1")
    assert job.codes[0] != 0 and job.codes[1] != 0, job.failure()
    # node1's launcher names the root cause (a rank killed by signal 9) ...
    assert "exits with return code = -9" in job.logs["node1-1"], job.failure()
    # ... and node0's stages fail on the lost neighbour (stage 2, on node1) instead of hanging.
    assert job.errors.get(1, "").startswith("PeerLostError: stage 1 lost stage 2 (rank 2)"), job.failure()
    assert _unreleased(_wait_released(cluster.nodes)) == []


# `envpipe train` on every node, each starting its node's ranks through the DeepSpeed launcher (no ssh).
TRAIN = ["envpipe", "train", "--device", "cpu", "--stages", "2", "--micro-batches", "4", "--seq-len", "32"]
TRAIN_STEPS = 40  # planning takes 30 with the short "envpipe" block below; 10 steps at the plan


def _train(
    cluster: Cluster, nodes: list[Node], name: str, *extra: str, during=None, timeout_s: float = 600
) -> tuple[list[int | None], list[str], Path]:
    """``envpipe train`` on ``nodes`` (``--hostfile`` with one slot each and ``--node-rank`` when several);
    returns exit codes, outputs and the first node's report path."""
    folder = cluster.workdir / name
    folder.mkdir()
    ds_config = folder / "ds.json"
    ds_config.write_text(json.dumps({"envpipe": {"reconfig_max_rounds": 2, "baseline_steps": 2}}))
    report = folder / "report.json"
    common = [*TRAIN, "--deepspeed-config", str(ds_config), "--report", str(report), *extra]
    if len(nodes) > 1:
        common += ["--hostfile", str(cluster.hostfile(1))]
    port = str(next(_ports))
    logs = [folder / f"{node.name}.log" for node in nodes]
    processes = [
        node.popen(
            [*common, *(["--node-rank", str(i)] if len(nodes) > 1 else [])],
            env={"MASTER_PORT": port, "COLUMNS": "200"},
            log=log,
        )
        for i, (node, log) in enumerate(zip(nodes, logs))
    ]
    if during is not None:
        during()
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout_s))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes, [log.read_text(errors="replace") for log in logs], report


def test_envpipe_train_with_a_hostfile_across_two_nodes(cluster: Cluster) -> None:
    codes, outputs, report_path = _train(cluster, cluster.nodes, "train-2nodes", "--steps", str(TRAIN_STEPS))
    assert codes == [0, 0], outputs
    assert "node 1: its ranks finished" in outputs[1]
    report = json.loads(report_path.read_text())
    placement = sorted(report["placement"], key=lambda p: p["stage"])
    for stage, (where, node) in enumerate(zip(placement, cluster.nodes)):
        assert (where["stage"], where["host"]) == (stage, node.name)
        assert where["gpu_uuid"] in _agent_uuids(node)  # leased from its own node's agent
    # Per-node energy: stage s ran on node s; both measured (simulated) by their own agent.
    stage_energy = report["summary"]["baseline"]["stage_energy_j"]
    assert stage_energy["0"] > 0 and stage_energy["1"] > 0, report["summary"]
    assert report["summary"]["energy_unavailable_windows"] == 0
    single_codes, single_out, single_path = _train(
        cluster, cluster.nodes[:1], "train-1node", "--steps", str(TRAIN_STEPS)
    )
    assert single_codes == [0], single_out
    single = json.loads(single_path.read_text())
    assert [x["step"] for x in report["losses"]] == [x["step"] for x in single["losses"]]
    assert [x["loss"] for x in report["losses"]] == pytest.approx(
        [x["loss"] for x in single["losses"]], rel=1e-5
    )
    assert _unreleased(_wait_released(cluster.nodes)) == []


def test_envpipe_train_names_a_rank_killed_on_another_node(cluster: Cluster) -> None:
    node1 = cluster.nodes[1]

    def kill_node1_rank() -> None:
        deadline = time.monotonic() + 300
        while not any(g["holder"] for g in (node1.agent_status() or {"gpus": []})["gpus"]):
            assert time.monotonic() < deadline, "node1's rank never leased its GPU"
            time.sleep(0.2)
        time.sleep(2.0)  # training, not starting
        for pid in node1.pids("--local_rank="):  # the rank, not its launchers
            os.kill(pid, signal.SIGKILL)

    codes, outputs, _ = _train(
        cluster, cluster.nodes, "train-kill", "--steps", "100000", during=kill_node1_rank
    )
    assert codes == [1, 1], outputs
    text0, text1 = (" ".join(out.split()) for out in outputs)
    # node1 names its killed rank; node0 names what it lost: its peer at node1's address (gloo's error, as
    # a PeerLostError from a pipeline transfer or a RuntimeError from a collective, wherever stage 0 was).
    assert "a rank on this node was killed by signal 9" in text1, text1
    assert "error: DeepSpeed launcher exited with code" in text0, text0
    assert f"[{cluster.nodes[1].address}]" in text0, text0  # "Connection closed by peer [addr]:port", ...
    assert _unreleased(_wait_released(cluster.nodes)) == []
