"""Data-driven start for the tubelet embedding: whitened principal components of frame differences.

Why (measured on the synthetic benchmark, docs/experiments.md "Why the tiny default starts from motion PCA"): a ViT trained from a random
start for a CPU budget learns nothing a linear probe can use across subjects, not even with labels
(300 supervised steps of the tiny encoder stay at the majority class), because a micro-gesture is a
small movement and each subject's look dominates the pixels. Starting the tubelet embedding from the
principal components of the *differences between consecutive frames inside a tubelet* (PCA whitening,
a classic unsupervised first layer, Coates & Ng 2011) makes every token respond to what moved in its
patch and not to what it looks like; masked reconstruction and the clip contrast then train the whole
encoder from there. No label is used: the components come from unlabelled training clips.

The embedding is linear in a patch vector ``x`` ordered ``(C, tubelet, patch, patch)``. With
``d_j = x[:, j+1] - x[:, j]`` (``tubelet - 1`` differences) and whitened components ``U`` of ``d``,
the token is ``U (d - mean d)``, i.e. weight ``U_{j-1} - U_j`` on frame ``j`` of the tubelet.
"""

from __future__ import annotations

import torch


def frame_differences(patches: torch.Tensor, channels: int, tubelet: int) -> torch.Tensor:
    """Patch vectors ``(n, C*tubelet*p*p)`` -> in-tubelet differences ``(n, C*(tubelet-1)*p*p)``."""
    x = patches.float().reshape(len(patches), channels, tubelet, -1)
    return (x[:, :, 1:] - x[:, :, :-1]).reshape(len(patches), -1)


def motion_pca_embedding(diffs: torch.Tensor, channels: int, tubelet: int, dim: int,
                         eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of a tubelet embedding whose outputs are whitened principal components of frame differences.

    Args:
        diffs: ``(n, C*(tubelet-1)*p*p)`` :func:`frame_differences` of patches of normalised training
            clips, n much larger than their width.
        dim: embedding width D. When D exceeds the number of components ``k = min(n, width)`` only k rows
            are returned (the caller keeps its own start for the rest).
        eps: added to each component's standard deviation before dividing, so near-zero-variance
            directions (noise) are not blown up.

    Returns:
        ``weight`` ``(k, C*tubelet*p*p)`` and ``bias`` ``(k,)``: ``weight @ x + bias`` for a patch vector
        ``x`` is its whitened component.
    """
    if tubelet < 2:
        raise ValueError(f"motion PCA init needs model.tubelet >= 2 (frames to difference), got {tubelet}")
    diffs = diffs.float()
    n = len(diffs)
    mean = diffs.mean(dim=0)
    # Components from the SVD of the centred differences: rows of vh, variances s^2 / (n - 1).
    _, s, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    k = min(dim, len(s))
    scale = s[:k] / max(n - 1, 1) ** 0.5 + eps
    components = vh[:k] / scale[:, None]  # (k, width), acting on differences
    per_diff = components.reshape(k, channels, tubelet - 1, -1)
    weight = torch.zeros(k, channels, tubelet, per_diff.shape[-1])
    weight[:, :, 1:] += per_diff
    weight[:, :, :-1] -= per_diff
    return weight.reshape(k, -1), -(components @ mean)


@torch.no_grad()
def init_patch_embed_from_motion(embed: torch.nn.Linear, diffs: torch.Tensor, channels: int, tubelet: int,
                                 eps: float = 0.1) -> int:
    """Overwrite (the first rows of) ``embed`` ``(D, P)`` with :func:`motion_pca_embedding`; returns rows set."""
    weight, bias = motion_pca_embedding(diffs, channels, tubelet, embed.out_features, eps)
    k = len(weight)
    embed.weight[:k] = weight.to(embed.weight)
    if embed.bias is not None:
        embed.bias[:k] = bias.to(embed.bias)
    return k
