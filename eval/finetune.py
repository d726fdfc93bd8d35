"""Supervised / semi-supervised fine-tuning: `python eval/finetune.py [run=runs/NAME] [shards=DIR] [key=value ...]`.

With no arguments: the newest run in runs/ on the default synthetic shards, recipes/finetune/tiny_cpu.yaml.
`compare=true label_fraction=0.1` runs {random, pretrained} init x {supervised, semi-supervised}. Works under
`accelerate launch` too. See mgfm.evaluate.finetune.
"""

from mgfm.evaluate.finetune import main

if __name__ == "__main__":
    main()
