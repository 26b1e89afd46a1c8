"""Emulated nodes on one machine: each a network, mount, UTS and pid namespace of its own, wired by veth.

    with Cluster(nodes=2) as cluster:                     # node0 10.213.77.1, node1 10.213.77.2
        cluster.nodes[1].start_agent(gpus=2)              # envpipe-agent (sim) on node1's own /run/envpipe
        cluster.nodes[1].run(["hostname"])                # -> node1

What a node has of its own, as a real node would: its network (``eth0`` with an address of
:data:`SUBNET`, ``lo``), its hostname, its ``/run`` (so the agent's default socket ``/run/envpipe/
control.sock`` is that node's agent), its ``/etc/hosts`` (every node by name) and its pids (the agent sees
only its node's processes). Everything else — the file system, the Python environment — is shared, like a
cluster's shared home. The nodes hang off a bridge inside a separate "switch" namespace; no namespace has
a route out, the host's network is never touched, and the addresses exist only inside these namespaces.

Cleanup is owed to the kernel, not to this process surviving: every node's first process (pid 1 of its
pid namespace) reads a pipe from this process and, at end of file (``close()``, or this process dying),
sends SIGTERM to everything in its node, waits a grace period and exits, which makes the kernel kill what
is left. A namespace ends with its last process; the veth pairs and the bridge end with their namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# A private (RFC 1918) /24 that exists only inside the namespaces made here; nothing routes to or from it.
SUBNET = "10.213.77"
PREFIX_LEN = 24
# How long a node's processes get after SIGTERM before the kernel kills them (the agent resets clocks).
TERM_GRACE_S = 5.0
# Variables a node's processes must not inherit from the caller: they would point at the host's agent or
# at another job's rendezvous.
_SCRUBBED = (
    "ENVPIPE_AGENT",
    "XDG_RUNTIME_DIR",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
    "CROSS_RANK",
    "CROSS_SIZE",
    "LOCAL_SIZE",
)

# pid 1 of a node: set up /run, /etc/hosts, the hostname and lo; say "ready"; reap orphans until stdin ends;
# then SIGTERM the node, wait, exit (the kernel kills the rest of the pid namespace with it).
_HOLDER = r"""
import os, select, signal, socket, subprocess, sys, time
name, run_dir, hosts, grace_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if run_dir:
    subprocess.run(["mount", "--bind", run_dir, "/run"], check=True)
    subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
    socket.sethostname(name)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)

def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return

def others():
    return [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]

while not stop:
    readable = select.select([0], [], [], 0.2)[0]
    reap()
    if readable and not os.read(0, 4096):
        break
with __import__("contextlib").suppress(ProcessLookupError):
    os.kill(-1, signal.SIGTERM)
deadline = time.monotonic() + grace_s
while others() and time.monotonic() < deadline:
    reap()
    time.sleep(0.05)
"""


def unavailable_reason() -> str | None:
    """Why emulated nodes cannot run here (None when they can): root, ``unshare``/``nsenter``/``ip``, and
    a trial namespace with a veth pair (containers without CAP_SYS_ADMIN or veth support fail here)."""
    if os.geteuid() != 0:
        return "emulated nodes need root (network, mount and pid namespaces)"
    missing = [tool for tool in ("unshare", "nsenter", "ip", "mount") if shutil.which(tool) is None]
    if missing:
        return f"emulated nodes need {', '.join(missing)} (util-linux, iproute2)"
    trial = subprocess.run(
        [
            "unshare",
            "--net",
            "--mount",
            "--uts",
            "--pid",
            "--fork",
            "--mount-proc",
            "--",
            "sh",
            "-c",
            "ip link add name t0 type veth peer name t1 && ip link add name b0 type bridge",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if trial.returncode:
        return f"cannot create namespaces with a veth pair and a bridge here: {trial.stderr.strip()[:200]}"
    return None


def node_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process on a node: the caller's, without agent and rendezvous variables, with
    this Python's scripts (``deepspeed``, ``torchrun``, ``envpipe``) first on PATH and the repository
    importable."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def _children(pid: int) -> list[int]:
    """Pids (host numbering) whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def _child_of(pid: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _children(pid)
        if found:
            return found[0]
        time.sleep(0.01)
    raise RuntimeError(f"process {pid} started no child within {timeout_s} s")


@dataclass
class Namespace:
    """One holder: ``unshare`` (``launcher``) and its child, pid 1 of the namespace (``pid``, host pids)."""

    launcher: subprocess.Popen
    pid: int

    def enter(self, argv: Sequence[str], *, net_only: bool = False, cwd: Path = REPO) -> list[str]:
        """``argv`` as a command that runs inside this namespace, in ``cwd``.

        The directory is changed inside the node (``sh -c cd``), not with ``nsenter --wd``: nsenter opens
        that directory before it enters the mount namespace, so the working directory would stay on the
        host's mount tree and a rename from an absolute path into it fails (EXDEV).
        """
        if net_only:
            return ["nsenter", f"--target={self.pid}", "--net", "--", *argv]
        spaces = ["--net", "--mount", "--uts", "--pid"]
        return [
            "nsenter",
            f"--target={self.pid}",
            *spaces,
            "--",
            "sh",
            "-c",
            'cd "$0" && exec "$@"',
            str(cwd),
            *argv,
        ]

    def close(self, timeout_s: float) -> None:
        """End of file on the holder's stdin: it stops its namespace (killed if not within ``timeout_s``)."""
        with contextlib.suppress(OSError):
            self.launcher.stdin.close()
        try:
            self.launcher.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # pid 1 gone: the kernel kills its whole pid namespace
            self.launcher.kill()
            self.launcher.wait()


def _start_holder(name: str, run_dir: str, hosts: str, *, node: bool) -> Namespace:
    spaces = ["--net", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
    launcher = subprocess.Popen(
        [
            "unshare",
            *(spaces if node else ["--net", "--pid", "--fork", "--mount", "--mount-proc"]),
            "--",
            sys.executable,
            "-c",
            _HOLDER,
            name,
            run_dir,
            hosts,
            str(TERM_GRACE_S),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = launcher.stdout.readline().strip()
    if line != "ready":
        launcher.kill()
        launcher.wait()
        raise RuntimeError(f"node {name} did not start (holder said {line!r}; exit {launcher.returncode})")
    return Namespace(launcher, _child_of(launcher.pid))


@dataclass
class Node:
    """One emulated node: run commands in it, start and stop its agent, read its agent's state."""

    name: str
    index: int
    address: str
    namespace: Namespace
    root: Path  # on the host: root/run is this node's /run
    processes: list[subprocess.Popen] = field(default_factory=list)
    agent: subprocess.Popen | None = None

    @property
    def run_dir(self) -> Path:
        """This node's ``/run``, seen from the host."""
        return self.root / "run"

    @property
    def agent_endpoint_from_host(self) -> str:
        """The node agent's control socket as the host reaches it (ipc sockets are files; the path is
        this node's ``/run/envpipe/control.sock``)."""
        return f"ipc://{self.run_dir / 'envpipe' / 'control.sock'}"

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen:
        """Start ``argv`` on this node (its own environment, see :func:`node_environ`); output to ``log``."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            process = subprocess.Popen(
                self.namespace.enter(argv, cwd=cwd),
                env=node_environ(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if log is not None:
                out.close()
        self.processes.append(process)
        return process

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        timeout_s: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` on this node and wait; output captured as text."""
        done = subprocess.run(
            self.namespace.enter(argv),
            env=node_environ(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and done.returncode:
            raise RuntimeError(
                f"{self.name}: {' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        return done

    def start_agent(self, gpus: int = 1, *, args: Sequence[str] = (), timeout_s: float = 30.0) -> None:
        """``envpipe-agent --backend sim`` on this node, sockets in its default place (``/run/envpipe``)."""
        cmd = [sys.executable, "-m", "envpipe_agent", "--config", "", "--backend", "sim", "--gpus", str(gpus)]
        self.agent = self.popen([*cmd, *args], log=self.root / "agent.log")
        deadline = time.monotonic() + timeout_s
        while self.hello() is None:
            if self.agent.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "agent.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name}: the agent did not answer within {timeout_s} s:\n{log}")
            time.sleep(0.1)

    def stop_agent(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Signal the agent process (not its ``nsenter`` parent) and wait; returns nsenter's exit code."""
        assert self.agent is not None, "no agent started on this node"
        with contextlib.suppress(ProcessLookupError, RuntimeError):
            os.kill(_child_of(self.agent.pid, timeout_s=1.0), sig)
        return self.agent.wait(timeout_s)

    def pids(self, command_contains: str) -> list[int]:
        """Host pids of this node's processes whose command line contains ``command_contains``."""
        own = os.stat(f"/proc/{self.namespace.pid}/ns/pid").st_ino
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{entry}/ns/pid").st_ino != own:
                        continue
                    if command_contains.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                        found.append(int(entry))
        return found

    def hello(self) -> dict[str, Any] | None:
        """The node agent's ``hello`` (uuids of its GPUs, backend), or None if it does not answer."""
        return self._ask("hello")

    def agent_status(self) -> dict[str, Any] | None:
        """The node agent's status snapshot (leases, clocks, energy), or None if it does not answer."""
        return self._ask("status")

    def _ask(self, op: str) -> dict[str, Any] | None:
        from envpipe_agent.client import AgentClient, AgentUnavailable

        client = AgentClient(
            self.agent_endpoint_from_host, job_id="multinode-harness", rank=-1, timeout_s=1.0
        )
        try:
            return client.call(op)
        except AgentUnavailable:
            return None
        finally:
            client.close()

    def stop_processes(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (then SIGKILL) every process started with :meth:`popen`, inside the node."""
        stop(self.processes, timeout_s)


def stop(processes: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM the node-side process of each ``nsenter`` in ``processes``; SIGKILL what is left at the end."""
    for process in processes:
        if process.poll() is None:
            for pid in _children(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for pid in _children(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait()


class Cluster:
    """``nodes`` emulated nodes on a private bridge; a context manager that always cleans up."""

    def __init__(self, nodes: int = 2, *, workdir: Path | None = None) -> None:
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes={nodes}: between 1 and 250 (one /24)")
        self.count = nodes
        self.owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="envpipe-nodes-"))
        self.nodes: list[Node] = []
        self.switch: Namespace | None = None

    def __enter__(self) -> Cluster:  # noqa: PYI034 - not subclassed
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        names = [f"node{i}" for i in range(self.count)]
        hosts = self.workdir / "hosts"
        hosts.write_text(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
            + "".join(f"{SUBNET}.{i + 1} {n}\n" for i, n in enumerate(names))
        )
        self.switch = _start_holder("switch", "", "", node=False)
        sw = self.switch
        _ip(sw, "link", "add", "name", "br0", "type", "bridge")
        _ip(sw, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            root = self.workdir / name
            (root / "run").mkdir(parents=True)
            node = Node(
                name,
                i,
                f"{SUBNET}.{i + 1}",
                _start_holder(name, str(root / "run"), str(hosts), node=True),
                root,
            )
            self.nodes.append(node)
            port = f"p{i}"
            _ip(
                sw,
                "link",
                "add",
                "name",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                str(node.namespace.pid),
            )
            _ip(sw, "link", "set", port, "master", "br0", "up")
            _ip(node.namespace, "addr", "add", f"{node.address}/{PREFIX_LEN}", "dev", "eth0")
            _ip(node.namespace, "link", "set", "eth0", "up")

    def hostfile(self, slots: int) -> Path:
        """A DeepSpeed hostfile naming every node with ``slots`` ranks."""
        path = self.workdir / f"hostfile-{slots}"
        path.write_text("".join(f"{node.name} slots={slots}\n" for node in self.nodes))
        return path

    def close(self) -> None:
        """Stop every process started on a node, then every namespace (also after a failed start)."""
        for node in self.nodes:
            node.stop_processes()
        for node in self.nodes:
            node.namespace.close(TERM_GRACE_S + 5.0)
        if self.switch is not None:
            self.switch.close(TERM_GRACE_S + 5.0)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def describe(self) -> list[dict[str, Any]]:
        """Name, address and agent GPUs of every node (for reports)."""
        out = []
        for node in self.nodes:
            hello = node.hello() or {}
            out.append(
                {
                    "node": node.name,
                    "address": node.address,
                    "agent_gpus": [g["uuid"] for g in hello.get("gpus", [])],
                }
            )
        return out


def _ip(namespace: Namespace, *args: str) -> None:
    done = subprocess.run(
        namespace.enter(["ip", *args], net_only=True), capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _main() -> int:
    """``python -m benchmarks.multinode.nodes``: bring two nodes up, show them, tear them down."""
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    with Cluster(2) as cluster:
        for node in cluster.nodes:
            node.start_agent(gpus=1)
        print(json.dumps(cluster.describe(), indent=1))
        print(cluster.nodes[0].run(["ping", "-c", "1", "-W", "2", "node1"], check=False).stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
