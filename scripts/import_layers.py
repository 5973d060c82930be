"""The import picture of `unimm`: which modules import which, and where that runs against the floors.

UniMM is built in floors (docs/DESIGN.md, "Layers"): a module may import its own floor and the floors below it,
never one above. This script lists every `unimm.*` import of every module (module-level and inside functions:
a lazy import is still a dependency; imports under `if TYPE_CHECKING:` are left out, they never run), then prints
the imports that run upward and the import cycles between modules, with their counts.

    python scripts/import_layers.py            # counts, then each upward import and each cycle
    python scripts/import_layers.py --quiet    # counts only

Exit status 1 when there is an upward import or a cycle. `tests/test_layers.py` asserts the same through
`import_picture()`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "unimm"
# Bottom to top. A module belongs to the floor named by its first component below `unimm` (`unimm.data.images` is on
# `data`); `unimm/__init__.py` and `unimm/testing.py` sit above every floor (they may import anything, nothing in a
# floor imports them). Floors of equal height may not import each other.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("utils", "testing"),
    ("tokenizer",),
    ("llm",),
    ("data",),
    ("train",),
    ("inference",),
    ("eval",),
    ("demo",),
    ("cli",),
)
_HEIGHT = {name: height for height, names in enumerate(FLOORS) for name in names}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({module_path(self.source)}:{self.line})"


def module_path(module: str, root: Path | None = None) -> str:
    root = root or _repo_root()
    path = root.joinpath(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(root))


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def discover_modules(root: Path) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Import statements anywhere in `tree`, skipping the bodies of `if TYPE_CHECKING:` (its `else:` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(root: Path) -> list[Edge]:
    """Every `unimm.*` import of every module as an edge to the module it names (for `from pkg import name`, the
    submodule `pkg.name` when there is one, else `pkg`)."""
    modules = discover_modules(root)
    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules and "." in target:  # `import unimm.x.y.attr` forms
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != module and target.split(".")[0] == PACKAGE:
                    edges.add(Edge(module, target, node.lineno))
    return sorted(edges, key=lambda e: (e.source, e.target, e.line))


def floor_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in _HEIGHT else None


def upward_imports(edges: Iterable[Edge]) -> list[Edge]:
    """Edges from a floor to a floor above it (or to another floor of the same height)."""
    found = []
    for edge in edges:
        source, target = floor_of(edge.source), floor_of(edge.target)
        if source is None or target is None or source == target:
            if source is not None and target is None:  # a floor importing `unimm` itself or `unimm.testing`
                found.append(edge)
            continue
        if _HEIGHT[target] >= _HEIGHT[source]:
            found.append(edge)
    return found


def import_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """The strongly connected groups of two or more modules in the import graph (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def cycle_path(group: list[str], edges: Iterable[Edge]) -> list[Edge]:
    """One closed walk through a cycle group, as the edges that make it (for the message)."""
    inside = set(group)
    by_source: dict[str, list[Edge]] = {}
    for edge in edges:
        if edge.source in inside and edge.target in inside:
            by_source.setdefault(edge.source, []).append(edge)
    start = group[0]
    # breadth-first from each successor of `start` back to `start`
    for first in by_source.get(start, []):
        previous: dict[str, Edge] = {}
        frontier = [first.target]
        seen = {first.target}
        while frontier:
            following = []
            for node in frontier:
                for edge in by_source.get(node, []):
                    if edge.target == start:
                        walk = [edge]
                        while walk[0].source != first.target:
                            walk.insert(0, previous[walk[0].source])
                        return [first] + walk if first.target != start else [first]
                    if edge.target not in seen:
                        seen.add(edge.target)
                        previous[edge.target] = edge
                        following.append(edge.target)
            frontier = following
    return []


@dataclass
class ImportPicture:
    edges: list[Edge]
    upward: list[Edge]
    cycles: list[list[str]]

    def report(self, quiet: bool = False) -> str:
        lines = [f"{len(self.edges)} imports between unimm modules; {len(self.upward)} upward imports; "
                 f"{len(self.cycles)} import cycles"]
        if not quiet:
            lines += [f"upward: {edge}" for edge in self.upward]
            for group in self.cycles:
                walk = cycle_path(group, self.edges)
                lines.append(f"cycle of {len(group)} modules: " + "; ".join(str(edge) for edge in walk))
        return "\n".join(lines)


def import_picture(root: Path | None = None) -> ImportPicture:
    edges = import_edges(root or _repo_root())
    return ImportPicture(edges, upward_imports(edges), import_cycles(edges))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=_repo_root(), help="the repository root (holds unimm/)")
    parser.add_argument("--quiet", action="store_true", help="print the counts only")
    args = parser.parse_args(argv)
    picture = import_picture(args.root)
    print(picture.report(args.quiet))
    return 1 if picture.upward or picture.cycles else 0


if __name__ == "__main__":
    sys.exit(main())
