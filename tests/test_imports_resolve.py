"""Every `from ddeseg... import name` in the repository names something that exists.

Modules move (the consolidation moved the audio DSP, class lists and boxes into the library);
an import inside a function is only executed when that function runs, so a stale one would
fail for a user on a rarely used path. This imports each named module and looks up each name.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("ddeseg", "pipelines", "cli", "benchmarks", "tests")


def _imports() -> list[tuple[str, int, str, tuple[str, ...]]]:
    found = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                where = str(path.relative_to(REPO))
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("ddeseg"):
                    found.append((where, node.lineno, node.module, tuple(alias.name for alias in node.names)))
                elif isinstance(node, ast.Import):
                    found += [(where, node.lineno, a.name, ()) for a in node.names if a.name.startswith("ddeseg")]
    return found


def _missing(module_name: str, names: tuple[str, ...]) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return [f"{module_name} ({error})"]
    missing = []
    for name in names:
        if hasattr(module, name):
            continue
        try:  # `from package import submodule`
            importlib.import_module(f"{module_name}.{name}")
        except ImportError:
            missing.append(f"{module_name}.{name}")
    return missing


def test_every_ddeseg_import_resolves():
    problems = [
        f"{where}:{line}: {item}"
        for where, line, module, names in _imports()
        for item in _missing(module, names)
    ]
    assert not problems, "stale imports:\n" + "\n".join(problems)


def test_the_check_sees_a_stale_import():
    assert _missing("ddeseg.audio", ("LogMelBatcher",)) == []
    assert _missing("ddeseg.audio", ("no_such_function",)) == ["ddeseg.audio.no_such_function"]
    assert _missing("ddeseg.pipelines.logmel", ())[0].startswith("ddeseg.pipelines.logmel")

