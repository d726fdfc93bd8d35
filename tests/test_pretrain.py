"""pretrain.py end to end on tiny shards: run folder, HF encoder, typo errors, SIGKILL resume, and two
CPU ranks under DeepSpeed ZeRO-2 through `accelerate launch`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"size": "custom", "img_size": 32, "frames": 4, "dim": 32, "depth": 1, "heads": 2,
              "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1, "norm_pix_loss": False}


def _recipe(tmp_path: Path, shards: Path, **extra) -> Path:
    recipe = {
        "name": "tiny", "out_dir": str(tmp_path / "runs"), "shards": str(shards), "synthetic_data": None,
        "model": TINY_MODEL,
        "stream": {"img_size": 32, "frames": 4, "batch_size": 2, "num_workers": 0, "mask_ratio": 0.5},
        "optim": {"base_lr": 0.5, "epochs": 4, "warmup_epochs": 0},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _pretrain(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_single_process_run_writes_everything(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards))])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["dim"] == 32
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["world_size"] == 1 and summary["skipped_samples"] == 0
    assert [m["step"] for m in _metrics(run)] == list(range(1, 13))
    assert (run / "checkpoints").is_dir() and len(list((run / "checkpoints").iterdir())) == 2  # keep last 2

    from transformers import VideoMAEModel

    model = VideoMAEModel.from_pretrained(run / "encoder")
    assert model.config.hidden_size == 32

    # Rerunning a finished run changes nothing (make demo reruns every stage).
    weights = (run / "encoder" / "model.safetensors").read_bytes()
    again = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards))])
    assert again.returncode == 0 and "already complete" in again.stderr
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "encoder" / "model.safetensors").read_bytes() == weights


def test_typo_in_override_is_one_line_error(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards)), "optim.base_rl=1e-3"])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "unknown key 'base_rl'" in last and "did you mean 'base_lr'" in last


def test_missing_init_checkpoint_is_one_line_error(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards)), f"init_from={tmp_path / 'nope'}"])
    assert result.returncode == 2
    assert "nope" in result.stderr.strip().splitlines()[-1]


def test_geometry_mismatch_names_both_keys(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards)), "stream.frames=8"])
    assert result.returncode == 2
    assert "model.frames=4 but stream.frames=8" in result.stderr


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_continues(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards, checkpoint_every=5, keep_checkpoints=3)
    args = [sys.executable, "pretrain.py", "--recipe", str(recipe), "optim.epochs=25"]  # 75 steps
    run = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "step_00000005" / "meta.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in _metrics(run))
    assert killed_at < 75, "the run finished before it could be killed"

    result = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 75
    assert summary["resumed_from_step"] is not None and 5 <= summary["resumed_from_step"] <= killed_at
    steps = [m["step"] for m in _metrics(run)]
    assert steps == list(range(1, 76)), "resumed run must continue the step count with no gap or repeat"
    assert not list((run / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_ranks(tmp_path, tiny_shards):
    # Also the motion-PCA start (computed per rank, broadcast from rank 0) with a frozen embedding.
    recipe = _recipe(tmp_path, tiny_shards, audit_data=True, patch_init="motion_pca", patch_init_clips=4,
                     freeze_patch_embed=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              "recipes/accelerate/multi_cpu_deepspeed.yaml", "pretrain.py", "--recipe", str(recipe)]
    first = subprocess.run([*launch, "optim.epochs=10"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2

    # Shards are re-dealt to ranks every epoch; within a step (here one step = one epoch) the ranks'
    # clips are disjoint.
    seen: dict[int, dict[str, set]] = {0: {}, 1: {}}
    for rank in (0, 1):
        for line in (run / "data_audit" / f"rank{rank}.txt").read_text().splitlines():
            step, clip_id = line.split()
            seen[rank].setdefault(step, set()).add(clip_id)
    assert sorted(seen[0]) == sorted(seen[1]) and len(seen[0]) == 10
    for step in seen[0]:
        assert not seen[0][step] & seen[1][step], f"step {step}: both ranks trained on {seen[0][step] & seen[1][step]}"

    losses = [m["loss"] for m in _metrics(run)]
    assert len(losses) == 10 and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not decrease: {losses}"
    checkpoint = run / "checkpoints" / "step_00000010"
    assert (checkpoint / "meta.json").exists() and (checkpoint / "pytorch_model").is_dir()

    # Both ranks resume from that ZeRO-2 checkpoint and train on to a longer schedule.
    second = subprocess.run([*launch, "optim.epochs=12"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 12 and summary["world_size"] == 2
    from mgfm.model.hf import read_hf_weights

    # The rows set from motion PCA (as many as rank 0's few tiny clips allow) are still that frozen start.
    rows = int(re.search(r"tubelet embedding: (\d+) of 32 rows", first.stdout + first.stderr).group(1))
    w = read_hf_weights(run / "encoder")["embeddings.patch_embeddings.projection.weight"]
    assert rows > 0 and w[:rows].abs().sum() > 0 and bool((w[:rows, :, 0] == -w[:rows, :, 1]).all())


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_agree(path):
    from mgfm.config import load_recipe
    from mgfm.train.pretrain import check_geometry
    from mgfm.train.recipe import PretrainRecipe

    recipe = load_recipe(PretrainRecipe, path)
    check_geometry(recipe)
    assert recipe.optim.betas == (0.9, 0.95) and recipe.optim.weight_decay == 0.05
    assert recipe.stream.mask_ratio == 0.9


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_name_their_stage(path):
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == int(path.stem[-1])


def test_uint8_batches_are_normalised_by_the_trainer(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards)), "stream.video_dtype=uint8", "optim.epochs=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in _metrics(tmp_path / "runs" / "tiny")]
    # Un-normalised 0..255 pixels through the pixel loss would give losses in the thousands.
    assert losses and all(loss < 10 for loss in losses)
