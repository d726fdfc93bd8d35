"""`make real-motion` (experiments.real_motion): shards from a clip CSV with start/end frames, one mixture
pretraining per seed, both probes with their reference rows on every set, and the table over seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_CLIPS, TINY_VIDEOS

from experiments.curve import main as curve_main
from experiments.real_motion import main

TINY_MODEL = ["model.size=custom", "model.img_size=32", "model.frames=4", "model.dim=32", "model.depth=1",
              "model.heads=2", "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=1"]


def _fake_shared(root: Path, tiny_videos: dict[str, Path]) -> Path:
    """``<root>/mini/index.csv``: the tiny clips as a long-video clip CSV (cut by start/end frames)."""
    (root / "mini").mkdir(parents=True)
    with (root / "mini" / "index.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject", "split", "start_frame", "end_frame", "video_id"])
        for vid, start, end, label in TINY_CLIPS:
            _, subject, split = TINY_VIDEOS[vid]
            writer.writerow([str(tiny_videos[vid]), label, subject, split, start, end, vid])
    return root


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~5 min: two seeds pretrained, both probes on every snapshot
def test_real_motion_table_over_seeds_and_probes(tmp_path, tiny_videos, capsys):
    shared = _fake_shared(tmp_path / "shared", tiny_videos)
    out = tmp_path / "out"
    main(["--shared", str(shared), "--real", "mini", "--no-synthetic", "--shards-dir", str(tmp_path / "shards"),
          "--out", str(out), "--seeds", "0,1", *TINY_MODEL, "stream.batch_size=2", "stream.num_workers=0",
          "stream.shuffle_buffer=4", "stream.mask_ratio=0.5", "stream.decoder_keep_ratio=1.0", "patch_init_clips=4", "optim.epochs=2", "optim.warmup_epochs=0", "checkpoint_every=0",
          "export_epochs=[0,1]"])
    manifest = json.loads((tmp_path / "shards" / "mini" / "manifest.json").read_text())
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 6, "test": 6}
    table = json.loads((out / "table.json").read_text())
    for probe in ("linear", "attentive"):
        per_seed = table["sets"]["mini"][probe]["per_seed"]
        assert set(per_seed) == {"pretrained", "epoch 0", "random init", "raw pixels"}
        assert all(len(v) == 2 for v in per_seed.values())
        assert per_seed["raw pixels"][0] == per_seed["raw pixels"][1]  # no seed in the pixel reference
        # the final row is the final encoder's probe, epoch 0 the seed's own initialisation (= its random init)
        final = out / "seed1" / "curve" / "epoch_00002" / probe / "mini" / "report.json"
        assert json.loads(final.read_text())["results"]["pretrained"]["probe"]["top1"] == per_seed["pretrained"][1]
        assert per_seed["epoch 0"] == per_seed["random init"]
        mean = table["sets"]["mini"][probe]["mean"]
        assert table["sets"]["mini"][probe]["gap"]["pixels"] == pytest.approx(mean["pretrained"] - mean["raw pixels"])
        # every row's seed mean has its 95% interval over the test clips, and the gaps say whether they overlap
        for row, (low, high) in table["sets"]["mini"][probe]["ci95"].items():
            assert low <= mean[row] <= high and 0 <= low <= high <= 1
        apart = table["sets"]["mini"][probe]["intervals_apart"]
        ci = table["sets"]["mini"][probe]["ci95"]
        assert apart["pixels"] == (ci["pretrained"][0] > ci["raw pixels"][1] or ci["pretrained"][1] < ci["raw pixels"][0])
        point = table["curve"]["scores"]["mini"][probe]
        assert len(point["pretrained ci95"]) == 3 and point["random init ci95"][0] <= point["random init"]
        assert table["curve"]["epochs"] == [0, 1, 2]
        assert table["curve"]["scores"]["mini"][probe]["pretrained"][-1] == pytest.approx(mean["pretrained"])
    assert (out / "seed0" / "encoder" / "config.json").exists() and (out / "seed1" / "encoders" / "epoch_00001").is_dir()
    text = (out / "table.md").read_text()
    assert "pretrained - pixels" in text and "final - epoch 0" in text and "Learning curve" in text
    assert " ± " in text and "(sd " in text
    assert (out / "curves.png").stat().st_size > 1000 and "table:" in capsys.readouterr().out

    # the runs' curves side by side (their probe reports reused), with one curve kept as a file
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps([{**table["curve"], "run": "earlier/mean", "scores": {
        "mini": {"linear": table["curve"]["scores"]["mini"]["linear"]}}}]))
    compare = tmp_path / "compare.png"
    curve_main([str(out / "seed0"), str(out / "seed1"), "--shards", str(tmp_path / "shards" / "mini"),
                "--compare", str(compare), "--add", str(kept)])
    assert compare.stat().st_size > 1000 and f"comparison: {compare}" in capsys.readouterr().out
    # an earlier block's tokens: a curve of its own, beside the last block's
    curve_main([str(out / "seed0"), "--shards", str(tmp_path / "shards" / "mini"), "--probes", "linear",
                "--block", "1"])
    by_block = json.loads((out / "seed0" / "curve-block1" / "report.json").read_text())
    assert by_block["block"] == 1 and by_block["epochs"] == [0, 1, 2] and "block 1" in capsys.readouterr().out
    probed = json.loads((out / "seed0" / "curve-block1" / "epoch_00002" / "linear" / "mini" / "report.json").read_text())
    assert probed["block"] == 1 and "tokens read after encoder block 1" in (
        out / "seed0" / "curve-block1" / "epoch_00002" / "linear" / "mini" / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        curve_main([str(out / "seed0"), "--shards", str(tmp_path / "shards" / "mini"), "--block", "2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "block=2: the encoder" in err and "blocks 1 to 1" in err
    kept.write_text(json.dumps({"epochs": [0]}))
    with pytest.raises(SystemExit) as exit_info:
        curve_main(["--compare", str(compare), "--add", str(kept)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "not a curve" in err


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~2 min
def test_a_corpus_run_is_probed_on_built_shard_folders(tmp_path, tiny_shards, capsys):
    """--corpus: the recipe's own shards are pretrained on; --real names a built shard folder to probe;
    --curve-probes keeps the attentive probe to the run's two ends; a finished run is reused as it is."""
    out = tmp_path / "out"
    argv = ["--corpus", "--real", str(tiny_shards), "--no-synthetic", "--out", str(out), "--seeds", "3", "--probes",
            "linear,attentive", "--curve-probes", "linear", f"shards=[{tiny_shards}]", *TINY_MODEL,
            "stream.batch_size=2", "stream.num_workers=0", "stream.shuffle_buffer=4", "stream.mask_ratio=0.5",
            "stream.decoder_keep_ratio=1.0", "patch_init_clips=4", "optim.epochs=2", "optim.warmup_epochs=0",
            "checkpoint_every=0", "export_epochs=[0,1]", "stream.cache=none"]
    main(argv)
    recipe = (out / "seed3" / "recipe.yaml").read_text()
    assert str(tiny_shards) in recipe and "seed: 3" in recipe
    table = json.loads((out / "table.json").read_text())
    name = tiny_shards.name
    assert set(table["sets"]) == {name} and table["sets"][name]["linear"]["per_seed"]["pretrained"]
    assert "its own shards (a corpus)" in (out / "table.md").read_text()
    curve_dir = out / "seed3" / "curve"
    assert [(curve_dir / f"epoch_0000{e}" / "attentive").is_dir() for e in (0, 1, 2)] == [True, False, True]
    assert [(curve_dir / f"epoch_0000{e}" / "linear").is_dir() for e in (0, 1, 2)] == [True, True, True]
    attentive = table["sets"][name]["attentive"]["per_seed"]
    final = json.loads((curve_dir / "epoch_00002" / "attentive" / name / "report.json").read_text())
    assert attentive["pretrained"] == [final["results"]["pretrained"]["probe"]["top1"]]
    assert attentive["epoch 0"] == attentive["random init"] and set(table["curve"]["scores"][name]) == {"linear"}
    trained = (out / "seed3" / "encoder" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    main(argv)  # (setup_logging's basicConfig(force=True) writes to the captured stderr, not to caplog)
    assert "finished with this recipe; reused" in capsys.readouterr().err
    assert (out / "seed3" / "encoder" / "model.safetensors").stat().st_mtime_ns == trained


def test_missing_real_set_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--shared", str(tmp_path), "--no-synthetic", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("experiments.real_motion: error: ") and "no such file" in err and "utkinect" in err
