"""Pretraining step throughput: our MaskedVideoModel vs ``transformers.VideoMAEForPreTraining``.

One step = forward + backward + AdamW step on a batch of random ImageNet-normalised clips with a 0.9 tube
mask and the per-patch normalised pixel loss, same widths, input and masks for every side. Three sides:

* ``hf``      transformers VideoMAEForPreTraining (SDPA attention), the reference;
* ``ours``    our model, the decoder reconstructs every masked token (same work as ``hf``);
* ``ours+dm`` our model with VideoMAE-V2 decoder masking (running cell, keep ``--decoder-keep``).

Warmup steps are excluded; the sides are timed in interleaved repeats (rotating the order each repeat)
and the median per-step time of each side is reported, so machine noise hits every side alike. Prints
clips/s and the ratios ours/hf. Example::

    .venv/bin/python benchmarks/bench_pretrain.py --size tiny --batch 4 --steps 3 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch

from mgfm.data.masking import MaskGenerator
from mgfm.model.flops import count_params
from mgfm.model.hf import hf_config_dict
from mgfm.model.encoder import ModelConfig
from mgfm.model.masked import build_pretraining_model, param_groups

log = logging.getLogger("bench_pretrain")

TARGETS = {"ours": 0.95, "ours+dm": 1.2}  # required speed ratios vs hf


def build_hf(cfg: ModelConfig):
    """The transformers model with our widths (final encoder norm, q/v bias, norm_pix_loss, SDPA)."""
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    d = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type", "mgfm", "qkv_bias")}
    return VideoMAEForPreTraining(VideoMAEConfig(**d, attn_implementation="sdpa"))


def make_masks(cfg: ModelConfig, batch: int, ratio: float, keep: float, seed: int):
    """Encoder masks and running-cell decoder masks, bool ``(batch, N)`` each."""
    gen = MaskGenerator(cfg.grid, ratio=ratio, decoder_keep_ratio=keep)
    rng = np.random.default_rng(seed)
    enc, dec = zip(*(gen(rng) for _ in range(batch)))
    return torch.as_tensor(np.stack(enc)), torch.as_tensor(np.stack(dec))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "S", "B", "L", "H"])
    ap.add_argument("--frames", type=int, default=None, help="clip frames (default: the size's preset)")
    ap.add_argument("--img", type=int, default=None, help="crop side (default: the size's preset)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--mask-ratio", type=float, default=0.9)
    ap.add_argument("--decoder-keep", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="'process' times this process's CPU time: steadier on a shared CPU box with --threads 1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    cfg = ModelConfig(size=args.size)
    cfg = dataclasses.replace(cfg, frames=args.frames or cfg.frames, img_size=args.img or cfg.img_size)
    enc_mask, dec_mask = make_masks(cfg, args.batch, args.mask_ratio, args.decoder_keep, args.seed)
    video = torch.randn(args.batch, cfg.frames, cfg.channels, cfg.img_size, cfg.img_size)
    video, enc_mask, dec_mask = video.to(device), enc_mask.to(device), dec_mask.to(device)

    ours = build_pretraining_model(cfg).to(device).train()
    hf = build_hf(cfg).to(device).train()
    n_ours, n_hf = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in hf.parameters())
    log.info("size %s: %dx%dx%d, %d tokens, batch %d, encoder %.2fM params; ours %.2fM, hf %.2fM params in all",
             cfg.size, cfg.frames, cfg.img_size, cfg.img_size, cfg.num_tokens, args.batch,
             count_params(cfg) / 1e6, n_ours / 1e6, n_hf / 1e6)
    opt_kw = dict(lr=1e-4, betas=(0.9, 0.95))
    opt_ours = torch.optim.AdamW(param_groups(ours, 0.05), **opt_kw)
    opt_hf = torch.optim.AdamW(param_groups(hf, 0.05), **opt_kw)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext()

    def step_hf() -> float:
        with amp():
            loss = hf(pixel_values=video, bool_masked_pos=enc_mask).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.item()

    def step_ours(decoder_mask) -> float:
        with amp():
            loss, _ = ours(video, enc_mask, decoder_mask)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    sides = {"hf": step_hf, "ours": lambda: step_ours(None), "ours+dm": lambda: step_ours(dec_mask)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.clock == "process" and device.type != "cpu":
        ap.error("--clock process only makes sense on the CPU")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for name, fn in sides.items():
        for _ in range(args.warmup):
            fn()
        log.info("warmed up %s", name)
    times: dict[str, list[float]] = {name: [] for name in sides}
    peak: dict[str, int] = {name: 0 for name in sides}
    names = list(sides)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = clock()
            for _ in range(args.steps):
                sides[name]()
            sync()
            times[name].append((clock() - t0) / args.steps)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
        log.info("repeat %d/%d: %s", r + 1, args.repeats,
                 ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))

    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {"size": cfg.size, "frames": cfg.frames, "img": cfg.img_size, "batch": args.batch,
              "device": str(device), "amp": args.amp, "threads": torch.get_num_threads(), "clock": args.clock,
              "clips_per_s": {n: args.batch / t for n, t in med.items()},
              "ratio": {n: med["hf"] / med[n] for n in ("ours", "ours+dm")}}
    print(f"\npretraining step, size {cfg.size}, {cfg.frames}x{cfg.img_size}x{cfg.img_size}, batch {args.batch}, "
          f"mask {args.mask_ratio}, device {device}, amp {args.amp}, threads {torch.get_num_threads()}, "
          f"{args.clock} clock, median of {args.repeats} x {args.steps} steps")
    print(f"{'side':<10}{'ms/step':>10}{'clips/s':>10}{'vs hf':>8}{'target':>8}" +
          (f"{'peak GiB':>10}" if device.type == "cuda" else ""))
    for n in names:
        ratio = med["hf"] / med[n]
        target = f">={TARGETS[n]}" if n in TARGETS else "-"
        mem = f"{peak[n] / 2**30:>10.2f}" if device.type == "cuda" else ""
        print(f"{n:<10}{med[n] * 1e3:>10.1f}{args.batch / med[n]:>10.2f}{ratio:>7.2f}x{target:>8}{mem}")
    return result


if __name__ == "__main__":
    main()
