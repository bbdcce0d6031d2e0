"""The import structure of ``src/vlp`` keeps the layers docs/architecture.md describes.

Every ``import`` in the package is read (module level and inside functions alike), so a
function-level import cannot hide an edge that the layers forbid or a cycle between modules.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vlp"

# Bottom to top. A part may import parts of lower layers only; parts of one layer never
# import each other (models, eval and train are peers: none of them imports another).
LAYERS: list[set[str]] = [
    {"errors"},
    {"config", "cliargs", "htmlpage"},  # htmlpage: what HTML reports share
    {"store"},
    {"tokenizers", "losses", "generate"},
    {"contract", "vocabularies"},  # vocabularies: standard vocabularies found on disk
    {"nn", "data"},
    {"models", "eval", "train"},
    {"factory"},
    {"interop"},
    # pretrained names: hub snapshots converted through interop into vlp's cache; run: a
    # training run, whose towers may start from other checkpoints read through interop
    {"hub", "run"},
    {"vlp"},  # the package's own __init__: the public API (vlp.load, vlp.save, ...)
    {"search"},  # embed parts, faiss indexes, Index: below serve, which answers /v1/search
    {"capfilt", "caption", "serve", "benchmarks", "report"},  # serve: the HTTP API over
    # vlp.eval and the factory; benchmarks: released dataset layouts scored through vlp.eval;
    # report: a run directory's HTML page
    {"recipes"},
    {"cli"},
    {"__main__"},
]
# the edges the architecture names explicitly, checked on their own for a clear message
FORBIDDEN = [("train", "models"), ("models", "train"), ("interop", "train"),
             ("nn", "models"), ("nn", "train"), ("nn", "data"), ("data", "models"),
             ("losses", "models"), ("generate", "models"), ("store", "models"),
             ("store", "train"), ("contract", "models")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The vlp modules `path` imports: ``from pkg import sub`` counts as ``pkg.sub`` when that
    is a module, else as ``pkg``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name == "vlp" or name.startswith("vlp.")}


def _part(module: str) -> str:
    """The layer unit of a module: its first name below vlp."""
    parts = module.split(".")
    return "vlp" if len(parts) == 1 else parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_every_part_has_a_layer(graph):
    known = set().union(*LAYERS)
    unknown = sorted({_part(module) for module in graph} - known)
    assert not unknown, f"parts of src/vlp with no layer in this test: {unknown}"


def test_forbidden_edges(graph):
    found = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
             if (_part(module), _part(target)) in FORBIDDEN]
    assert not found, "imports the architecture forbids:\n" + "\n".join(sorted(found))


def test_parts_import_only_lower_layers(graph):
    layer = {part: index for index, parts in enumerate(LAYERS) for part in parts}
    found = []
    for module, targets in graph.items():
        source = _part(module)
        for target in targets:
            part = _part(target)
            if part != source and layer.get(part, -1) >= layer.get(source, -1):
                found.append(f"{module} -> {target} ({source} is not above {part})")
    assert not found, "imports against the layers:\n" + "\n".join(sorted(found))


def test_no_import_cycle_between_modules(graph):
    """Counting function-level imports: none exists only to break a cycle."""
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        edges[module].update(t for t in targets if t in graph and t != module)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_500_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
