"""pretrain.py end to end on tiny shards: run folder, HF encoder, the logged lr schedule, gradient
accumulation, typo errors, epoch-boundary resume (SIGKILL at any moment: tests/test_chaos.py), and DeepSpeed
bf16 on CPU through `accelerate launch` (ZeRO-2 and ZeRO-3, one and two ranks) exporting the fp32 master
weights."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"size": "custom", "img_size": 32, "frames": 4, "dim": 32, "depth": 1, "heads": 2,
              "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1, "norm_pix_loss": False}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
TWO_RANKS_ZERO2 = [*LAUNCH, "--config_file", "recipes/accelerate/multi_cpu_deepspeed.yaml"]


def _recipe(tmp_path: Path, shards: Path, **extra) -> Path:
    recipe = {
        "name": "tiny", "out_dir": str(tmp_path / "runs"), "shards": str(shards), "synthetic_data": None,
        "model": TINY_MODEL,
        "stream": {"batch_size": 2, "num_workers": 0, "mask_ratio": 0.5},
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


def expected_lr(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """VideoMAE's schedule, written out independently of mgfm: the lr after ``step`` optimiser steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def assert_lr_schedule(rows: list[dict], steps_per_epoch: int, epochs: int, warmup_epochs: float, base_lr: float,
                       global_batch: int, min_lr: float = 1e-6) -> None:
    total, warmup, peak = steps_per_epoch * epochs, int(warmup_epochs * steps_per_epoch), base_lr * global_batch / 256
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    for row in rows:
        want = expected_lr(row["step"], total, warmup, peak, min_lr)
        assert row["lr"] == pytest.approx(want, rel=1e-6), f"step {row['step']}: lr {row['lr']}, schedule {want}"


def _launch(launch: list[str], recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*launch, "pretrain.py", "--recipe", str(recipe), *overrides], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def assert_fp32_master_export(run: Path) -> None:
    """The run's encoder loads in transformers and holds the fp32 master weights of its last checkpoint
    (as DeepSpeed's own zero_to_fp32 consolidates them), not the bf16 copy the module computed with."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import VideoMAEModel

    from mgfm.model.hf import load_encoder_hf

    assert VideoMAEModel.from_pretrained(run / "encoder").config.hidden_size == 32
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    master = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    exported = load_encoder_hf(run / "encoder")[0].state_dict()
    trainable = {k[len("encoder."):]: v for k, v in master.items() if k.startswith("encoder.")}
    assert trainable and all(torch.equal(exported[k], v.float()) for k, v in trainable.items())
    weight = exported["blocks.0.attn.qkv_weight"]
    assert bool((weight.bfloat16().float() != weight).any()), "exported weights are a bf16 copy"


def test_single_process_run_writes_everything(tmp_path, tiny_shards):
    # the default per-patch normalised pixel target (norm_pix_loss), one warmup epoch
    recipe = _recipe(tmp_path, tiny_shards, model={**TINY_MODEL, "norm_pix_loss": True})
    args = ["--recipe", str(recipe), "optim.warmup_epochs=1"]
    result = _pretrain(args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["dim"] == 32
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["world_size"] == 1 and summary["skipped_samples"] == 0
    assert summary["precision"] == "no" and not summary["deepspeed"]
    rows = _metrics(run)
    # 6 train clips / 2 per batch = 3 steps per epoch, 4 epochs
    assert_lr_schedule(rows, steps_per_epoch=3, epochs=4, warmup_epochs=1, base_lr=0.5, global_batch=2)
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and 0.5 < losses[0] < 1.5  # unit-variance targets at the start
    assert (run / "checkpoints").is_dir() and len(list((run / "checkpoints").iterdir())) == 2  # keep last 2

    from transformers import VideoMAEModel

    model = VideoMAEModel.from_pretrained(run / "encoder")
    assert model.config.hidden_size == 32

    # Rerunning a finished run changes nothing (make demo reruns every stage).
    weights = (run / "encoder" / "model.safetensors").read_bytes()
    again = _pretrain(args)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "encoder" / "model.safetensors").read_bytes() == weights


def test_typo_in_override_is_one_line_error(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards)), "optim.base_rl=1e-3"])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "unknown key 'optim.base_rl'" in last and "did you mean 'optim.base_lr'" in last


def test_missing_init_checkpoint_is_one_line_error(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards)), f"init_from={tmp_path / 'nope'}"])
    assert result.returncode == 2
    assert "nope" in result.stderr.strip().splitlines()[-1]


def test_clip_geometry_is_set_once_on_the_model(tmp_path, tiny_shards):
    result = _pretrain(["--recipe", str(_recipe(tmp_path, tiny_shards)), "stream.frames=8"])
    assert result.returncode == 2
    assert "stream.frames has moved: set model.frames instead" in result.stderr.strip().splitlines()[-1]


def _audit(run: Path, rank: int = 0) -> list[tuple[int, str]]:
    lines = (run / "data_audit" / f"rank{rank}.txt").read_text().splitlines()
    return [(int(step), clip) for step, clip in (line.split() for line in lines)]


@pytest.mark.slow  # ~45 s
def test_gradient_accumulation_steps_once_per_accumulation(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards, audit_data=True)
    result = _pretrain(["--recipe", str(recipe), "optim.grad_accum=2", "stream.batches_per_epoch=4",
                        "optim.warmup_epochs=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    # 4 batches of 2 clips per epoch, 2 per optimiser step: 2 steps per epoch, global batch 4 clips
    assert_lr_schedule(_metrics(run), steps_per_epoch=2, epochs=4, warmup_epochs=1, base_lr=0.5, global_batch=4)
    per_step: dict[int, int] = {}
    for step, _ in _audit(run):
        per_step[step] = per_step.get(step, 0) + 1
    assert per_step == {step: 4 for step in range(8)}, "each optimiser step trains on 2 micro-batches of 2 clips"


@pytest.mark.slow  # ~60 s: a run, then its resume
def test_checkpoint_at_an_epoch_boundary_resumes_with_the_next_epoch(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards, audit_data=True, checkpoint_every=3, keep_checkpoints=5)
    first = _pretrain(["--recipe", str(recipe), "optim.epochs=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    boundary = run / "checkpoints" / "step_00000003"  # the end of epoch 0
    assert json.loads((boundary / "meta.json").read_text())["epoch"] == 1
    order = _audit(run)
    epoch0, epoch1 = [c for s, c in order if s < 3], [c for s, c in order if s >= 3]
    assert epoch0 != epoch1, "the two epochs must be told apart by their clip order"

    # lose the end of the run: it resumes from the boundary and trains epoch 1 as the first run did
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    shutil.rmtree(run / "encoder")
    again = _pretrain(["--recipe", str(recipe), "optim.epochs=2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 3
    assert _audit(run) == order, "the resumed run trains epoch 1 on the clips of the first run, in its order"


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~2 min: two DeepSpeed ranks
def test_deepspeed_zero2_bf16_two_cpu_ranks(tmp_path, tiny_shards):
    # Also the motion-PCA start (computed per rank, broadcast from rank 0) with a frozen embedding.
    recipe = _recipe(tmp_path, tiny_shards, audit_data=True, patch_init="motion_pca", patch_init_clips=4,
                     freeze_patch_embed=True, mixed_precision="bf16")
    first = _launch(TWO_RANKS_ZERO2, recipe, "optim.epochs=10", "optim.warmup_epochs=2")
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["precision"] == "bf16" and summary["deepspeed"]

    # Shards are re-dealt to ranks every epoch; within a step (here one step = one epoch) the ranks'
    # clips are disjoint.
    seen: dict[int, dict[int, set]] = {0: {}, 1: {}}
    for rank in (0, 1):
        for step, clip_id in _audit(run, rank):
            seen[rank].setdefault(step, set()).add(clip_id)
    assert sorted(seen[0]) == sorted(seen[1]) and len(seen[0]) == 10
    for step in seen[0]:
        assert not seen[0][step] & seen[1][step], f"step {step}: both ranks trained on {seen[0][step] & seen[1][step]}"

    # 6 train clips / (2 ranks x 2 clips) = 1 step per epoch; the lr follows the schedule step by step
    rows = _metrics(run)
    assert_lr_schedule(rows, steps_per_epoch=1, epochs=10, warmup_epochs=2, base_lr=0.5, global_batch=4)
    losses = [m["loss"] for m in rows]
    assert all(map(lambda x: x == x and abs(x) < 1e6, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not decrease: {losses}"
    checkpoint = run / "checkpoints" / "step_00000010"
    assert (checkpoint / "meta.json").exists() and (checkpoint / "pytorch_model").is_dir()
    assert_fp32_master_export(run)

    # Both ranks resume from that ZeRO-2 checkpoint and train on to a longer schedule.
    _launch(TWO_RANKS_ZERO2, recipe, "optim.epochs=12", "optim.warmup_epochs=2")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 12 and summary["world_size"] == 2
    from mgfm.model.hf import read_hf_weights

    # The rows set from motion PCA (as many as rank 0's few tiny clips allow) are still that frozen start.
    rows = int(re.search(r"tubelet embedding: (\d+) of 32 rows", first.stdout + first.stderr).group(1))
    w = read_hf_weights(run / "encoder")["embeddings.patch_embeddings.projection.weight"]
    assert rows > 0 and w[:rows].abs().sum() > 0 and bool((w[:rows, :, 0] == -w[:rows, :, 1]).all())


@pytest.mark.slow
def test_deepspeed_zero3_bf16_two_cpu_ranks_exports_the_consolidated_master_weights(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards, mixed_precision="bf16")
    zero3 = [*LAUNCH, "--use_deepspeed", "--num_processes", "2", "--num_machines", "1", "--deepspeed_config_file",
             "recipes/deepspeed/zero3.json"]
    _launch(zero3, recipe, "optim.epochs=3")
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["precision"] == "bf16" and summary["steps"] == 3
    assert_fp32_master_export(run)


@pytest.mark.slow
def test_accelerates_own_zero3_one_process_bf16(tmp_path, tiny_shards):
    # No DeepSpeed JSON: accelerate builds the config (stage3_gather_16bit_weights_on_model_save off), which
    # the export must not need. The recipe's precision holds although the launcher exports "no".
    recipe = _recipe(tmp_path, tiny_shards, mixed_precision="bf16")
    zero3 = [*LAUNCH, "--use_deepspeed", "--zero_stage", "3", "--num_processes", "1", "--num_machines", "1"]
    _launch(zero3, recipe, "optim.epochs=2", "optim.warmup_epochs=1")
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["deepspeed"] and summary["world_size"] == 1
    assert_lr_schedule(_metrics(run), steps_per_epoch=3, epochs=2, warmup_epochs=1, base_lr=0.5, global_batch=2)
    assert_fp32_master_export(run)


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_agree(path):
    from mgfm.config import load_recipe
    from mgfm.train.recipe import PretrainRecipe

    recipe = load_recipe(PretrainRecipe, path)
    stream = recipe.clip_stream  # the stream takes the model's geometry; the recipe does not repeat it
    assert (stream.frames, stream.img_size, stream.patch) == (recipe.model.frames, recipe.model.img_size, 16)
    assert recipe.stream.frames is None and recipe.stream.img_size is None
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


def test_pretraining_on_a_weighted_mixture_of_shard_sets(tmp_path, tiny_shards):
    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    recipe = _recipe(tmp_path, tiny_shards, audit_data=True)
    result = _pretrain(["--recipe", str(recipe), f"shards=[{tiny_shards},{other}]", "shard_weights=[1,3]",
                        "optim.epochs=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    drawn = [clip for _, clip in _audit(run)]
    sets = {clip.split("/")[0] for clip in drawn}
    assert sets == {tiny_shards.name, "other"}
    # 12 clips per epoch (both sets' train clips), 4 epochs of 6 steps; about a quarter from the first set
    assert len(drawn) == 48 and 0.1 < sum(c.startswith(f"{tiny_shards.name}/") for c in drawn) / 48 < 0.45
    bad = _pretrain(["--recipe", str(recipe), f"shards=[{tiny_shards},{other}]", "shard_weights=[1]", "name=bad"])
    assert bad.returncode == 2 and "1 weights for 2 shard sets" in bad.stderr.strip().splitlines()[-1]


def _teacher_and_encoder(checkpoint: Path) -> tuple[dict, dict]:
    """The teacher's and the encoder's weights in a single-process checkpoint (Accelerate's model.safetensors)."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    return ({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")},
            {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})


@pytest.mark.parametrize("target,extra", [("motion", []), ("pixels+motion", []), ("features", []),
                                          ("pixels", ["loss.content_floor=0.05"])])
def test_each_objective_pretrains_from_memory_with_snapshots(tmp_path, tiny_shards, target, extra):
    recipe = _recipe(tmp_path, tiny_shards, model={**TINY_MODEL, "norm_pix_loss": True})
    result = _pretrain(["--recipe", str(recipe), f"loss.target={target}", "stream.cache=memory",
                        "export_epochs=[0,2]", "loss.ema_momentum=0.9", "loss.variance_weight=0.1", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    rows = _metrics(run)
    assert len(rows) == 12 and all(math.isfinite(r["loss"]) and math.isfinite(r["feature_std"]) for r in rows)
    assert "decoded into memory" in result.stderr
    from transformers import VideoMAEModel

    for epoch in (0, 2):  # snapshots load like the final encoder
        assert VideoMAEModel.from_pretrained(run / "encoders" / f"epoch_{epoch:05d}").config.hidden_size == 32
    if extra:  # the figure-aware loss: the share of masked tokens that count is logged, and some do not
        shares = [r["content_share"] for r in rows]
        assert all(0 <= v <= 1 for v in shares) and 0 < sum(shares) < len(shares), shares
    if target != "features":
        assert "target_std" not in rows[0] and "ema_momentum" not in rows[0]
        return
    assert all(r["target_std"] > 0 for r in rows)
    momenta = [r["ema_momentum"] for r in rows]
    assert momenta[0] == pytest.approx(0.9, abs=0.01) and momenta[-1] == 1.0 and momenta == sorted(momenta)
    # the teacher followed the encoder: it left the initialisation and trails the trained weights
    teacher, encoder = _teacher_and_encoder(sorted((run / "checkpoints").glob("step_*"))[-1])
    from mgfm.model.hf import load_encoder_hf

    start = load_encoder_hf(run / "encoders" / "epoch_00000")[0].state_dict()
    key = "blocks.0.attn.qkv_weight"
    assert not torch.equal(teacher[key], start[key]) and not torch.equal(teacher[key], encoder[key])
    assert (teacher[key] - start[key]).abs().sum() < (encoder[key] - start[key]).abs().sum()


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~2 min: two DeepSpeed ranks
def test_feature_target_under_deepspeed_zero2_bf16_two_cpu_ranks(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards, mixed_precision="bf16", loss={"target": "features", "ema_momentum": 0.9},
                     stream={"batch_size": 2, "num_workers": 0, "mask_ratio": 0.5, "cache": "memory"})
    _launch(TWO_RANKS_ZERO2, recipe, "optim.epochs=6")
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["precision"] == "bf16" and summary["deepspeed"]
    rows = _metrics(run)
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) and r["target_std"] > 0 for r in rows)
    assert_fp32_master_export(run)
    # the bf16 module state DeepSpeed saved holds the teacher, moved away from the encoder's start
    states = torch.load(sorted((run / "checkpoints").glob("step_*"))[-1] / "pytorch_model" /
                        "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    teacher = states["teacher.blocks.0.attn.qkv_weight"].float()
    encoder = states["encoder.blocks.0.attn.qkv_weight"].float()
    assert teacher.dtype == torch.float32 and not torch.equal(teacher, encoder)
    _launch(TWO_RANKS_ZERO2, recipe, "optim.epochs=8")  # resumes with the teacher from the checkpoint
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 6
