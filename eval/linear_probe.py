"""Frozen-encoder probe + k-means: `python eval/linear_probe.py [run=runs/NAME] [shards=DIR] [probe=linear|attentive]`.

With no arguments: the newest run in runs/ on the default synthetic shards. See mgfm.evaluate.probe_eval.
"""

from mgfm.cli import run_cli
from mgfm.evaluate.probe_eval import ProbeRecipe, run
from mgfm.runtime import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_cli(ProbeRecipe, run, None, "eval/linear_probe.py", __doc__.splitlines()[0])
