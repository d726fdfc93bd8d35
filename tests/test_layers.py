"""The library stacks the way the pipeline runs: a module imports only its own layer, the layers below it and
the base modules (``sources < shards < data < model < train < evaluate < entry points``; base modules import
only each other). Function-level imports count too. Nothing in the library imports the repository's scripts
around it (``experiments/``, ``benchmarks/``, ``tools/``, ``eval/``, ``pretrain.py``): they import the library,
never the other way. And no module outgrows one job (~500 lines)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE = {"mgfm", "mgfm.errors", "mgfm.files", "mgfm.config", "mgfm.cli", "mgfm.runtime", "mgfm.report"}
LAYERS = ("sources", "shards", "data", "model", "train", "evaluate")
ENTRY = {"mgfm.pipeline", "mgfm.demo", "mgfm.real_motion"}
MAX_LINES = 500
# the repository's scripts around the library: they may import mgfm, mgfm never imports them
OUTSIDE = ("experiments", "benchmarks", "tools", "eval", "pretrain")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """0 for the base modules, 1..6 for the layers, 7 for the entry points."""
    if module in BASE:
        return 0
    if module in ENTRY:
        return len(LAYERS) + 1
    top = module.split(".")[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: not in a layer; add it to BASE, LAYERS or ENTRY of tests/test_layers.py")
    return LAYERS.index(top) + 1


def upward_imports(root: Path) -> list[str]:
    """``"<file>:<line> <module> (layer) imports <module> (layer)"`` for every import of ``root`` (the ``mgfm``
    folder) that goes up a layer, and ``"<file>:<line> <module> imports <script> (outside the library)"`` for
    every import of the scripts around it (:data:`OUTSIDE`)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(root, path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in OUTSIDE:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {importer} imports {target} "
                                 f"(outside the library)")
                if target.split(".")[0] != "mgfm":
                    continue
                if layer(target) > layer(importer):
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {importer} (layer {layer(importer)}) "
                                 f"imports {target} (layer {layer(target)})")
    return found


def test_no_module_imports_upward():
    assert upward_imports(REPO / "mgfm") == []


def test_a_planted_upward_import_is_caught(tmp_path):
    copy = tmp_path / "mgfm"
    shutil.copytree(REPO / "mgfm", copy, ignore=shutil.ignore_patterns("__pycache__"))
    masking = copy / "data" / "masking.py"
    masking.write_text(masking.read_text() + "\n\ndef planted():\n    from mgfm.evaluate.probe import train_probe\n")
    runtime = copy / "runtime.py"  # a base module reaching into a layer
    runtime.write_text(runtime.read_text() + "\nimport mgfm.train.engine\n")
    probe = copy / "evaluate" / "probe.py"  # the library reaching into a research driver
    probe.write_text(probe.read_text() + "\nfrom experiments.curve import curve\n")
    found = upward_imports(copy)
    assert len(found) == 3, found
    assert "mgfm.data.masking (layer 3) imports mgfm.evaluate.probe (layer 6)" in found[0]
    assert "mgfm.evaluate.probe imports experiments.curve (outside the library)" in found[1]
    assert "mgfm.runtime (layer 0) imports mgfm.train.engine (layer 5)" in found[2]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "mgfm").rglob("*.py")))
def test_no_module_outgrows_one_job(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines: split it along its sections"
