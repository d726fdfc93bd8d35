"""benchmarks/gpu_check.py: the model FLOPs per clip it divides by for MFU, and its CPU smoke mode end to end
(every stage ok, so the GPU check cannot rot before a GPU runs it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env

from mgfm.data.masking import MaskGenerator
from mgfm.model.flops import encoder_gmacs, pretrain_gflops
from mgfm.model.encoder import ModelConfig
from mgfm.model.masked import build_pretraining_model

REPO = Path(__file__).resolve().parents[1]
# 2 x 4 x 4 = 32 tokens of 3 x 2 x 16 x 16 = 1536 pixels
SMALL = ModelConfig(size="custom", img_size=64, frames=4, dim=32, depth=2, heads=2, decoder_dim=16, decoder_depth=1,
                    decoder_heads=1)


def _blocks(n: int, d: int, depth: int) -> int:
    """MACs of ``depth`` blocks (mlp ratio 4) over ``n`` tokens, written out: qkv + out projections, MLP,
    ``QK^T`` and ``AV``."""
    return depth * (n * 3 * d * d + n * d * d + 2 * n * d * 4 * d + n * n * d + n * n * d)


def test_pretrain_gflops_is_the_hand_count():
    # mask 0.75 hides round(0.75 * 16) = 12 positions at both time steps: 24 masked, 8 visible tokens
    encoder = 8 * 1536 * 32 + _blocks(8, 32, 2)
    decoder = 8 * 32 * 16 + _blocks(8 + 24, 16, 1) + 24 * 16 * 1536
    assert pretrain_gflops(SMALL, 0.75) == pytest.approx(6 * (encoder + decoder) / 1e9, rel=1e-12)
    # decoder masking: the decoder reconstructs round(24 * 0.5) = 12 of the masked tokens
    decoder = 8 * 32 * 16 + _blocks(8 + 12, 16, 1) + 12 * 16 * 1536
    assert pretrain_gflops(SMALL, 0.75, decoder_keep_ratio=0.5) == pytest.approx(6 * (encoder + decoder) / 1e9,
                                                                                rel=1e-12)


def test_pretrain_gflops_grows_with_the_visible_share_and_counts_vit_b():
    flops = [pretrain_gflops(SMALL, ratio) for ratio in (0.9, 0.75, 0.5, 0.25, 0.0)]
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert pretrain_gflops(SMALL, 0.9, 0.5) < pretrain_gflops(SMALL, 0.9)
    # no mask: the encoder part is the published-convention encoder count on every token
    full = 6 * (encoder_gmacs(SMALL) + (32 * 32 * 16 + _blocks(32, 16, 1)) / 1e9)
    assert pretrain_gflops(SMALL, 0.0) == pytest.approx(full, rel=1e-12)
    # ViT-B 16x224², 0.9 tube mask: 160 visible of 1568 tokens, ~34 GMACs forward
    vit_b = ModelConfig(size="B", img_size=224, frames=16)
    assert 190 < pretrain_gflops(vit_b, 0.9) < 215


@pytest.mark.parametrize("keep", [None, 0.5])
def test_pretrain_gflops_is_a_third_of_the_model_forward_counted_by_torch(keep):
    # The forward's matrix products counted by torch (attention through the math kernel, which it can count)
    # on real masks from the data path's generator.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_pretraining_model(SMALL)
    rng = np.random.default_rng(0)
    enc, dec = (torch.as_tensor(np.stack(m)) for m in zip(*(MaskGenerator(SMALL.grid, 0.75, keep)(rng)
                                                             for _ in range(3))))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(torch.randn(3, 4, 3, 64, 64), enc, None if keep is None else dec)
    per_clip = counter.get_total_flops() / 3
    assert per_clip == pytest.approx(pretrain_gflops(SMALL, 0.75, keep) * 1e9 / 3, rel=1e-9)


@pytest.mark.slow
def test_smoke_mode_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-check"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--smoke"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["environment", "pretrain_random", "loader", "learning", "pretrain_shards", "features",
                            "search"]
    real_data = all((REPO.parent / "shared" / "data" / name / "index.csv").exists() for name in ("utkinect", "florence3d"))
    if not real_data:  # the learning leg reads ../shared/data and says why it skipped elsewhere
        assert stages["learning"]["skipped"] and "utkinect" in stages["learning"]["reason"]
    failed = {name: stage.get("error") for name, stage in stages.items()
              if stage["ok"] is not True and not (name == "learning" and not real_data)}
    assert not failed, failed
    assert report["gpu_mode"] is False and report["finished"]

    # what one device call carries: printed first, and under the device's limit
    carried = re.search(r"carried bundle: ([0-9.]+) MiB \(tree [0-9.]+, wheels [0-9.]+, shared [0-9.]+\)", done.stdout)
    assert carried and float(carried.group(1)) == pytest.approx(report["bundle"]["total_mib"], abs=0.05)
    assert report["bundle"]["fits"] and report["bundle"]["total_mib"] < 64

    loader = stages["loader"]
    new, today = "new defaults (stored at the crop, fastdecode + bframes 7, pyav)", "today's format, pyav"
    assert loader["clips_per_cpu_s"][new] > 0 and loader["clips_per_cpu_s"][today] > 0
    assert loader["cores_per_gpu"][new] == pytest.approx(rand_rate(stages) / loader["clips_per_cpu_s"][new])
    assert loader["workers"]["clips_per_s"] > 0
    if real_data:
        learning = stages["learning"]
        assert learning["epochs"] >= 1 and set(learning["probes"]) == {"utkinect", "florence3d"}
        for by_encoder in learning["probes"].values():
            assert set(by_encoder) == {"pretrained", "random init", "raw pixels"}
            for entry in by_encoder.values():
                low, high = entry["top1_ci95"]
                assert 0 <= low <= entry["top1"] <= high <= 1
        assert "| florence3d | raw pixels |" in done.stdout  # the one table

    cuda = torch.cuda.is_available()  # --smoke keeps the sizes tiny; the devices are what the machine has
    assert stages["environment"]["torch"] == torch.__version__

    rand = stages["pretrain_random"]
    assert rand["precision"] == "bf16" and rand["deepspeed"] is True
    assert rand["loss_finite"] and 0 < rand["first_loss"] < 10 and 0 < rand["last_loss"] < 10
    assert rand["clips_per_s"] > 0 and rand["step_s_median"] <= rand["step_s_p90"]
    assert rand["model_gflops_per_clip"] == pytest.approx(pretrain_gflops(ModelConfig(**report["sizes"]["model"]),
                                                                          report["sizes"]["mask_ratio"]))
    assert rand["mfu"] is None and (rand["peak_memory_gib"] is None) != cuda  # smoke: no peak to divide by
    assert "aten::" in (out / rand["profile"]).read_text()  # MFU unknown: the profile is written

    shards = stages["pretrain_shards"]
    summary = shards["summary"]
    assert json.loads((Path(shards["shards"]) / "manifest.json").read_text())["encoding"]["tune"] == "fastdecode"
    assert summary["precision"] == "bf16" and summary["deepspeed"] is True and summary["world_size"] == 1
    assert shards["logged_steps"] == summary["steps"] == 6 and shards["loss_finite"]
    assert shards["encoder"]["loads"] and shards["encoder"]["dim"] == 32
    manifest = json.loads((Path(shards["shards"]) / "manifest.json").read_text())
    test_clips = manifest["splits"]["test"]["samples"]
    assert test_clips > 0 and shards["clips"]["test"] == test_clips

    feats = stages["features"]
    assert feats["shape"] == [test_clips, 32] and feats["finite"]
    assert feats["device"] == ("cuda:0" if cuda else "cpu") and feats["encoder"] == "pretrain_shards' encoder"
    assert feats["precision"] == ("bf16" if cuda else "fp32")

    search = stages["search"]
    assert set(search["methods"]) == {"numpy", "faiss-cpu", "torch-cpu"}
    for name, method in search["methods"].items():
        assert method["ok"] and method["recall_at_10"] == 1.0, (name, method)
        assert method["queries_per_s"] > 0
    assert search["gpu_search_backend"] is None

    assert "pretrain_random" in done.stdout and "gpu_check (smoke)" in done.stdout  # the summary table


def rand_rate(stages: dict) -> float:
    """The training rate the loader leg divides by: pretrain_random's clips/s."""
    return stages["pretrain_random"]["clips_per_s"]
