"""The shape of the code: the import graph of the four packages has no circles and runs one way
(``tasks`` ← ``actors`` ← ``serve`` ← ``cluster``, as docs say), and the serve benchmark's
package and ``serve/`` keep their rooms small.

The graph is read from the source with ``ast`` (nothing is imported), and it counts every import
statement, also those inside functions: a lazy import hides a circle from Python at import time,
not from the reader who has to hold both modules in mind. Imports under
``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("tasks", "actors", "serve", "cluster")  # each may import only those before it
BENCH_PACKAGE = ROOT / "benchmarks" / "serve_bench"
BENCH_MAX_LINES = 400
SERVE_MAX_LINES = 500  # the ingress is split by route family (serve/routes/) to stay under it


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(packages: tuple[str, ...] = LAYERS) -> dict[str, Path]:
    """Every module of ``packages`` (folders under the checkout), by dotted name."""
    return {
        _module_name(path): path
        for package in packages
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports, at any depth of its code: for
    ``from a.b import c`` both ``a.b`` and ``a.b.c`` (``c`` may be a module)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: anchored at this module's package
                package = module.split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph(packages: tuple[str, ...] = LAYERS) -> dict[str, dict[str, int]]:
    """module → {module of ``packages`` it imports: the first line that does}."""
    modules = _modules(packages)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for target, line in _imported_names(name, path):
            while target and target not in modules:  # a.b.some_function → a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].setdefault(target, line)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    edges = [
        f"{a} → {b} (line {line})"
        for a in component
        for b, line in sorted(graph[a].items())
        if b in inside
    ]
    return "; ".join(edges)


def test_the_walker_sees_the_imports_it_must():
    """The checks below are only as good as the graph: lazy and top-level imports both count."""
    graph = import_graph()
    assert "cluster.jobs" in graph["cluster.cli"]  # inside build_parser
    assert "actors.vlm" in graph["actors.modeling"]  # inside build_model
    assert "tasks" in graph["actors.bundle"]  # `from tasks import Task`
    assert len(graph) > 50
    assert "serve.routes.openai" in graph["serve.routes.multimodal"]
    assert "serve.ingress" in graph["serve.app"]
    bench = import_graph(("benchmarks/serve_bench",))
    assert "benchmarks.serve_bench.load" in bench["benchmarks.serve_bench.classifier"]  # relative


@pytest.mark.parametrize(
    "packages", [LAYERS, ("benchmarks/serve_bench",)], ids=["project", "bench"]
)
def test_no_import_circles(packages):
    graph = import_graph(packages)
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(_describe(c, graph) for c in found)


def test_imports_go_one_way():
    """``tasks`` ← ``actors`` ← ``serve`` ← ``cluster``: nothing imports a layer above its own."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{a} → {b} (line {line})"
        for a, targets in import_graph().items()
        for b, line in targets.items()
        if rank[b.split(".")[0]] > rank[a.split(".")[0]]
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("tasks", ("ray", "torch")),  # pure Python: row schemas, encoders, decoders, metrics
        ("serve", ("actors.train_loop", "cluster.train")),  # serving never pulls in training
    ],
)
def test_what_a_layer_never_imports(package, forbidden):
    hits = [
        f"{name}:{line} imports {target}"
        for name, path in _modules().items()
        if name.split(".")[0] == package
        for target, line in _imported_names(name, path)
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("path", sorted(BENCH_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_serve_benchmark_rooms_are_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= BENCH_MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "serve").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_serve_rooms_are_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= SERVE_MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines"
