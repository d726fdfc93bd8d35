"""``python -m mgfm.model CHECKPOINT OUT [key=value ...]``: a public VideoMAE checkpoint of any layout
(:data:`mgfm.model.pretrained.LAYOUTS`) written as our encoder folder (Hugging Face ``VideoMAEModel`` format),
which the probes, retrieval and fine-tuning take as ``run=OUT``.

    python -m mgfm.model vit_b_k710_dl_from_giant.pth checkpoints/videomae2-vit-b
    python -m mgfm.model my_odd.pth checkpoints/odd size=custom dim=640 depth=12 heads=10 decoder_dim=320 \\
        decoder_depth=4 decoder_heads=5

``key=value`` are model settings (``mgfm.model.encoder.ModelConfig``, on top of ``size=B``) for what the
weights of a ``.pth`` do not say: attention heads of a width outside the standard sizes, and the clip
(``frames``, ``img_size``; VideoMAE's 16 x 224^2 by default) of a checkpoint that stores no position table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mgfm.cli import one_line_errors
from mgfm.config import load_recipe
from mgfm.errors import InputError
from mgfm.model.hf import save_encoder_hf
from mgfm.model.pretrained import LAYOUTS, read_checkpoint
from mgfm.model.encoder import ModelConfig, VideoEncoder

PROG = "python -m mgfm.model"
BASE = ["size=B"]  # the published checkpoints' size and clip, which key=value amend


def convert(checkpoint: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Write the encoder of ``checkpoint`` to the new folder ``out``; returns it. An existing ``out`` is an
    error (nothing is overwritten)."""
    out = Path(out)
    if out.exists():
        raise InputError(f"{out}: already exists; give a new folder (nothing is overwritten)")
    hint = load_recipe(ModelConfig, None, [*BASE, *(overrides or [])])
    read = read_checkpoint(checkpoint, hint)
    encoder = VideoEncoder(read.cfg)
    encoder.load_state_dict(read.encoder)
    return save_encoder_hf(encoder, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help=f"{LAYOUTS}")
    parser.add_argument("out", help="the encoder folder to write (must not exist)")
    parser.add_argument("overrides", nargs="*", help="model settings the weights do not hold, e.g. heads=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors(PROG):
        folder = convert(args.checkpoint, args.out, args.overrides)
    print(f"{folder}: encoder written; use it as run={folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
