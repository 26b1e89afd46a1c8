"""Layering: the import graph of envpipe/, agent/ and cli/ (imports inside functions and TYPE_CHECKING count).

The rules (docs/architecture.md, "Layers and import rules"): no cycles; the agent at the ground imports
nothing of envpipe or the CLI, nor torch, deepspeed, transformers, typer or rich; envpipe never imports the
CLI; deepspeed only inside envpipe/deepspeed/ (the adapter); torch and transformers only in the training side
(envpipe/deepspeed, envpipe/models, envpipe/data, envpipe/train, envpipe/export.py); the plain-Python core
(IR, schedules, verifier, simulator, planner, controller) imports none of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"envpipe": ROOT / "envpipe", "envpipe_agent": ROOT / "agent", "envpipe_cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def import_graph(*, external: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (functions and TYPE_CHECKING too).

    ``from a.b import c`` points at ``a.b.c`` when that is a module, else at ``a.b`` (its ``__init__`` runs).
    With ``external``: also the top-level names of other packages (``torch``, ``deepspeed``, ...).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                top = target.partition(".")[0]
                if top not in PACKAGES:
                    if external and top:
                        graph[name].add(top)
                    continue
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == [], "import cycles (imports inside functions count)"


def test_the_cycle_finder_finds_cycles_through_function_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def _importers(graph: dict[str, set[str]], names: set[str]) -> dict[str, set[str]]:
    return {module: targets & names for module, targets in graph.items() if targets & names}


def _prefixed(graph: dict[str, set[str]], *prefixes: str) -> dict[str, set[str]]:
    return {m: t for m, t in graph.items() if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_layers_import_only_downwards() -> None:
    graph = import_graph(external=True)
    agent = _prefixed(graph, "envpipe_agent")
    heavy_or_cli = {"torch", "deepspeed", "transformers", "typer", "rich", "envpipe", "envpipe_cli"}
    upward = {m: {t for t in ts if t.partition(".")[0] in heavy_or_cli} for m, ts in agent.items()}
    assert {m: ts for m, ts in upward.items() if ts} == {}, "the agent is the ground layer"
    library = _prefixed(graph, "envpipe")
    assert {m: ts for m, ts in library.items() if any(t.startswith("envpipe_cli") for t in ts)} == {}


def test_deepspeed_only_in_the_adapter() -> None:
    graph = import_graph(external=True)
    outside = {
        m: t for m, t in _importers(graph, {"deepspeed"}).items() if not m.startswith("envpipe.deepspeed")
    }
    assert outside == {}, "DeepSpeed is imported only by envpipe/deepspeed/ (the adapter)"


def test_torch_only_on_the_training_side() -> None:
    training = ("envpipe.deepspeed", "envpipe.models", "envpipe.data", "envpipe.train", "envpipe.export")
    graph = import_graph(external=True)
    users = _importers(graph, {"torch", "transformers", "safetensors"})
    assert {m for m in users if not any(m == p or m.startswith(p + ".") for p in training)} == set()


def test_deepspeed_private_attributes_only_in_the_adapter() -> None:
    """No code outside envpipe/deepspeed/ reads a private attribute that DeepSpeed's pipeline classes set."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("deepspeed")
    if spec is None or spec.origin is None:
        pytest.skip("deepspeed is not installed (the train extra)")
    source = Path(spec.origin).parent / "runtime"
    private: set[str] = set()
    for rel in ("pipe/module.py", "pipe/engine.py", "engine.py", "pipe/topology.py"):
        private |= set(re.findall(r"self\.(_[A-Za-z]\w*)\s*=", (source / rel).read_text()))
    assert "_local_start" in private and "_topo" in private  # the scan reads DeepSpeed's own attributes
    found = []
    for folder in PACKAGES.values():
        for path in folder.rglob("*.py"):
            if path.is_relative_to(ROOT / "envpipe" / "deepspeed"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                owner = (
                    node.value.id
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    else ""
                )
                if isinstance(node, ast.Attribute) and node.attr in private and owner not in ("self", "cls"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert found == [], "DeepSpeed internals belong in envpipe/deepspeed/ (the adapter)"
