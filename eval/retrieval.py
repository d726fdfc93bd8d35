"""FAISS retrieval with a run's frozen encoder: `python eval/retrieval.py [run=runs/NAME] [shards=DIR] [query=VIDEO [montage=PNG]] [key=value ...]`.

With no arguments: the newest run in runs/ on the default synthetic shards; indexes the train split, queries
with the test split, reports Recall@1/5/10 and mAP. With query=FILE: prints the clips nearest to that video.
See mgfm.evaluate.retrieval_eval.
"""

from mgfm.cli import run_cli
from mgfm.evaluate.retrieval_eval import RetrievalRecipe, run
from mgfm.runtime import setup_logging

if __name__ == "__main__":
    setup_logging()
    run_cli(RetrievalRecipe, run, None, "eval/retrieval.py", __doc__.splitlines()[0])
