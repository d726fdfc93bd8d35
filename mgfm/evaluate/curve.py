"""Moved out of the library: learning curves are ``python -m experiments.curve``."""

from mgfm.cli import moved_command

moved_command("mgfm.evaluate.curve", "run `python -m experiments.curve` instead", __name__)
