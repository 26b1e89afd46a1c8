"""Leases: which rank holds which GPU, until it releases, stops heartbeating or its process dies.

Every way a lease ends returns the GPU to the caller of :meth:`LeaseManager.expire` / :meth:`release`,
which resets its clocks (DESIGN invariant 2). Holder pids are only checked when the peer is on this node
(ipc endpoints); over tcp a pid names a process on another host and only heartbeats count.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from envpipe_agent.protocol import LEASE_TOKEN_BYTES, lease_token


@dataclass(slots=True)
class Lease:
    """One GPU held by one rank of one job."""

    lease_id: int  # 128 random bits (secrets), never 0
    gpu_index: int
    gpu_uuid: str
    job_id: str
    rank: int
    pid: int
    created_s: float = field(default_factory=time.monotonic)
    heartbeat_s: float = field(default_factory=time.monotonic)
    # window id -> (energy in mJ at the mark, being estimated off the loop; the mark's monotonic time)
    windows: dict[int, tuple[Future[float], float]] = field(default_factory=dict)
    events: int = 0  # phase events accepted for this lease
    # False when the pid named no live process at claim time: a rank in a container (its own pid namespace)
    # reports a pid the agent cannot see, and checking it would end its lease at every tick.
    pid_checked: bool = True
    # The caller's uid (SO_PEERCRED) and the pid whose death ends the lease; None / the claimed pid over tcp.
    uid: int | None = None
    watch_pid: int = 0

    def __post_init__(self) -> None:
        self.watch_pid = self.watch_pid or self.pid

    def holder(self) -> dict[str, object]:
        """Who holds it, for refusals and status."""
        return {"job_id": self.job_id, "rank": self.rank, "pid": self.pid, "uid": self.uid}

    def describe(self) -> str:
        age_s = time.monotonic() - self.created_s
        uid = "" if self.uid is None else f" uid {self.uid}"
        return f"job {self.job_id!r} rank {self.rank} pid {self.pid}{uid} (lease age {age_s:.1f} s)"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this node and is not a zombie (another user's process counts).

    A killed rank whose launcher has not reaped it yet is a zombie: ``kill(pid, 0)`` still succeeds, so the
    state in /proc decides (when /proc hides the process, e.g. systemd's ProtectProc, kill's answer stands).
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:  # a pid no kernel can have (a forged claim): gone, not a crash of the agent's loop
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def new_lease_id() -> int:
    """A lease id nobody can guess: 128 bits from ``secrets`` (a 32-bit id fell to a flood within hours).

    Never 0, which marks "no lease" on the client.
    """
    return secrets.randbits(8 * LEASE_TOKEN_BYTES) or 1


class LeaseManager:
    """Leases by id and by GPU index. Used only from the agent's event-loop thread (no locking)."""

    def __init__(self, timeout_s: float, check_pids: bool) -> None:
        if timeout_s <= 0:
            raise ValueError(f"lease_timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.check_pids = check_pids
        self.by_id: dict[int, Lease] = {}
        self.by_token: dict[bytes, Lease] = {}  # the event path's key: no int is built per event
        self.by_gpu: dict[int, Lease] = {}

    def claim(
        self,
        gpu_index: int,
        gpu_uuid: str,
        job_id: str,
        rank: int,
        pid: int,
        lease_id: int = 0,
        uid: int | None = None,
        watch_pid: int = 0,
    ) -> tuple[Lease, bool]:
        """Grant a lease, or return the caller's own lease again (a claim is idempotent).

        A repeated claim must name the lease it holds (``lease_id``): job, rank and pid are public (status
        shows them), so they alone would hand the lease to anyone who copies them.

        Returns:
            The lease and whether it is new.

        Raises:
            LookupError: the GPU is held by someone else; the message names the holder.
        """
        held = self.by_gpu.get(gpu_index)
        if held is not None:
            if (held.job_id, held.rank, held.pid, held.lease_id) == (job_id, rank, pid, lease_id):
                held.heartbeat_s = time.monotonic()
                return held, False
            raise LookupError(
                f"GPU {gpu_uuid} is held by {held.describe()}; wait for it to end or stop that job"
            )
        lease_id = new_lease_id()
        while lease_id in self.by_id:
            lease_id = new_lease_id()
        lease = Lease(lease_id, gpu_index, gpu_uuid, job_id, rank, pid, uid=uid, watch_pid=watch_pid)
        lease.pid_checked = self.check_pids and pid_alive(lease.watch_pid)  # else heartbeats alone end it
        self.by_id[lease_id] = lease
        self.by_token[lease_token(lease_id)] = lease
        self.by_gpu[gpu_index] = lease
        return lease, True

    def heartbeat(self, lease_id: int) -> Lease | None:
        lease = self.by_id.get(lease_id)
        if lease is not None:
            lease.heartbeat_s = time.monotonic()
        return lease

    def release(self, lease_id: int) -> Lease | None:
        lease = self.by_id.pop(lease_id, None)
        if lease is not None:
            del self.by_gpu[lease.gpu_index]
            del self.by_token[lease_token(lease_id)]
        return lease

    def expire(self) -> list[tuple[Lease, str]]:
        """End every lease whose heartbeat is overdue or whose local holder process is gone."""
        now_s = time.monotonic()
        ended: list[tuple[Lease, str]] = []
        for lease in list(self.by_id.values()):
            if now_s - lease.heartbeat_s > self.timeout_s:
                reason = f"no heartbeat for {now_s - lease.heartbeat_s:.1f} s"
            elif lease.pid_checked and not pid_alive(lease.watch_pid):
                reason = f"holder pid {lease.watch_pid} is gone"
            else:
                continue
            self.release(lease.lease_id)
            ended.append((lease, reason))
        return ended


class Reservations:
    """GPUs whose holders an agent restart lost, kept for the holder's uid for one lease timeout.

    The agent writes who holds which GPU (uid only: no lease id, which is a credential) to a file of its
    runtime directory on every grant and release; the next agent reads it at start. Until the timeout,
    only that uid (or root) may claim the GPU, so a claim queued by another user cannot win the race
    against the job that was using it (that job's client claims again by itself within a heartbeat).
    """

    def __init__(self, holders: dict[str, int], timeout_s: float) -> None:
        until_s = time.monotonic() + timeout_s
        self.by_uuid: dict[str, tuple[int, float]] = {uuid: (uid, until_s) for uuid, uid in holders.items()}

    def blocks(self, gpu_uuid: str, uid: int | None) -> int | None:
        """The uid the GPU is reserved for when ``uid`` may not claim it now, else None."""
        entry = self.by_uuid.get(gpu_uuid)
        if entry is None:
            return None
        owner, until_s = entry
        if time.monotonic() > until_s or uid == owner:
            del self.by_uuid[gpu_uuid]
            return None
        return None if uid == 0 else owner


def holders_record(leases: LeaseManager) -> bytes:
    """The lease state file's content: GPU UUID -> holder uid (leases with a known uid)."""
    holders = {lease.gpu_uuid: lease.uid for lease in leases.by_gpu.values() if lease.uid is not None}
    return json.dumps({"holders": holders}).encode()


def parse_holders(data: bytes | None) -> dict[str, int]:
    """GPU UUID -> uid from a lease state file (anything unreadable is no reservation)."""
    try:
        holders = json.loads(data or b"{}").get("holders", {})
    except (ValueError, AttributeError, RecursionError):
        return {}
    if not isinstance(holders, dict):
        return {}
    return {str(k): v for k, v in holders.items() if isinstance(v, int) and not isinstance(v, bool)}
