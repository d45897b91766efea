"""The library (`ddeseg/`) never imports the preprocessing stages or the command line.

Installed, `pipelines/` is `ddeseg.pipelines` and `cli/` is `ddeseg.cli` (see pyproject.toml), so
an import of either from a library module would make the two layers depend on each other. Every
import is checked: module level and inside functions, absolute and relative (resolved against
the importing module's package), and the top-level names `pipelines` / `cli` too (what a
checkout on `sys.path` would offer).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "ddeseg"
FORBIDDEN = ("ddeseg.pipelines", "ddeseg.cli", "pipelines", "cli")

# `python -m ddeseg` runs the command line: the one library file whose job is to import it.
ALLOWED = {"__main__.py"}


def _module_name(path: Path) -> str:
    parts = ["ddeseg", *path.relative_to(LIBRARY).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved; for
    `from X import a` both `X` and `X.a` are listed (`a` may be a submodule)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def forbidden_imports(path: Path) -> list[str]:
    return [
        f"{path.relative_to(LIBRARY.parent)}:{line}: imports {name}"
        for line, name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    ]


def library_files() -> list[Path]:
    return sorted(p for p in LIBRARY.rglob("*.py") if p.relative_to(LIBRARY).as_posix() not in ALLOWED)


def test_the_library_imports_neither_pipelines_nor_cli():
    files = library_files()
    assert len(files) > 20  # the walk found the library
    problems = [problem for path in files for problem in forbidden_imports(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import ddeseg.pipelines",
        "def f():\n    from ddeseg.pipelines.shard_writer import write_tar\n",
        "def f():\n    import ddeseg.cli.app as app\n",
        "from ddeseg import pipelines",
        "from .. import cli",  # from ddeseg/data/x.py
        "from ..pipelines import records",
        "import pipelines.records",
        "class A:\n    def m(self):\n        from cli import app\n",
    ],
)
def test_the_check_sees_every_spelling(source, tmp_path, monkeypatch):
    """The walker itself: each spelling of a forbidden import, at any depth, is caught."""
    fake_library = tmp_path / "ddeseg"
    (fake_library / "data").mkdir(parents=True)
    path = fake_library / "data" / "x.py"
    path.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "LIBRARY", fake_library)
    assert forbidden_imports(path), source


def test_allowed_imports_pass(tmp_path, monkeypatch):
    fake_library = tmp_path / "ddeseg"
    (fake_library / "data").mkdir(parents=True)
    path = fake_library / "data" / "x.py"
    path.write_text("from . import schema\nfrom ..models import frontend\nimport ddeseg.classes\nfrom ddeseg import audio\n")
    monkeypatch.setattr(sys.modules[__name__], "LIBRARY", fake_library)
    assert forbidden_imports(path) == []
