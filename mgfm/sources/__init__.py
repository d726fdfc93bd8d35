"""Readers of the world: annotations, clip index, video I/O and the synthetic benchmark."""
