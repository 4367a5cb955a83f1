"""The house a newcomer reads: the import graph of qwen3_jax/, data_pipeline/ and launch/ has no
circles (counting imports inside functions), the library's rooms stack on floors with no room
reaching back up, and imports inside functions are only for optional heavy dependencies, each
saying so on its line. Read from the source with `ast`: nothing is imported."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qwen3_jax", "data_pipeline", "launch")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.AST) -> list[str]:
    """The in-tree modules an import statement names (a `from pkg import mod` names pkg.mod)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            keep = len(parts) - node.level + (MODULES[module].name == "__init__.py")
            base = ".".join(parts[:keep] + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def _imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> in-tree modules it imports anywhere, [(module, line, text) of imports inside functions])."""
    graph, inner = defaultdict(set), []
    for module, path in MODULES.items():
        source = path.read_text()
        tree = ast.parse(source)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(t for t in _targets(module, node) if t != module)
                if id(node) not in top:
                    inner.append((module, node.lineno, source.splitlines()[node.lineno - 1]))
    return graph, inner


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _room(module: str) -> str:
    """A room: a top-level library module or subpackage of qwen3_jax, or a whole other package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "qwen3_jax" and len(parts) > 1 else parts[0]


def test_no_import_circles_between_modules():
    graph, _ = _imports()
    assert _cycles(graph) == []


def test_rooms_stack_on_floors():
    """Between rooms (qwen3_jax's modules and subpackages, data_pipeline, launch) no circles either:
    each room only reaches down. launch/ is the top floor; nothing imports it."""
    graph, _ = _imports()
    rooms = defaultdict(set)
    for module, targets in graph.items():
        for t in targets:
            if _room(t) != _room(module):
                rooms[_room(module)].add(_room(t))
    assert _cycles(rooms) == []
    assert not any("launch" in targets for room, targets in rooms.items() if room != "launch")


def test_imports_inside_functions_are_optional_dependencies_and_say_so():
    """An import inside a function says why it waits in a comment on its line; in the library
    (qwen3_jax/) it is for an optional or platform-specific dependency only (`# optional: ...`)."""
    _, inner = _imports()
    bad = [f"{m}:{line}: {text.strip()}" for m, line, text in inner
           if ("optional" not in text if m.startswith("qwen3_jax") else "#" not in text)]
    assert bad == []
    in_tree = [f"{m}:{line}" for m, line, text in inner if m.startswith("qwen3_jax")
               and text.split()[1].split(".")[0] in PACKAGES]
    assert in_tree == []  # our own modules are never imported late
