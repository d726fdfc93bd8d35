"""The chaos run: pretraining killed with SIGKILL at random moments (mid-step, mid-checkpoint, mid-export,
while starting up) and rerun each time with the same command ends with an encoder bitwise equal to an
uninterrupted run of the same recipe and seed, and a ``metrics.jsonl`` without gaps or repeats whose every
loss equals the uninterrupted run's (so the data each step saw was the same too) — on one process with two
loader workers, and on two DeepSpeed ZeRO-2 ranks on the CPU."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import subprocess_env
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"size": "custom", "img_size": 32, "frames": 4, "dim": 32, "depth": 1, "heads": 2,
              "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1, "drop_path": 0.1}
LAUNCH = {
    "one process": [sys.executable, "pretrain.py"],
    "two ZeRO-2 ranks": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                         "recipes/accelerate/multi_cpu_deepspeed.yaml", "pretrain.py"],
}
KILLS = 10


def _recipe(tmp_path: Path, shards: Path, workers: int) -> Path:
    recipe = {
        "out_dir": str(tmp_path / "runs"), "shards": str(shards), "synthetic_data": None, "model": TINY_MODEL,
        "stream": {"batch_size": 1, "num_workers": workers, "mask_ratio": 0.5, "repeats": 2, "shuffle_buffer": 4},
        "optim": {"base_lr": 0.5, "epochs": 6, "warmup_epochs": 1},
        "flip": True, "seed": 7, "checkpoint_every": 2, "keep_checkpoints": 2, "export_epochs": [0, 3, 6],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun's workers, DataLoader workers) at once."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def _exporting(run: Path) -> bool:
    """An encoder export under way: its temporary folder, or the run's end after its final checkpoint."""
    temporary = list(run.glob(".encoder.*.tmp-*")) + list((run / "encoders").glob(".epoch_*.*.tmp-*"))
    return bool(temporary) or ((run / "checkpoints").is_dir() and any(
        json.loads((c / "meta.json").read_text()).get("final") for c in (run / "checkpoints").glob("step_*[0-9]")
        if (c / "meta.json").is_file()) and not (run / "summary.json").exists())


MOMENTS = {
    "checkpoint": lambda run: bool(list((run / "checkpoints").glob("step_*.tmp"))),
    "export": _exporting,
    "step": lambda run: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0,
}


def _chaos(command: list[str], run: Path, rng: random.Random, deadline: float) -> dict[str, int]:
    """Rerun ``command`` until it finishes, killing it at ``KILLS`` or more moments: a random delay, or the
    moment a checkpoint or an export is being written, or a step has been logged. Returns the kills by moment."""
    landed: dict[str, int] = {}
    plan = ["checkpoint", "export", "random", "checkpoint", "random", "step", "export", "random"]
    attempt = 0
    while True:
        assert time.time() < deadline, f"the chaos run did not finish in time (kills so far: {landed})"
        proc = _start(command)
        want = plan[attempt % len(plan)] if sum(landed.values()) < KILLS or "export" not in landed else None
        attempt += 1
        if want is None:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-4000:]
            return landed
        start, delay = time.time(), rng.uniform(0.5, 12.0)
        while proc.poll() is None:
            if (want == "random" and time.time() - start > delay) or (want in MOMENTS and MOMENTS[want](run)):
                _kill_tree(proc)
                landed[want] = landed.get(want, 0) + 1
                break
            time.sleep(0.002)
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()[-4000:]
            if (run / "summary.json").exists():  # finished before the moment came: start a fresh chaos run
                return landed | {"finished early": 1}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("launch,workers", [("one process", 2), ("two ZeRO-2 ranks", 0)])
def test_a_run_killed_at_random_moments_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path, tiny_shards, launch,
                                                                                   workers):
    recipe = _recipe(tmp_path, tiny_shards, workers)
    command = [*LAUNCH[launch], "--recipe", str(recipe)]
    reference = subprocess.run([*command, "name=reference"], cwd=REPO, env=subprocess_env(), capture_output=True,
                               text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-4000:]

    runs = tmp_path / "runs"
    rng = random.Random(f"{launch}-chaos")
    landed: dict[str, int] = {}
    deadline = time.time() + 1200
    while "finished early" in landed or not landed:  # a run that outran its kills is started over
        if (runs / "chaos").exists():
            import shutil
            shutil.rmtree(runs / "chaos")
        landed = _chaos([*command, "name=chaos"], runs / "chaos", rng, deadline)
    assert sum(landed.values()) >= KILLS and landed.get("checkpoint") and landed.get("export"), landed

    ref, chaos = runs / "reference", runs / "chaos"
    want, got = _tensors(ref / "encoder"), _tensors(chaos / "encoder")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "the resumed encoder differs from the uninterrupted one"
    for epoch in (0, 3, 6):
        snapshot = f"encoders/epoch_{epoch:05d}"
        assert all(torch.equal(a, b) for a, b in zip(_tensors(ref / snapshot).values(), _tensors(chaos / snapshot).values()))
    rows = [json.loads(line) for line in (chaos / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(ref_rows) + 1)), "metrics.jsonl has a gap or a repeat"
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows], "a resumed step saw other data or weights"
    summary = json.loads((chaos / "summary.json").read_text())
    assert summary["steps"] == len(ref_rows) and summary["skipped_samples"] == 0
    leftovers = [p.name for p in chaos.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert not leftovers, leftovers
