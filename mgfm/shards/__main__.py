"""``python -m mgfm.shards build|verify|merge``: make, check and merge WebDataset shard sets.

    python -m mgfm.shards build --format imigue --index labels.csv --video-dir videos/ --out shards/imigue
    python -m mgfm.shards build --format csv --index my_clips.csv --out shards/mine --part 0/4
    python -m mgfm.shards build --format pose --index poses.csv --layout kinect-v1 --out shards/poses
    python -m mgfm.shards verify shards/imigue
    python -m mgfm.shards merge shards/imigue      # after copying the parts' shards into one folder
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mgfm.errors import InputError, MgfmError
from mgfm.files import storage_cause
from mgfm.shards import manifest as mf
from mgfm.shards.build import BuildConfig, build_shards, parse_part
from mgfm.sources.pose import LAYOUTS
from mgfm.sources.formats import FORMATS, read_source_index
from mgfm.sources.video_io import X264_TUNES
from mgfm.shards.verify import verify_shards



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgfm.shards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="cut, re-encode and shard every clip of a clip index")
    b.add_argument("--format", choices=FORMATS, default=None,
                   help="clip-index format (default: json for a .json --index, else required)")
    b.add_argument("--index", required=True, help="annotation file / dataset root / saved ClipIndex json")
    b.add_argument("--out", required=True, help="output folder, e.g. shards/<name>")
    b.add_argument("--protocol", default=None, help="iMiGUE protocol.json (default: the official protocol)")
    b.add_argument("--video-dir", default=None, help="iMiGUE: folder of the source videos")
    b.add_argument("--video-pattern", default=None, help="iMiGUE: video file name pattern, e.g. {video_id}.mp4")
    b.add_argument("--short-side", type=int, default=BuildConfig.short_side)
    b.add_argument("--context", type=int, default=0, help="context frames added before and after each clip")
    b.add_argument("--shard-mb", type=float, default=BuildConfig.shard_mb, help="target shard size (approximate)")
    b.add_argument("--shard-samples", type=int, default=None, help="clips per shard (overrides --shard-mb)")
    b.add_argument("--crf", type=int, default=BuildConfig.crf)
    b.add_argument("--tune", choices=X264_TUNES, default=None,
                   help="x264 tuning, e.g. fastdecode (no CABAC, no deblocking: faster to decode, more bytes)")
    b.add_argument("--bframes", type=int, default=None,
                   help="N non-reference B-frames between reference frames (the loader skips unsampled ones)")
    b.add_argument("--keyint", type=int, default=None, help="a keyframe every N frames (default: x264's, 250)")
    b.add_argument("--workers", type=int, default=1, help="processes")
    b.add_argument("--source-threads", type=int, default=1,
                   help="decoder threads per source video (0 = auto; useful with --workers 1)")
    b.add_argument("--part", default="0/1", help="i/N: build only slice i of N (for N machines)")
    b.add_argument("--splits", default=None, help="comma-separated splits to build (default: all)")
    b.add_argument("--overwrite", action="store_true", help="replace shards built from another plan")
    b.add_argument("--classes", default=None, help="csv/smg: text file of class names, one per line (ids follow it)")
    b.add_argument("--dedupe", action="store_true", help="csv: drop repeated rows of one clip (counted) "
                                                         "instead of stopping at the first")
    b.add_argument("--layout", default=None, help=f"pose: the joint layout of the files ({', '.join(LAYOUTS)})")
    b.add_argument("--pose-fps", type=float, default=BuildConfig.pose_fps, help="pose: frame rate of the drawn clips")
    b.add_argument("--pose-view", default=None, help="pose: image axes of the drawing, e.g. x,-z (default: the "
                                                     "layout's)")

    v = sub.add_parser("verify", help="decode every sample and check it against the manifest")
    v.add_argument("shards", help="shard folder")
    v.add_argument("--no-decode", action="store_true", help="skip decoding (checksums, counts, json only)")
    v.add_argument("--workers", type=int, default=1)

    m = sub.add_parser("merge", help="rebuild manifest.json from the complete shards in a folder")
    m.add_argument("shards", help="shard folder")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "verify":
            return _verify(args)
        manifest = mf.rebuild_manifest(args.shards)
        print(mf.format_manifest(manifest))
        mf.require_samples(manifest, args.shards)
        return 0 if manifest["complete"] else 2
    except (MgfmError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk or a read-only folder: the path and the cause, in one line
        cause = storage_cause(err)
        if cause is None:
            raise
        print(f"error: cannot write {err.filename or getattr(args, 'out', None) or args.shards}: {cause}",
              file=sys.stderr)
        return 1


def _build(args: argparse.Namespace) -> int:
    fmt = args.format or ("json" if args.index.endswith(".json") else None)
    if fmt is None:
        raise InputError(f"--format is required for {args.index} (one of {', '.join(FORMATS)})")
    index = read_source_index(fmt, args.index, args.protocol, args.video_dir, args.video_pattern, args.classes,
                              args.dedupe, args.layout)
    config = BuildConfig(
        short_side=args.short_side, context_frames=args.context, shard_mb=args.shard_mb,
        shard_samples=args.shard_samples, crf=args.crf, tune=args.tune, bframes=args.bframes, keyint=args.keyint,
        workers=args.workers, source_threads=args.source_threads, part=parse_part(args.part),
        splits=tuple(s.strip() for s in args.splits.split(",")) if args.splits else None,
        pose_layout=args.layout if fmt == "pose" else None, pose_fps=args.pose_fps, pose_view=args.pose_view,
    )
    source = {"format": fmt, "index": str(Path(args.index).resolve())}
    if fmt == "pose":
        source["layout"] = args.layout
    if args.protocol:
        source["protocol"] = str(Path(args.protocol).resolve())
    if args.video_dir:
        source["video_dir"] = str(Path(args.video_dir).resolve())
    manifest = build_shards(index, args.out, config, source=source, overwrite=args.overwrite)
    print(mf.format_manifest(manifest))
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify_shards(args.shards, decode=not args.no_decode, workers=args.workers)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    print(f"verified {report.shards_checked} shards, {report.samples_checked} samples: "
          f"{'OK' if report.ok else f'{len(report.problems)} problems'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
