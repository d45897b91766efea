"""No import circle anywhere in the installed package (`ddeseg`, `ddeseg.pipelines`, `ddeseg.cli`).

A circle hides in a function-level import as easily as at module level (the import runs later,
but the two modules still cannot be understood, tested or moved apart), so every import counts:
module level and inside functions, absolute and relative. An edge goes to the module that is
named (`from ddeseg.data import shards` -> `ddeseg.data.shards`; `from ddeseg.config import
Config` -> `ddeseg.config`); the implicit import of parent packages is not an edge, so a
package's `__init__` may re-export its children.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed names of the three top-level folders (pyproject.toml's package-dir).
PACKAGES = {"ddeseg": ROOT / "ddeseg", "ddeseg.pipelines": ROOT / "pipelines", "ddeseg.cli": ROOT / "cli"}


def module_files() -> dict[str, Path]:
    """Installed module name -> file, for every .py of the three packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that `module` (at `path`) names in any import statement."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from X import a`: the submodule X.a when it is one, else X itself.
            names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        else:
            continue
        for name in names:
            # `import ddeseg.data.shards as s` and `from ddeseg.data.shards.x import` alike: the
            # longest project module the dotted name starts with.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {module: _imports(module, path, known) for module, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
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
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    found.append(sorted(component))
    return sorted(found)


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "circle: " + ", ".join(component) + "\n    " + "\n    ".join(edges)


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 60  # the walk found the package
    found = circles(graph)
    assert not found, "\n".join(describe(c, graph) for c in found)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
    ],
)
def test_the_circle_finder_finds_circles(graph, expected):
    assert circles(graph) == expected


def test_function_level_and_relative_imports_are_edges(tmp_path):
    (tmp_path / "x.py").write_text("def f():\n    from .y import g\n")
    known = {"pkg.x", "pkg.y"}
    assert _imports("pkg.x", tmp_path / "x.py", known) == {"pkg.y"}


def test_no_two_modules_share_a_file_name():
    """One name, one module: `predict.py` means one thing. The one allowed pair is a command's
    `cli/X.py` and its stage `pipelines/X.py` (`ddeseg X` reads the one, then runs the other)."""
    by_name: dict[str, list[str]] = {}
    for module, path in module_files().items():
        if path.name not in {"__init__.py", "__main__.py"}:
            by_name.setdefault(path.name, []).append(module)
    clashes = []
    for name, modules in sorted(by_name.items()):
        rest = sorted(modules)
        stem = name.removesuffix(".py")
        pair = {f"ddeseg.cli.{stem}", f"ddeseg.pipelines.{stem}"}
        if len(rest) == 2 and set(rest) == pair:
            continue
        if len(rest) > 1:
            clashes.append(f"{name}: {', '.join(rest)}")
    assert not clashes, "\n".join(clashes)
