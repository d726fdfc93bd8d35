"""Motion-PCA start of the tubelet embedding: blind to still patches, whitened on moving ones, and wired
into pretraining (frozen when asked)."""

from __future__ import annotations

import pytest
import torch

from mgfm.model.motion_init import frame_differences, init_patch_embed_from_motion, motion_pca_embedding

C, T, PP = 3, 2, 16  # channels, tubelet, pixels per patch side squared (4x4 patches)


def _patches(n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    still = torch.randn(n, C, 1, PP, generator=g) * 3.0  # strong appearance, shared by both frames
    motion = torch.randn(n, C, 1, PP, generator=g) * torch.linspace(0.05, 1.0, PP)  # weaker, anisotropic
    return torch.cat([still, still + motion], dim=2).reshape(n, -1)


def test_embedding_ignores_what_does_not_move():
    patches = _patches()
    weight, bias = motion_pca_embedding(frame_differences(patches, C, T), C, T, dim=8)
    assert weight.shape == (8, C * T * PP) and bias.shape == (8,)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(C, 1, PP, generator=g).expand(C, T, PP).reshape(-1)
    b = (torch.randn(C, 1, PP, generator=g) * 10).expand(C, T, PP).reshape(-1)
    torch.testing.assert_close(weight @ a + bias, weight @ b + bias)  # any still patch -> the same token


def test_embedding_whitens_the_frame_differences():
    patches = _patches()
    diffs = frame_differences(patches, C, T)
    weight, bias = motion_pca_embedding(diffs, C, T, dim=12, eps=0.0)
    tokens = patches @ weight.t() + bias
    cov = torch.cov(tokens.t())
    torch.testing.assert_close(cov, torch.eye(12), atol=1e-3, rtol=0)
    # Ordered by variance: the first component is the most moving direction of the data.
    first = weight[0].reshape(C, T, PP)[0, 1]
    assert first.abs().argmax() >= PP // 2


def test_dim_beyond_the_components_keeps_the_rest_of_the_start():
    diffs = frame_differences(_patches(200), C, T)  # width C*PP = 48
    embed = torch.nn.Linear(C * T * PP, 64)
    before = embed.weight.detach().clone()
    assert init_patch_embed_from_motion(embed, diffs, C, T) == 48
    assert not torch.equal(embed.weight[:48], before[:48]) and torch.equal(embed.weight[48:], before[48:])
    with pytest.raises(ValueError, match="tubelet >= 2"):
        motion_pca_embedding(diffs, C, 1, dim=8)


def test_pretraining_starts_from_motion_pca_and_keeps_it_frozen(tmp_path, tiny_shards):
    from test_pretrain import _pretrain, _recipe

    from mgfm.model.hf import read_hf_weights

    recipe = _recipe(tmp_path, tiny_shards, patch_init="motion_pca", patch_init_clips=6, freeze_patch_embed=True)
    result = _pretrain(["--recipe", str(recipe), "optim.epochs=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from motion PCA of" in result.stderr
    w = read_hf_weights(tmp_path / "runs" / "tiny" / "encoder")["embeddings.patch_embeddings.projection.weight"]
    # (D, C, tubelet, p, p): weights on the two frames cancel, so still content gives no signal; after
    # training, because the embedding was frozen.
    assert w.abs().sum() > 0
    torch.testing.assert_close(w[:, :, 0], -w[:, :, 1])
