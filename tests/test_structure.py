"""The house stays easy to change: no import cycle (even among imports only for the type
checker), small modules where the pool's logic lives, short functions, and no backend named
outside backends/ (they declare what they can do)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sandbox_actors", "backends")
SERVER = ROOT / "sandbox_actors" / "image" / "server.py"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def module_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours ``name`` imports at module level, those imported only for the type
    checker included (imports inside functions are how a cycle is broken at run time)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in tree.body + [n for top in tree.body if isinstance(top, ast.If) for n in top.body]:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_cycle_even_among_type_checking_imports():
    known = modules()
    graph = {name: module_imports(name, path, set(known)) for name, path in known.items()}
    # A package's __init__ that re-exports its modules is not a cycle with them.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_pool_s_modules_stay_small():
    lines = {name: len((ROOT / "sandbox_actors" / name).read_text().splitlines()) for name in ("pool.py", "fleet.py")}
    assert lines["pool.py"] <= 300 and lines["fleet.py"] <= 350, lines


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                limit = 80 if path == SERVER else 60  # the image's request handlers may be longer
                if size > limit:
                    long.append(f"{name}.{node.name}: {size} lines")
    assert not long, long


def test_no_backend_is_named_outside_backends():
    named = []
    for path in (ROOT / "sandbox_actors").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""backend\.kind\s*[!=]=|[!=]=\s*["'](docker|provisioner)["']|["'](docker|provisioner)["']\s*[!=]=""",
                         line):
                named.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not named, named
