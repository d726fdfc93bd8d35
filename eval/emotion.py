"""Video-level emotion heads over a run's frozen clip features: `python eval/emotion.py [run=runs/NAME] [shards=DIR] [key=value ...]`.

With no arguments: the newest run in runs/ on the default synthetic shards. Gathers the clips of every shard
split, regroups them by video in time order, and scores majority / pooled-feature / BiLSTM / MG-sequence
heads on the emotion-test videos over several seeds. See mgfm.evaluate.emotion_eval.
"""

from mgfm.cli import run_cli
from mgfm.evaluate.emotion_eval import EmotionRecipe, run
from mgfm.runtime import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_cli(EmotionRecipe, run, None, "eval/emotion.py", __doc__.splitlines()[0])
