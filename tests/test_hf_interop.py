"""Hugging Face VideoMAE interop: save/load both directions, q/v biases, head-model folders, bad folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgfm.model.hf import (
    EncoderFolderError,
    encoder_checksum,
    hf_config_dict,
    init_encoder_from_hf,
    load_encoder_hf,
    save_encoder_hf,
)
from mgfm.model.encoder import ModelConfig, build_encoder
from mgfm.model.layers import sinusoid_table
from mgfm.model.masked import build_pretraining_model

transformers = pytest.importorskip("transformers")
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel  # noqa: E402
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny(**kw) -> ModelConfig:
    base = dict(size="custom", dim=32, depth=2, heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                img_size=32, frames=4, patch=8)
    return ModelConfig(**{**base, **kw})


def hf_config(**kw) -> VideoMAEConfig:
    base = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2, decoder_intermediate_size=32, use_mean_pooling=False)
    return VideoMAEConfig(**{**base, **kw})


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (q/v biases and norms included), so every mapping error shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_norm_scale else 0.0))


def clip(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, cfg.frames, cfg.channels, cfg.img_size, cfg.img_size, generator=g)


def hf_features(model: VideoMAEModel, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=video).last_hidden_state.mean(1)


def test_position_table_matches_transformers():
    torch.testing.assert_close(sinusoid_table(1568, 768), get_sinusoid_encoding_table(1568, 768)[0])


@pytest.mark.parametrize("final_norm", [True, False])
def test_saved_encoder_loads_in_transformers_with_same_features(tmp_path, final_norm):
    cfg = tiny(final_norm=final_norm)
    enc = build_encoder(cfg).eval()
    randomise(enc)
    folder = save_encoder_hf(enc, tmp_path / "encoder")
    model, info = VideoMAEModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.use_mean_pooling is (not final_norm)
    v = clip(cfg)
    with torch.no_grad():
        ours = enc.features(v)
    assert (ours - hf_features(model.eval(), v)).abs().max() < 1e-4
    for i in range(cfg.depth):
        attn = model.encoder.layer[i].attention.attention
        assert torch.equal(attn.query.bias, enc.blocks[i].attn.q_bias)
        assert torch.equal(attn.value.bias, enc.blocks[i].attn.v_bias)
        assert enc.blocks[i].attn.q_bias.abs().sum() > 0
        assert attn.key.bias is None


def test_a_block_readout_is_the_transformers_hidden_state_after_that_layer(tmp_path):
    cfg = tiny(depth=3)
    enc = build_encoder(cfg).eval()
    randomise(enc)
    model = VideoMAEModel.from_pretrained(save_encoder_hf(enc, tmp_path / "encoder")).eval()
    v = clip(cfg)
    with torch.no_grad():
        hidden = model(pixel_values=v, output_hidden_states=True).hidden_states  # embeddings, then each layer
        for block in range(1, cfg.depth + 1):
            assert (enc.features(v, block=block) - hidden[block].mean(1)).abs().max() < 1e-4
        assert not torch.allclose(enc.features(v, block=1), enc.features(v), atol=1e-3)
        tokens = enc.pooled_tokens(v, grid=(1, 2, 2), block=2)
        assert tokens.shape == (2, 4, cfg.dim) and torch.allclose(tokens.mean(1), hidden[2].mean(1), atol=1e-4)
    with pytest.raises(ValueError, match="block=4: the encoder has blocks 1 to 3"):
        enc.features(v, block=4)


def test_our_folder_round_trips_and_checksums(tmp_path):
    cfg = tiny(pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25), drop_path=0.1)
    model = build_pretraining_model(cfg).eval()
    randomise(model)
    folder = save_encoder_hf(model, tmp_path / "enc")  # a full model: its .encoder is saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors",
                                                        "preprocessor_config.json"]
    keys = load_file(str(folder / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.q_bias" in keys and not any("decoder" in k for k in keys)
    enc, cfg2 = load_encoder_hf(folder)
    assert cfg2 == cfg
    v = clip(cfg)
    with torch.no_grad():
        torch.testing.assert_close(enc.features(v), model.features(v), rtol=0, atol=0)
    first = encoder_checksum(folder)
    assert first == encoder_checksum(folder) and len(first) == 64
    with torch.no_grad():
        model.encoder.blocks[0].attn.v_bias.add_(1.0)
    save_encoder_hf(model, folder)  # overwrite in place, nothing left behind
    assert encoder_checksum(folder) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


@pytest.mark.parametrize("mean_pooling", [False, True])
def test_transformers_model_folder_loads_with_same_features(tmp_path, mean_pooling):
    hf = VideoMAEModel(hf_config(use_mean_pooling=mean_pooling, layer_norm_eps=1e-12)).eval()
    randomise(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes query.bias / value.bias
    enc, cfg = load_encoder_hf(tmp_path / "hf")
    assert cfg.final_norm is (not mean_pooling) and cfg.layer_norm_eps == 1e-12 and cfg.size == "custom"
    v = clip(cfg)
    with torch.no_grad():
        assert (enc.features(v) - hf_features(hf, v)).abs().max() < 1e-4
    for i in range(cfg.depth):
        assert torch.equal(enc.blocks[i].attn.q_bias, hf.encoder.layer[i].attention.attention.query.bias)
        assert torch.equal(enc.blocks[i].attn.v_bias, hf.encoder.layer[i].attention.attention.value.bias)


def test_pretraining_format_folder_loads_encoder_only(tmp_path):
    hf = VideoMAEForPreTraining(hf_config()).eval()
    randomise(hf, seed=4)
    hf.save_pretrained(tmp_path / "pt")
    keys = load_file(str(tmp_path / "pt" / "model.safetensors"))
    assert any(k.startswith("decoder.") for k in keys) and all(
        k.startswith(("videomae.", "decoder.", "encoder_to_decoder", "mask_token")) for k in keys)
    enc, cfg = load_encoder_hf(tmp_path / "pt")
    v = clip(cfg)
    with torch.no_grad():
        assert (enc.features(v) - hf_features(hf.videomae, v)).abs().max() < 1e-4
    # the folder can seed a pretraining run (init_from=) at another clip geometry, its position table
    # resampled (pos_embed=interpolate, else refused): the decoder stays fresh
    from mgfm.model.encoder import at_geometry

    run_cfg = tiny(frames=8, img_size=16, mlp_ratio=2.0, layer_norm_eps=1e-12, decoder_dim=24, decoder_heads=3)
    with pytest.raises(EncoderFolderError, match="position table is for a 2x4x4 token grid, the model's for 4x2x2"):
        init_encoder_from_hf(build_pretraining_model(run_cfg), tmp_path / "pt")
    model = build_pretraining_model(at_geometry(cfg, run_cfg, "interpolate", "pt"))
    decoder_before = model.decoder.head.weight.clone()
    assert init_encoder_from_hf(model, tmp_path / "pt") == cfg
    assert torch.equal(model.encoder.blocks[1].attn.v_bias, enc.blocks[1].attn.v_bias)
    assert torch.equal(model.decoder.head.weight, decoder_before)
    with pytest.raises(EncoderFolderError, match="encoder has dim=32, the model expects 48"):
        init_encoder_from_hf(build_pretraining_model(tiny(dim=48, heads=2, mlp_ratio=2.0)), tmp_path / "pt")


def test_legacy_q_v_bias_names_and_torch_bin(tmp_path):
    """Public checkpoints name the biases q_bias/v_bias; older ones ship pytorch_model.bin."""
    hf = VideoMAEForPreTraining(hf_config()).eval()
    randomise(hf, seed=5)
    state = {k.replace("attention.attention.query.bias", "attention.attention.q_bias")
              .replace("attention.attention.value.bias", "attention.attention.v_bias"): v.clone()
             for k, v in hf.state_dict().items()}
    assert any(k.endswith("q_bias") for k in state)
    folder = tmp_path / "legacy"
    folder.mkdir()
    cfg_dict = hf.config.to_dict()
    cfg_dict.pop("qv_bias")
    cfg_dict["qkv_bias"] = True  # the 4.x spelling
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    torch.save(state, folder / "pytorch_model.bin")
    enc, cfg = load_encoder_hf(folder)
    v = clip(cfg)
    with torch.no_grad():
        assert (enc.features(v) - hf_features(hf.videomae, v)).abs().max() < 1e-4


def test_hf_config_dict_is_a_valid_transformers_config():
    cfg = tiny()
    d = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    hc = VideoMAEConfig(**d)
    assert (hc.hidden_size, hc.intermediate_size, hc.qv_bias, hc.use_mean_pooling) == (32, 128, True, False)


# ---------------------------------------------------------------------------------------------- bad folders


def _good_folder(tmp_path: Path) -> Path:
    enc = build_encoder(tiny())
    return save_encoder_hf(enc, tmp_path / "good")


def _write_config(folder: Path, **changes) -> None:
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("breakage, expected", [
    ("missing_folder", "not a folder"),
    ("no_config", "no config.json"),
    ("bad_json", "not readable JSON"),
    ("wrong_type", "model_type is 'vit'"),
    ("no_weights", "no model.safetensors"),
    ("garbage_weights", "weights cannot be read"),
    ("wider_config", "has shape"),
    ("deeper_config", "lack 'encoder.layer.2."),
    ("shallower_config", "layer 1 exists but config says 1 layers"),
    ("no_qv_bias", "unexpected encoder weight"),
    ("pooling_mismatch", "use_mean_pooling=True but the weights have a final layernorm"),
    ("missing_key", "lack 'encoder.layer.1.output.dense.weight'"),
])
def test_bad_folder_gives_one_line_error(tmp_path, breakage, expected):
    folder = _good_folder(tmp_path)
    if breakage == "missing_folder":
        folder = tmp_path / "nope"
    elif breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif breakage == "wrong_type":
        _write_config(folder, model_type="vit")
    elif breakage == "no_weights":
        (folder / "model.safetensors").unlink()
    elif breakage == "garbage_weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    elif breakage == "wider_config":
        _write_config(folder, hidden_size=64, intermediate_size=256)
    elif breakage == "deeper_config":
        _write_config(folder, num_hidden_layers=3)
    elif breakage == "shallower_config":
        _write_config(folder, num_hidden_layers=1)
    elif breakage == "no_qv_bias":
        _write_config(folder, qv_bias=False, qkv_bias=False)
    elif breakage == "pooling_mismatch":
        _write_config(folder, use_mean_pooling=True)
    elif breakage == "missing_key":
        state = load_file(str(folder / "model.safetensors"))
        del state["encoder.layer.1.output.dense.weight"]
        save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(EncoderFolderError) as info:
        load_encoder_hf(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder)) and expected in message, message


def test_checksum_of_folder_without_weights(tmp_path):
    with pytest.raises(EncoderFolderError, match="no model.safetensors"):
        encoder_checksum(tmp_path)


# ------------------------------------------------------------------------------- another clip geometry


def test_position_table_of_the_trained_grid_is_the_transformers_table():
    from mgfm.model.layers import position_table

    torch.testing.assert_close(position_table((8, 14, 14), 768), sinusoid_table(1568, 768))
    torch.testing.assert_close(position_table((8, 14, 14), 768, (8, 14, 14)), sinusoid_table(1568, 768))


def test_position_table_is_resampled_over_t_h_w_not_over_the_token_index():
    from mgfm.model.layers import position_table

    trained = sinusoid_table(4 * 4 * 4, 16).reshape(4, 4, 4, 16)
    half = position_table((2, 2, 2), 16, (4, 4, 4)).reshape(2, 2, 2, 16)
    # halving every side: each new token is the mean of the 2x2x2 trained tokens it covers
    expected = trained.reshape(2, 2, 2, 2, 2, 2, 16).mean(dim=(1, 3, 5))
    torch.testing.assert_close(half, expected)
    # the flattened index would have given token (0, 1, 0) the trained table's row 2 = place (0, 0, 2)
    assert not torch.allclose(half[0, 1, 0], trained.reshape(-1, 16)[2])


def test_another_geometry_is_refused_or_resampled_by_choice(caplog):
    from mgfm.model.encoder import GeometryError, at_geometry

    trained = tiny()  # 4 frames x 32^2, patch 8: 2x4x4 tokens
    shorter = tiny(frames=2)
    with pytest.raises(GeometryError) as err:
        at_geometry(trained, shorter, "error", "enc")
    message = str(err.value)
    assert "\n" not in message and "2x4x4 tokens" in message and "1x4x4 tokens" in message
    assert "pos_embed=interpolate" in message
    resampled = at_geometry(trained, shorter, "interpolate", "enc")
    assert resampled.pos_grid == (2, 4, 4) and "position table resampled" in caplog.text
    assert at_geometry(trained, tiny(drop_path=0.1), "error", "enc").pos_grid is None  # same grid: nothing to do
    # an already resampled encoder keeps its table on its own grid, and resamples from the trained one
    assert at_geometry(resampled, tiny(frames=2), "error", "enc").pos_grid == (2, 4, 4)
    assert at_geometry(resampled, tiny(frames=6), "interpolate", "enc").pos_grid == (2, 4, 4)


def test_a_resampled_encoder_round_trips_with_its_table(tmp_path):
    from mgfm.model.encoder import at_geometry

    cfg = at_geometry(tiny(), tiny(frames=8), "interpolate", "enc")
    encoder = build_encoder(cfg)
    randomise(encoder)
    save_encoder_hf(encoder, tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["mgfm"]["pos_grid"] == [2, 4, 4]
    loaded, loaded_cfg = load_encoder_hf(tmp_path / "enc")
    assert loaded_cfg.pos_grid == (2, 4, 4)
    video = clip(cfg)
    torch.testing.assert_close(loaded.eval().features(video), encoder.eval().features(video))
    # copying it into a model whose table is made for another grid is refused
    with pytest.raises(EncoderFolderError, match="position table is for a 2x4x4 token grid"):
        init_encoder_from_hf(build_pretraining_model(tiny(frames=8)), tmp_path / "enc")
