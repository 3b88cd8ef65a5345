"""The shape of the code: the import graph of the project's own modules, its cycles, the longest functions.

    .venv/bin/python benchmarks/code_shape.py            # drope_ops and workflows
    .venv/bin/python benchmarks/code_shape.py drope_ops  # one package

(a) Every import of a project module, wherever it stands (top level, inside a function, under
TYPE_CHECKING), read with `ast`, is an edge; imports inside a function are marked `*` (lazy) and
still count: a lazy import hides a cycle from Python's import machinery, not from the design. An
edge goes to the module named (`from drope_ops import storage` -> drope_ops.storage), not to the
parent packages Python also initialises on the way. Cycles are the strongly connected components of
more than one module; one closed path is printed for each.
(b) The 15 longest functions and methods (decorators included), with file:line.

Exit status 1 when the graph has a cycle, else 0. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("drope_ops", "workflows")
TOP_FUNCTIONS = 15


def module_files(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The project module `name` refers to: itself, or its longest prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _lazy_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes that stand inside a function body."""
    lazy = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return lazy


def imports_of(module: str, path: Path, modules: dict) -> dict[str, bool]:
    """Project modules `module` imports -> True when every such import is lazy (inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = _lazy_nodes(tree)
    is_pkg = path.name == "__init__.py"
    edges: dict[str, bool] = {}

    def add(target: str | None, node) -> None:
        if target is not None and target != module:  # a package importing its own names is no edge
            edges[target] = edges.get(target, True) and id(node) in lazy

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, modules), node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package upwards
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import submodule` names the submodule
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else _resolve(source, modules), node)
    return edges


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in discovery order, each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def cycle_path(graph: dict[str, dict], comp: list[str]) -> list[str]:
    """One closed path through a component: start -> ... -> start (breadth-first, shortest)."""
    members, start = set(comp), comp[0]
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if child in members and child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    return comp


def longest_functions(modules: dict[str, Path], root: Path, top: int) -> list[tuple[int, str, str]]:
    rows = []
    for path in sorted(set(modules.values())):
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    name = f"{prefix}{child.name}"
                    rows.append((child.end_lineno - first + 1, name, f"{path.relative_to(root)}:{child.lineno}"))
                    visit(child, f"{name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(tree, "")
    rows.sort(key=lambda r: (-r[0], r[2]))
    return rows[:top]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("packages", nargs="*", default=list(PACKAGES), help="top-level packages (default: %(default)s)")
    p.add_argument("--top", type=int, default=TOP_FUNCTIONS, help="how many of the longest functions")
    args = p.parse_args(argv)
    modules = module_files(ROOT, args.packages)
    graph = {m: imports_of(m, path, modules) for m, path in modules.items()}

    n_edges = sum(len(e) for e in graph.values())
    n_lazy = sum(lazy for e in graph.values() for lazy in e.values())
    print(f"import graph: {len(modules)} modules, {n_edges} edges ({n_lazy} only inside functions, marked *)")
    width = max(map(len, modules))
    for m in sorted(graph):
        targets = ", ".join(t + ("*" if lazy else "") for t, lazy in sorted(graph[m].items()))
        print(f"  {m:<{width}} -> {targets or '-'}")

    cycles = strongly_connected(graph)
    print()
    if cycles:
        print(f"CYCLES: {len(cycles)}")
        for comp in cycles:
            print(f"  {len(comp)} modules {{{', '.join(comp)}}}: {' -> '.join(cycle_path(graph, comp))}")
    else:
        print("cycles: none (the import graph is a DAG)")

    print()
    print(f"longest functions (top {args.top}):")
    for lines, name, where in longest_functions(modules, ROOT, args.top):
        print(f"  {lines:5d} lines  {name:<45} {where}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
