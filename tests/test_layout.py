"""The shape of the source tree: the static import graph of src/byol has no cycle, and no file
refers to documents that are not in the repository."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _modules() -> dict[str, Path]:
    """Every module of the byol package: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for path in sorted((SRC / "byol").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, name: str, is_package: bool, modules: dict) -> list[str]:
    """The byol modules one import statement of module ``name`` depends on."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "byol" or a.name.startswith("byol.")]
    if node.level:  # relative: resolved against the importing module's package
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base != "byol" and not base.startswith("byol."):
        return []
    # `from byol.x import y`: the module byol.x.y when there is one, else the names of byol.x
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {module it imports: where (file:line)}, for every import, also inside functions."""
    modules = _modules()
    graph: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, name, path.name == "__init__.py", modules):
                    if target != name and target in modules:
                        edges.setdefault(target, f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    component of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, dict[str, str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    return paths[node] + [start]
                if child in component and child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"not a strongly connected component: {component}")  # a bug in this test


def _describe(graph: dict[str, dict[str, str]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def _deps(source: str, name: str, is_package: bool = False) -> list[str]:
    modules = {"byol", "byol.x", "byol.x.y", "byol.z"}
    return [t for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
            for t in _imported(node, name, is_package, modules)]


def test_the_graph_sees_every_kind_of_import():
    assert _deps("import byol.x\nimport os", "byol.z") == ["byol.x"]  # a package: its __init__
    assert _deps("from byol.x import y, f", "byol.z") == ["byol.x.y", "byol.x"]  # module, names
    assert _deps("def g():\n    from byol import z", "byol.x.y") == ["byol.z"]  # lazy, inside a function
    assert _deps("from . import f", "byol.x.y") == ["byol.x"]  # its own package's __init__ names
    assert _deps("from .y import f", "byol.x", is_package=True) == ["byol.x.y"]
    assert _deps("from ..z import f", "byol.x.y") == ["byol.z"]
    graph = import_graph()
    assert "byol.config.sections" in graph["byol.config"]  # a package's __init__ re-exports
    assert "byol.train.checkpoint" in graph["byol.config.resume"]  # imported inside resumed_config
    # a cycle is found and reported with where each import is
    toy = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:9"}, "c": {"a": "c.py:30"}, "d": {"a": "d.py:2"}}
    assert find_cycles(toy) == [["a", "b", "c", "a"]]
    assert _describe(toy, ["a", "b", "c", "a"]) == "a (a.py:1) -> b (b.py:9) -> c (c.py:30) -> a"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


STALE = ("PAPER" + ".md", "DESIGN" + ".md", "STYLE" + ".md")  # split: this file must not match itself


BUILT = ("__pycache__", ".pytest_cache")  # and *.egg-info: outputs of a build, not the repository's


def _repository_texts():
    """Every text file of src, tests, benchmarks, docs and configs, and README.md."""
    paths = [p for top in ("src", "tests", "benchmarks", "docs", "configs") for p in sorted((ROOT / top).rglob("*"))]
    for path in [*paths, ROOT / "README.md"]:
        rel = path.relative_to(ROOT).parts
        if not path.is_file() or any(part in BUILT or part.endswith(".egg-info") for part in rel):
            continue
        data = path.read_bytes()
        if b"\0" not in data[:8192]:  # images and other binaries have NUL bytes
            yield path, data.decode("utf-8", errors="replace")


def test_no_file_refers_to_documents_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{i}: {name}"
             for path, text in _repository_texts()
             for i, line in enumerate(text.splitlines(), 1)
             for name in STALE if name in line]
    assert not found, "references to missing documents (cite docs/method.md §N):\n" + "\n".join(found)
