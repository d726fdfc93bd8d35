"""Moved: the raw-pixel reference is defined once, :class:`mgfm.evaluate.raw_pixels.PixelEncoder`, the
``raw pixels`` row of every report (``python eval/linear_probe.py``)."""

from mgfm.cli import moved_command

moved_command("mgfm.evaluate.pixel_baseline", "the raw-pixel reference is the 'raw pixels' row of every report "
              "(`python eval/linear_probe.py run=runs/NAME shards=...`)", __name__)
