"""Moved out of the library: the real-motion study is ``python -m experiments.real_motion`` (``make real-motion``)."""

from mgfm.cli import moved_command

moved_command("mgfm.real_motion", "run `python -m experiments.real_motion` (or `make real-motion`) instead", __name__)
