"""Masked video pretraining: `accelerate launch pretrain.py [--recipe FILE] [key=value ...]`.

With no arguments it runs the embedded default (recipes/pretrain/tiny_cpu.yaml): the tiny encoder on the
synthetic micro-gesture benchmark, building the benchmark and its shards first when they are missing.
"""

from mgfm.pipeline import pretrain_main

if __name__ == "__main__":
    pretrain_main()
