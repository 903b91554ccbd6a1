#!/usr/bin/env python3
"""Report the import structure of src/lorafit: imports inside functions, and import loops.

    python scripts/import_report.py            # counts and loops
    python scripts/import_report.py -v         # also every in-function import (module:line)
    python scripts/import_report.py OLD/src/lorafit   # another tree (an old release)

A loop is a strongly connected set of modules in the graph of ALL imports (module top and inside
functions: an import inside a function is still a dependency, it only hides from a reader), and
the same for the package's parts (each sub-package, each module at its root, and its __init__).
Enforcement is `lint-imports` (the contracts in pyproject.toml) and tests/test_structure.py; this
script gives the numbers and names behind them.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def targets(mod: str, node: ast.AST, is_pkg: bool, known) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = mod.split(".")[: len(mod.split(".")) - (0 if is_pkg else 1)]
            base = base[: len(base) - (node.level - 1)]
            tgt = ".".join(base + ([node.module] if node.module else []))
        else:
            tgt = node.module or ""
        return [f"{tgt}.{a.name}" if f"{tgt}.{a.name}" in known else tgt for a in node.names]
    return [a.name for a in node.names]


def _visit(node, in_func, m, is_pkg, mods, edges, inner) -> None:
    """Record the imports under ``node`` of module ``m``: edges to lorafit modules, and those in functions."""
    for child in ast.iter_child_nodes(node):
        func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for t in targets(m, child, is_pkg, mods):
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    edges[m].add(t)
            if in_func:
                inner.append((m, child.lineno, ast.unparse(child)))
        _visit(child, func, m, is_pkg, mods, edges, inner)


def scan(root: Path):
    mods = modules(root)
    pkg = root.name
    edges = {m: set() for m in mods}
    inner = []
    for m, path in mods.items():
        _visit(ast.parse(path.read_text(), str(path)), False, m, path.name == "__init__.py", mods, edges, inner)
    return pkg, mods, edges, inner


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("-")]
    root = Path(args[0] if args else Path(__file__).resolve().parents[1] / "src" / "lorafit")
    pkg, mods, edges, inner = scan(root)
    internal = [x for x in inner if x[2].split()[1].startswith((pkg, "."))]
    external = collections.Counter(x[2].split()[1].lstrip(".").split(".")[0] for x in inner if x not in internal)
    print(f"{len(mods)} modules; imports inside functions: {len(inner)} "
          f"({len(internal)} of {pkg} itself, {len(inner) - len(internal)} of other packages)")
    print("  other packages imported inside functions: " + ", ".join(f"{k} {v}" for k, v in external.most_common()))
    if "-v" in argv:
        for m, line, text in inner:
            print(f"    {m}:{line}  {text}")
    module_loops = loops(edges)
    print(f"module import loops: {len(module_loops)}")
    for comp in module_loops:
        print("  " + " <-> ".join(comp))

    def folder(m: str) -> str:
        """A sub-package, or a module at the package root (each its own unit), or the package face."""
        parts = m.split(".")
        return parts[1] if len(parts) > 1 else f"{pkg} (__init__)"

    fgraph: dict[str, set[str]] = collections.defaultdict(set)
    for a, bs in edges.items():
        for b in bs:
            if folder(a) != folder(b):
                fgraph[folder(a)].add(folder(b))
                fgraph.setdefault(folder(b), set())
    folder_loops = loops(dict(fgraph))
    print(f"part import loops: {len(folder_loops)}")
    for comp in folder_loops:
        print("  " + " <-> ".join(comp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
