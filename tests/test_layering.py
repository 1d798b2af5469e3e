"""The layers of docs/design.md §3 hold in the code: imports only go down (or stay in a
layer), form no cycle, and nothing in jest_jax imports the experiment configs."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jest_jax")


def design_layers() -> dict[str, int]:
    """Module (relative to jest_jax, "data.sources") → layer, from docs/design.md."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        block = re.search(r"```layers\n(.*?)```", f.read(), re.S).group(1)
    layers, rank = {}, None
    for line in block.strip().splitlines():
        if line[:1].isspace():  # continues the layer above
            names = line.split()
        else:
            first, _, rest = line.partition(" ")
            rank, names = int(first), rest.partition(":")[2].split()
        for module in names:
            layers[module] = rank
    return layers


def package_modules() -> dict[str, str]:
    """Module name → file, for every module of jest_jax (packages by their __init__)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, name), PACKAGE)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:  # jest_jax/__init__.py itself only states the version
                out[".".join(parts)] = os.path.join(folder, name)
    return out


def imports_of(path: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(jest_jax modules, other top-level packages) that the file imports, at any depth
    (imports inside functions count: a lazy import is still a dependency)."""
    tree = ast.parse(open(path).read())
    ours, others = set(), set()

    def add(name: str) -> None:
        if name == "jest_jax":
            return
        if name.startswith("jest_jax."):
            ours.add(name[len("jest_jax."):])
        else:
            others.add(name.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            add(node.module)
            for alias in node.names:  # `from jest_jax.data import sources`: a module
                sub = f"{node.module}.{alias.name}"
                if sub.startswith("jest_jax.") and sub[len("jest_jax."):] in known:
                    ours.add(sub[len("jest_jax."):])
    return ours, others


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    if module in layers:
        return layers[module]
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        wildcard = ".".join(parts[:i]) + ".*"
        if wildcard in layers:
            return layers[wildcard]
    return None


def violations(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import that goes up a layer, every module without a layer, every cycle."""
    found = [f"{m}: in no layer of docs/design.md" for m in graph if layer_of(m, layers) is None]
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            low, high = layer_of(module, layers), layer_of(dep, layers)
            if low is not None and high is not None and high > low:
                found.append(f"{module} (layer {low}) imports {dep} (layer {high})")
    state: dict[str, int] = {}  # 1: on the DFS path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                found.append("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, set(modules))[0] for name, path in modules.items()}


def test_imports_follow_the_layers_of_the_design(graph):
    assert violations(graph, design_layers()) == []


def test_every_layer_entry_is_a_module():
    modules = set(package_modules())
    for entry in design_layers():
        if entry.endswith(".*"):
            assert any(m.startswith(entry[:-1]) for m in modules), entry
        else:
            assert entry in modules, f"docs/design.md names {entry!r}, which does not exist"


def test_kernels_import_only_the_foundation(graph):
    layers = design_layers()
    for leaf in ("losses", "criteria", "selection"):
        assert all(layer_of(d, layers) < layer_of(leaf, layers) for d in graph[leaf]), leaf
    assert graph["losses"] <= {"fields"} and graph["criteria"] <= {"fields", "registry"}
    assert graph["selection"] <= {"criteria", "losses"}


def test_nothing_in_the_package_imports_the_experiment_configs():
    modules = package_modules()
    for name, path in modules.items():
        assert "configs" not in imports_of(path, set(modules))[1], name


def test_the_checker_finds_what_it_forbids():
    """An upward import, a module in no layer and a cycle are each reported."""
    layers = {"a": 0, "b": 1, "c": 1}
    assert violations({"a": {"b"}, "b": set()}, layers) == ["a (layer 0) imports b (layer 1)"]
    assert violations({"z": set()}, layers) == ["z: in no layer of docs/design.md"]
    assert violations({"b": {"c"}, "c": {"b"}}, layers) == ["import cycle: b -> c -> b"]
    assert violations({"b": {"a"}, "c": {"b", "a"}, "a": set()}, layers) == []
