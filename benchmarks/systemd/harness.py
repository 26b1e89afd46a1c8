"""The shipped unit under a real systemd: a minimal Debian 12 booted with systemd-nspawn (issue 12).

Steps (each printed as it runs; results as JSON):

1. A Debian bookworm tree (debootstrap, ~4 min; reused when present) with a venv at /opt/envpipe holding
   this checkout's wheel and its dependencies (wheels downloaded on the host: the container has no network).
2. Boot it: ``systemd-nspawn -D TREE -b --register=no --keep-unit --private-network`` (without the first two
   nspawn fails on a host without a system bus), and drive it with ``nsenter -t <its PID 1> -a``.
3. Install exactly as systemd/README.md says (its bash block, run as root in the container with ``sudo``
   removed, ``pip install envpipe`` replaced by the offline install and the ExecStart= drop-in the README
   describes), plus one test drop-in: the fake libnvidia-ml.so.1 of tests/agent (the container has no GPU).
4. Check: READY=1 (active after Type=notify), socket owner and mode, a lock applied by a client and reset
   on ``systemctl stop``, a restart after SIGKILL that resets, SIGHUP that resets (and restarts), the live
   ``systemd-analyze security`` score, and a socket-group member's attacks on the running service.

Needs root, systemd-container and debootstrap (``apt-get install -y systemd-container debootstrap``), gcc
and network access for debootstrap and the wheels. Never run on a machine with NVIDIA GPUs (the fake NVML
is loaded inside the container only, but the checks assume no real driver).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEBOOTSTRAP = [
    "debootstrap",
    "--variant=minbase",
    "--include=systemd,systemd-sysv,dbus,python3,python3-venv,procps,iproute2,passwd",
    "bookworm",
]
DEPENDENCIES = ["pyzmq", "nvidia-ml-py", "typer", "rich", "prometheus-client", "click"]
FAKE_STATE = "/var/lib/fake-nvml/state"
# The README's steps need these edits to run unattended in a container without network (documented in
# docs/reliability.md): no sudo (we are root), the package from local wheels, and the venv's script path.
_INSTALL_DROPIN = """[Service]
ExecStart=
ExecStart=/opt/envpipe/bin/envpipe-agent --config /etc/envpipe/agent.toml $ENVPIPE_AGENT_ARGS
"""
# Test-only: the fake NVML (no GPU in the container) and its state file, writable under ProtectSystem=strict.
_FAKE_DROPIN = f"""[Service]
Environment=LD_LIBRARY_PATH=/opt/fake-nvml ENVPIPE_FAKE_NVML_STATE={FAKE_STATE} ENVPIPE_FAKE_NVML_GPUS=2
ReadWritePaths=/var/lib/fake-nvml
"""
_HOLDER = """
import os, sys, time
from envpipe_agent.client import AgentClient
client = AgentClient(job_id="harness", rank=0, timeout_s=5)
client.claim(client.hello().gpus[0].uuid)
client.set_clock(int(sys.argv[1]))
print("locked", os.getpid(), flush=True)
time.sleep(600)
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(command: list[str] | str, check: bool = True, timeout_s: float = 600, **kw: Any) -> str:
    result = subprocess.run(
        command, shell=isinstance(command, str), capture_output=True, text=True, timeout=timeout_s, **kw
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{command!r} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


class Container:
    """A booted tree; ``run`` executes a shell command inside it (as root, all namespaces)."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(tree), "-b", "--register=no", "--keep-unit", "--private-network",
             "--console=passive"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self.pid = self._init_pid()
            deadline_s = time.monotonic() + 120
            while time.monotonic() < deadline_s:
                state = self.run("systemctl is-system-running", check=False).strip()
                if state in ("running", "degraded"):
                    return
                time.sleep(0.5)
            raise RuntimeError(f"the container did not boot (state {state!r})")
        except BaseException:
            os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait()
            raise

    def _init_pid(self) -> int:
        deadline_s = time.monotonic() + 30
        while time.monotonic() < deadline_s:
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            for child in children.read_text().split() if children.exists() else []:
                # nspawn forks an intermediate child first; the container's PID 1 runs systemd
                if Path(f"/proc/{child}/comm").read_text(errors="replace").strip() == "systemd":
                    return int(child)
            time.sleep(0.1)
        raise RuntimeError("systemd-nspawn started no container init")

    def run(self, command: str, check: bool = True, timeout_s: float = 300) -> str:
        return sh(["nsenter", "-t", str(self.pid), "-a", "bash", "-c", command], check, timeout_s)

    def popen(self, command: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid), "-a", "bash", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def show(self, *props: str) -> dict[str, str]:
        out = self.run(f"systemctl show envpipe-agent -p {','.join(props)}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> None:
        try:
            self.run("systemctl poweroff", check=False, timeout_s=30)
            self.nspawn.wait(60)
        except (subprocess.TimeoutExpired, RuntimeError):
            os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait()


def prepare_tree(tree: Path) -> None:
    wheels = tree / "opt/envpipe-wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    log("wheels: this checkout and its base dependencies")
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)])
    sh([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(wheels), *DEPENDENCIES])
    fake = tree / "opt/fake-nvml"
    fake.mkdir(parents=True, exist_ok=True)
    sh(["gcc", "-shared", "-fPIC", "-O2", "-o", str(fake / "libnvidia-ml.so.1"),
        str(REPO / "tests/agent/fake_nvml.c")])
    (tree / "var/lib/fake-nvml").mkdir(parents=True, exist_ok=True)
    src = tree / "root/envpipe-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "systemd", src / "systemd")
    shutil.copy(REPO / "tests/agent/fake_nvml.c", src / "fake_nvml.c")
    (tree / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service").unlink(missing_ok=True)


def readme_steps() -> list[str]:
    """The bash block of systemd/README.md, as the harness runs it (see _INSTALL_DROPIN)."""
    text = (REPO / "systemd/README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    if block is None:
        raise RuntimeError("systemd/README.md has no bash block")
    steps = []
    for line in block.group(1).splitlines():
        line = line.split("  #")[0].strip()
        if not line:
            continue
        if line.startswith("pip install envpipe"):
            line = ("python3 -m venv /opt/envpipe && /opt/envpipe/bin/pip install -q --no-index "
                    "--find-links /opt/envpipe-wheels envpipe")
        if "usermod" in line:
            line = "useradd --create-home member && usermod -aG envpipe member"
        if "enable --now" in line:  # the README's ExecStart= drop-in (venv path), and the test's fake NVML
            steps.append("mkdir -p /etc/systemd/system/envpipe-agent.service.d")
            steps.append(f"printf '%s' '{_INSTALL_DROPIN}' > /etc/systemd/system/envpipe-agent.service.d/path.conf")
            steps.append(f"printf '%s' '{_FAKE_DROPIN}' > /etc/systemd/system/envpipe-agent.service.d/fake-nvml.conf")
        steps.append(line.replace("sudo ", ""))
    return steps


def fake_locked(tree: Path, index: int) -> int:
    import struct

    data = (tree / FAKE_STATE.lstrip("/")).read_bytes()
    return struct.unpack_from("<I", data, struct.calcsize("<IIQ") + index * struct.calcsize("<IIIIQQQQQQ"))[0]


def wait(predicate: Any, timeout_s: float) -> float | None:
    start_s = time.monotonic()
    while time.monotonic() - start_s < timeout_s:
        if predicate():
            return time.monotonic() - start_s
        time.sleep(0.02)
    return None


class Holder:
    """A client process in the container holding GPU 0 locked; ``kill`` ends it inside the container (killing
    nsenter would leave it running, and its client would claim the GPU again after an agent restart)."""

    def __init__(self, box: Container, popen: subprocess.Popen, pid: int) -> None:
        self.box, self.popen, self.pid = box, popen, pid

    def kill(self) -> None:
        self.box.run(f"kill -9 {self.pid}", check=False)
        self.popen.wait(10)


def lock_gpu(box: Container, clock_mhz: int = 1200) -> Holder:
    holder = box.popen(f"cd / && exec /opt/envpipe/bin/python -c '{_HOLDER}' {clock_mhz}")
    line = holder.stdout.readline()
    if "locked" not in line:
        holder.kill()
        journal = box.run("journalctl -u envpipe-agent --no-pager -o cat | tail -20", check=False)
        raise RuntimeError(f"the holder could not lock a GPU: {line} {holder.stderr.read()[-1500:]}\n{journal}")
    return Holder(box, holder, int(line.split()[1]))


def checks(box: Container) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tree = box.tree
    state = box.show("ActiveState", "SubState", "NRestarts", "MainPID", "Type")
    out["after_install"] = state
    out["ready"] = state["ActiveState"] == "active" and state["Type"] == "notify"
    out["journal_ready"] = "ready: backend nvml" in box.run("journalctl -u envpipe-agent --no-pager -o cat")
    out["modes"] = box.run("stat -c '%n %U:%G %a' /run/envpipe /run/envpipe/control.sock /run/envpipe/events.sock")
    holder = lock_gpu(box)
    wait(lambda: fake_locked(tree, 0) == 1, 5)  # the agent's GPU worker applies it just after the reply
    out["locked_by_client"] = fake_locked(tree, 0)
    box.run("systemctl stop envpipe-agent")
    out["locked_after_systemctl_stop"] = fake_locked(tree, 0)
    holder.kill()
    box.run("systemctl start envpipe-agent")
    for name, sig in (("sigkill", "SIGKILL"), ("sighup", "SIGHUP")):
        before = int(box.show("NRestarts")["NRestarts"])
        holder = lock_gpu(box)
        wait(lambda: fake_locked(tree, 0) == 1, 5)
        locked = fake_locked(tree, 0)
        pid = box.show("MainPID")["MainPID"]
        start_s = time.monotonic()
        box.run(f"kill -s {sig} {pid}")
        reset_s = wait(lambda: fake_locked(tree, 0) == 0, 30)
        restarted_s = wait(lambda: box.show("NRestarts", "ActiveState") == {
            "NRestarts": str(before + 1), "ActiveState": "active"}, 30)
        holder.kill()
        out[name] = {"locked_before": locked, "reset_after_s": reset_s, "restarted_after_s": restarted_s,
                     "total_s": round(time.monotonic() - start_s, 2),
                     "exit": box.show("ExecMainStatus")["ExecMainStatus"]}
    score = box.run("systemd-analyze security envpipe-agent --no-pager | tail -1", check=False)
    out["security"] = score.strip()
    out["security_exposure"] = float(re.search(r"level for \S+: ([0-9.]+)", score).group(1))
    out["journal_tail"] = box.run("journalctl -u envpipe-agent --no-pager -o cat | tail -25")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="/var/tmp/envpipe-systemd/bookworm", help="Debian tree (reused)")
    parser.add_argument("--mirror", default=None, help="Debian mirror for debootstrap (default: its own)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--hostile", action="store_true", help="also run benchmarks/reliability/hostile.py "
                        "inside the container, as a member of the envpipe group")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        print("error: needs root and systemd-nspawn (apt-get install -y systemd-container debootstrap)")
        return 2
    if Path("/dev/nvidiactl").exists():
        print("error: this machine has NVIDIA GPUs; run the harness where there are none")
        return 2
    base = Path(args.tree)
    if not (base / "usr/bin/python3").exists():
        log(f"debootstrap bookworm into {base} (~4 min)")
        sh([*DEBOOTSTRAP, str(base), *([args.mirror] if args.mirror else [])], timeout_s=1800)
    tree = base.with_name(base.name + "-run")  # a fresh copy each run: the README steps run on a clean system
    shutil.rmtree(tree, ignore_errors=True)
    log(f"copy {base} to {tree}")
    sh(["cp", "-a", "--reflink=auto", str(base), str(tree)])
    prepare_tree(tree)
    log("boot")
    box = Container(tree)
    results: dict[str, Any] = {"systemd": box.run("systemctl --version | head -1").strip()}
    try:
        for step in readme_steps():
            log(f"README step: {step[:110]}")
            box.run(f"cd /root/envpipe-src && {step}")
        results.update(checks(box))
        if args.hostile:
            results["hostile"] = hostile_in_container(box)
    finally:
        log("power off")
        box.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def hostile_in_container(box: Container) -> dict[str, Any]:
    """benchmarks/reliability/hostile.py against the running service, as the group member ``member``."""
    target = box.tree / "opt/hostile"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(REPO / "benchmarks", target / "benchmarks")
    box.run("chmod -R a+rX /opt/hostile")
    out = box.run(
        "cd /opt/hostile && setpriv --reuid member --regid member --init-groups "
        "/opt/envpipe/bin/python -m benchmarks.reliability.hostile --endpoint ipc:///run/envpipe/control.sock "
        "--agent-pid $(systemctl show -p MainPID --value envpipe-agent)",
        timeout_s=600,
    )
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
