"""The fault kit: damaged shards, stale caches, concurrent runs, typos in data and paths, encodings, full or
read-only disks. Each fault must end in a clear answer (a one-line error naming what is wrong, or a skip that
is counted once and reported), never in a silent loss or a misleading message."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CLASSES, read_tar, subprocess_env, tiny_encoder_folder

from mgfm.sources.clip_index import AnnotationError, Clip, ClipIndex

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"size": "custom", "img_size": 32, "frames": 4, "dim": 32, "depth": 1, "heads": 2,
              "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 1, "norm_pix_loss": False}


def _copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def _shard_files(shards: Path, split: str) -> list[Path]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [shards / s["name"] for s in manifest["splits"][split]["shards"]]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600, **kw)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def _probe_args(run: Path, shards: Path, *extra: str) -> list[str]:
    return ["eval/linear_probe.py", f"run={run}", f"shards={shards}", "stream.num_workers=0", "stream.batch_size=2",
            "references=false", "kmeans=false", "linear.c_grid=[1.0]", *extra]


# ------------------------------------------------------------------------------- 1. an empty shard


@pytest.mark.parametrize("damage", ["zero bytes", "valid empty tar", "cut to one sample"])
def test_a_test_shard_that_lost_its_clips_is_an_error_unless_allowed(tmp_path, tiny_shards, damage):
    shards = _copy(tiny_shards, tmp_path)
    broken = _shard_files(shards, "test")[1]
    if damage == "zero bytes":
        broken.write_bytes(b"")
    else:
        members = read_tar(broken)
        keep = list(members)[:1] if damage == "cut to one sample" else []
        with tarfile.open(broken, "w") as tar:
            for key in keep:
                for ext, data in members[key].items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    lost = 3 - (1 if damage == "cut to one sample" else 0)
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")

    refused = _run(_probe_args(run, shards))
    assert refused.returncode == 2
    last = _last_line(refused)
    assert f"read {6 - lost} of 6 clips of test ({lost} lost: {broken.name}" in last and "allow_missing=true" in last

    allowed = _run(_probe_args(run, shards, "allow_missing=true"))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    out = run / "eval" / "shards"
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["test"]["expected"] == 6 and report["data"]["test"]["read"] == 6 - lost
    assert report["data"]["test"]["missing"] == lost and report["data"]["test"]["lost"][0]["shard"].endswith(broken.name)
    assert report["results"]["pretrained"]["probe"]["n"] == 6 - lost
    first = (out / "report.md").read_text().splitlines()[2]  # after the title
    assert first.startswith("**Incomplete data (allow_missing=true):** read")
    assert "Incomplete data" in allowed.stdout.splitlines()[0]


def test_pretraining_counts_the_clips_of_an_empty_train_shard_once(tmp_path, tiny_shards):
    shards = _copy(tiny_shards, tmp_path)
    _shard_files(shards, "train")[0].write_bytes(b"")
    recipe = {"name": "t", "out_dir": str(tmp_path / "runs"), "shards": str(shards), "synthetic_data": None,
              "model": TINY_MODEL, "stream": {"batch_size": 2, "num_workers": 0, "mask_ratio": 0.5},
              "optim": {"base_lr": 0.5, "epochs": 5, "warmup_epochs": 0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = _run(["pretrain.py", "--recipe", str(tmp_path / "r.yaml")])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    # 3 clips lost over 5 epochs of resampled passes: counted once each, the shard once
    assert summary["skipped_samples"] == 3 and summary["broken_shards"] == 1
    assert "empty shard: 0 bytes" in result.stderr


# ------------------------------------------------------------------------------- 2. the feature cache


def test_the_feature_cache_never_keeps_a_loss_and_follows_the_shard_files(tmp_path, tiny_shards):
    from mgfm.data.stream import StreamConfig
    from mgfm.evaluate.extract import eval_stream_config, split_features

    shards = _copy(tiny_shards, tmp_path)
    encoder = tiny_encoder_folder(tmp_path / "encoder")
    cfg = eval_stream_config(StreamConfig(frames=4, img_size=32), batch_size=2, num_workers=0)
    cache = tmp_path / "cache"
    shard = _shard_files(shards, "test")[0]
    saved = shard.read_bytes()
    shard.write_bytes(b"")
    partial = split_features(encoder, shards, "test", cfg, cache)
    assert len(partial) == 3 and partial.read["missing"] == 3
    assert not list(cache.glob("*.json")), "an incomplete set must not be cached"

    shard.write_bytes(saved)  # restored: every clip again, now cached
    full = split_features(encoder, shards, "test", cfg, cache)
    assert len(full) == 6 and full.read["missing"] == 0 and len(list(cache.glob("*.json"))) == 1

    # the manifest is part of the key: a rewritten manifest (other classes, say) is never served stale
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["class_names"] = ["x", "y", "z"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    split_features(encoder, shards, "test", cfg, cache)
    assert len(list(cache.glob("*.json"))) == 2
    # so are the shard files: one rewritten in place (same manifest) is read again
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    split_features(encoder, shards, "test", cfg, cache)
    assert len(list(cache.glob("*.json"))) == 3


def test_features_dir_moves_the_evaluation_cache(tmp_path, tiny_shards):
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = _run(_probe_args(run, tiny_shards, f"features_dir={tmp_path / 'elsewhere'}"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "elsewhere").glob("*.safetensors")) and not (run / "features").exists()


# ------------------------------------------------------------------------------- 3. concurrent runs


def _tiny_recipe(tmp_path: Path, shards: Path, **extra) -> Path:
    recipe = {"name": "dup", "out_dir": str(tmp_path / "runs"), "shards": str(shards), "synthetic_data": None,
              "model": TINY_MODEL, "stream": {"batch_size": 2, "num_workers": 0, "mask_ratio": 0.5},
              "optim": {"base_lr": 0.5, "epochs": 1, "warmup_epochs": 0}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_second_writer_of_a_run_folder_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, tiny_shards):
    from mgfm.files import FolderLock

    recipe = _tiny_recipe(tmp_path, tiny_shards)
    run = tmp_path / "runs" / "dup"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir(parents=True)
        lock = {"pid": holder.pid, "host": os.uname().nodename, "started": None, "since": "earlier"}
        (run / FolderLock.NAME).write_text(json.dumps(lock))
        refused = _run(["pretrain.py", "--recipe", str(recipe)])
        assert refused.returncode == 2
        assert f"is in use by pid {holder.pid}" in _last_line(refused)
        assert not (run / "recipe.yaml").exists(), "the refused run must not write into the folder"
    finally:
        holder.kill()
        holder.wait()
    taken = _run(["pretrain.py", "--recipe", str(recipe)])  # the holder is gone now
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert f"taking over the lock of pid {holder.pid}" in taken.stderr
    assert not (run / FolderLock.NAME).exists() and (run / "encoder" / "config.json").exists()


def test_folder_lock_in_process(tmp_path):
    from mgfm.files import FolderInUse, FolderLock

    with FolderLock(tmp_path / "run"):
        with pytest.raises(FolderInUse, match=f"in use by pid {os.getpid()}"):
            with FolderLock(tmp_path / "run"):
                pass
    with FolderLock(tmp_path / "run"):  # released on exit
        pass


# ------------------------------------------------------------------------------- 4. a mistyped shards path


def test_a_mistyped_shards_path_is_an_error_not_a_reason_to_render(tmp_path, tiny_shards):
    recipe = _tiny_recipe(tmp_path, tiny_shards)
    synthetic = tmp_path / "data" / "synthetic"
    result = _run(["pretrain.py", "--recipe", str(recipe), f"shards={tmp_path / 'shrads'}",
                   f"synthetic_data={synthetic}"])
    assert result.returncode == 2
    assert "shrads: no manifest.json there" in _last_line(result)
    assert not synthetic.exists() and not (tmp_path / "shrads").exists()


# ------------------------------------------------------------------------------- 5. a damaged train split


def test_classes_a_damaged_train_split_lost_are_named(tmp_path, tiny_videos):
    from mgfm.shards import BuildConfig, build_shards

    # train: class_a and class_b in the first shard, class_c alone in the second
    clips = [Clip("v0", 0, 9, 0, "1", "train", 25.0, str(tiny_videos["v0"])),
             Clip("v0", 10, 19, 1, "1", "train", 25.0, str(tiny_videos["v0"])),
             Clip("v1", 2, 12, 2, "2", "train", 25.0, str(tiny_videos["v1"])),
             Clip("v2", 0, 9, 0, "3", "test", 25.0, str(tiny_videos["v2"])),
             Clip("v2", 10, 19, 2, "3", "test", 25.0, str(tiny_videos["v2"])),
             Clip("v3", 0, 9, 1, "4", "test", 25.0, str(tiny_videos["v3"]))]
    shards = tmp_path / "shards"
    build_shards(ClipIndex(clips, list(TINY_CLASSES), "t", {}), shards, BuildConfig(short_side=32, shard_samples=2,
                                                                                    crf=12), source={"format": "t"})
    _shard_files(shards, "train")[1].write_bytes(b"")
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = _run(_probe_args(run, shards))
    assert result.returncode == 2
    last = _last_line(result)
    assert "classes 2 ('class_c') have test clips but no train clips" in last
    assert "read 2 of 3 clips of train (1 lost" in last and "NaN" not in result.stderr


# ------------------------------------------------------------------------------- 6. readers


def _csv(tmp_path: Path, rows: list[str], name: str = "clips.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(("path,label,subject,split\n" + "\n".join(rows) + "\n").encode(encoding))
    return path


def _read(path: Path, **kw) -> ClipIndex:
    from mgfm.sources.generic_csv import read_csv_index

    return read_csv_index(path, **kw)


def test_a_typo_in_a_names_only_csv_is_not_a_new_class(tmp_path):
    rows = [f"v{i}.mp4,touch forehead,s{i},train" for i in range(5)] + ["v9.mp4,touch forhead,s9,test",
                                                                        "v8.mp4,fold arms,s8,test"]
    with pytest.raises(AnnotationError) as err:
        _read(_csv(tmp_path, rows))
    message = str(err.value)
    assert "clips.csv:7 field 'label'" in message and "did you mean 'touch forehead'?" in message
    assert "\n" not in message
    # names a case apart are the same typo
    with pytest.raises(AnnotationError, match="did you mean 'fold arms'"):
        _read(_csv(tmp_path, ["a.mp4,fold arms,s1,train", "b.mp4,fold arms,s1,train", "c.mp4,Fold Arms,s2,test"]))
    # a given class list: a name outside it is refused with a suggestion; near names are fine there
    with pytest.raises(AnnotationError, match="unknown class 'touch forhead'; did you mean 'touch forehead'"):
        _read(_csv(tmp_path, rows), class_names=["touch forehead", "fold arms"])
    ok = _read(_csv(tmp_path, ["a.mp4,touch hat,s1,train", "b.mp4,touch hair,s2,test"]),
               class_names=["touch hat", "touch hair"])
    assert [c.label for c in ok.clips] == [0, 1]


def test_repeated_rows_are_an_error_naming_both_lines_or_dropped_with_dedupe(tmp_path, caplog):
    rows = ["a.mp4,x,s1,train", "b.mp4,y,s1,train", "a.mp4,x,s1,train", "c.mp4,x,s2,test"]
    with pytest.raises(AnnotationError, match=r"clips.csv:4: the same clip as line 2 .*--dedupe"):
        _read(_csv(tmp_path, rows))
    index = _read(_csv(tmp_path, rows), dedupe=True)
    assert len(index.clips) == 3 and "1 repeated row(s) dropped" in caplog.text
    with pytest.raises(AnnotationError, match="the same clip as line 2 with another label"):
        _read(_csv(tmp_path, ["a.mp4,x,s1,train", "a.mp4,y,s1,train"]), dedupe=True)


def test_shard_builder_takes_a_class_list_and_dedupe(tmp_path):
    from mgfm.sources.formats import read_source_index

    csv = _csv(tmp_path, ["a.mp4,touch hat,s1,train", "a.mp4,touch hat,s1,train", "b.mp4,touch hair,s2,test"])
    (tmp_path / "classes.txt").write_text("touch hat\ntouch hair\n")
    index = read_source_index("csv", csv, classes=tmp_path / "classes.txt", dedupe=True)
    assert index.class_names == ["touch hat", "touch hair"] and len(index.clips) == 2


# ------------------------------------------------------------------------------- 7. disks and permissions


def test_a_read_only_run_folder_is_one_line(tmp_path, tiny_shards, monkeypatch, capsys):
    import mgfm.train.pretrain as pretrain
    from mgfm.pipeline import pretrain_main

    def read_only(recipe, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path) + ".tmp")

    monkeypatch.setattr(pretrain, "save_recipe", read_only)
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--recipe", str(_tiny_recipe(tmp_path, tiny_shards))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pretrain.py: error: cannot write") and "recipe.yaml.tmp: read-only file system" in err


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import shutil as shutil_module

    from accelerate.state import AcceleratorState

    from test_engine import _recipe

    from mgfm.files import StorageError
    from mgfm.train import checkpoint
    from mgfm.train.engine import Engine, Schedule

    AcceleratorState._reset_state(True)
    engine = Engine(_recipe())
    model = torch.nn.Linear(2, 1)
    engine.prepare(model, [{"params": list(model.parameters())}], Schedule(4, 4, 0, 1e-3, 1e-6))
    good = engine.save(tmp_path / "ckpt", 1, {})

    def full(path):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos; basic_ios::clear: iostream error")

    monkeypatch.setattr(engine.accelerator, "save_state", full)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: shutil_module._ntuple_diskusage(100, 100, 0))
    with pytest.raises(StorageError, match=r"cannot write .*step_00000002.tmp: no space left on the device"):
        engine.save(tmp_path / "ckpt", 2, {})
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "ckpt")] == [good.name]
    assert not (tmp_path / "ckpt" / "step_00000002.tmp").exists()
    AcceleratorState._reset_state(True)


def test_a_full_disk_while_building_shards_is_one_line(tmp_path, tiny_csv, monkeypatch, capsys):
    import mgfm.shards.__main__ as shards_cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "train-000000.tar.tmp"))

    monkeypatch.setattr(shards_cli, "build_shards", full)
    assert shards_cli.main(["build", "--format", "csv", "--index", str(tiny_csv), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {tmp_path / 'out' / 'train-000000.tar.tmp'}: no space left on the device"


# ------------------------------------------------------------------------------- 8. encodings


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    index = _read(_csv(tmp_path, ["a.mp4,x,s1,train", "b.mp4,y,s2,test"], encoding="utf-8-sig"))
    assert [c.label_name for c in index.clips] == ["x", "y"]


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = _csv(tmp_path, ["a.mp4,touch forehead,s1,train", "b.mp4,café,s2,test"], encoding="latin-1")
    with pytest.raises(AnnotationError, match=r"clips.csv:3: not UTF-8 text \(byte 0xe9 at column 10\)"):
        _read(path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"name: x\n\x89PNG\r\n\x1a\n\x00\x00")
    result = _run(["pretrain.py", "--recipe", str(recipe)])
    assert result.returncode == 2
    assert _last_line(result) == (f"pretrain.py: error: recipe {recipe}:2: not UTF-8 text (byte 0x89 at column 1); "
                                  f"save it as UTF-8")


# ------------------------------------------------------------------------------- 9. streams


def test_a_garbage_mp4_is_skipped_without_printing_its_bytes(tmp_path, tiny_shards):
    shards = _copy(tiny_shards, tmp_path)
    shard = _shard_files(shards, "test")[0]
    members = read_tar(shard)
    first = next(iter(members))
    members[first]["mp4"] = bytes(range(256)) * 4
    with tarfile.open(shard, "w") as tar:
        for key, files in members.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = _run(_probe_args(run, shards, "allow_missing=true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(c.isprintable() or c in "\n\r\t\x1b" for c in result.stderr + result.stdout), "binary on the terminal"
    report = json.loads((run / "eval" / "shards" / "report.json").read_text())
    assert report["data"]["test"]["missing"] == 1 and report["data"]["test"]["lost"][0]["key"] == first


@pytest.mark.slow
def test_two_ranks_with_a_missing_train_shard_skip_and_count_like_one(tmp_path, tiny_shards):
    shards = _copy(tiny_shards, tmp_path)
    _shard_files(shards, "train")[1].unlink()
    recipe = _tiny_recipe(tmp_path, shards, optim={"base_lr": 0.5, "epochs": 3, "warmup_epochs": 0})
    launch = ["-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/multi_cpu_deepspeed.yaml"]
    result = _run([*launch, "pretrain.py", "--recipe", str(recipe)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "dup" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["skipped_samples"] == 3 and summary["broken_shards"] == 1
    assert "missing shard" in result.stderr


def test_fine_tuning_refuses_a_test_split_that_lost_clips(tmp_path, tiny_shards):
    shards = _copy(tiny_shards, tmp_path)
    _shard_files(shards, "test")[0].write_bytes(b"")
    encoder = tiny_encoder_folder(tmp_path / "encoder")
    args = ["eval/finetune.py", f"run={encoder}", f"shards={shards}", f"out={tmp_path / 'ft'}", "stream.num_workers=0",
            "stream.batch_size=2", "optim.epochs=1", "views=1", "head_init=random"]
    refused = _run(args)
    assert refused.returncode == 2
    assert "read 3 of 6 clips of test (3 lost" in _last_line(refused) and "allow_missing=true" in _last_line(refused)
    allowed = _run([*args, "allow_missing=true"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert json.loads((tmp_path / "ft" / "report.json").read_text())["test_clips"] == 3


# ------------------------------------------------------------------------------- 9. recipe values


@pytest.mark.parametrize("override,expected", [
    ("stream.decoder_keep_ratio=1.5", "stream.decoder_keep_ratio=1.5: expected a value in (0, 1]"),
    ("stream.mask_ratio=1.5", "stream.mask_ratio=1.5: expected a value in (0, 1)"),
])
def test_a_value_that_cannot_train_is_one_line_before_any_folder(tmp_path, tiny_shards, override, expected):
    # decoder_keep_ratio=1.5 used to hang pretraining: every clip failed inside our mask code and was counted
    # as a bad sample, so the run sat at step 0
    result = _run(["pretrain.py", "--recipe", str(_tiny_recipe(tmp_path, tiny_shards)), override])
    assert result.returncode == 2 and expected in _last_line(result)
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line, no traceback
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script,override,expected", [
    ("eval/finetune.py", "optim.label_smoothing=1.0", "optim.label_smoothing=1: expected a value in [0, 1)"),
    ("eval/linear_probe.py", "linear.cv_folds=1", "linear.cv_folds=1: expected >= 2"),
    ("eval/retrieval.py", "recall_target=1.5", "recall_target=1.5: expected a value in (0, 1]"),
])
def test_evaluators_check_their_values_before_any_folder(tmp_path, tiny_shards, script, override, expected):
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = _run([script, f"run={run}", f"shards={tiny_shards}", override])
    err = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in err and err.startswith(f"{script}: error: ") and err.endswith(expected), err
    assert sorted(p.name for p in run.iterdir()) == ["encoder"]


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot write, and the cause the error must name: a 1 MB read-only tmpfs mount
    where we may mount (root: permissions do not stop root), else a folder without write permission."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "permission denied"
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root without the right to mount ({mounted.stderr.decode().strip()}): no folder "
                    f"this process cannot write")
    yield folder, "read-only file system"
    subprocess.run(["umount", str(folder)], check=True)


def test_a_features_folder_that_cannot_be_written_names_the_real_cause(tmp_path, tiny_shards, unwritable_folder):
    # the small read-only mount has almost no free space: the cause must come from the errno, not from df
    folder, cause = unwritable_folder
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = _run(_probe_args(run, tiny_shards, f"features_dir={folder}"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = _last_line(result)
    assert last.startswith(f"eval/linear_probe.py: error: cannot write {folder}/") and last.endswith(f": {cause}"), last
    assert "Traceback" not in result.stderr


def test_storage_causes_come_from_the_errno_a_library_quotes():
    from safetensors import SafetensorError

    from mgfm.files import storage_cause

    quoted = SafetensorError('Error while serializing: IoError(Os { code: 13, kind: PermissionDenied, message: '
                             '"Permission denied" })')
    assert storage_cause(quoted, "/") == "permission denied"
    assert storage_cause(RuntimeError("write failed (os error 28)")) == "no space left on the device"
    assert storage_cause(OSError(errno.EROFS, "Read-only file system")) == "read-only file system"
    assert storage_cause(OSError(errno.EIO, "I/O error"), "/") is None  # an errno we do not blame on the machine
    assert storage_cause(RuntimeError("boom")) is None


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    from mgfm.files import atomic_path, write_atomic

    target = write_atomic(tmp_path / "report.json", "old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            1 / 0
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# ------------------------------------------------------------------------------- 10. what the stream reports


def test_a_missing_shard_and_a_short_shard_are_reported_apart_and_sizes_are_checked(tmp_path, tiny_shards):
    shards = _copy(tiny_shards, tmp_path)
    train = _shard_files(shards, "train")
    train[0].unlink()  # missing
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["samples"] += 2  # lists more samples than the shard holds
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with open(train[1], "ab") as handle:  # and a size that differs from the manifest's
        handle.write(bytes(1024))
    result = _run(["pretrain.py", "--recipe", str(_tiny_recipe(tmp_path, shards)), "optim.epochs=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = json.loads((tmp_path / "runs" / "dup" / "summary.json").read_text())["skipped_by_reason"]
    assert set(reasons) == {"missing shard", "fewer than the manifest lists"}, reasons
    assert f"{train[1]} is" in result.stderr and "its manifest says" in result.stderr and "verify" in result.stderr


def test_clips_shorter_than_the_clip_length_are_said_to_be_filled(tiny_shards, caplog):
    from mgfm.data.stream import StreamConfig, make_loader

    cfg = StreamConfig(frames=32, img_size=32, masks=False, num_workers=0, batch_size=4)  # tiny clips: 8-14 frames
    loader, skips = make_loader(tiny_shards, "test", cfg, mode="eval", rank=0, world=1)
    assert sum(len(b["clip_id"]) for b in loader) == 6 and skips.total == 0 and skips.padded == 6
    assert "6 clips are shorter than 32 frames and were filled (stream.pad=stretch)" in caplog.text


def test_ctrl_c_is_one_line_saying_a_rerun_resumes(capsys):
    from mgfm.cli import run_cli
    from mgfm.train.recipe import OptimConfig

    def interrupted(recipe):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(OptimConfig, interrupted, [], "pretrain.py", "test")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "pretrain.py: interrupted; rerun the same command to resume"


# ------------------------------------------------------------------------------- 10. caches and builds that cannot lie


@pytest.mark.parametrize("damage", ["cut tensor file", "junk json", "rewritten tensor file", "older cache"])
def test_a_damaged_feature_cache_is_named_once_recomputed_and_rewritten(tmp_path, tiny_shards, caplog, damage):
    # issue 39, fault 3: `truncate -s 100` gave "mmap length is greater than file size", junk JSON a
    # JSONDecodeError, on every later evaluation; a rewritten tensor file was read as if it were the features
    import numpy as np

    from mgfm.data.stream import StreamConfig
    from mgfm.evaluate.extract import eval_stream_config, split_features
    from mgfm.evaluate.featureset import FeatureSet

    encoder = tiny_encoder_folder(tmp_path / "encoder")
    cfg = eval_stream_config(StreamConfig(frames=4, img_size=32), batch_size=2, num_workers=0)
    cache = tmp_path / "cache"
    first = np.array(split_features(encoder, tiny_shards, "test", cfg, cache).features)
    [meta_path] = cache.glob("*.json")
    stem = meta_path.with_suffix("")
    tensor_path = stem.with_suffix(".safetensors")
    if damage == "cut tensor file":
        os.truncate(tensor_path, 100)
    elif damage == "junk json":
        meta_path.write_text("junk{")
    elif damage == "rewritten tensor file":  # same size, other numbers: only the checksum tells
        data = bytearray(tensor_path.read_bytes())
        data[-4:] = np.float32(1e6).tobytes()
        tensor_path.write_bytes(bytes(data))
    else:  # written before caches carried a size and a checksum: nothing vouches for the tensor file
        meta = json.loads(meta_path.read_text())
        meta.pop("tensor", None)
        meta_path.write_text(json.dumps(meta))

    caplog.set_level(logging.INFO)
    caplog.clear()
    again = split_features(encoder, tiny_shards, "test", cfg, cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"feature cache {stem.name} is not usable" in warnings[0], warnings
    np.testing.assert_array_equal(again.features, first)

    caplog.clear()  # rewritten: the next evaluation reads it, silently
    cached = split_features(encoder, tiny_shards, "test", cfg, cache)
    assert not [r for r in caplog.records if r.levelname == "WARNING"] and "cached at" in caplog.text
    np.testing.assert_array_equal(cached.features, first)
    np.testing.assert_array_equal(FeatureSet.load(stem).features, first)


def _kinect_v1(path: Path, frames: int = 20) -> Path:
    """Kinect v1 joint text: a frame number and x y z for 20 joints per line (61 values)."""
    rows = [" ".join(str(v) for v in [i, *[0.01 * (i + j) for j in range(60)]]) for i in range(frames)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_build_that_skipped_every_clip_fails_and_verify_fails_on_it(tmp_path, capsys):
    # issue 39, fault 5: kinect-v1 files built with --layout kinect-v2 exited 0 with "0 samples" and verify said OK
    from mgfm.shards.__main__ import main as shards_main

    for name in ("s1", "s2", "s3"):
        _kinect_v1(tmp_path / f"{name}.txt")
    (tmp_path / "poses.csv").write_text("path,subject,split,fps\ns1.txt,1,train,30\ns2.txt,2,train,30\n"
                                        "s3.txt,3,test,30\n")
    out = tmp_path / "shards"
    assert shards_main(["build", "--format", "pose", "--index", str(tmp_path / "poses.csv"), "--layout", "kinect-v2",
                        "--out", str(out), "--short-side", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {out}: every split (test, train) has no samples: all 3 of the clips were "
                              f"skipped (3 x pose file unreadable (e.g. "), err[-1]
    assert "61 values per line do not fit layout kinect-v2" in err[-1]
    assert json.loads((out / "manifest.json").read_text())["totals"]["skipped"] == 3  # the record is kept

    assert shards_main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "PROBLEM split train: no samples: all 2 of its clips were skipped (2 x pose file unreadable" in printed
    assert "PROBLEM split test: no samples: its only clip was skipped" in printed


def test_a_split_that_came_out_empty_is_named_alone(tmp_path, tiny_videos):
    from mgfm.errors import InputError
    from mgfm.shards import BuildConfig, build_shards

    clips = [Clip("v0", 0, 9, 0, "1", "train", 25.0, str(tiny_videos["v0"])),
             Clip("gone", 0, 9, 1, "2", "test", 25.0, str(tmp_path / "gone.mp4")),
             Clip("gone", 10, 19, 2, "2", "test", 25.0, str(tmp_path / "gone.mp4"))]
    with pytest.raises(InputError) as err:
        build_shards(ClipIndex(clips, list(TINY_CLASSES), "t"), tmp_path / "shards", BuildConfig(short_side=32, crf=12))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'shards'}: split 'test' has no samples: all 2 of its clips were skipped "
                              f"(2 x source video unreadable (e.g. FileNotFoundError: source video not found: ")
    assert "train" not in message.split(";")[0] and "\n" not in message


def _symlink_loop(tmp_path: Path) -> Path:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return loop


def test_a_shards_path_that_is_a_symlink_loop_is_one_line(tmp_path, tiny_shards, capsys):
    # issue 39, fault 6: pretraining ended in "RuntimeError: Symlink loop from ..." (Path.resolve)
    from mgfm.errors import InputError
    from mgfm.pipeline import pretrain_main
    from mgfm.shards.read import resolve_shards

    loop = _symlink_loop(tmp_path)
    synthetic = tmp_path / "synthetic"
    with pytest.raises(SystemExit) as exit_info:
        pretrain_main(["--recipe", str(_tiny_recipe(tmp_path, tiny_shards)), f"shards={loop}",
                       f"synthetic_data={synthetic}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"pretrain.py: error: {loop}: a symlink loop (a link on this path points back to itself); " \
                      f"fix or remove the link"
    assert not synthetic.exists() and not (tmp_path / "runs").exists()
    for read in (lambda: resolve_shards(loop, "train"), lambda: resolve_shards(loop / "manifest.json", "train")):
        with pytest.raises(InputError, match="a symlink loop"):
            read()


@pytest.mark.parametrize("where", ["name=", "--out", "features_dir=", "out="])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, tiny_shards, tiny_csv, capsys, where):
    # issue 39, fault 6: each of these ended in a FileExistsError traceback (features_dir= after encoding)
    from mgfm.cli import run_cli
    from mgfm.evaluate.probe_eval import ProbeRecipe, run as probe
    from mgfm.pipeline import pretrain_main
    from mgfm.shards.__main__ import main as shards_main

    blocker = tmp_path / "taken"
    blocker.write_text("a file\n")
    expected = f"{blocker} is a file, where a folder belongs; pick another path or move it away"
    if where == "--out":
        assert shards_main(["build", "--format", "csv", "--index", str(tiny_csv), "--out", str(blocker)]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {expected}"
        return
    with pytest.raises(SystemExit) as exit_info:
        if where == "name=":
            pretrain_main(["--recipe", str(_tiny_recipe(tmp_path, tiny_shards)), f"out_dir={tmp_path}", "name=taken"])
        else:
            run = tiny_encoder_folder(tmp_path / "run" / "encoder").parent
            target = blocker if where == "features_dir=" else blocker / "report"
            run_cli(ProbeRecipe, probe, [f"run={run}", f"shards={tiny_shards}", "references=false", "kmeans=false",
                                       "stream.num_workers=0", f"{where}{target}"], "eval/linear_probe.py", "test")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if where == "out=":
        expected = expected.replace(f"{blocker} is", f"{blocker} (on the path to {blocker / 'report'}) is")
    prog = "pretrain.py" if where == "name=" else "eval/linear_probe.py"
    assert err == f"{prog}: error: {expected}", err
    assert blocker.read_text() == "a file\n"


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n\n"])
def test_an_empty_recipe_file_is_one_line_not_the_built_in_defaults(tmp_path, capsys, text):
    # issue 39, fault 7: an empty recipe file trained silently on built-in defaults, which are not the documented
    # default recipe (recipes/pretrain/tiny_cpu.yaml)
    from mgfm.cli import run_cli
    from mgfm.config import RecipeError, load_recipe
    from mgfm.train.recipe import PretrainRecipe

    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"{path}: the recipe file is empty"):
        load_recipe(PretrainRecipe, path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(PretrainRecipe, lambda recipe: pytest.fail("ran on built-in defaults"), ["--recipe", str(path)],
                "pretrain.py", "test")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"pretrain.py: error: {path}: the recipe file is empty (no keys); write the "
                                       f"keys to set, or leave --recipe out to run the default recipe\n")
