"""Where a rank stands in a job, from whichever launcher started it, as torch.distributed's variables.

torch.distributed (``init_method="env://"``) and DeepSpeed read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. torchrun and the DeepSpeed launcher set them; ``srun`` does not: it
sets ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` / ``SLURM_NODEID`` and the job's node list,
whose first host is the natural rendezvous. :func:`detect` reads the environment of one rank, names the
launcher and returns a :class:`DistEnv`; :func:`apply` writes the missing torch variables back (it never
overrides one that is set). Pure Python: no torch import.

Precedence: torchrun, then the DeepSpeed launcher, then SLURM, then plain variables. torchrun or the
DeepSpeed launcher started *by* ``srun`` (one task per node) wins over SLURM: there ``SLURM_PROCID`` is the
node's index, not the rank.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

from envpipe.errors import ConfigError

# torch.distributed's default rendezvous port (torch.distributed.constants), used when nothing names one.
DEFAULT_MASTER_PORT = 29500
# SLURM jobs without MASTER_PORT: a port derived from the job id, so that two jobs sharing a first node
# do not collide (the rule PyTorch Lightning's SLURMEnvironment uses: 10000 + last four digits).
SLURM_PORT_BASE = 10000


@dataclass(frozen=True, slots=True)
class DistEnv:
    """One rank's place in the job, as torch.distributed wants it."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    def torch_environ(self) -> dict[str, str]:
        """The variables torch.distributed's ``env://`` rendezvous and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def describe(self) -> str:
        """One line for logs: ``rank 3/4 (node 1, local 1/2) via slurm, master node0:12345``."""
        return (
            f"rank {self.rank}/{self.world_size} (node {self.node_rank}, local {self.local_rank}/"
            f"{self.local_world_size}) via {self.launcher}, master {self.master_addr}:{self.master_port}"
        )


def _int(env: Mapping[str, str], name: str, *, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"${name} is not set; the launcher must set it (or set it yourself)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name}={value!r} is not an integer; fix the launcher's environment") from None


def _port(env: Mapping[str, str], default: int) -> int:
    port = _int(env, "MASTER_PORT", default=default)
    if not 0 < port < 65536:
        raise ConfigError(f"$MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def _from_torch_vars(env: Mapping[str, str], launcher: str, *, local_size: str, node: str) -> DistEnv:
    """torchrun and the DeepSpeed launcher: the torch variables are there; only their names for the
    local size and the node index differ (torchrun: LOCAL_WORLD_SIZE/GROUP_RANK, DeepSpeed:
    LOCAL_SIZE/CROSS_RANK)."""
    world_size = _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", default=0)
    local_world_size = _int(env, local_size, default=world_size)
    return _checked(
        DistEnv(
            launcher=launcher,
            rank=_int(env, "RANK"),
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node_rank=_int(env, node, default=_int(env, "RANK") // max(local_world_size, 1)),
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_port(env, DEFAULT_MASTER_PORT),
        )
    )


def _torchrun(env: Mapping[str, str]) -> DistEnv:
    return _from_torch_vars(env, "torchrun", local_size="LOCAL_WORLD_SIZE", node="GROUP_RANK")


def _deepspeed(env: Mapping[str, str]) -> DistEnv:
    return _from_torch_vars(env, "deepspeed", local_size="LOCAL_SIZE", node="CROSS_RANK")


def _env(env: Mapping[str, str]) -> DistEnv:
    return _from_torch_vars(env, "env", local_size="LOCAL_WORLD_SIZE", node="GROUP_RANK")


def _slurm(env: Mapping[str, str]) -> DistEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError(
            "$SLURM_PROCID is set but $SLURM_JOB_NODELIST is not: start the ranks with srun inside an "
            "allocation, or set MASTER_ADDR"
        )
    master_addr = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
    job_id = env.get("SLURM_JOB_ID", "")
    default_port = SLURM_PORT_BASE + int(job_id[-4:]) if job_id.isdigit() else DEFAULT_MASTER_PORT
    world_size = _int(env, "SLURM_NTASKS")
    node_rank = _int(env, "SLURM_NODEID")
    return _checked(
        DistEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=world_size,
            local_rank=_int(env, "SLURM_LOCALID"),
            local_world_size=_slurm_tasks_on_node(env, node_rank, world_size),
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=_port(env, default_port),
        )
    )


def _slurm_tasks_on_node(env: Mapping[str, str], node_rank: int, world_size: int) -> int:
    """Tasks on this node from ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` ("2(x3),1")."""
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not text:
        return _int(env, "SLURM_NTASKS_PER_NODE", default=world_size)
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ConfigError(
                f"$SLURM_TASKS_PER_NODE={text!r}: cannot read {part!r} (expected e.g. '2(x3),1')"
            )
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if node_rank >= len(counts):
        raise ConfigError(
            f"$SLURM_NODEID={node_rank} but $SLURM_TASKS_PER_NODE={text!r} lists {len(counts)} nodes"
        )
    return counts[node_rank]


# The launchers we recognise, in precedence order: (name, "is it this one?", reader). One registry:
# detection, the docs and the tests all go through it.
LAUNCHERS: tuple[
    tuple[str, Callable[[Mapping[str, str]], bool], Callable[[Mapping[str, str]], DistEnv]], ...
] = (
    ("torchrun", lambda env: "TORCHELASTIC_RUN_ID" in env, _torchrun),
    ("deepspeed", lambda env: "CROSS_RANK" in env and "RANK" in env, _deepspeed),
    ("slurm", lambda env: "SLURM_PROCID" in env and "RANK" not in env, _slurm),
    ("env", lambda env: "RANK" in env, _env),
)


def detect(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """This rank's place, read from ``environ`` (default ``os.environ``); None when no launcher set one.

    Raises:
        ConfigError: a launcher's variables are there but incomplete or unreadable (the message names the
            variable and what to do).
    """
    env = os.environ if environ is None else environ
    for _name, matches, read in LAUNCHERS:
        if matches(env):
            return read(env)
    return None


def apply(environ: MutableMapping[str, str] | None = None) -> DistEnv | None:
    """:func:`detect`, then set every torch.distributed variable that is missing (set ones are kept)."""
    env = os.environ if environ is None else environ
    found = detect(env)
    if found is not None:
        for name, value in found.torch_environ().items():
            env.setdefault(name, value)
    return found


def _checked(dist: DistEnv) -> DistEnv:
    if dist.world_size < 1:
        raise ConfigError(f"{dist.launcher}: world size {dist.world_size}; it must be at least 1")
    if not 0 <= dist.rank < dist.world_size:
        raise ConfigError(f"{dist.launcher}: rank {dist.rank} outside 0..{dist.world_size - 1}")
    if not 0 <= dist.local_rank < max(dist.local_world_size, 1):
        raise ConfigError(
            f"{dist.launcher}: local rank {dist.local_rank} outside 0..{dist.local_world_size - 1}"
        )
    return dist


_HOST_RANGE = re.compile(r"\[([^\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as ``scontrol show hostnames`` prints it, in order.

    ``"node[01-03,07],gpu5"`` → ``["node01", "node02", "node03", "node07", "gpu5"]``; several bracket
    groups in one name multiply (``"r[1-2]n[1-2]"`` → r1n1, r1n2, r2n1, r2n2). Zero padding is kept.

    Raises:
        ConfigError: unbalanced brackets or a range that does not read as ``a-b`` with a <= b.
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        hosts += _expand_one(name, nodelist)
    if not hosts:
        raise ConfigError(f"node list {nodelist!r} names no host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ConfigError(f"node list {text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ConfigError(f"node list {text!r}: unbalanced brackets")
    return [part.strip() for part in parts + [current] if part.strip()]


def _expand_one(name: str, nodelist: str) -> list[str]:
    match = _HOST_RANGE.search(name)
    if match is None:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    out = []
    for item in match.group(1).split(","):
        low, _, high = item.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ConfigError(f"node list {nodelist!r}: cannot read range {item!r} (expected e.g. 01-04)")
        for number in range(int(low), int(high or low) + 1):
            out += _expand_one(f"{head}{number:0{len(low)}d}{tail}", nodelist)
    return out


__all__ = ["LAUNCHERS", "DistEnv", "apply", "detect", "expand_nodelist"]
