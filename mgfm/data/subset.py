"""Seeded, stratified labelled subsets for semi-supervised recognition (``label_fraction``).

``stratified_subset(clip_ids, labels, fraction, seed)`` keeps, for every class ``c`` with ``n_c``
labelled clips, ``max(1, round(fraction * n_c))`` of them, so the subset follows the (long-tailed) class
distribution and no class is left without a labelled clip. The choice depends only on the set of
``(clip_id, label)`` pairs, the fraction and the seed (not on the order the clips arrive in): within a
class the clip ids are sorted, then permuted by a generator seeded with ``(seed, class id)``. A larger
fraction with the same seed keeps a superset of a smaller one's clips (the same per-class order is cut
longer), so runs at 1%, 5% and 10% are nested.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from mgfm.errors import MgfmError


class SubsetError(MgfmError, ValueError):
    """A label fraction or clip list that cannot give a complete stratified subset."""


def check_fraction(fraction: float, name: str = "label_fraction") -> float:
    """``fraction`` as a float in (0, 1]; :class:`SubsetError` naming ``name`` otherwise."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise SubsetError(f"{name}: expected a fraction in (0, 1], got {fraction!r}") from None
    if not 0.0 < value <= 1.0:
        raise SubsetError(f"{name}: expected a fraction in (0, 1], got {fraction!r}")
    return value


def stratified_subset(clip_ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int = 0,
                      class_names: Sequence[str] | None = None) -> list[str]:
    """The labelled subset's clip ids (sorted).

    Args:
        clip_ids: N clip ids (unique).
        labels: N class ids; ``-1`` (unlabelled) clips are never selected.
        fraction: in (0, 1]; per class ``max(1, round(fraction * n_c))`` clips are kept.
        seed: selects which clips (same seed + same clips -> same subset).
        class_names: when given, a label outside them is a :class:`SubsetError`. A class without labelled
            clips stays without: check the split first (:func:`missing_train_classes`).
    """
    fraction = check_fraction(fraction)
    if len(clip_ids) != len(labels):
        raise SubsetError(f"stratified_subset: {len(clip_ids)} clip ids but {len(labels)} labels")
    if len(set(clip_ids)) != len(clip_ids):
        raise SubsetError("stratified_subset: clip ids must be unique")
    by_class: dict[int, list[str]] = defaultdict(list)
    for clip_id, label in zip(clip_ids, labels):
        if int(label) >= 0:
            by_class[int(label)].append(str(clip_id))
    if not by_class:
        raise SubsetError("stratified_subset: no labelled clip to choose from")
    if class_names is not None:
        unknown = sorted(c for c in by_class if c >= len(class_names))
        if unknown:
            raise SubsetError(f"stratified_subset: label {unknown[0]} is outside the {len(class_names)} classes")
    chosen: list[str] = []
    for c, ids in sorted(by_class.items()):
        ids = sorted(ids)
        order = np.random.default_rng([int(seed), c]).permutation(len(ids))
        keep = max(1, int(round(fraction * len(ids))))
        chosen.extend(ids[i] for i in order[:keep])
    return sorted(chosen)


def missing_train_classes(train_labels: Sequence[int], test_labels: Sequence[int],
                          class_names: Sequence[str]) -> str | None:
    """``"classes 2 ('class_c') have test clips but no train clips"`` when some classes of the test split have
    no labelled train clip (a model cannot learn them; a class absent from both splits is no one's concern),
    else None. Every such class is named (up to six)."""
    absent = sorted(set(int(y) for y in test_labels if int(y) >= 0) - set(int(y) for y in train_labels))
    if not absent:
        return None
    names = ", ".join(f"{k} ({class_names[k]!r})" for k in absent[:6]) + (", ..." if len(absent) > 6 else "")
    return f"classes {names} have test clips but no train clips"


__all__ = ["SubsetError", "check_fraction", "missing_train_classes", "stratified_subset"]
