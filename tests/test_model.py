"""VideoMAE-style model: shapes, masked loss, decoder masking, features, sizes (all on tiny configs)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mgfm.config import load_recipe
from mgfm.data.masking import MaskGenerator
from mgfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgfm.model.flops import count_params, encoder_gmacs, measured_encoder_gmacs
from mgfm.model.encoder import ModelConfig, build_encoder, mask_indices, patchify, unpatchify
from mgfm.model.layers import drop_path
from mgfm.model.masked import LossConfig, build_pretraining_model, param_groups, pixel_targets

B = 2


def tiny(**kw) -> ModelConfig:
    base = dict(size="custom", dim=32, depth=2, heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                img_size=32, frames=4, patch=8, tubelet=2)
    return ModelConfig(**{**base, **kw})


def masks(cfg: ModelConfig, keep: float | None = None, seed: int = 0, ratio: float = 0.75):
    gen = MaskGenerator(cfg.grid, ratio=ratio, decoder_keep_ratio=keep)
    rng = np.random.default_rng(seed)
    enc, dec = zip(*(gen(rng) for _ in range(B)))
    return torch.as_tensor(np.stack(enc)), torch.as_tensor(np.stack(dec))


def video(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.frames, cfg.channels, cfg.img_size, cfg.img_size, generator=g)


def pixel_box(cfg: ModelConfig, token: int) -> tuple[slice, slice, slice]:
    """(frames, rows, cols) slices of one token in a (T, C, H, W) clip."""
    g = cfg.grid
    t, h, w = token // (g.h * g.w), (token // g.w) % g.h, token % g.w
    return (slice(t * cfg.tubelet, (t + 1) * cfg.tubelet), slice(h * cfg.patch, (h + 1) * cfg.patch),
            slice(w * cfg.patch, (w + 1) * cfg.patch))


def set_token_pixels(v: torch.Tensor, cfg: ModelConfig, sample: int, token: int, value: torch.Tensor) -> None:
    ts, hs, ws = pixel_box(cfg, token)
    v[sample, ts, :, hs, ws] = value


# ---------------------------------------------------------------------------------------------- config


def test_config_presets_and_overrides():
    cfg = ModelConfig()
    assert (cfg.size, cfg.dim, cfg.depth, cfg.heads, cfg.img_size, cfg.frames) == ("tiny", 192, 4, 3, 112, 16)
    b = ModelConfig(size="b", depth=6)
    assert (b.size, b.dim, b.depth, b.heads, b.decoder_dim) == ("B", 768, 6, 12, 384)
    assert ModelConfig(size="H").mlp_dim == 4 * 1280


@pytest.mark.parametrize("kw, field", [
    (dict(size="XL"), "model.size"),
    (dict(size="custom"), "model.dim"),
    (dict(frames=15), "model.frames"),
    (dict(img_size=100), "model.img_size"),
    (dict(heads=5), "model.dim"),
    (dict(pixel_mean=(0.5,)), "model.pixel_mean"),
    (dict(drop_path=1.0), "model.drop_path"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_config_from_recipe_overrides():
    cfg = load_recipe(ModelConfig, None, ["size=S", "drop_path=0.1", "img_size=160", "pixel_mean=[0.5,0.5,0.5]"])
    assert (cfg.dim, cfg.img_size, cfg.drop_path, cfg.pixel_mean) == (384, 160, 0.1, (0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------- tokens


def test_patchify_roundtrip_and_conv_equivalence():
    cfg = tiny()
    v = video(cfg)
    p = patchify(v, cfg.tubelet, cfg.patch)
    assert p.shape == (B, cfg.num_tokens, cfg.patch_dim)
    assert torch.equal(unpatchify(p, cfg.grid, cfg.channels, cfg.tubelet, cfg.patch), v)
    # our Linear patch embedding == a Conv3d tubelet embedding with the reshaped kernel, in (t, h, w) order
    enc = build_encoder(cfg)
    w = enc.patch_embed.weight.reshape(cfg.dim, cfg.channels, cfg.tubelet, cfg.patch, cfg.patch)
    conv = F.conv3d(v.permute(0, 2, 1, 3, 4), w, enc.patch_embed.bias, stride=(cfg.tubelet, cfg.patch, cfg.patch))
    torch.testing.assert_close(enc.patch_embed(p), conv.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_pixel_target_is_per_patch_normalised_unnormalised_pixels():
    cfg = tiny()
    v = video(cfg)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    raw = patchify(v * std + mean, cfg.tubelet, cfg.patch).reshape(B, cfg.num_tokens, 3, -1)
    want = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, unbiased=True, keepdim=True).sqrt() + 1e-6)
    got = pixel_targets(patchify(v, cfg.tubelet, cfg.patch), cfg)
    torch.testing.assert_close(got, want.reshape(B, cfg.num_tokens, -1), rtol=1e-4, atol=1e-4)
    plain = pixel_targets(patchify(v, cfg.tubelet, cfg.patch), dataclasses.replace(cfg, norm_pix_loss=False))
    torch.testing.assert_close(plain, raw.reshape(B, cfg.num_tokens, -1))


def test_mask_indices_and_validation():
    cfg = tiny()
    enc, dec = masks(cfg, keep=0.5)
    vis, tgt = mask_indices(enc, dec)
    for i in range(B):
        assert vis[i].tolist() == torch.nonzero(~enc[i]).flatten().tolist()
        assert tgt[i].tolist() == torch.nonzero(dec[i]).flatten().tolist()
    uneven = enc.clone()
    uneven[0, torch.nonzero(~enc[0])[0]] = True
    with pytest.raises(ValueError, match="same number"):
        mask_indices(uneven)
    with pytest.raises(ValueError, match="hides every token"):
        mask_indices(torch.ones_like(enc))
    outside = dec.clone()
    for i in range(B):  # swap one reconstructed token for a visible one: counts stay equal
        outside[i, torch.nonzero(~enc[i])[0]] = True
        outside[i, torch.nonzero(dec[i])[0]] = False
    with pytest.raises(ValueError, match="subset"):
        mask_indices(enc, outside)


# ---------------------------------------------------------------------------------------------- model


def test_forward_shapes_and_gradients():
    cfg = tiny(tubelet=4, patch=16, frames=8, img_size=48)  # non-default tubelet/patch
    model = build_pretraining_model(cfg)
    enc, _ = masks(cfg)
    n_masked = int(enc[0].sum())
    loss, out = model(video(cfg), enc)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert out.pred.shape == out.target.shape == (B, n_masked, 3 * 4 * 16 * 16)
    assert out.visible_index.shape == (B, cfg.num_tokens - n_masked)
    loss.backward()
    for name in ("encoder.blocks.0.attn.q_bias", "encoder.blocks.1.attn.v_bias", "encoder.patch_embed.weight",
                 "decoder.mask_token", "decoder.head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    tokens = model.encoder(video(cfg), enc)
    assert tokens.shape == (B, cfg.num_tokens - n_masked, cfg.dim)
    assert model.features(video(cfg)).shape == (B, cfg.dim)
    with pytest.raises(ValueError, match="video: expected"):
        model.features(torch.zeros(B, cfg.frames, 3, 32, 32))


def zero_input_model(cfg: ModelConfig):
    """A model whose predictions do not depend on the pixels: only the target can move the loss."""
    model = build_pretraining_model(cfg).eval()
    with torch.no_grad():
        model.encoder.patch_embed.weight.zero_()
    return model


def test_loss_only_depends_on_masked_tokens():
    cfg = tiny()
    model = zero_input_model(cfg)
    enc, _ = masks(cfg)
    v = video(cfg)
    with torch.no_grad():
        base, _ = model(v, enc)
        visible_tok = int(torch.nonzero(~enc[0])[0])
        masked_tok = int(torch.nonzero(enc[0])[0])
        v_vis = v.clone()
        set_token_pixels(v_vis, cfg, 0, visible_tok, torch.randn(cfg.tubelet, 3, cfg.patch, cfg.patch) * 5)
        v_msk = v.clone()
        set_token_pixels(v_msk, cfg, 0, masked_tok, torch.randn(cfg.tubelet, 3, cfg.patch, cfg.patch) * 5)
        assert torch.equal(model(v_vis, enc)[0], base)
        assert not torch.allclose(model(v_msk, enc)[0], base)


def test_encoder_never_sees_masked_pixels():
    cfg = tiny()
    model = build_pretraining_model(cfg).eval()
    enc, _ = masks(cfg)
    v = video(cfg)
    v2 = v.clone()
    for tok in torch.nonzero(enc[0]).flatten().tolist():
        set_token_pixels(v2, cfg, 0, tok, 3.0)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(v, enc), model.encoder(v2, enc), rtol=0, atol=0)
        assert not torch.allclose(model.encoder.features(v), model.encoder.features(v2))


def test_decoder_masking_restricts_loss_to_kept_tokens():
    cfg = tiny()
    model = zero_input_model(cfg)
    enc, dec = masks(cfg, keep=0.5)
    v = video(cfg)
    with torch.no_grad():
        base, out = model(v, enc, dec)
        assert out.pred.shape[1] == int(dec[0].sum()) < int(enc[0].sum())
        assert torch.equal(out.target_index[0], torch.nonzero(dec[0]).flatten())
        dropped = int(torch.nonzero(enc[0] & ~dec[0])[0])  # masked but not reconstructed
        kept = int(torch.nonzero(dec[0])[0])
        v_drop, v_keep = v.clone(), v.clone()
        set_token_pixels(v_drop, cfg, 0, dropped, torch.randn(cfg.tubelet, 3, cfg.patch, cfg.patch) * 5)
        set_token_pixels(v_keep, cfg, 0, kept, torch.randn(cfg.tubelet, 3, cfg.patch, cfg.patch) * 5)
        assert torch.equal(model(v_drop, enc, dec)[0], base)
        assert not torch.allclose(model(v_keep, enc, dec)[0], base)
        # without decoder masking the dropped token is part of the loss again
        assert not torch.allclose(model(v_drop, enc)[0], model(v, enc)[0])


def test_decoder_sees_only_visible_and_kept_tokens():
    cfg = tiny()
    model = build_pretraining_model(cfg).eval()
    enc, dec = masks(cfg, keep=0.5)
    seen = []
    model.decoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        model(video(cfg), enc, dec)
        model(video(cfg), enc)
    n_vis = int((~enc[0]).sum())
    assert seen == [n_vis + int(dec[0].sum()), cfg.num_tokens]


def test_features_ignore_masks_and_are_deterministic():
    cfg = tiny(drop_path=0.3)
    model = build_pretraining_model(cfg)
    assert list(inspect.signature(model.features).parameters) == ["video"]
    assert list(inspect.signature(model.encoder.features).parameters) == ["video", "block"]  # no mask
    v = video(cfg)
    enc, _ = masks(cfg)
    model.eval()
    with torch.no_grad():
        f = model.features(v)
        torch.testing.assert_close(f, model.encoder(v).mean(1))
        torch.testing.assert_close(f, model.features(v), rtol=0, atol=0)
        assert not torch.allclose(f, model.encoder(v, enc).mean(1))
        model.train()  # drop path is active in training only
        torch.manual_seed(0)
        outs = [model.encoder(v) for _ in range(6)]
        assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    y = drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    torch.testing.assert_close(torch.unique(y), torch.tensor([0.0, 1 / 0.75]))
    assert torch.equal(y, per_sample[:, None, None].expand_as(y))  # one draw per sample
    assert abs(per_sample.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    cfg = tiny()
    a = build_pretraining_model(cfg)
    b = build_pretraining_model(dataclasses.replace(cfg, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    enc, dec = masks(cfg, keep=0.5)
    v = video(cfg)
    la, _ = a(v, enc, dec)
    lb, _ = b(v, enc, dec)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.encoder.blocks[0].attn.qkv_weight.grad, b.encoder.blocks[0].attn.qkv_weight.grad)


def test_param_groups_skip_decay_on_biases_norms_and_mask_token():
    model = build_pretraining_model(tiny())
    decay, no_decay = param_groups(model, 0.05)
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    assert id(named["decoder.mask_token"]) in ids and id(named["encoder.blocks.0.attn.q_bias"]) in ids
    assert id(named["encoder.blocks.0.attn.qkv_weight"]) not in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


# ---------------------------------------------------------------------------------------------- sizes

PUBLISHED = {"S": (22e6, 57), "B": (87e6, 180), "L": (305e6, 597), "H": (633e6, 1192)}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_size_table_matches_published(size):
    cfg = dataclasses.replace(ModelConfig(size=size), frames=16, img_size=224)
    params, gmacs = PUBLISHED[size]
    assert abs(count_params(cfg) / params - 1) < 0.02
    assert abs(encoder_gmacs(cfg) / gmacs - 1) < 0.02
    assert measured_encoder_gmacs(cfg) == pytest.approx(encoder_gmacs(cfg), rel=1e-3)  # meta-device count


def test_count_params_matches_real_model():
    cfg = tiny()
    model = build_pretraining_model(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.encoder.parameters())
    assert count_params(cfg, "all") == sum(p.numel() for p in model.parameters())


def test_bench_pretrain_runs(capsys):
    """Smoke run of benchmarks/bench_pretrain.py on a tiny geometry (no timing is asserted)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pretrain.py"
    spec = importlib.util.spec_from_file_location("bench_pretrain", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--size", "tiny", "--frames", "4", "--img", "64", "--batch", "2", "--steps", "1",
                         "--repeats", "2", "--warmup", "0"])
    assert set(result["ratio"]) == {"ours", "ours+dm"} and all(r > 0 for r in result["ratio"].values())
    assert "ours+dm" in capsys.readouterr().out


def test_motion_term_adds_the_frame_difference_error():
    from mgfm.model.encoder import ModelConfig
    from mgfm.model.masked import build_pretraining_model, motion_loss

    cfg = ModelConfig(size="custom", img_size=32, frames=4, dim=32, depth=1, heads=2, decoder_dim=16,
                      decoder_depth=1, decoder_heads=1)
    video = torch.randn(2, 4, 3, 32, 32)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, [0, 1, 4, 5]] = True
    torch.manual_seed(0)
    plain = build_pretraining_model(cfg)
    torch.manual_seed(0)
    with_motion = build_pretraining_model(cfg, LossConfig(motion_weight=2.0))
    loss0, out = plain(video, mask)
    loss2, _ = with_motion(video, mask)
    expected = motion_loss(out.pred, out.target, cfg)
    assert expected > 0
    torch.testing.assert_close(loss2, loss0 + 2.0 * expected)
    # A prediction that copies the target has no motion error.
    assert motion_loss(out.target, out.target, cfg) == 0


def test_motion_map_marks_where_and_when_the_clip_moved():
    from mgfm.model.motion_map import motion_map

    cfg = tiny(frames=8, img_size=32)
    still = torch.zeros(1, cfg.frames, 3, 32, 32)
    assert motion_map(still, cfg.tubelet, 4, IMAGENET_MEAN, IMAGENET_STD).abs().max() == 0
    moving = still.clone()
    moving[0, 4:, :, 0:8, 24:32] = 1.0  # from frame 4 on, the top-right cell changes
    m = motion_map(moving, cfg.tubelet, 4, IMAGENET_MEAN, IMAGENET_STD).reshape(3, 4, 4)  # 3 = 8 / 2 - 1
    assert m[0].abs().max() == 0  # frame 2 still equals frame 0
    expected = torch.zeros(2, 4, 4)
    expected[:, 0, 3] = 1.0  # frames 4 and 6: the top-right cell only, scaled to max 1
    torch.testing.assert_close(m[1:], expected)


def test_motion_map_term_trains_the_unmasked_pooled_feature_on_one_view_per_clip():
    from mgfm.model.motion_map import motion_map
    from mgfm.model.masked import first_views

    group = torch.tensor([0, 0, 1, 1, 2])
    assert first_views(group).tolist() == [0, 2, 4]
    assert first_views(torch.tensor([5, 3, 5, 3])).tolist() == [1, 0]  # first row of each clip, clip order by id

    cfg = tiny()
    model = build_pretraining_model(cfg, LossConfig(motion_map_weight=0.5, motion_map_grid=2))
    v = video(cfg)
    enc, dec = masks(cfg)
    loss, out = model(v, enc, dec, torch.tensor([7, 7]))  # two views of one clip: one motion-map row
    pooled = model.encoder(v[:1]).mean(dim=1)
    target = motion_map(v[:1], cfg.tubelet, 2, cfg.pixel_mean, cfg.pixel_std)
    expected = F.mse_loss(model.motion_map.head(pooled), target) / target.pow(2).mean()
    torch.testing.assert_close(out.motion_map_loss, expected.detach())
    torch.testing.assert_close(loss, out.reconstruction_loss + 0.5 * expected.detach())
    # The head reads the unmasked clip: its gradient reaches the patch embedding of masked tokens' pixels too.
    model.zero_grad()
    (model.motion_map(pooled, v[:1], cfg.pixel_mean, cfg.pixel_std)).backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="motion_map_grid=0: expected >= 1"):
        load_recipe(LossConfig, None, ["motion_map_grid=0"])


# ------------------------------------------------------------------------------------- objectives


def test_motion_target_is_clip_normalised_frame_differences_and_zero_where_nothing_moves():
    from mgfm.model.masked import motion_video

    cfg = tiny()
    v = video(cfg)
    v[:, :, :, :, : cfg.patch] = 0.3  # the first column of patches never changes
    model = build_pretraining_model(cfg, LossConfig(target="motion"))
    enc, _ = masks(cfg)
    loss, out = model(v, enc)
    assert out.pred.shape == out.target.shape and out.target.shape[-1] == cfg.patch_dim
    moving = motion_video(v)
    diff = v[:, 1:] - v[:, :-1]
    diff = torch.cat((diff, diff[:, -1:]), 1)  # the last frame repeats the last difference
    torch.testing.assert_close(moving, diff / diff.std(dim=(1, 3, 4), keepdim=True))
    assert moving.std(dim=(1, 3, 4)).sub(1).abs().max() < 0.2  # unit spread over each clip and channel
    still = torch.tensor([i % cfg.grid.w == 0 for i in range(cfg.num_tokens)])
    rows = still[out.target_index]  # (B, Nt): targets of tokens in the still column
    assert rows.any() and out.target[rows].abs().max() == 0
    assert out.target[~rows].abs().sum() > 0
    # the motion target moves with a masked token's pixels only (the encoder never sees them)
    loss.backward()
    assert model.decoder.head.weight.grad.abs().sum() > 0


def test_pixels_and_motion_target_is_both_side_by_side():
    cfg = tiny()
    enc, _ = masks(cfg)
    v = video(cfg)
    both = build_pretraining_model(cfg, LossConfig(target="pixels+motion"))
    _, out = both(v, enc)
    _, pixels = build_pretraining_model(cfg)(v, enc)
    _, motion = build_pretraining_model(cfg, LossConfig(target="motion"))(v, enc)
    assert out.target.shape[-1] == 2 * cfg.patch_dim == out.pred.shape[-1]
    assert torch.equal(out.target, torch.cat((pixels.target, motion.target), -1))
    with pytest.raises(ValueError, match="only with loss.target=pixels"):
        LossConfig(target="motion", motion_weight=1.0)


def test_feature_target_is_the_ema_teachers_normalised_features_of_the_whole_clip():
    cfg = tiny()
    torch.manual_seed(0)
    model = build_pretraining_model(cfg, LossConfig(target="features", variance_weight=1.0))
    model.train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    enc, _ = masks(cfg)
    v = video(cfg)
    loss, out = model(v, enc)
    assert out.pred.shape == out.target.shape == (B, int(enc[0].sum()), cfg.dim)
    full = model.teacher.forward_patches(model.encoder.patchify(v))  # the teacher sees every token
    expected = torch.gather(F.layer_norm(full, full.shape[-1:]), 1, out.target_index[..., None].expand(-1, -1, cfg.dim))
    torch.testing.assert_close(out.target, expected)
    assert {"feature_std", "target_std", "variance_loss"} <= set(out.stats)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.encoder.blocks[0].attn.qkv_weight.grad.abs().sum() > 0

    # EMA: momentum 1 keeps the teacher, 0 copies the encoder, 0.5 averages
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    model.update_teacher(0.5)
    for a, t, s in zip(before, model.teacher.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t, (a + s) / 2)
    model.update_teacher(0.0)
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.encoder.parameters()))
    # the momentum rises on a cosine from ema_momentum to ema_momentum_end
    objective = LossConfig(target="features", ema_momentum=0.99, ema_momentum_end=1.0)
    assert objective.momentum(0, 100) == pytest.approx(0.99) and objective.momentum(100, 100) == 1.0
    assert objective.momentum(50, 100) == pytest.approx(0.995)


def test_a_bf16_teacher_keeps_its_average_in_fp32():
    cfg = tiny()
    model = build_pretraining_model(cfg, LossConfig(target="features")).to(torch.bfloat16)
    start = [p.float().clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    for _ in range(100):  # each step moves 0.001 of the way: below bf16's resolution of weights near 1
        model.update_teacher(0.999)
    expected = [s + (1 - 0.999 ** 100) * 1.0 for s in start]
    for got, want in zip(model.teacher.parameters(), expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=0.02, rtol=0.01)


def test_the_content_floor_scores_only_the_tokens_that_show_something():
    cfg = tiny()
    v = video(cfg)
    v[..., :, : cfg.img_size // 2] = 0.3  # the left half is flat background: its tokens show nothing
    v[0, ..., : cfg.img_size // 2] += 1e-4 * torch.randn_like(v[0, ..., : cfg.img_size // 2])  # codec noise
    enc, _ = masks(cfg)
    torch.manual_seed(0)
    plain = build_pretraining_model(cfg, LossConfig())
    figure = build_pretraining_model(cfg, LossConfig(content_floor=0.01))
    figure.load_state_dict(plain.state_dict())
    loss_all, out_all = plain(v, enc)
    loss, out = figure(v, enc)
    torch.testing.assert_close(out.pred, out_all.pred)
    # which target tokens sit in the flat left half: column < half the grid's width
    shows = (out.target_index % cfg.grid.w) >= cfg.grid.w // 2
    per_token = (out.pred.float() - out.target).pow(2).mean(-1)
    torch.testing.assert_close(loss, per_token[shows].mean())
    torch.testing.assert_close(loss_all, per_token.mean())
    assert out.stats["content_share"] == pytest.approx(shows.float().mean().item())
    out.pred.retain_grad()
    loss, out = figure(v, enc)
    out.pred.retain_grad()
    loss.backward()
    assert out.pred.grad[~shows].abs().max() == 0 and out.pred.grad[shows].abs().max() > 0
    # a clip with nothing in it: no loss and no NaN
    empty, out = figure(torch.full_like(v, 0.3), enc)
    assert empty.item() == 0 and out.stats["content_share"].item() == 0

