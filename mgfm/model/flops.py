"""Parameter and GMAC counts of the encoder, without allocating real weights.

GMACs are multiply-accumulates of the matrix products (patch embedding, q/k/v/out projections, the two
attention products ``QK^T`` and ``AV``, MLP) for one clip through the full encoder with no mask, the
convention of the published VideoMAE table (ViT-B: 180 GMACs per 16x224x224 view). Norms, softmax and
GELU are not counted. :func:`measured_encoder_gmacs` cross-checks the formula with
``torch.utils.flop_counter`` on the meta device.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from mgfm.model.videomae import SIZES, MaskedVideoModel, ModelConfig, VideoEncoder


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
    import argparse

    ap = argparse.ArgumentParser(description="encoder parameters and GMACs per clip for each size preset")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"| size | dim / depth / heads | encoder params | GMACs per {args.frames}x{args.img}x{args.img} view |")
    print("| --- | --- | --- | --- |")
    for r in size_table(img_size=args.img, frames=args.frames):
        print(f"| {r['size']} | {r['dim']} / {r['depth']} / {r['heads']} | {r['params_M']:.1f}M | {r['gmacs']:.1f} |")


__all__ = ["count_params", "encoder_gmacs", "measured_encoder_gmacs", "size_table"]

if __name__ == "__main__":
    main()
