"""Run the commands of docs/multinode.md on emulated nodes: ``python -m benchmarks.multinode.docs_check``.

Every fenced ``bash`` block that follows a ``<!-- run: node0 node1 -->`` comment is run, in document order,
with ``bash -euo pipefail`` on each node named (on several nodes at once: launchers must meet), in one
scratch folder shared by the nodes, with ``NODE_RANK`` set to the node's index. A block fails the check
when any of its shells exits non-zero; the check prints each block's nodes, exit codes and time.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from benchmarks.multinode.nodes import REPO, Cluster, unavailable_reason

_BLOCK = re.compile(r"<!-- run: ([\w ]+?) -->\s*```bash\n(.*?)```", re.DOTALL)


def blocks(markdown: str) -> list[tuple[list[str], str]]:
    """``(node names, script)`` of every block marked to run, in order."""
    return [(names.split(), body) for names, body in _BLOCK.findall(markdown)]


def check(doc: Path, timeout_s: float = 300.0, tail_lines: int = 8) -> int:
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    todo = blocks(doc.read_text())
    failures = 0
    with Cluster(2) as cluster:
        scratch = cluster.workdir / "scratch"
        scratch.mkdir()
        nodes = {node.name: node for node in cluster.nodes}
        for number, (names, script) in enumerate(todo, 1):
            began = time.monotonic()
            logs = [cluster.workdir / f"block{number}-{name}.log" for name in names]
            shells = [
                nodes[name].popen(
                    ["bash", "-euo", "pipefail", "-c", script],
                    env={"NODE_RANK": str(nodes[name].index)},
                    log=log,
                    cwd=scratch,
                )
                for name, log in zip(names, logs)
            ]
            codes = []
            for shell in shells:
                try:
                    codes.append(shell.wait(max(0.1, timeout_s - (time.monotonic() - began))))
                except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                    codes.append(None)
            first = script.strip().splitlines()[0][:70]
            print(
                f"block {number} on {' '.join(names)}: exit {codes} "
                f"in {time.monotonic() - began:.1f} s  ({first})"
            )
            failures += any(codes)
            for name, log in zip(names, logs):
                lines = log.read_text(errors="replace").splitlines()
                print(f"--- {name}:", *lines[-(60 if any(codes) else tail_lines) :], sep="\n    ")
    print(f"{len(todo) - failures} of {len(todo)} blocks passed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multinode.docs_check")
    parser.add_argument("doc", nargs="?", type=Path, default=REPO / "docs" / "multinode.md")
    parser.add_argument("--tail", type=int, default=8, help="output lines shown per node and block")
    args = parser.parse_args(argv)
    return check(args.doc, tail_lines=args.tail)


if __name__ == "__main__":
    sys.exit(main())
