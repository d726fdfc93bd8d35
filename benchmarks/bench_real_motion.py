"""Does pretraining add value on real motion? Learning curves of the frozen linear probe, in one process.

Each shard set's train and test clips are decoded once (16 x 112 px, uint8 in memory); the tiny encoder is
pretrained on a mixture of the sets' train clips (equal weights, random multi-scale crops, tube masks) and,
at ``--probe-at`` fractions of ``--steps`` (step 0 = the random init), probed on every set exactly as
``eval/linear_probe.py`` probes (mean-pooled tokens of the unmasked centre crop, standardised logistic
regression, C by subject-grouped CV). References measured in the same process: raw pixels (8 x 3 x 4 x 4)
and the step-0 encoder. Objectives (``--objectives``, run one after the other from the same seed):

* ``videomae``: masked-tubelet reconstruction (per-patch normalised pixels), as the GPU recipes train;
* ``maps``: reconstruction plus a linear head on the pooled features of the *unmasked* clip that regresses
  where the figure is and where it moved on a ``--grid`` x ``--grid`` grid (grey-level distance from the
  frame's median, and frame differences to the first frame; no label), a motion target in the spirit of
  MaskFeat's hand-made targets.

Prints a table (objective, step, top-1 per set) and writes ``--out``/real_motion.json and a PNG of the
curves. Example (about 45 minutes on 2 cores for 1,000 steps)::

    .venv/bin/python benchmarks/bench_real_motion.py --steps 1000 --objectives videomae,maps \\
        --sets synthetic=shards/synthetic,utkinect=shards/utkinect,florence3d=shards/florence3d
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mgfm.data.clip_augment import crop_clips
from mgfm.data.decoded_split import decode_split
from mgfm.data.masking import MaskGenerator
from mgfm.data.stream import StreamConfig, make_loader
from mgfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise
from mgfm.evaluate.featureset import FeatureSet
from mgfm.evaluate.metrics import classification_metrics
from mgfm.evaluate.probe import ProbeConfig, predict, train_probe
from mgfm.evaluate.raw_pixels import PixelEncoder
from mgfm.report import format_table, save_figure
from mgfm.model.motion_map import motion_map
from mgfm.model.encoder import ModelConfig
from mgfm.model.masked import build_pretraining_model, param_groups
from mgfm.shards.manifest import load_manifest

log = logging.getLogger("bench_real_motion")
GEOMETRY = dict(frames=16, img_size=112)


def decode_sets(sets: dict[str, str], test_limit: int | None) -> dict[str, dict]:
    """``{name: {train, test (DecodedSplit), classes, subjects {clip_id: subject}}}``; at most ``test_limit``
    test clips per set (an even sample) to keep probing cheap."""
    cfg = StreamConfig(**GEOMETRY, masks=False, num_workers=2, batch_size=32, video_dtype="uint8")
    out = {}
    for name, path in sets.items():
        train, test = (decode_split(path, split, cfg, progress=False) for split in ("train", "test"))
        if test_limit and len(test) > test_limit:
            keep = np.linspace(0, len(test) - 1, test_limit).round().astype(int)
            test = test.select([test.clip_ids[i] for i in keep])
        subjects = {}
        meta_cfg = StreamConfig(frames=2, img_size=32, masks=False, num_workers=0, batch_size=64)
        for split in ("train", "test"):
            loader, _ = make_loader(path, split, meta_cfg, mode="eval")
            subjects.update({c: str(m.get("subject")) for b in loader for c, m in zip(b["clip_id"], b["meta"])})
        out[name] = {"train": train, "test": test, "classes": list(load_manifest(path)["class_names"]),
                     "subjects": subjects}
    return out


def probe_all(features_fn, data: dict[str, dict]) -> dict[str, float]:
    """Linear-probe top-1 on each set's test clips of ``features_fn`` ((B, T, 3, S, S) -> (B, D))."""
    scores = {}
    for name, d in data.items():
        sets = []
        for cache in (d["train"], d["test"]):
            with torch.no_grad():
                feats = torch.cat([features_fn(normalise(cache.video[i:i + 64, 0], IMAGENET_MEAN, IMAGENET_STD))
                                   for i in range(0, len(cache), 64)]).numpy()
            rows = [{"label": int(y), "subject": d["subjects"].get(c, c), "clip_id": c}
                    for y, c in zip(cache.labels.tolist(), cache.clip_ids)]
            sets.append(FeatureSet(feats, rows))
        probe = train_probe(sets[0], len(d["classes"]), ProbeConfig())
        scores[name] = classification_metrics(predict(probe, sets[1]), sets[1].labels, d["classes"], [])["top1"]
    return scores


def layout_and_motion(video: torch.Tensor, grid: int) -> torch.Tensor:
    """Where the figure is (grey-level distance from each frame's median, one frame per tubelet) and where it
    moved (:func:`mgfm.model.motion_map.motion_map`), each pooled to ``grid`` x ``grid`` and scaled to max 1:
    ``(B, T, 3, H, W)`` normalised -> ``(B, (T/2 + T/2 - 1) * grid^2)``."""
    x = video.float() * torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    grey = x.mean(2)[:, ::2]
    figure = (grey - grey.flatten(2).median(dim=2).values[..., None, None]).abs()
    cells = F.adaptive_avg_pool2d(figure, grid).flatten(1)
    cells = cells / (cells.amax(1, keepdim=True) + 1e-6)
    return torch.cat([cells, motion_map(video, 2, grid, IMAGENET_MEAN, IMAGENET_STD)], 1)


def curve(objective: str, data: dict[str, dict], args: argparse.Namespace) -> list[dict]:
    """Pretrain with ``objective`` for ``args.steps`` steps; the probe scores at each probe step."""
    torch.manual_seed(args.seed)
    cfg = ModelConfig(size="tiny", **GEOMETRY)
    model = build_pretraining_model(cfg)
    head = torch.nn.Linear(cfg.dim, (GEOMETRY["frames"] - 1) * args.grid ** 2) if objective == "maps" else None
    groups = param_groups(model, 0.05) + ([{"params": list(head.parameters()), "weight_decay": 0.0}] if head else [])
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + np.cos(np.pi * max(0, s - warmup) / max(1, args.steps - warmup)))))
    masks = MaskGenerator(cfg.grid, ratio=0.9)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    names = list(data)
    at = sorted({int(round(float(f) * args.steps)) for f in args.probe_at.split(",")})
    rows, start = [], time.time()
    for step in range(args.steps + 1):
        if step in at:
            model.eval()
            rows.append({"objective": objective, "step": step, **probe_all(model.features, data),
                         "seconds": round(time.time() - start)})
            model.train()
            log.info("%s", rows[-1])
        if step == args.steps:
            break
        picks = [(names[rng.integers(len(names))], 0) for _ in range(args.batch)]
        clips = torch.stack([data[n]["train"].video[rng.integers(len(data[n]["train"])), 0] for n, _ in picks])
        video = normalise(crop_clips(clips, cfg.img_size, (1.0, 0.875, 0.75, 0.66), False, gen),
                          IMAGENET_MEAN, IMAGENET_STD)
        enc = torch.as_tensor(np.stack([masks(rng)[0] for _ in range(args.batch)]))
        loss, _ = model(video, enc)
        if head is not None:
            target = layout_and_motion(video, args.grid)
            loss = loss + F.mse_loss(head(model.features(video)), target) / target.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return rows


def plot(rows: list[dict], references: dict[str, float], path: Path) -> None:
    from matplotlib.figure import Figure

    sets = list(references)
    fig = Figure(figsize=(4 * len(sets), 3.2), dpi=110)
    for i, name in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        for objective in dict.fromkeys(r["objective"] for r in rows):
            mine = [r for r in rows if r["objective"] == objective]
            ax.plot([r["step"] for r in mine], [r[name] for r in mine], marker="o", label=objective)
        ax.axhline(references[name], color="grey", ls="--", label="raw pixels")
        ax.set_title(name)
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("linear probe top-1")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="synthetic=shards/synthetic,utkinect=shards/utkinect,florence3d=shards/florence3d")
    ap.add_argument("--objectives", default="videomae,maps")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--probe-at", default="0,0.5,1", help="fractions of --steps at which every set is probed")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak lr (warmup 10%%, cosine)")
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--test-limit", type=int, default=600, help="test clips probed per set at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_real_motion"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sets = dict(item.split("=", 1) for item in args.sets.split(","))
    data = decode_sets(sets, args.test_limit)
    references = probe_all(PixelEncoder().features, data)
    rows = [row for objective in args.objectives.split(",") for row in curve(objective, data, args)]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "raw_pixels": references, "curves": rows}
    (args.out / "real_motion.json").write_text(json.dumps(result, indent=1))
    plot(rows, references, args.out / "real_motion.png")
    table = [["raw pixels", "-", *(references[s] for s in sets)]]
    table += [[r["objective"], r["step"], *(r[s] for s in sets)] for r in rows]
    print(format_table(["encoder", "step", *sets], table, floatfmt=".3f"))
    print(f"curves: {args.out / 'real_motion.png'}")
    return result


if __name__ == "__main__":
    main()
