"""Parameter and GMAC counts of the encoder, without allocating real weights, and the model FLOPs of a
pretraining step per clip (:func:`pretrain_gflops`, for model FLOPs utilisation).

GMACs are multiply-accumulates of the matrix products (patch embedding, q/k/v/out projections, the two
attention products ``QK^T`` and ``AV``, MLP) for one clip through the full encoder with no mask, the
convention of the published VideoMAE table (ViT-B: 180 GMACs per 16x224x224 view). Norms, softmax and
GELU are not counted. :func:`measured_encoder_gmacs` cross-checks the formula with
``torch.utils.flop_counter`` on the meta device.
"""

from __future__ import annotations

import dataclasses
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from mgfm.model.encoder import SIZES, ModelConfig, VideoEncoder
from mgfm.model.masked import MaskedVideoModel
from mgfm.data.masking import num_masked


def count_params(cfg: ModelConfig, part: str = "encoder") -> int:
    """Trainable parameters of ``part`` in ``encoder|decoder|all`` (built on the meta device)."""
    if part not in ("encoder", "decoder", "all"):
        raise ValueError(f"part: expected encoder|decoder|all, got {part!r}")
    with torch.device("meta"):
        model = VideoEncoder(cfg) if part == "encoder" else MaskedVideoModel(cfg)
    module = model.decoder if part == "decoder" else model
    return sum(p.numel() for p in module.parameters())


def encoder_gmacs(cfg: ModelConfig, tokens: int | None = None) -> float:
    """Analytic GMACs of one clip through the encoder with ``tokens`` tokens (default: all ``N``)."""
    n = cfg.num_tokens if tokens is None else tokens
    d = cfg.dim
    per_layer = n * (4 * d * d + 2 * d * cfg.mlp_dim) + 2 * n * n * d  # qkv+proj, mlp, QK^T and AV
    return (n * cfg.patch_dim * d + cfg.depth * per_layer) / 1e9


def _blocks_macs(tokens: int, dim: int, mlp_dim: int, depth: int) -> int:
    """MACs of ``depth`` transformer blocks over ``tokens`` tokens (the per-layer count of :func:`encoder_gmacs`)."""
    return depth * (tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 2 * tokens * tokens * dim)


def pretrain_gflops(cfg: ModelConfig, mask_ratio: float = 0.9, decoder_keep_ratio: float | None = None) -> float:
    """Model GFLOPs of one clip through a pretraining step: forward + backward (3 x the forward) x 2 FLOPs
    per MAC x the forward's GMACs, counted as :func:`encoder_gmacs` counts them (matrix products only).

    The forward: the encoder on the ``visible`` tokens a tube mask of ``mask_ratio`` leaves
    (:func:`mgfm.data.masking.num_masked`), the ``encoder_to_decoder`` projection of those tokens, the decoder
    blocks over ``visible + reconstructed`` tokens, and the pixel head (``decoder_dim x patch_dim``) on the
    ``reconstructed`` ones: every masked token, or with VideoMAE-V2 decoder masking the
    ``round(masked * decoder_keep_ratio)`` that :func:`mgfm.data.masking.decoder_mask` keeps. The backward is
    taken as twice the forward (the usual convention, although no gradient flows into the input patches);
    the optional contrastive and motion-map terms, norms, softmax, the loss and the optimiser are not counted.
    """
    masked = num_masked(cfg.grid, mask_ratio)
    visible = cfg.num_tokens - masked
    reconstructed = masked if decoder_keep_ratio is None else int(round(masked * decoder_keep_ratio))
    d = cfg.decoder_dim
    decoder_macs = (visible * cfg.dim * d + _blocks_macs(visible + reconstructed, d, cfg.decoder_mlp_dim,
                                                         cfg.decoder_depth) + reconstructed * d * cfg.patch_dim)
    return 3 * 2 * (encoder_gmacs(cfg, tokens=visible) + decoder_macs / 1e9)


def measured_encoder_gmacs(cfg: ModelConfig) -> float:
    """GMACs of :meth:`VideoEncoder.forward` on one unmasked clip, counted by ``FlopCounterMode`` on meta."""
    with torch.device("meta"):
        encoder = VideoEncoder(cfg)
        video = torch.empty(1, cfg.frames, cfg.channels, cfg.img_size, cfg.img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        encoder(video)
    return counter.get_total_flops() / 2 / 1e9


def size_table(img_size: int = 224, frames: int = 16, sizes: tuple[str, ...] = tuple(SIZES)) -> list[dict]:
    """Rows ``{size, dim, depth, heads, params_M, gmacs}`` per preset at one ``frames x img_size^2`` view."""
    rows = []
    for size in sizes:
        cfg = dataclasses.replace(ModelConfig(size=size), img_size=img_size, frames=frames)
        rows.append({"size": size, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads,
                     "params_M": count_params(cfg) / 1e6, "gmacs": encoder_gmacs(cfg)})
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m mgfm.model.flops [--img 224] [--frames 16]``: print the encoder size table."""
    ap = argparse.ArgumentParser(description="encoder parameters and GMACs per clip for each size preset")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"| size | dim / depth / heads | encoder params | GMACs per {args.frames}x{args.img}x{args.img} view |")
    print("| --- | --- | --- | --- |")
    for r in size_table(img_size=args.img, frames=args.frames):
        print(f"| {r['size']} | {r['dim']} / {r['depth']} / {r['heads']} | {r['params_M']:.1f}M | {r['gmacs']:.1f} |")


__all__ = ["count_params", "encoder_gmacs", "measured_encoder_gmacs", "pretrain_gflops", "size_table"]

if __name__ == "__main__":
    main()
