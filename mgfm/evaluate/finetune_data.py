"""Fine-tuning's data: each split decoded once into memory (this rank's part), the seeded stratified labelled
subset, the model geometry the encoder is fine-tuned at, and the augmented micro-batches of a step (their
draws seeded by ``(seed, rank, step)``, so a resumed run sees what an uninterrupted one would have)."""

from __future__ import annotations

import dataclasses
import logging
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from mgfm.data.clip_augment import crop_clips, strong_jitter
from mgfm.data.decoded_split import DecodedSplit, decode_split
from mgfm.data.stream import SkipCounter, SplitRead, expected_clips
from mgfm.data.subset import missing_train_classes, stratified_subset
from mgfm.data.transforms import normalise
from mgfm.errors import InputError
from mgfm.evaluate.encoder_eval import resolve_encoder
from mgfm.evaluate.finetune_recipe import FinetuneRecipe
from mgfm.model.hf import config_from_hf, read_hf_config
from mgfm.model.encoder import at_geometry
from mgfm.runtime import gather_objects, rank_world
from mgfm.shards.manifest import load_manifest

log = logging.getLogger("mgfm.finetune")


@dataclass
class FinetuneData:
    """What every variant of a run trains and tests on (this rank's part of each split).

    ``train``: every train clip (the unlabelled pool), ``labelled``: the labelled subset of it,
    ``test``: the test clips (``views`` windows each), ``class_names``, ``labelled_ids``: the global
    labelled subset, ``class_counts``: labelled clips per class over all ranks."""

    train: DecodedSplit
    labelled: DecodedSplit
    test: DecodedSplit
    class_names: list[str]
    labelled_ids: list[str]
    class_counts: np.ndarray
    n_train: int
    fraction: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


def model_geometry(recipe: FinetuneRecipe):
    """The encoder folder, the run folder and the model config of the run: the encoder's, with the recipe's
    ``model.`` changes (at another frames / img_size its position table is kept, resampled or refused:
    ``pos_embed``)."""
    run_dir, encoder = resolve_encoder(recipe)
    trained = config_from_hf(read_hf_config(encoder), encoder)
    changes = {k: v for k, v in dataclasses.asdict(recipe.model).items() if v is not None}
    try:
        cfg = dataclasses.replace(trained, **changes)
    except ValueError as err:
        raise InputError(f"model.frames/img_size/drop_path do not fit the encoder: {err}") from None
    return encoder, run_dir, at_geometry(trained, cfg, recipe.pos_embed, str(encoder))


def stream_configs(recipe: FinetuneRecipe, cfg) -> tuple:
    """(train cache stream, test stream): the recipe's decoding settings cut to the model's geometry."""
    side = recipe.cache_side or cfg.img_size
    if side < cfg.img_size:
        raise InputError(f"cache_side={side} is smaller than img_size={cfg.img_size}")
    stream = dataclasses.replace(recipe.stream.with_model(cfg), masks=False, repeats=1, seed=recipe.seed)
    # the train cache keeps whole frames at cache_side for random crops; no masks, so any side will do
    return dataclasses.replace(stream, img_size=side, eval_crop=1.0), stream


def split_read(shards: str, split: str, cache: DecodedSplit) -> SplitRead:
    """How completely the ranks together cached ``split`` (against its manifest)."""
    parts = gather_objects((len(cache), cache.lost))
    return SplitRead(str(shards), split, expected_clips(shards, split), sum(n for n, _ in parts),
                     SkipCounter.merged_records(r for _, lost in parts for r in lost))


def load_data(recipe: FinetuneRecipe, cfg, fraction: float, cached: FinetuneData | None = None) -> FinetuneData:
    """Decode (or reuse ``cached``'s) splits and choose the labelled subset for ``fraction``."""
    if cached is None:
        class_names = list(load_manifest(recipe.shards)["class_names"])
        train_cfg, test_cfg = stream_configs(recipe, cfg)
        train = decode_split(recipe.shards, recipe.train_split, train_cfg, recipe.train_views,
                             desc=f"decode {recipe.train_split}")
        test = decode_split(recipe.shards, recipe.test_split, test_cfg, recipe.views, desc=f"decode {recipe.test_split}")
        for split, cache, strict in ((recipe.train_split, train, False), (recipe.test_split, test, True)):
            read = split_read(recipe.shards, split, cache)
            if not read.complete and (strict and not recipe.allow_missing):
                raise InputError(f"{recipe.shards}: {read.describe()}; restore the shards (`python -m mgfm.shards "
                                 f"verify` names what is wrong) or set allow_missing=true")
            if not read.complete:
                log.warning("%s: %s", recipe.shards, read.describe())
    else:
        class_names, train, test = cached.class_names, cached.train, cached.test
    pairs = [p for part in gather_objects(list(zip(train.clip_ids, train.labels.tolist()))) for p in part]
    if not pairs:
        raise InputError(f"{recipe.shards}: split {recipe.train_split!r} has no clips")
    ids, labels = zip(*pairs)
    test_labels = [y for part in gather_objects(test.labels.tolist()) for y in part]
    missing = missing_train_classes(labels, test_labels, class_names)
    if missing:
        read = split_read(recipe.shards, recipe.train_split, train)
        lost = "" if read.complete else f"; {read.describe()}"
        raise InputError(f"{recipe.shards}: {missing}{lost}; fine-tuning cannot learn them")
    labelled_ids = stratified_subset(ids, labels, fraction, recipe.seed, class_names)
    lab = dict(pairs)
    counts = np.bincount([lab[c] for c in labelled_ids], minlength=len(class_names))
    labelled = train.select(labelled_ids)
    log.info("label_fraction %g: %d of %d train clips labelled (%d classes, %d-%d per class)", fraction,
             len(labelled_ids), len(pairs), len(class_names), counts.min(), counts.max())
    return FinetuneData(train, labelled, test, class_names, labelled_ids, counts, len(pairs), fraction,
                        tuple(cfg.pixel_mean), tuple(cfg.pixel_std))


# ------------------------------------------------------------------------------------------ batches


@dataclass
class StepBatch:
    """One micro-batch: labelled ``video`` float ``(B, T, 3, S, S)`` + ``labels`` ``(B,)``; for FixMatch the
    unlabelled ``weak`` and ``strong`` views ``(B*mu, T, 3, S, S)`` of the same clips (+ their true
    labels ``unlabelled_labels`` for diagnostics only, -1 where unknown)."""

    video: torch.Tensor
    labels: torch.Tensor
    weak: torch.Tensor | None = None
    strong: torch.Tensor | None = None
    unlabelled_labels: torch.Tensor | None = None


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch's draws (deterministic, so resume replays the same data)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{rank}:{step}:{micro}".encode()))


def labelled_indices(n: int, labels: torch.Tensor, batch: int, step: int, micro: int, grad_accum: int,
                     balance: str, seed: int, rank: int) -> torch.Tensor:
    """Indices of this micro-batch's labelled clips: epoch-wise permutations (every clip once per
    ``n`` clips drawn), or, with ``balance="sampler"``, class-balanced draws (each class equally likely,
    then a clip of it)."""
    if balance == "sampler":
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1).float()
        weights = 1.0 / counts[labels]
        return torch.multinomial(weights, batch, replacement=True, generator=step_generator(seed, rank, step, micro))
    start = (step * grad_accum + micro) * batch
    out = []
    for k in range(start, start + batch):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}:{rank}:e{epoch}".encode())))
        out.append(int(perm[pos]))
    return torch.tensor(out, dtype=torch.long)


def make_batch(data: FinetuneData, recipe: FinetuneRecipe, img_size: int, step: int, micro: int,
               semi: bool) -> StepBatch:
    """Augmented tensors of one micro-batch (weak views for labelled clips)."""
    rank, _ = rank_world()
    gen = step_generator(recipe.seed, rank, step, micro)
    b = recipe.stream.batch_size
    mean, std = data.mean, data.std
    idx = labelled_indices(len(data.labelled), data.labelled.labels, b, step, micro, recipe.optim.grad_accum,
                           recipe.balance, recipe.seed, rank)
    video = _pick_views(data.labelled, idx, gen)
    out = StepBatch(normalise(crop_clips(video, img_size, recipe.crop_scales, recipe.flip, gen), mean, std),
                    data.labelled.labels[idx])
    if semi:
        uidx = torch.randint(len(data.train), (b * recipe.semi.ratio,), generator=gen)
        clips = _pick_views(data.train, uidx, gen)
        weak = crop_clips(clips, img_size, recipe.crop_scales, recipe.flip, gen)
        strong = strong_jitter(crop_clips(clips, img_size, recipe.crop_scales, recipe.flip, gen),
                               recipe.semi.strong, gen)
        out.weak, out.strong = normalise(weak, mean, std), normalise(strong, mean, std)
        out.unlabelled_labels = data.train.labels[uidx]
    return out


def _pick_views(cache: DecodedSplit, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``(B, T, 3, S0, S0)``: one random cached temporal window of each clip ``idx``."""
    views = torch.randint(cache.views, (len(idx),), generator=gen)
    return cache.video[idx, views]
