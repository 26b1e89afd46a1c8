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
import stat
from pathlib import Path

from envpipe_agent.errors import AgentConfigError
from envpipe_agent.peers import peer_of_fd

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
    """Create the socket directory (0750, group ``gid``), or check the one that is there.

    The agent runs as root and writes into this directory (lock, lease state, sockets): one made by another
    user, or a symlink, would let that user point root's writes anywhere (an ``agent.lock`` symlink made
    root truncate any file) or delete the sockets. Such a directory is refused, never followed or fixed.
    """
    directory = Path(path)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    info = os.lstat(parent)
    shared = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX  # others may rename entries in it
    if info.st_uid not in (os.geteuid(), 0) or shared:
        raise AgentConfigError(
            f"runtime_dir {path}: its parent {parent} can be changed by others (owner uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):o}), who could replace the directory; "
            "pick a directory under one that only you or root can write (e.g. /run or $XDG_RUNTIME_DIR)"
        )
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise AgentConfigError(
            f"runtime_dir {path} is a symlink or not a directory; remove it (the agent never follows one)"
        )
    if info.st_uid != os.geteuid():
        raise AgentConfigError(
            f"runtime_dir {path} belongs to uid {info.st_uid}, not to the agent (uid {os.geteuid()}); "
            "remove it and start again (another user's directory could redirect the agent's files)"
        )
    _set_group(str(directory), gid)
    os.chmod(directory, DIR_MODE)


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """Open a file of the runtime directory without following a symlink; it must be the agent's own."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise AgentConfigError(f"{path} belongs to another user; remove it and start again")
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` (0600, via a temporary file of the same directory)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def read_private(path: Path, limit_bytes: int = 1 << 16) -> bytes | None:
    """The agent's own file ``path`` (None when missing, not ours, or a symlink)."""
    try:
        fd = open_private(path, os.O_RDONLY)
    except (OSError, AgentConfigError):
        return None
    try:
        return os.read(fd, limit_bytes)
    finally:
        os.close(fd)


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
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT, 0o640)
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


class GpuLocks:
    """One abstract Unix socket per GPU UUID (``@envpipe-agent-gpu/<uuid>``): two clock-setting agents on
    one node (different runtime dirs) would fight over the same GPUs; the second is refused.

    Abstract names need no file (nothing to clean up after a crash: the kernel frees the name with the
    process) but anyone may bind one. A name held by a root process is another agent (refused); a name held
    by anyone else cannot be an agent that sets clocks (that needs root), so it is logged and ignored
    rather than letting any user keep the agent from starting.
    """

    PREFIX = "envpipe-agent-gpu/"

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []

    def acquire(self, uuids: list[str]) -> None:
        for uuid in uuids:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind("\0" + self.PREFIX + uuid)
                sock.listen(1)
            except OSError:
                sock.close()
                self._check_holder(uuid)
                continue
            self._sockets.append(sock)

    def _check_holder(self, uuid: str) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(0.5)
        try:
            probe.connect("\0" + self.PREFIX + uuid)
            holder = peer_of_fd(probe.fileno())
        except OSError as exc:
            log.warning("GPU %s: its agent lock is taken and the holder does not answer (%s); going on", uuid, exc)
            return
        finally:
            probe.close()
        if holder is None:
            log.warning("GPU %s: its agent lock is taken and its holder's credentials are unreadable; going on", uuid)
            return
        pid, uid = holder.pid, holder.uid
        if holder.is_root:
            self.release()
            raise AgentConfigError(
                f"another envpipe-agent (pid {pid}) already drives GPU {uuid}; stop it "
                "(systemctl stop envpipe-agent) or give each agent its own GPUs with --manage"
            )
        log.warning("GPU %s: agent lock held by uid %d pid %d (not root, so no agent); going on", uuid, uid, pid)

    def release(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []


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
