"""Train micro-batches epoch after epoch (:class:`EpochStream`), resumable from any micro-batch: its
``state_dict()`` holds the epoch, the batches taken from it, the loader's own state (torchdata's
``StatefulDataLoader``) and what the stream skipped so far, so a run continued from a checkpoint sees exactly
the batches the uninterrupted run would have seen, and its summary counts the skips of both."""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from mgfm.data.stream.loader import StreamLoader
from mgfm.data.stream.skips import SkipCounter
from mgfm.errors import InputError

log = logging.getLogger("mgfm.data.stream")


class EpochStream:
    """``per_epoch`` micro-batches of each epoch's loader (``open_epoch(epoch) -> (loader, skips)``, one pass
    each), epoch after epoch, starting after ``position`` micro-batches in all; ``state`` is a
    :meth:`state_dict` saved at that position (None: a fresh start, or a checkpoint without one, which
    restarts the epoch's stream, said in a warning). An iterator; :meth:`close` stops the loader workers."""

    def __init__(self, open_epoch: Callable[[int], tuple[StreamLoader, SkipCounter]], per_epoch: int,
                 position: int = 0, state: dict | None = None, source: str = "the train stream") -> None:
        if per_epoch < 1:
            raise ValueError(f"an epoch needs at least one batch, got {per_epoch}")
        self.open_epoch, self.per_epoch, self.source = open_epoch, per_epoch, source
        self.epoch, self.done = divmod(position, per_epoch)
        self.counters: list[SkipCounter] = []
        self._loader: StreamLoader | None = None
        self._batches: Iterator[dict] | None = None
        self._resume_loader = None
        if state is not None:
            self.counters.append(SkipCounter.from_state(state["skips"]))
            if (state.get("epoch"), state.get("done")) != (self.epoch, self.done):
                raise ValueError(f"stream state at epoch {state.get('epoch')} batch {state.get('done')} given to a "
                                 f"stream at epoch {self.epoch} batch {self.done}")
            self._resume_loader = state.get("loader")
        elif self.done:
            log.warning("%s: the checkpoint holds no stream position; epoch %d restarts its stream for its last %d "
                        "batches (some clips of it are seen twice)", source, self.epoch, per_epoch - self.done)

    def __iter__(self) -> "EpochStream":
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self._loader, counter = self.open_epoch(self.epoch)
            self.counters.append(counter)
            if self._resume_loader is not None:
                self._loader.load_state_dict(self._resume_loader)
                self._resume_loader = None
            self._batches = iter(self._loader)
        try:
            batch = next(self._batches)
        except StopIteration:
            raise InputError(f"{self.source} ended after {self.done} of {self.per_epoch} batches in epoch "
                             f"{self.epoch}") from None
        self.done += 1
        if self.done == self.per_epoch:  # the next batch opens the next epoch
            self.close()
            self.epoch, self.done = self.epoch + 1, 0
        return batch

    def skips(self) -> SkipCounter:
        """What the stream skipped over the whole run so far (a clip lost in several epochs counts once)."""
        return SkipCounter.merged(self.counters)

    def state_dict(self) -> dict:
        """The position after the batches taken so far (JSON-able)."""
        loader = self._loader.state_dict() if self._batches is not None else self._resume_loader
        return {"epoch": self.epoch, "done": self.done, "loader": loader, "skips": self.skips().state_dict()}

    def close(self) -> None:
        """Stop the current epoch's loader workers (taking no more batches)."""
        self._batches = None
        self._loader = None
