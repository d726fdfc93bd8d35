"""CLI: ``python -m mgfm.sources.synthetic --out data/synthetic [--videos N --subjects S --seed S --height 128 ...]``.

Generates (or finishes) the synthetic benchmark, then prints its statistics and the rendering speed.
"""

from __future__ import annotations

import argparse
import logging

from mgfm.sources.clip_index import format_summary
from mgfm.sources.synthetic import SyntheticConfig, generate_with_stats, is_rendered, read_synthetic


def main(argv: list[str] | None = None) -> None:
    d = SyntheticConfig()
    ap = argparse.ArgumentParser(prog="python -m mgfm.sources.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/synthetic", help="output folder (resumed when it exists)")
    ap.add_argument("--videos", type=int, default=d.videos)
    ap.add_argument("--subjects", type=int, default=d.subjects)
    ap.add_argument("--clips-per-video", type=int, default=d.clips_per_video, help="mean clips per video")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--height", type=int, default=d.height, help="frame height (the short side)")
    ap.add_argument("--width", type=int, default=d.width, help="frame width (0 = 5/4 of the height)")
    ap.add_argument("--workers", type=int, default=d.workers, help="render processes")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = SyntheticConfig(subjects=args.subjects, videos=args.videos, clips_per_video=args.clips_per_video,
                             seed=args.seed, height=args.height, width=args.width, workers=args.workers)
    if is_rendered(args.out, config):
        speed = f"{args.out}: already complete, nothing rendered"
    else:
        speed = generate_with_stats(args.out, config, progress=not args.no_progress).speed_line()
    index = read_synthetic(args.out)
    print(format_summary(index.summary()))
    print(speed)


if __name__ == "__main__":
    main()
