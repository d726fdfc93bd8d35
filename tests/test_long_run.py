"""What long runs meet: a rerun with a changed recipe, a torn newest checkpoint, an interrupted end of a run,
SIGTERM / SIGUSR1 / Ctrl-C under the launchers, and seeds and settings that each have one address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

from mgfm.config import RecipeError, load_recipe, recipe_to_dict
from mgfm.evaluate.finetune_recipe import FinetuneRecipe
from mgfm.evaluate.probe_eval import ProbeRecipe
from mgfm.train.recipe import PretrainRecipe
from mgfm.train.stop import EXIT_REQUEUE

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"size": "custom", "img_size": 32, "frames": 4, "dim": 32, "depth": 1, "heads": 2,
              "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1, "norm_pix_loss": False}


def _recipe(tmp_path: Path, shards: Path, **extra) -> Path:
    recipe = {"name": "r", "out_dir": str(tmp_path / "runs"), "shards": str(shards), "synthetic_data": None,
              "model": TINY_MODEL, "stream": {"batch_size": 2, "num_workers": 0, "mask_ratio": 0.5},
              "optim": {"base_lr": 0.5, "epochs": 2, "warmup_epochs": 0}, "checkpoint_every": 2, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _pretrain(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, "pretrain.py", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


def _last(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ 1. a changed recipe on resume


def test_a_rerun_that_changes_the_model_is_refused_before_anything_is_written(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards)
    assert _pretrain("--recipe", str(recipe)).returncode == 0
    run = tmp_path / "runs" / "r"
    saved = (run / "recipe.yaml").read_bytes()

    changed = _pretrain("--recipe", str(recipe), "model.dim=64", "model.heads=4", "optim.base_lr=0.1")
    assert changed.returncode == 2
    last = _last(changed)
    assert last.startswith("pretrain.py: error: ") and "holds a run of another recipe" in last
    assert "model.dim (32 -> 64)" in last and "model.heads (2 -> 4)" in last and "optim.base_lr (0.5 -> 0.1)" in last
    assert "Traceback" not in changed.stderr
    assert (run / "recipe.yaml").read_bytes() == saved, "the run's recipe.yaml was overwritten"

    # more epochs is what a resumed run may change: it continues the schedule from the last checkpoint
    longer = _pretrain("--recipe", str(recipe), "optim.epochs=3")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert _steps(run) == list(range(1, 10)) and yaml.safe_load((run / "recipe.yaml").read_text())["optim"]["epochs"] == 3


def test_resume_never_refuses_to_overwrite_checkpoints_and_a_named_checkpoint_must_verify(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards)
    assert _pretrain("--recipe", str(recipe)).returncode == 0
    never = _pretrain("--recipe", str(recipe), "resume=never")
    assert never.returncode == 2 and "resume=never" in _last(never) and "would overwrite" in _last(never)
    missing = _pretrain("--recipe", str(recipe), f"resume={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "not a complete mgfm checkpoint" in _last(missing)


# ------------------------------------------------------------------------ 2. a torn newest checkpoint


def test_a_torn_newest_checkpoint_is_named_and_the_older_one_resumes(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards)
    assert _pretrain("--recipe", str(recipe)).returncode == 0
    run = tmp_path / "runs" / "r"
    older, newest = sorted((run / "checkpoints").glob("step_*"))
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, 1000)  # a copy or a disk that lost the end of the file
    shutil.rmtree(run / "encoder")

    again = _pretrain("--recipe", str(recipe))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint {newest} skipped: model.safetensors is 1000 bytes, {size} when written" in again.stderr
    assert f"resumed from {older}" in again.stderr
    assert _steps(run) == list(range(1, 7)) and (run / "encoder" / "model.safetensors").is_file()


# ------------------------------------------------------------------------ 4. an interrupted end of a run


def test_a_rerun_finishes_what_an_interrupted_end_left_undone(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards, export_epochs=[2])
    assert _pretrain("--recipe", str(recipe)).returncode == 0
    run = tmp_path / "runs" / "r"
    encoder = (run / "encoder" / "model.safetensors").read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    # killed in the export: the encoder swapped out, its temporary folder of a process that is gone
    os.replace(run / "encoder", run / ".encoder.999999.tmp-x")
    shutil.rmtree(run / "encoders" / "epoch_00002")
    (run / "summary.json").unlink()
    (run / "loss.png").unlink()

    again = _pretrain("--recipe", str(recipe))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished what an interrupted end of the run left undone" in again.stderr
    assert (run / "encoder" / "model.safetensors").read_bytes() == encoder
    assert (run / "encoders" / "epoch_00002" / "model.safetensors").read_bytes() == encoder
    assert (run / "loss.png").is_file() and not list(run.glob(".encoder.*"))
    assert {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k != "seconds"} == \
        {k: v for k, v in summary.items() if k != "seconds"} | {"resumed_from_step": 6, "clips_per_s": 0.0}

    only_summary = _pretrain("--recipe", str(recipe))  # complete again: nothing to do
    assert only_summary.returncode == 0 and "already complete" in only_summary.stderr


# ------------------------------------------------------------------------ 4. signals


def _stop_with(signum: int, tmp_path: Path, shards: Path, launcher: tuple[str, ...] = ()) -> tuple[int, str]:
    """Start a long run, signal it (the whole process group) after two steps; returns (exit code, stderr)."""
    recipe = _recipe(tmp_path, shards, checkpoint_every=1000)
    run = tmp_path / "runs" / "r"
    proc = subprocess.Popen([sys.executable, *launcher, "pretrain.py", "--recipe", str(recipe), "optim.epochs=200"],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and len(_steps(run)) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signum)  # as a scheduler or a terminal signals the whole job
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_checkpoint_at_the_next_step_and_exit_for_a_requeue(tmp_path, tiny_shards, signum):
    code, err = _stop_with(signum, tmp_path, tiny_shards)
    assert code == EXIT_REQUEUE == 75
    run = tmp_path / "runs" / "r"
    stopped = _steps(run)[-1]
    lines = [line for line in err.splitlines() if line.startswith("pretrain.py:")]
    assert lines == [f"pretrain.py: stopped by {signal.Signals(signum).name} at step {stopped}; checkpoint "
                     f"{run / 'checkpoints' / f'step_{stopped:08d}'} saved: rerun the same command to resume"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{stopped:08d}"]
    requeued = _pretrain("--recipe", str(tmp_path / "recipe.yaml"), "checkpoint_every=1000", "optim.epochs=1")
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'}" in requeued.stderr


@pytest.mark.slow  # the launcher's start
def test_ctrl_c_under_accelerate_launch_checkpoints_and_says_so_in_one_line(tmp_path, tiny_shards):
    launcher = ("-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/single_cpu.yaml")
    code, err = _stop_with(signal.SIGINT, tmp_path, tiny_shards, launcher)
    assert code == 130
    ours = [line for line in err.splitlines() if line.startswith("pretrain.py:")]
    assert len(ours) == 1 and "stopped by SIGINT" in ours[0] and "Traceback" not in err


# ------------------------------------------------------------------------ one address per setting


@pytest.mark.parametrize("cls,override,where", [
    (PretrainRecipe, "stream.seed=3", "stream.seed has moved: set seed instead"),
    (PretrainRecipe, "stream.flip=true", "stream.flip has moved: set flip instead"),
    (PretrainRecipe, "stream.mean=[0.5,0.5,0.5]", "stream.mean has moved: set model.pixel_mean instead"),
    (PretrainRecipe, "stream.eval_crop=0.8", "stream.eval_crop is not used by pretraining (an evaluation setting)"),
    (FinetuneRecipe, "stream.flip=true", "stream.flip has moved: set flip instead"),
    (FinetuneRecipe, "stream.repeats=2", "stream.repeats is not used by fine-tuning"),
    (ProbeRecipe, "stream.crop_scales=[1.0]", "stream.crop_scales is not used by frozen-encoder evaluations"),
    (ProbeRecipe, "stream.seed=1", "stream.seed has moved: set seed instead"),
])
def test_a_setting_has_one_address_and_a_key_the_command_does_not_use_is_an_error(cls, override, where):
    with pytest.raises(RecipeError, match=where.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(cls, None, [override])


@pytest.mark.parametrize("cls", [PretrainRecipe, FinetuneRecipe, ProbeRecipe])
def test_a_saved_recipe_loads_back_as_the_same_recipe(tmp_path, cls):
    recipe = load_recipe(cls, None, ["seed=5"])
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    assert recipe_to_dict(load_recipe(cls, path)) == recipe_to_dict(recipe)


def test_the_run_seed_and_flip_reach_the_train_stream():
    recipe = load_recipe(PretrainRecipe, None, ["seed=9", "flip=true"])
    assert recipe.clip_stream.seed == 9 and recipe.clip_stream.flip and recipe.clip_stream.masks
