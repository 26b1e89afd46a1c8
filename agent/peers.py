"""Who is calling: SO_PEERCRED credentials of ipc peers, the per-uid connection cap and connection shedding.

libzmq fills each ipc frame's ``Peer-Address`` metadata from SO_PEERCRED (``localhost:uid:gid:pid``), so a
request names its sender's uid and pid as the kernel saw them at connect time; a tcp peer has none (tcp has
no access control beyond the network: prefer ipc). The sockets' monitors report every accepted connection
with its file descriptor: :class:`ConnectionGuard` reads SO_PEERCRED there and shuts down the connections
of a uid over its cap, and (memory guard) every connection of every uid but root's.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections import Counter
from dataclasses import dataclass

import zmq

ROOT_UID = 0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Peer:
    """The kernel's view of a connected process (SO_PEERCRED, at connect time)."""

    uid: int
    gid: int
    pid: int

    @property
    def is_root(self) -> bool:
        return self.uid == ROOT_UID


def peer_of(frame: zmq.Frame) -> Peer | None:
    """The sender of ``frame`` (received with ``copy=False``); None over tcp or when libzmq gives none."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return None
    parts = address.split(":") if isinstance(address, str) else []
    if len(parts) != 4 or parts[0] != "localhost":  # ipc: localhost:uid:gid:pid; tcp: ip:port
        return None
    try:
        uid, gid, pid = (int(part) for part in parts[1:])
    except ValueError:
        return None
    return Peer(uid, gid, pid)


def peer_of_fd(fd: int) -> Peer | None:
    """SO_PEERCRED of a connected Unix socket, without taking ownership of ``fd``; None if it is none."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return Peer(uid, gid, pid)
    except OSError:
        return None
    finally:
        sock.detach()


def shutdown_fd(fd: int) -> bool:
    """Shut a connection down under libzmq's feet: its engine sees the end of the stream and closes it,
    dropping whatever it buffered (a half-received message included)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()


def process_uid(pid: int) -> int | None:
    """The owner of process ``pid`` as this process can see it (/proc), or None when it is not visible
    (gone, in another pid namespace, or hidden by ProtectProc=invisible)."""
    if pid <= 0:
        return None
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except (OSError, OverflowError, ValueError):
        return None


def rss_bytes() -> int:
    """This process's resident memory (from /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim): the frames of a shed message are
    60 kB allocations from the heap, which glibc keeps resident otherwise. No-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ConnectionGuard:
    """Connections by uid, fed by the sockets' ACCEPTED and DISCONNECTED monitor events (loop thread only).

    A uid may hold ``cap_per_uid`` connections across both sockets; the next one is shut down at accept
    (the caller counts it). Root and the agent's own uid are never capped or shed (root can do anything to the agent
    anyway, and a user's own agent, e.g. ``envpipe train``'s embedded one, serves only that user's ranks).
    A connection whose credentials cannot be read (tcp) is not capped.
    """

    def __init__(self, cap_per_uid: int) -> None:
        self.cap_per_uid = cap_per_uid
        self.exempt = {ROOT_UID, os.geteuid()}
        self.uid_of_fd: dict[int, int] = {}
        self.per_uid: Counter[int] = Counter()

    def accepted(self, fd: int) -> int | None:
        """Count a new connection; returns its uid when it was over the cap and is shut down, else None."""
        peer = peer_of_fd(fd)
        if peer is None:
            return None
        self._forget(fd)  # an fd number reused before its disconnect was seen
        self.uid_of_fd[fd] = peer.uid
        self.per_uid[peer.uid] += 1
        over = peer.uid not in self.exempt and self.per_uid[peer.uid] > self.cap_per_uid
        return peer.uid if over and shutdown_fd(fd) else None

    def disconnected(self, fd: int) -> None:
        self._forget(fd)

    def _forget(self, fd: int) -> None:
        uid = self.uid_of_fd.pop(fd, None)
        if uid is not None:
            self.per_uid[uid] -= 1
            if self.per_uid[uid] <= 0:
                del self.per_uid[uid]

    def shed_all_but_root(self) -> int:
        """Shut down every connection not of root or the agent's own uid (the memory guard's last resort);
        returns how many."""
        count = 0
        for fd, uid in list(self.uid_of_fd.items()):
            if uid not in self.exempt and shutdown_fd(fd):
                count += 1
        return count
