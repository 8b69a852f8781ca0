"""The folders are the layers (docs/outputs.md, "Layout"): every import in the
library, the tasks and the report goes down, never up. Read with `ast`, so an
import inside a function counts as much as one at the top."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "speed", "deploy", "runner", "task", "report")
MAY_IMPORT = {  # layer -> the layers its modules may import (besides their own)
    "core": set(),  # common/*.py and common/methods/ (the distiller builds methods; methods use the losses)
    "speed": {"core"},
    "deploy": {"core"},
    "runner": {"core", "speed", "deploy"},
    "task": {"core", "speed", "deploy", "runner"},
    "report": set(),  # and only the two TensorFlow-free readers below
}
REPORT_READS = {"kdtoolkit.files", "kdtoolkit.metrics", "kdtoolkit.runner.results"}  # none imports TensorFlow


def layer_of_module(name):
    """The layer of an imported module name, or None for a module outside the project."""
    parts = name.split(".")
    if parts[0] == "kdtoolkit":
        return parts[1] if len(parts) > 1 and parts[1] in ("speed", "deploy", "runner") else "core"
    if parts[0] in ("task1_mnist", "task2_mhist"):
        return "task"
    if parts[0] == "reports":
        return "report"
    return None


def layer_of_file(path):
    relative = path.relative_to(ROOT).parts
    if relative[0] == "common":
        return relative[1] if len(relative) > 2 and relative[1] in ("speed", "deploy", "runner") else "core"
    return {"task1_mnist": "task", "task2_mhist": "task", "reports": "report"}[relative[0]]


def imports(path):
    """Every module name `path` imports (`from kdtoolkit import x` counts as `kdtoolkit.x`)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("kdtoolkit", "kdtoolkit.runner", "kdtoolkit.speed", "kdtoolkit.deploy"):
                yield from (f"{node.module}.{alias.name}" for alias in node.names)
            else:
                yield node.module


FILES = sorted(p for folder in ("common", "task1_mnist", "task2_mhist", "reports") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path):
    layer = layer_of_file(path)
    for name in imports(path):
        target = layer_of_module(name)
        if target is None or target == layer:
            continue
        if layer == "report":
            assert name in REPORT_READS, f"{path.relative_to(ROOT)} imports {name}: the report reads results only"
        else:
            assert target in MAY_IMPORT[layer], f"{path.relative_to(ROOT)} ({layer}) imports {name} ({target})"


def test_the_rule_sees_an_upward_import(tmp_path):
    """The check can fail: an import of the runner from the core is caught."""
    assert layer_of_file(ROOT / "common" / "losses.py") == "core"
    assert layer_of_module("kdtoolkit.runner.results") == "runner"
    assert "runner" not in MAY_IMPORT["core"]
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from kdtoolkit.runner import results\n")
    assert list(imports(probe)) == ["kdtoolkit.runner.results"]


def test_the_layout_table_names_every_module():
    """docs/outputs.md's layer table names every module of the library's folders."""
    table = (ROOT / "docs" / "outputs.md").read_text(encoding="utf-8")
    table = table[table.index("## Layout"):]
    for folder in ("common", "common/speed", "common/deploy", "common/runner"):
        for module in sorted((ROOT / folder).glob("*.py")):
            if module.name != "__init__.py":
                assert f"`{module.name}`" in table, f"docs/outputs.md's layout lacks {folder}/{module.name}"
