"""benchmarks/bench_real_motion.py: its hand-made layout/motion target and a smoke run of the whole curve."""

import importlib.util
import json
from pathlib import Path

import torch

from mgfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise


def load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_real_motion.py"
    spec = importlib.util.spec_from_file_location("bench_real_motion", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_layout_target_finds_the_figure_and_its_motion():
    """A bright square in the top-left cell that jumps to the bottom-right cell halfway through the clip:
    the layout part peaks where the square is in each kept frame, the motion part is zero before the jump."""
    bench = load_bench()
    frames, size, grid = 8, 32, 2
    video = torch.zeros(1, frames, 3, size, size, dtype=torch.uint8)
    video[:, :4, :, 2:10, 2:10] = 255
    video[:, 4:, :, 20:28, 20:28] = 255
    target = bench.layout_and_motion(normalise(video, IMAGENET_MEAN, IMAGENET_STD), grid)
    layout = target[0, :frames // 2 * grid ** 2].view(frames // 2, grid * grid)
    assert layout[:2].argmax(1).tolist() == [0, 0] and layout[2:].argmax(1).tolist() == [3, 3]
    assert target.shape == (1, (frames // 2 + frames // 2 - 1) * grid ** 2)
    motion = target[0, frames // 2 * grid ** 2:].view(frames // 2 - 1, grid * grid)
    assert motion[0].abs().max() < 1e-4  # frame 2 equals frame 0
    assert motion[1:, [0, 3]].min() > 0.5 and motion[1:, [1, 2]].abs().max() < 1e-4


def test_curve_smoke_run_writes_scores_for_every_set_and_step(tiny_shards, tmp_path):
    bench = load_bench()
    out = tmp_path / "out"
    result = bench.main(["--sets", f"tiny={tiny_shards}", "--objectives", "videomae,maps", "--steps", "2",
                         "--probe-at", "0,1", "--batch", "2", "--out", str(out)])
    assert [(r["objective"], r["step"]) for r in result["curves"]] == [
        ("videomae", 0), ("videomae", 2), ("maps", 0), ("maps", 2)]
    assert all(0.0 <= r["tiny"] <= 1.0 for r in result["curves"]) and 0.0 <= result["raw_pixels"]["tiny"] <= 1.0
    assert json.loads((out / "real_motion.json").read_text())["curves"] == result["curves"]
