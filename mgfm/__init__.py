"""mgfm: micro-gesture video foundation models (shards, masked pretraining, frozen-encoder evaluation)."""

__version__ = "0.1.0"
