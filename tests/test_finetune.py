"""Fine-tuning: stratified labelled subsets, the FixMatch loss, the HF classification export, and
eval/finetune.py end to end on tiny shards (reports, resume, compare grid, bad input, two CPU ranks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import subprocess_env

from mgfm.data.subset import SubsetError, stratified_subset
from mgfm.model.encoder import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = dict(size="custom", img_size=32, frames=4, dim=32, depth=2, heads=2, decoder_dim=16, decoder_depth=1,
            decoder_heads=1)


# ------------------------------------------------------------------------------------------- subset


def _long_tail(seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    sizes = [200, 60, 20, 7, 3, 1]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    ids = [f"clip{k:04d}" for k in rng.permutation(len(labels))]
    return ids, labels


def test_stratified_subset_is_deterministic_complete_and_nested():
    ids, labels = _long_tail()
    a = stratified_subset(ids, labels, 0.1, seed=3)
    order = np.random.default_rng(1).permutation(len(ids))
    b = stratified_subset([ids[i] for i in order], [labels[i] for i in order], 0.1, seed=3)
    assert a == b, "the subset must not depend on the order the clips arrive in"
    lab = dict(zip(ids, labels))
    counts = np.bincount([lab[c] for c in a], minlength=6)
    assert counts.tolist() == [20, 6, 2, 1, 1, 1]  # round(0.1 * n), at least one per class
    assert stratified_subset(ids, labels, 0.1, seed=4) != a  # the seed picks the clips
    assert set(stratified_subset(ids, labels, 0.05, seed=3)) <= set(a) <= set(stratified_subset(ids, labels, 0.5, seed=3))
    assert stratified_subset(ids, labels, 1.0) == sorted(ids)
    # unlabelled clips are never chosen
    assert "u" not in stratified_subset([*ids, "u"], [*labels, -1], 1.0)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, "half"])
def test_fraction_outside_0_1_is_rejected(fraction):
    ids, labels = _long_tail()
    with pytest.raises(SubsetError, match=r"label_fraction: expected a fraction in \(0, 1\]"):
        stratified_subset(ids, labels, fraction)


def test_classes_a_model_cannot_learn_are_all_named_and_only_they():
    from mgfm.data.subset import missing_train_classes

    names = ["a", "b", "c", "d"]
    # b and d have test clips but no train clips; c has clips in neither split and is no one's concern
    assert missing_train_classes([0, 0, 2 * 0], [0, 1, 3, -1], names) == "classes 1 ('b'), 3 ('d') have test clips but no train clips"
    assert missing_train_classes([0, 1], [1, 0], names) is None


# -------------------------------------------------------------------------------------- model, loss


def _classifier(classes: int = 3, seed: int = 0):
    from mgfm.model.classifier import build_classifier

    torch.manual_seed(seed)
    return build_classifier(ModelConfig(**TINY), classes)


def test_fixmatch_loss_uses_unlabelled_clips():
    from mgfm.evaluate.finetune import StepBatch, compute_loss
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe, SemiConfig

    recipe = FinetuneRecipe(semi=SemiConfig(method="fixmatch", threshold=0.0))
    gen = torch.Generator().manual_seed(0)
    video, labels = torch.randn(2, 4, 3, 32, 32, generator=gen), torch.tensor([0, 2])
    unlabelled = [torch.randn(4, 4, 3, 32, 32, generator=gen) for _ in range(2)]

    def grads(u: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        model = _classifier()
        batch = StepBatch(video, labels, weak=u, strong=u.flip(-1), unlabelled_labels=torch.full((4,), -1))
        loss, stats = compute_loss(model, batch, recipe, None, weight)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), stats

    g0, stats = grads(unlabelled[0])
    g1, _ = grads(unlabelled[1])
    g_again, _ = grads(unlabelled[0])
    assert stats["mask_rate"] == 1.0 and stats["loss_u"] > 0
    assert torch.equal(g0, g_again)
    assert not torch.allclose(g0, g1), "changing the unlabelled clips must change the update"
    g_off, _ = grads(unlabelled[1], weight=0.0)
    g_off_other, _ = grads(unlabelled[0], weight=0.0)
    assert torch.allclose(g_off, g_off_other)  # with lambda_u = 0 only the labelled clips count

    # a threshold nobody reaches masks every pseudo-label out
    recipe.semi.threshold = 1.0
    _, stats = grads(unlabelled[0])
    assert stats["mask_rate"] == 0.0 and stats["loss_u"] == 0.0


def _square_clips(by_row: bool):
    """18 two-window clips of 3 classes; the class sets where a bright square sits: its column (left to
    right), or, ``by_row``, its row (the square then stays at the left, so a mirror image moves it)."""
    from mgfm.data.decoded_split import DecodedSplit
    from mgfm.evaluate.finetune import FinetuneData

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(6)
    video = torch.randint(0, 60, (18, 2, 4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    for i, c in enumerate(labels.tolist()):
        rows, cols = (slice(2 + 10 * c, 12 + 10 * c), slice(2, 12)) if by_row else (slice(4, 14), slice(2 + 10 * c, 12 + 10 * c))
        video[i, :, :, :, rows, cols] = 250
    cache = DecodedSplit(video, labels, [f"c{i:02d}" for i in range(18)])
    return FinetuneData(cache, cache, cache, ["a", "b", "c"], cache.clip_ids, np.full(3, 6), 18, 1.0,
                        (0.45, 0.45, 0.45), (0.225, 0.225, 0.225))


def test_probe_head_reproduces_the_linear_probe_on_the_labelled_clips():
    from mgfm.data.decoded_split import DecodedSplit
    from mgfm.evaluate.finetune import fit_probe_head, predict_split
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe

    data = _square_clips(by_row=False)
    cache, video, labels = data.labelled, data.labelled.video, data.labelled.labels
    model = _classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = fit_probe_head(model.train(), data, FinetuneRecipe(head_init_c=1.0), img_size=32)
    assert model.training, "fitting the head must leave the model in the mode it found it"
    assert stats["probe_samples"] == 36  # 18 clips x 2 cached windows
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed == ["head.weight", "head.bias"], "only the head is set; the encoder stays as it was"
    # the head gives the regression's own decisions: its accuracy on the clips it was fitted on
    scores = predict_split(model, cache, 8, data.mean, data.std, 32)  # windows averaged
    per_window = [predict_split(model, DecodedSplit(video[:, v:v + 1], labels, cache.clip_ids), 8, data.mean,
                                data.std, 32).argmax(1) for v in range(2)]
    window_acc = float(np.mean([(p == labels.numpy()).mean() for p in per_window]))
    assert window_acc == pytest.approx(stats["probe_train_accuracy"])
    assert (scores.argmax(1) == labels.numpy()).mean() > 0.9


def test_probe_head_with_flip_is_fitted_on_the_mirror_images_too():
    from mgfm.data.decoded_split import DecodedSplit
    from mgfm.evaluate.finetune import fit_probe_head, predict_split
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe

    data = _square_clips(by_row=True)
    model = _classifier()
    stats = fit_probe_head(model, data, FinetuneRecipe(head_init_c=1.0, flip=True), img_size=32)
    assert stats["probe_samples"] == 72  # 18 clips x 2 windows, as they are and mirrored
    mirrored = DecodedSplit(data.labelled.video.flip(-1), data.labelled.labels, data.labelled.clip_ids)
    for cache in (data.labelled, mirrored):
        scores = predict_split(model, cache, 8, data.mean, data.std, 32)
        assert (scores.argmax(1) == cache.labels.numpy()).mean() > 0.9


def test_semi_headroom_benchmark_finds_headroom_where_clusters_carry_the_labels():
    """benchmarks/bench_semi_headroom.py on two moons with two labelled points per class: label spreading
    labels every unlabelled point right and reaches the every-label ceiling, which the linear probe of
    the four labelled points does not; confident self-training adds little (the cluster assumption is what
    makes unlabelled points useful, the benchmark's point on our features)."""
    import importlib.util

    from sklearn.datasets import make_moons

    from mgfm.evaluate.featureset import FeatureSet

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_semi_headroom.py"
    spec = importlib.util.spec_from_file_location("bench_semi_headroom", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def features(seed):
        x, y = make_moons(400, noise=0.06, random_state=seed)
        return FeatureSet.from_labels(x, y)

    train = features(0)
    labelled = np.zeros(len(train), dtype=bool)
    for c in (0, 1):
        labelled[np.flatnonzero(train.labels == c)[:2]] = True
    rows = bench.pseudo_rows(bench.Headroom(train, features(1), 2, 1.0), labelled, [0.9], [0.5], [10])
    reference, _ = rows["supervised only (reference)"]
    ceiling, _ = rows["every train label (ceiling)"]
    spread, spread_pseudo = rows["label spreading, 10-NN graph"]
    assert spread_pseudo == 1.0 and spread == pytest.approx(ceiling)
    assert ceiling > reference + 0.03
    assert rows["self-training, confidence >= 0.9"][0] < ceiling


def test_layer_decay_groups_scale_the_lr_by_depth():
    from mgfm.model.classifier import layer_decay_groups

    model = _classifier()
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale = {g["layer"]: g["lr_scale"] for g in groups}
    assert scale == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}  # patch embed, block 0, block 1, head
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"][0].dim() < 2)


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    from transformers import VideoMAEForVideoClassification

    from mgfm.model.classifier import load_classifier_hf, save_classifier_hf

    model = _classifier(4).eval()
    with torch.no_grad():  # move every weight away from its init so a dropped key would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    names = ["turtle neck", "deep breath", "touch hat", "illustrative"]
    save_classifier_hf(model, tmp_path / "clf", names)
    hf, info = VideoMAEForVideoClassification.from_pretrained(tmp_path / "clf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label == dict(enumerate(names)) and hf.config.label2id["touch hat"] == 2
    video = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(video), hf.eval()(pixel_values=video).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    back, back_names = load_classifier_hf(tmp_path / "clf")
    assert back_names == names
    torch.testing.assert_close(back(video), ours)


def test_pretrained_init_copies_the_encoder_and_its_norm(tmp_path):
    from mgfm.model.classifier import build_classifier
    from mgfm.model.hf import save_encoder_hf
    from mgfm.model.encoder import build_encoder

    torch.manual_seed(1)
    encoder = build_encoder(ModelConfig(**TINY))
    with torch.no_grad():
        encoder.norm.weight.fill_(0.5)
    save_encoder_hf(encoder, tmp_path / "enc")
    model = build_classifier(ModelConfig(**TINY, drop_path=0.1), 3, tmp_path / "enc")
    torch.testing.assert_close(model.encoder.blocks[1].attn.qkv_weight, encoder.blocks[1].attn.qkv_weight)
    assert torch.all(model.fc_norm.weight == 0.5) and model.encoder.blocks[1].drop_path == 0.1


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    from mgfm.model.hf import save_encoder_hf
    from mgfm.model.encoder import build_encoder

    torch.manual_seed(0)
    return save_encoder_hf(build_encoder(ModelConfig(**TINY)), tmp_path_factory.mktemp("enc") / "encoder")


def _recipe(tmp_path: Path, shards: Path, encoder: Path, **extra) -> Path:
    recipe = {
        "run": str(encoder), "shards": str(shards), "out": str(tmp_path / "ft"), "views": 2,
        "cache_side": 40, "crop_scales": [1.0, 0.8],
        "stream": {"batch_size": 2, "num_workers": 0},
        "optim": {"base_lr": 0.05, "epochs": 3, "warmup_epochs": 1},
        "semi": {"ratio": 2, "threshold": 0.0},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _finetune(args: list[str], launch: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [*(launch or [sys.executable]), "eval/finetune.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~60 s: two fine-tuning runs and a resume
def test_semi_supervised_run_writes_report_model_and_resumes(tmp_path, tiny_shards, tiny_encoder):
    recipe = _recipe(tmp_path, tiny_shards, tiny_encoder)
    result = _finetune(["--recipe", str(recipe), "semi.method=fixmatch", "label_fraction=0.5", "checkpoint_every=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "head initialised from a linear probe" in result.stderr  # head_init=probe is the default
    out = tmp_path / "ft"
    report = json.loads((out / "report.json").read_text())
    # 6 train clips, 2 per class: half of each class = 3 labelled; 2 clips x 1 rank per step -> 2 steps/epoch
    assert report["labelled_clips"] == 3 and report["train_clips"] == 6 and report["steps"] == 6
    assert report["test_clips"] == 6 and report["method"] == "fixmatch"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all("loss_u" in r for r in rows)
    assert (out / "report.md").read_text().count("| 0.5 |") == 1 and (out / "confusion.png").exists()

    from transformers import VideoMAEForVideoClassification

    hf = VideoMAEForVideoClassification.from_pretrained(out / "model").eval()
    assert hf.config.id2label == {0: "class_a", 1: "class_b", 2: "class_c"}
    # the reported scores are what the exported model (in transformers, not our code) scores on the test
    # clips: softmax averaged over the 2 temporal views
    from mgfm.config import load_recipe
    from mgfm.data.decoded_split import decode_split
    from mgfm.data.transforms import normalise
    from mgfm.evaluate.metrics import classification_metrics
    from mgfm.evaluate.finetune_data import model_geometry, stream_configs
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe

    loaded = load_recipe(FinetuneRecipe, recipe, ["semi.method=fixmatch", "label_fraction=0.5"])
    _, _, cfg = model_geometry(loaded)
    test = decode_split(tiny_shards, "test", stream_configs(loaded, cfg)[1], views=2, progress=False)
    with torch.no_grad():
        logits = hf(pixel_values=normalise(test.video.flatten(0, 1), cfg.pixel_mean, cfg.pixel_std)).logits
    scores = torch.softmax(logits, -1).reshape(len(test), 2, -1).mean(1).numpy()
    expected = classification_metrics(scores, test.labels.numpy(), ["class_a", "class_b", "class_c"], [])
    for key in ("top1", "top5", "mean_class_accuracy"):
        assert report["metrics"][key] == pytest.approx(expected[key]), key

    # a finished run is not redone
    again = _finetune(["--recipe", str(recipe), "semi.method=fixmatch", "label_fraction=0.5", "checkpoint_every=2"])
    assert again.returncode == 0 and "already complete" in again.stderr
    # lose everything but the checkpoints: the run resumes from its last one instead of starting over
    (out / "report.json").unlink()
    shutil.rmtree(out / "model")
    resumed = _finetune(["--recipe", str(recipe), "semi.method=fixmatch", "label_fraction=0.5", "checkpoint_every=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report2 = json.loads((out / "report.json").read_text())
    assert report2["resumed_from_step"] == 6 and report2["steps"] == 6
    assert "head initialised from a linear probe" not in resumed.stderr  # the checkpoint holds the head
    assert report2["metrics"]["top1"] == report["metrics"]["top1"]


def test_compare_grid_writes_a_summary(tmp_path, tiny_shards, tiny_encoder):
    recipe = _recipe(tmp_path, tiny_shards, tiny_encoder, balance="logit_adjust", head_init="random")
    result = _finetune(["--recipe", str(recipe), "compare=true", "compare_fractions=[0.5,1.0]", "optim.epochs=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert [r["variant"] for r in summary["runs"]] == ["random-sup", "random-semi", "pretrained-sup",
                                                      "pretrained-semi"] * 2
    assert [r["labelled_clips"] for r in summary["runs"]] == [3] * 4 + [6] * 4
    for fraction in ("0.5", "1"):
        for variant in ("random-sup", "pretrained-semi"):
            assert (tmp_path / "ft" / f"labels-{fraction}" / variant / "model" / "config.json").exists()
    assert "semi (FixMatch)" in result.stdout and "supervised" in result.stdout
    assert "head initialised from a linear probe" not in result.stderr  # head_init=random: fresh heads


@pytest.mark.parametrize("override, message", [
    ("label_fraction=0", "label_fraction=0: expected a value in (0, 1]"),
    ("label_fraction=1.5", "label_fraction=1.5: expected a value in (0, 1]"),
    ("optim.labl_smoothing=0.2", "unknown key 'optim.labl_smoothing'; did you mean 'optim.label_smoothing'?"),
    ("balance=oversample", "balance: expected one of ['none', 'sampler', 'logit_adjust']"),
])
def test_bad_input_is_one_line_error(tmp_path, tiny_shards, tiny_encoder, override, message):
    result = _finetune(["--recipe", str(_recipe(tmp_path, tiny_shards, tiny_encoder)), override])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eval/finetune.py: error:") and message in last


def test_class_without_train_clips_is_one_line_error(tmp_path, tiny_index, tiny_encoder):
    from mgfm.sources.clip_index import ClipIndex
    from mgfm.shards import BuildConfig, build_shards

    # class_c keeps its test clips but loses its train clips
    clips = [c for c in tiny_index.clips if not (c.split == "train" and c.label == 2)]
    shards = tmp_path / "shards"
    build_shards(ClipIndex(clips, tiny_index.class_names, "tiny", {}), shards,
                 BuildConfig(short_side=32, shard_samples=3, crf=12), source={"format": "test"})
    result = _finetune(["--recipe", str(_recipe(tmp_path, shards, tiny_encoder))])
    assert result.returncode == 2
    assert "classes 2 ('class_c') have test clips but no train clips; fine-tuning cannot learn them" in \
        result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # ~80 s: an interrupted and an uninterrupted run
def test_mid_run_resume_trains_on_as_the_uninterrupted_run(tmp_path, tiny_shards, tiny_encoder):
    recipe = _recipe(tmp_path, tiny_shards, tiny_encoder, checkpoint_every=2, keep_checkpoints=5)
    args = ["--recipe", str(recipe), "semi.method=fixmatch", "label_fraction=0.5", "model.drop_path=0.1"]
    first = _finetune(args)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "ft"
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # lose everything after step 2: the run resumes there and trains steps 3-6 again
    for name in ("step_00000004", "step_00000006"):
        shutil.rmtree(out / "checkpoints" / name)
    (out / "report.json").unlink()
    shutil.rmtree(out / "model")
    resumed = _finetune(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert again["resumed_from_step"] == 2 and again["steps"] == 6
    rows_again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_again] == list(range(1, 7))
    for a, b in zip(rows[2:], rows_again[2:]):  # same data, same dropout draws, same weights
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["lr"] == pytest.approx(a["lr"])
    assert again["metrics"]["top1"] == report["metrics"]["top1"]


def test_fine_tunes_of_one_run_on_two_shard_sets_get_their_own_folders(tmp_path):
    """Same run, same recipe name, two shard sets: two folders (one would resume the other's checkpoints)."""
    from mgfm.evaluate.finetune import finetune_folder
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe

    run = tmp_path / "runs" / "r"
    a, b = (finetune_folder(FinetuneRecipe(shards=s), run) for s in ("shards/utkinect", "shards/florence3d/"))
    assert a == run / "finetune" / "utkinect" / "finetune" and b == run / "finetune" / "florence3d" / "finetune"
    assert finetune_folder(FinetuneRecipe(shards="shards/utkinect", out=str(tmp_path / "x")), run) == tmp_path / "x"


def test_the_labelled_subset_is_drawn_with_the_recipe_seed(tiny_shards):
    from mgfm.data.decoded_split import DecodedSplit
    from mgfm.evaluate.finetune import FinetuneData, load_data
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe

    n = 40
    train = DecodedSplit(torch.zeros(n, 1, 2, 3, 4, 4, dtype=torch.uint8), torch.arange(n) % 4,
                      [f"clip{i:02d}" for i in range(n)])
    cached = FinetuneData(train, train, train, ["a", "b", "c", "d"], [], np.zeros(4), n, 1.0, (0.5,) * 3, (0.2,) * 3)
    cfg = ModelConfig(**TINY)
    subsets = {seed: load_data(FinetuneRecipe(seed=seed, label_fraction=0.25), cfg, 0.25, cached).labelled_ids
               for seed in range(4)}
    assert all(8 <= len(ids) <= 12 for ids in subsets.values())
    assert len({tuple(ids) for ids in subsets.values()}) > 1, "every seed drew the same labelled clips"
    assert subsets[1] == load_data(FinetuneRecipe(seed=1, label_fraction=0.25), cfg, 0.25, cached).labelled_ids


@pytest.mark.parametrize("old,new", [("frames=8", "model.frames"), ("img_size=64", "model.img_size"),
                                     ("drop_path=0", "model.drop_path"), ("batch_size=4", "stream.batch_size")])
def test_keys_that_moved_name_their_new_address(old, new):
    from mgfm.config import RecipeError, load_recipe
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe

    with pytest.raises(RecipeError, match=f"{old.split('=')[0]} has moved: set {new} instead"):
        load_recipe(FinetuneRecipe, None, [old])


def test_another_clip_length_is_refused_unless_the_position_table_is_resampled(tmp_path, tiny_shards, tiny_encoder):
    recipe = _recipe(tmp_path, tiny_shards, tiny_encoder, model={"frames": 2})
    refused = _finetune(["--recipe", str(recipe), "optim.epochs=1"])
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert "trained on 4x32^2 clips" in last and "pos_embed=interpolate" in last
    resampled = _finetune(["--recipe", str(recipe), "optim.epochs=1", "pos_embed=interpolate"])
    assert resampled.returncode == 0, resampled.stderr[-3000:]
    assert "position table resampled from a 2x2x2 to a 1x2x2 token grid" in resampled.stderr

    from mgfm.model.classifier import load_classifier_hf

    model, _ = load_classifier_hf(tmp_path / "ft" / "model")
    assert model.cfg.frames == 2 and model.cfg.pos_grid == (2, 2, 2)


def _assert_lr_follows_the_schedule(out: Path, steps_per_epoch: int, epochs: int, warmup_epochs: int,
                                    base_lr: float, global_batch: int) -> None:
    from test_pretrain import assert_lr_schedule

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert_lr_schedule(rows, steps_per_epoch, epochs, warmup_epochs, base_lr, global_batch)


@pytest.mark.slow
def test_two_cpu_ranks_deepspeed_bf16(tmp_path, tiny_shards, tiny_encoder):
    recipe = _recipe(tmp_path, tiny_shards, tiny_encoder, mixed_precision="bf16")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              "recipes/accelerate/multi_cpu_deepspeed.yaml"]
    result = _finetune(["--recipe", str(recipe), "semi.method=fixmatch", "label_fraction=1.0"], launch, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = tmp_path / "ft"
    report = json.loads((out / "report.json").read_text())
    # 6 labelled clips over 2 ranks x 2 clips -> 2 steps per epoch; every test clip scored exactly once
    assert report["world_size"] == 2 and report["steps"] == 6 and report["test_clips"] == 6
    assert report["precision"] == "bf16" and report["deepspeed"]
    _assert_lr_follows_the_schedule(out, 2, 3, 1, 0.05, 4)
    _assert_exports_fp32_master_weights(out)


@pytest.mark.slow
def test_one_cpu_rank_deepspeed_bf16(tmp_path, tiny_shards, tiny_encoder):
    recipe = _recipe(tmp_path, tiny_shards, tiny_encoder, mixed_precision="bf16")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "1",
              "--num_machines", "1", "--deepspeed_config_file", "recipes/deepspeed/zero2.json"]
    result = _finetune(["--recipe", str(recipe), "label_fraction=1.0"], launch, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = tmp_path / "ft"
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 1 and report["steps"] == 9 and report["precision"] == "bf16"
    _assert_lr_follows_the_schedule(out, 3, 3, 1, 0.05, 2)
    _assert_exports_fp32_master_weights(out)


def _assert_exports_fp32_master_weights(out: Path) -> None:
    from transformers import VideoMAEForVideoClassification

    hf = VideoMAEForVideoClassification.from_pretrained(out / "model")
    assert hf.config.id2label == {0: "class_a", 1: "class_b", 2: "class_c"}
    weight = hf.classifier.weight.detach()
    assert weight.dtype == torch.float32 and bool((weight.bfloat16().float() != weight).any())


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    from mgfm.config import load_recipe
    from mgfm.evaluate.finetune_recipe import FinetuneRecipe

    recipe = load_recipe(FinetuneRecipe, path)
    assert 0 < recipe.label_fraction <= 1 and recipe.optim.layer_decay < 1 and 0 <= recipe.model.drop_path < 1
    assert (recipe.cache_side or 0) >= (recipe.model.img_size or 0)
