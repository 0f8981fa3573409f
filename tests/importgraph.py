"""The import graph of the zblock package, read from its source with ast (nothing is imported).

    python tests/importgraph.py          # one "module -> imports" line per module

Every import of a zblock module counts: at module level, and inside functions (marked "lazy",
imported when the function first runs). `from . import PAGE_SIZE` is an import of the package
itself (`zblock`, its __init__). tests/test_layers.py checks the graph; this prints it.
"""

from __future__ import annotations

import ast
import os
import sys

PACKAGE = "zblock"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def modules() -> dict[str, str]:
    """Module name -> source path, for every .py file of the package and its subpackages (C
    extensions by their .c)."""
    out = {}
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(x for x in dirs if os.path.exists(os.path.join(d, x, "__init__.py")))
        rel = os.path.relpath(d, ROOT)
        pkg = ".".join([PACKAGE] + ([] if rel == "." else rel.split(os.sep)))
        for name in sorted(files):
            base, ext = os.path.splitext(name)
            if ext in (".py", ".c"):
                out[pkg if base == "__init__" else f"{pkg}.{base}"] = os.path.join(d, name)
    return out


def _package_of(name: str, path: str) -> str:
    """The package a module's relative imports start from."""
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def _targets(node: ast.AST, known: set[str], package: str = PACKAGE) -> list[str]:
    """The zblock modules one import statement loads (relative ones from `package`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        parts = package.split(".")
        if node.level > len(parts):
            raise ValueError(f"relative import beyond the package: level {node.level}")
        base = ".".join(parts[:len(parts) - node.level + 1]) + (f".{node.module}" if node.module else "")
    elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
        base = node.module
    else:
        return []
    # `from zblock import cli` loads zblock.cli; `from zblock import PAGE_SIZE` loads zblock only
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return subs + ([base] if len(subs) < len(node.names) else [])


class _Collector(ast.NodeVisitor):
    def __init__(self, known: set[str], package: str):
        self.known = known
        self.package = package
        self.depth = 0                  # > 0 inside a function body
        self.edges: dict[str, bool] = {}    # target -> lazy (only function-level imports)

    def _add(self, node: ast.AST) -> None:
        for t in _targets(node, self.known, self.package):
            lazy = self.depth > 0
            self.edges[t] = self.edges.get(t, True) and lazy

    visit_Import = visit_ImportFrom = _add

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def graph() -> dict[str, dict[str, bool]]:
    """module -> {imported zblock module: lazy}; a C extension imports nothing here."""
    mods = modules()
    known = set(mods)
    out = {}
    for name, path in mods.items():
        if not path.endswith(".py"):
            out[name] = {}
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        c = _Collector(known, _package_of(name, path))
        c.visit(tree)
        out[name] = {t: lazy for t, lazy in sorted(c.edges.items()) if t != name}
    return out


def cycles(g: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where it was entered)."""
    found, state = [], {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in g.get(m, {}):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in g:
        if m not in state:
            visit(m)
    return found


def main() -> int:
    g = graph()
    for m, edges in g.items():
        now = ", ".join(t for t, lazy in edges.items() if not lazy) or "-"
        lazy = ", ".join(t for t, lazy in edges.items() if lazy)
        print(f"{m} -> {now}" + (f"  (lazy: {lazy})" if lazy else ""))
    found = cycles(g)
    for c in found:
        print("cycle: " + " -> ".join(c))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
