"""One raw-pixel reference (:class:`mgfm.evaluate.raw_pixels.PixelEncoder`): the ``raw pixels`` row of every
report and the figure in the synthetic benchmark's README; no second definition anywhere in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import tiny_encoder_folder

from mgfm.evaluate import emotion_eval, probe_eval, retrieval_eval
from mgfm.evaluate.encoder_eval import EncoderEvalRecipe, encoders_to_compare
from mgfm.evaluate.raw_pixels import ROW, PixelEncoder

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("mgfm", "experiments", "benchmarks", "tools", "eval")
# a definition that makes raw-pixel features or a pixel baseline of its own
PIXEL_REFERENCE = re.compile(r"pixel.*(feature|baseline|encoder|reference)", re.IGNORECASE)


def test_every_report_compares_with_the_one_pixel_reference(tmp_path):
    rows, _ = encoders_to_compare(tiny_encoder_folder(tmp_path / "encoder"), EncoderEvalRecipe())
    assert [name for name, _, _ in rows] == ["pretrained", "random init", ROW]
    _, pixels, encoder_id = rows[-1]
    assert type(pixels) is PixelEncoder and encoder_id == PixelEncoder().encoder_id
    # each report's runner takes its compared encoders from that one list (encoder_eval.prepare)
    for runner in (probe_eval, retrieval_eval, emotion_eval):
        tree = ast.parse(Path(runner.__file__).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "mgfm.evaluate.encoder_eval" for alias in node.names}
        assert "prepare" in imported, f"{runner.__name__} builds its own compared encoders"


def test_no_second_raw_pixel_reference():
    found = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and PIXEL_REFERENCE.search(node.name):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert len(found) == 1 and found[0].startswith("mgfm/evaluate/raw_pixels.py:"), found
    assert found[0].endswith(" PixelEncoder"), found


def test_the_synthetic_readme_figure_is_the_reference_row():
    text = (REPO / "mgfm" / "sources" / "synthetic" / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("|") and ROW in line]
    assert len(rows) == 1, "the synthetic README gives one raw-pixel figure"
    pixels = PixelEncoder()
    row = rows[0]
    assert "make demo" in row, "the figure says the command that measured it"
    assert f"{pixels.frames} frames" in row and f"{pixels.size} x {pixels.size}" in row, (
        "the figure's geometry is not the reference's: re-measure it with `make demo`")
    assert re.search(r"\d+\.\d% top-1", row)
    assert "pixel_baseline" not in text

