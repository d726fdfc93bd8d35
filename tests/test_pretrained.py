"""Public VideoMAE checkpoints as init_from: Hugging Face folders (VideoMAEModel / ForPreTraining /
ForVideoClassification) and original VideoMAE / VideoMAE V2 state dicts (pretraining with decoder, fine-tuned
with head), each built here at a tiny size from the layout's own definition. Our encoder's features equal
transformers' VideoMAEModel's and our loss with the loaded decoder equals VideoMAEForPreTraining's; bad
files are one-line errors, through the pretraining CLI too; the adaptation recipe runs from a tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env
from safetensors.torch import save_file

from mgfm.model.hf import EncoderFolderError, load_encoder_hf, save_encoder_hf
from mgfm.model.pretrained import (HEADS_BY_WIDTH, CheckpointError, fit_config, load_pretrained,
                                   pixel_rows_to_ours, read_checkpoint)
from mgfm.model.encoder import GeometryError, ModelConfig, patchify
from mgfm.model.layers import sinusoid_table
from mgfm.model.masked import LossConfig, build_pretraining_model, param_groups

transformers = pytest.importorskip("transformers")
from transformers import (VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification,  # noqa: E402
                          VideoMAEModel)

warnings.filterwarnings("ignore", category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]
EPS = 1e-6  # the original repositories' LayerNorm eps


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def hf_config(**kw) -> VideoMAEConfig:
    base = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2, decoder_intermediate_size=32, use_mean_pooling=False,
                layer_norm_eps=EPS, norm_pix_loss=True)
    return VideoMAEConfig(**{**base, **kw})


def run_config(**kw) -> ModelConfig:
    """The run's model: the recipe's widths (heads included: 32 is no standard width) at the same clip."""
    base = dict(size="custom", dim=32, depth=2, heads=2, mlp_ratio=2.0, decoder_dim=16, decoder_depth=1,
                decoder_heads=2, decoder_mlp_ratio=2.0, img_size=32, frames=4, patch=8)
    return ModelConfig(**{**base, **kw})


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + scale)
    if isinstance(module, VideoMAEForPreTraining):
        module.decoder.norm.eps = EPS  # transformers' decoder norm keeps LayerNorm's 1e-5; VideoMAE's is 1e-6
    return module.eval()


def clip_and_mask(cfg: VideoMAEConfig, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(2, cfg.num_frames, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = (cfg.num_frames // cfg.tubelet_size) * (cfg.image_size // cfg.patch_size) ** 2
    mask = torch.stack([torch.randperm(tokens, generator=g) < tokens * 3 // 4 for _ in range(2)])
    return video, mask


def hf_features(model: VideoMAEModel, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=video).last_hidden_state.mean(1)


def started(checkpoint, run: ModelConfig, loss: LossConfig | None = None):
    model = build_pretraining_model(fit_config(checkpoint, run, "error"), loss)
    load_pretrained(model, checkpoint)
    return model.eval()


def assert_same_as_transformers(model, hf: VideoMAEForPreTraining | None, encoder: VideoMAEModel, cfg) -> None:
    """Features to 1e-5 against VideoMAEModel; the loss against VideoMAEForPreTraining on the same clip and mask."""
    video, mask = clip_and_mask(cfg)
    with torch.no_grad():
        assert (model.features(video) - hf_features(encoder, video)).abs().max() < 1e-5
        if hf is not None:
            ours, _ = model(video, mask)
            theirs = hf(pixel_values=video, bool_masked_pos=mask).loss
            assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())


# ----------------------------------------------------------------------------------- the original layouts

_BLOCK = [("attention.attention.q_bias", "attn.q_bias"), ("attention.attention.v_bias", "attn.v_bias"),
          ("attention.attention.query.bias", "attn.q_bias"), ("attention.attention.value.bias", "attn.v_bias"),
          ("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
          ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]


def original_layout(state: dict[str, torch.Tensor], encoder: str, classifier: bool = False) -> dict[str, torch.Tensor]:
    """A transformers VideoMAE state dict written in the original repositories' names (modeling_pretrain.py /
    modeling_finetune.py): ``encoder`` is the encoder's prefix there ("encoder." in a pretraining model)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    for key, value in state.items():
        key = key.removeprefix("videomae.")
        if key == "position_embeddings":
            continue
        m = re.match(r"^(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$", key)
        if m:
            where = f"{encoder}blocks.{m.group(2)}." if m.group(1) == "encoder.layer" else f"decoder.blocks.{m.group(2)}."
            rest = m.group(3)
            qkv_part = re.match(r"attention\.attention\.(query|key|value)\.weight", rest)
            if qkv_part:
                qkv.setdefault(where, [None] * 3)[("query", "key", "value").index(qkv_part.group(1))] = value
                continue
            name = next(new + rest[len(old):] for old, new in _BLOCK if rest.startswith(old))
            out[where + name] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out[encoder + "patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out[encoder + "norm." + key.rsplit(".", 1)[1]] = value
        elif classifier and key.startswith("classifier."):
            out["head." + key.rsplit(".", 1)[1]] = value
        else:  # encoder_to_decoder, mask_token, decoder.norm / decoder.head, fc_norm: the same names
            out[key] = value
    for where, parts in qkv.items():
        out[where + "attn.qkv.weight"] = torch.cat(parts)
    return out


def v1_pretraining_file(tmp_path: Path, hf: VideoMAEForPreTraining, name: str = "videomae_pt.pth") -> Path:
    """VideoMAE V1's training checkpoint: the state dict under 'model', beside its argparse args and epoch."""
    path = tmp_path / name
    torch.save({"model": original_layout(hf.state_dict(), "encoder."), "epoch": 799,
                "args": argparse.Namespace(model="pretrain_videomae_base_patch16_224", mask_ratio=0.9)}, path)
    return path


def v2_finetuned_file(tmp_path: Path, hf: VideoMAEForVideoClassification) -> Path:
    """A VideoMAE V2 fine-tuned / distilled checkpoint: mean pooling (fc_norm), a head, under 'module'."""
    path = tmp_path / "vit_k710_ft.pth"
    torch.save({"module": original_layout(hf.state_dict(), "", classifier=True)}, path)
    return path


def test_the_standard_head_table():
    assert HEADS_BY_WIDTH[384] == 6 and HEADS_BY_WIDTH[768] == 12 and HEADS_BY_WIDTH[1024] == 16
    assert HEADS_BY_WIDTH[1408] == 16 and HEADS_BY_WIDTH[512] == 8  # ViT-g; the L/H/g decoders


def test_pixel_head_rows_are_put_in_our_patch_order():
    cfg = run_config()
    video = torch.randn(1, 4, 3, 32, 32)
    ours = patchify(video, cfg.tubelet, cfg.patch)  # (C, tubelet, p, p)
    theirs = video.reshape(1, 2, 2, 3, 4, 8, 4, 8).permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(1, 32, -1)  # VideoMAE's
    assert torch.equal(pixel_rows_to_ours(theirs[0].T, cfg).T, ours[0])


# --------------------------------------------------------------------------------- each layout loads


def test_transformers_pretraining_folder_loads_encoder_and_decoder(tmp_path, caplog):
    cfg = hf_config()
    hf = randomise(VideoMAEForPreTraining(cfg), seed=1)
    hf.save_pretrained(tmp_path / "pt")
    checkpoint = read_checkpoint(tmp_path / "pt")
    assert checkpoint.decoder is not None and checkpoint.cfg.decoder_depth == 1
    with caplog.at_level(logging.INFO, logger="mgfm.model.pretrained"):
        model = started(checkpoint, run_config())
    assert "decoder loaded (1 blocks, width 16, pixel head)" in caplog.text
    assert_same_as_transformers(model, hf, hf.videomae, cfg)


@pytest.mark.parametrize("head", ["VideoMAEModel", "VideoMAEForVideoClassification"])
def test_transformers_encoder_folders_start_the_decoder_fresh(tmp_path, caplog, head):
    cfg = hf_config(use_mean_pooling=head != "VideoMAEModel", num_labels=5)
    hf = randomise((VideoMAEModel if head == "VideoMAEModel" else VideoMAEForVideoClassification)(cfg), seed=2)
    hf.save_pretrained(tmp_path / "enc")
    checkpoint = read_checkpoint(tmp_path / "enc")
    assert checkpoint.decoder is None
    run = run_config(final_norm=checkpoint.cfg.final_norm)
    torch.manual_seed(0)
    fresh = build_pretraining_model(fit_config(checkpoint, run, "error")).decoder.state_dict()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="mgfm.model.pretrained"):
        model = started(checkpoint, run)
    assert "has no pretraining decoder: the decoder starts fresh" in caplog.text
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in fresh.items())  # untouched
    assert_same_as_transformers(model, None, hf if head == "VideoMAEModel" else hf.videomae, cfg)


def test_original_pretraining_pth_loads_encoder_and_decoder(tmp_path, caplog):
    cfg = hf_config()
    hf = randomise(VideoMAEForPreTraining(cfg), seed=3)
    path = v1_pretraining_file(tmp_path, hf)
    checkpoint = read_checkpoint(path, run_config())
    assert checkpoint.layout == "VideoMAE .pth (pretraining with decoder)"
    assert (checkpoint.cfg.depth, checkpoint.cfg.heads, checkpoint.cfg.decoder_heads) == (2, 2, 2)  # heads: the recipe's
    with caplog.at_level(logging.INFO, logger="mgfm.model.pretrained"):
        model = started(checkpoint, run_config())
    assert "decoder loaded" in caplog.text
    assert_same_as_transformers(model, hf, hf.videomae, cfg)
    # another target keeps the decoder's blocks, not its pixel head
    motion = started(checkpoint, run_config(), LossConfig(target="motion"))
    assert torch.equal(motion.decoder.blocks[0].attn.qkv_weight, model.decoder.blocks[0].attn.qkv_weight)
    assert not torch.equal(motion.decoder.head.weight, model.decoder.head.weight)


def test_original_finetuned_pth_loads_the_encoder_without_its_head(tmp_path, caplog):
    cfg = hf_config(use_mean_pooling=True, num_labels=7)
    hf = randomise(VideoMAEForVideoClassification(cfg), seed=4)
    path = v2_finetuned_file(tmp_path, hf)
    with caplog.at_level(logging.INFO, logger="mgfm.model.pretrained"):
        checkpoint = read_checkpoint(path, run_config(final_norm=False))
    assert "leaving out 4 weights that are not the encoder (fc_norm, head)" in caplog.text
    assert checkpoint.decoder is None and not checkpoint.cfg.final_norm
    model = started(checkpoint, run_config(final_norm=False))
    assert_same_as_transformers(model, None, hf.videomae, cfg)
    with pytest.raises(EncoderFolderError, match="encoder has final_norm=False, the model expects True"):
        started(checkpoint, run_config())


def test_top_level_state_dict_of_a_standard_width_without_q_v_biases(tmp_path):
    """Heads from the standard table (width 192: 3 heads) with no recipe to ask; no q/v biases; .safetensors."""
    cfg = hf_config(hidden_size=192, num_attention_heads=3, intermediate_size=384, num_hidden_layers=1, qv_bias=False)
    hf = randomise(VideoMAEModel(cfg), seed=5)
    path = tmp_path / "enc.safetensors"
    save_file(original_layout(hf.state_dict(), ""), str(path))
    alone = read_checkpoint(path)  # no recipe: heads from the table, the clip VideoMAE's 16 x 224^2
    assert (alone.cfg.heads, alone.cfg.qv_bias, alone.cfg.frames, alone.cfg.img_size) == (3, False, 16, 224)
    run = run_config(dim=192, heads=3, depth=1, qv_bias=False)
    checkpoint = read_checkpoint(path, run)  # no position table: the clip is the run's
    model = started(checkpoint, run)
    assert_same_as_transformers(model, None, hf, cfg)


def test_learned_position_table_sets_the_geometry_and_is_kept(tmp_path, caplog):
    cfg = hf_config(use_mean_pooling=True, num_frames=8)  # a 4x4x4 token grid
    hf = randomise(VideoMAEModel(cfg), seed=6)
    table = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    hf.embeddings.position_embeddings = table  # what use_learnable_pos_emb trains
    path = tmp_path / "learned.pth"
    torch.save({"model": {**original_layout(hf.state_dict(), ""), "pos_embed": table}}, path)
    checkpoint = read_checkpoint(path, run_config(final_norm=False))  # the run says 4 frames; the table says 8
    assert checkpoint.cfg.learned_pos and (checkpoint.cfg.frames, checkpoint.cfg.img_size) == (8, 32)
    with pytest.raises(GeometryError, match="trained on 8x32\\^2 clips"):
        fit_config(checkpoint, run_config(final_norm=False), "error")
    model = started(checkpoint, run_config(final_norm=False, frames=8))
    no_decay = param_groups(model, 0.05)[1]["params"]
    assert model.encoder.pos_embed.table.requires_grad and any(p is model.encoder.pos_embed.table for p in no_decay)
    assert_same_as_transformers(model, None, hf, cfg)
    # exported and reloaded with its table (transformers cannot hold it: logged)
    with caplog.at_level(logging.WARNING):
        save_encoder_hf(model, tmp_path / "encoder")
    assert "position table is learned" in caplog.text
    encoder, saved = load_encoder_hf(tmp_path / "encoder")
    video = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.features(video), model.features(video))
    # at another clip length it is resampled over (t, h, w) and still trains
    short = build_pretraining_model(fit_config(checkpoint, run_config(final_norm=False), "interpolate"))
    load_pretrained(short, checkpoint)
    assert short.encoder.pos_embed.table.shape == (64, 32) and short.encoder.positions().shape == (32, 32)
    loss, _ = short(torch.randn(2, 4, 3, 32, 32), clip_and_mask(hf_config())[1])
    loss.backward()
    assert short.encoder.pos_embed.table.grad.abs().sum() > 0


def test_a_stored_fixed_table_gives_the_geometry(tmp_path):
    cfg = hf_config(use_mean_pooling=True, num_frames=8)
    hf = randomise(VideoMAEModel(cfg), seed=8)
    path = tmp_path / "fixed.pth"
    torch.save({**original_layout(hf.state_dict(), ""), "pos_embed": sinusoid_table(64, 32)[None]}, path)
    checkpoint = read_checkpoint(path, run_config(final_norm=False, img_size=32))
    assert not checkpoint.cfg.learned_pos and checkpoint.cfg.frames == 8 and not any("pos_embed" in k for k in checkpoint.encoder)
    assert_same_as_transformers(started(checkpoint, run_config(final_norm=False, frames=8)), None, hf, cfg)


# ------------------------------------------------------------------------------------------- bad files


class NotATensor:
    """A pickled object torch.load(weights_only=True) must refuse."""


def _good_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    return original_layout(randomise(VideoMAEForPreTraining(hf_config()), seed=9).state_dict(), "encoder.")


@pytest.mark.parametrize("breakage, expected", [
    ("missing", "no such file or folder (expected a Hugging Face VideoMAE folder"),
    ("tensor", "holds a Tensor, not a state dict"),
    ("refused", "torch.load(weights_only=True) refuses the Python objects it holds beside tensors (Unsupported "
                "global: GLOBAL test_pretrained.NotATensor was not an allowed global by default)"),
    ("garbage", "not a readable checkpoint (UnpicklingError: Unsupported operand 0)"),
    ("truncated", "not a readable checkpoint (RuntimeError: PytorchStreamReader failed reading zip archive"),
    ("empty", "holds no state dict at the top level: it is empty"),
    ("unknown", "unknown layout (first key 'fc.weight'); understood: a Hugging Face VideoMAE folder"),
    ("hf_without_config", "Hugging Face VideoMAE weights without their config.json"),
    ("missing_key", "weights lack 'encoder.blocks.1.mlp.fc2.weight'"),
    ("wrong_shape", "'encoder.blocks.1.mlp.fc1.weight' has shape (48, 32), the rest of the checkpoint implies (64, 32)"),
    ("layer_scale", "unexpected weight 'encoder.blocks.0.gamma_1' (layer scale (init_values > 0) is not supported)"),
    ("decoder_head", "decoder.head.weight has 100 outputs, a pixel head for 3x2x8x8 tubelets has 384"),
    ("not_2d_patch", "'encoder.patch_embed.proj.weight' has shape (32, 384), expected 5 dimensions"),
])
def test_bad_file_is_one_line_error(tmp_path, breakage, expected):
    path = tmp_path / "bad.pth"
    state = _good_state(tmp_path)
    if breakage == "tensor":
        torch.save(torch.zeros(3), path)
    elif breakage == "refused":
        torch.save({"model": state, "extra": NotATensor()}, path)
    elif breakage == "garbage":
        path.write_bytes(b"\x00not a zip" * 10)
    elif breakage == "truncated":
        torch.save({"model": state}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif breakage == "empty":
        torch.save({}, path)
    elif breakage == "unknown":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    elif breakage == "hf_without_config":
        torch.save(randomise(VideoMAEModel(hf_config()), seed=1).state_dict(), path)
    else:
        if breakage == "missing_key":
            del state["encoder.blocks.1.mlp.fc2.weight"]
        elif breakage == "wrong_shape":
            state["encoder.blocks.1.mlp.fc1.weight"] = torch.zeros(48, 32)
        elif breakage == "layer_scale":
            state["encoder.blocks.0.gamma_1"] = torch.ones(32)
        elif breakage == "decoder_head":
            state["decoder.head.weight"] = torch.zeros(100, 16)
        elif breakage == "not_2d_patch":
            state["encoder.patch_embed.proj.weight"] = torch.zeros(32, 384)
        if breakage != "missing":
            torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, run_config())
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message, message


def test_heads_of_a_width_outside_the_standard_sizes_must_be_given(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(_good_state(tmp_path), path)
    with pytest.raises(CheckpointError, match=r"attention heads are not in the weights and width 32 is not a standard "
                                              r"one .*; set model.heads \(with model.dim=32\)"):
        read_checkpoint(path)
    assert read_checkpoint(path, run_config(heads=4, decoder_heads=4)).cfg.heads == 4  # the recipe's heads win


def _pretrain(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


TINY = {"model.size": "custom", "model.dim": 32, "model.depth": 2, "model.heads": 2, "model.mlp_ratio": 2.0,
        "model.decoder_dim": 16, "model.decoder_depth": 1, "model.decoder_heads": 2, "model.decoder_mlp_ratio": 2.0,
        "model.img_size": 32, "model.frames": 4, "model.patch": 8, "model.drop_path": 0.0}


def test_adaptation_recipe_runs_from_a_checkpoint_and_a_bad_one_is_one_line(tmp_path, tiny_shards):
    """recipes/pretrain/adapt_vit_b_imigue.yaml at a tiny size: 2 steps from a tiny VideoMAE .pth, decoder
    included; the same command with a broken file ends in one error line."""
    hf = randomise(VideoMAEForPreTraining(hf_config()), seed=11)
    good = v1_pretraining_file(tmp_path, hf)
    overrides = [f"{k}={v}" for k, v in TINY.items()] + [
        f"shards={tiny_shards}", f"out_dir={tmp_path / 'runs'}", "name=adapt", "zero_stage=0", "stream.num_workers=0",
        "stream.batch_size=2", "stream.repeats=1", "stream.video_dtype=float32", "stream.batches_per_epoch=2",
        "optim.epochs=1", "optim.warmup_epochs=0", "checkpoint_every=0", "export_epochs=[0]"]
    recipe = ["--recipe", "recipes/pretrain/adapt_vit_b_imigue.yaml"]
    assert yaml.safe_load((REPO / recipe[1]).read_text())["init_from"]
    result = _pretrain([*recipe, *overrides, f"init_from={good}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoder loaded (1 blocks, width 16, pixel head)" in result.stderr
    run = tmp_path / "runs" / "adapt"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # the start (epoch 0) is the checkpoint's encoder, exported for probing beside the adapted one
    start, _ = load_encoder_hf(run / "encoders" / "epoch_00000")
    video = clip_and_mask(hf_config())[0]
    with torch.no_grad():
        assert (start.features(video) - hf_features(hf.videomae, video)).abs().max() < 1e-5

    bad = tmp_path / "bad.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, bad)
    result = _pretrain([*recipe, *overrides, "name=bad", f"init_from={bad}"])
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "error:" in last and str(bad) in last and "unknown layout" in last, last


def test_a_pth_converts_to_an_encoder_folder_for_probes_and_fine_tuning(tmp_path, capsys):
    """python -m mgfm.model: a VideoMAE V2 fine-tuned .pth becomes a folder with the same features."""
    from mgfm.model.__main__ import main

    cfg = hf_config(use_mean_pooling=True, num_labels=3)
    hf = randomise(VideoMAEForVideoClassification(cfg), seed=12)
    path = v2_finetuned_file(tmp_path, hf)
    args = [str(path), str(tmp_path / "enc"), "size=custom", "dim=32", "depth=2", "heads=2", "decoder_dim=16",
            "decoder_depth=1", "decoder_heads=2", "frames=4", "img_size=32", "patch=8"]
    assert main(args) == 0
    encoder, _ = load_encoder_hf(tmp_path / "enc")
    video = clip_and_mask(cfg)[0]
    with torch.no_grad():
        assert (encoder.features(video) - hf_features(hf.videomae, video)).abs().max() < 1e-5
    for argv, expected in (([str(path), str(tmp_path / "enc")], "enc: already exists"),
                           ([str(path), str(tmp_path / "enc2")], "attention heads are not in the weights")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and last.startswith("python -m mgfm.model: error:") and expected in last, last
