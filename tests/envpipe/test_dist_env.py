"""envpipe.dist_env: each launcher's variables (as the launchers set them) -> torch.distributed's."""

from __future__ import annotations

import pytest

from envpipe import dist_env
from envpipe.errors import ConfigError

# What srun sets for task 3 of `srun -N2 --ntasks-per-node=2` in job 4242 (the variables we read).
SLURM_TASK3 = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "node[0-1]",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_ID": "4242",
}
# What torchrun sets for local rank 1 on node 1 of `--nnodes 2 --nproc-per-node 2`.
TORCHRUN_RANK3 = {
    "TORCHELASTIC_RUN_ID": "none",
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29400",
}
# What deepspeed.launcher.launch sets on node 1 (--node_rank 1) with `node0 slots=2` / `node1 slots=2`.
DEEPSPEED_RANK3 = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_SIZE": "2",
    "CROSS_RANK": "1",
    "CROSS_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}


def test_slurm_variables_become_torch_variables_with_the_first_host_as_master() -> None:
    env = dict(SLURM_TASK3)
    found = dist_env.apply(env)
    assert found == dist_env.DistEnv("slurm", 3, 4, 1, 2, 1, "node0", 10000 + 4242)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
    }
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node0", "14242")


def test_slurm_keeps_a_master_set_by_the_user_and_uneven_tasks_per_node() -> None:
    env = SLURM_TASK3 | {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456", "SLURM_TASKS_PER_NODE": "1,3"}
    found = dist_env.apply(env)
    assert (found.master_addr, found.master_port, found.local_world_size) == ("10.1.2.3", 23456, 3)


def test_torchrun_under_srun_wins_over_slurm() -> None:
    # One srun task per node runs torchrun: SLURM_PROCID is the node index there, not the rank.
    env = TORCHRUN_RANK3 | {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[0-1]"}
    found = dist_env.detect(env)
    assert found == dist_env.DistEnv("torchrun", 3, 4, 1, 2, 1, "node0", 29400)


def test_deepspeed_launcher_names_local_size_and_node() -> None:
    env = dict(DEEPSPEED_RANK3)
    found = dist_env.apply(env)
    assert found == dist_env.DistEnv("deepspeed", 3, 4, 1, 2, 1, "10.0.0.1", 29500)
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == "1"


def test_apply_never_overrides_a_set_variable_and_no_launcher_is_none() -> None:
    env = SLURM_TASK3 | {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}
    # RANK unset -> SLURM is read; LOCAL_RANK set by the user stays.
    dist_env.apply(env)
    assert env["LOCAL_RANK"] == "0" and env["RANK"] == "3"
    assert dist_env.detect({}) is None and dist_env.apply({}) is None


def test_every_launcher_in_the_registry_is_detected() -> None:
    examples = {"torchrun": TORCHRUN_RANK3, "deepspeed": DEEPSPEED_RANK3, "slurm": SLURM_TASK3}
    examples["env"] = {"RANK": "0", "WORLD_SIZE": "1"}
    assert [name for name, _, _ in dist_env.LAUNCHERS] == list(examples)
    for name, env in examples.items():
        assert dist_env.detect(env).launcher == name


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[0-1]", ["node0", "node1"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("a-b[8-10]", ["a-b8", "a-b9", "a-b10"]),
        ("single", ["single"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert dist_env.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({k: v for k, v in SLURM_TASK3.items() if k != "SLURM_NTASKS"}, "$SLURM_NTASKS is not set"),
        ({k: v for k, v in SLURM_TASK3.items() if k != "SLURM_JOB_NODELIST"}, "$SLURM_JOB_NODELIST"),
        (SLURM_TASK3 | {"SLURM_JOB_NODELIST": "node[0-"}, "unbalanced brackets"),
        (SLURM_TASK3 | {"SLURM_JOB_NODELIST": "node[3-1]"}, "cannot read range '3-1'"),
        (SLURM_TASK3 | {"SLURM_PROCID": "x"}, "$SLURM_PROCID='x' is not an integer"),
        (SLURM_TASK3 | {"SLURM_PROCID": "4"}, "rank 4 outside 0..3"),
        (SLURM_TASK3 | {"SLURM_TASKS_PER_NODE": "2(x"}, "cannot read '2(x'"),
        (SLURM_TASK3 | {"MASTER_PORT": "70000"}, "$MASTER_PORT=70000 is not a TCP port"),
        ({"RANK": "0"}, "$WORLD_SIZE is not set"),
    ],
)
def test_bad_launcher_variables_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        dist_env.detect(env)
    assert names in str(caught.value)
