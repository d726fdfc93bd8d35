"""The synthetic micro-gesture benchmark: the project's embedded default dataset.

Identity-free seated figures (head, torso, arms, hands; no faces) drawn with OpenCV perform iMiGUE's 32
classes inside long "interview" videos, with iMiGUE-shaped long-tailed class frequencies and clip
lengths, per-subject looks and movement styles, and a video-level emotion that changes which gestures
occur. Written in iMiGUE's own format (``labels.csv`` + ``protocol.json`` + ``videos/<id>.mp4``)::

    python -m mgfm.sources.synthetic --out data/synthetic

    from mgfm.sources.synthetic import SyntheticConfig, generate
    csv_path = generate("data/synthetic", SyntheticConfig())
"""

from mgfm.sources.synthetic.generate import (GenerationStats, generate, generate_with_stats, is_rendered,
                                          labels_csv, protocol, render_frames, render_video)
from mgfm.sources.synthetic.plan import DatasetPlan, SyntheticConfig, make_plan

from pathlib import Path
from mgfm.sources.imigue import read_imigue

__all__ = [
    "DatasetPlan", "GenerationStats", "SyntheticConfig", "generate", "generate_with_stats", "is_rendered",
    "labels_csv", "make_plan", "protocol", "read_synthetic", "render_frames", "render_video",
]  # fmt: skip


def read_synthetic(out_dir, name: str = "synthetic"):
    """Read a generated folder into a :class:`~mgfm.sources.clip_index.ClipIndex` (iMiGUE reader, same format)."""
    out = Path(out_dir)
    return read_imigue(out / "labels.csv", protocol=out / "protocol.json", video_dir=out / "videos", name=name)
