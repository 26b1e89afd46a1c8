"""Process plumbing for the daemon: socket directory and permissions, single-instance lock, sd_notify.

The socket directory is 0750 and the sockets 0660, both owned by the socket group (``envpipe`` for the
system service), so only root and members of that group can reach the agent (DESIGN invariant 3).
"""

from __future__ import annotations

import fcntl
import grp
import logging
import os
import resource
import socket
from pathlib import Path

from envpipe_agent.errors import AgentConfigError

log = logging.getLogger("envpipe_agent.runtime")

DIR_MODE = 0o750
SOCKET_MODE = 0o660
DEFAULT_GROUP = "envpipe"


def resolve_group(name: str) -> int:
    """The gid for the sockets: the named group, else ``envpipe`` if it exists, else our own group."""
    if name:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise AgentConfigError(
                f"socket_group {name!r} does not exist; create it "
                "(systemd/sysusers.d/envpipe.conf) or pick another"
            ) from None
    try:
        return grp.getgrnam(DEFAULT_GROUP).gr_gid
    except KeyError:
        return os.getegid()


def prepare_dir(path: str, gid: int) -> None:
    """Create the socket directory (0750, group ``gid``)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _set_group(str(directory), gid)
    os.chmod(directory, DIR_MODE)


def _set_group(path: str, gid: int) -> None:
    # Skip the call when the group is already right: under the systemd unit (Group=envpipe, chown calls
    # filtered out by SystemCallFilter=~@privileged) it always is.
    if os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)


def secure_socket(endpoint: str, gid: int) -> None:
    """Give an ipc socket mode 0660 and group ``gid``; tcp endpoints have no file (and no access check)."""
    if not endpoint.startswith("ipc://"):
        log.warning(
            "endpoint %s is not group-restricted: anyone who can reach it can change clocks", endpoint
        )
        return
    path = endpoint[len("ipc://") :]
    _set_group(path, gid)
    os.chmod(path, SOCKET_MODE)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the soft limit in force.

    Every client connection is a file descriptor, and libzmq aborts the whole process when accept() on an
    ipc socket fails with EMFILE (ipc_listener.cpp asserts), skipping the clock reset on the way out. With
    systemd's default soft limit of 1024, that many connections from any socket-group member killed the
    agent; the hard limit (524288 under systemd) puts that out of practical reach.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    return soft


class InstanceLock:
    """An flock on ``<dir>/agent.lock``: a second agent on the same sockets would silently steal them."""

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / "agent.lock"
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AgentConfigError(
                f"another envpipe-agent (pid {holder}) already serves {self.path.parent}; stop it or use "
                "another --runtime-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd when NOTIFY_SOCKET is set; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)
        return False
    return True
