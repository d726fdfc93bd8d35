"""WebDataset streams of MG clips for training and evaluation.

``make_loader(source, split, cfg, mode="train"|"eval", epoch=0) -> (loader, skips)`` returns a
:class:`torch.utils.data.DataLoader` (already batched) and the :class:`SkipCounter` it fills. A batch is
a dict::

    video          float32 (B*K, T, 3, S, S)  normalised frames (K = cfg.repeats in train, 1 in eval);
                                              uint8 unnormalised with cfg.video_dtype="uint8"
    encoder_mask   bool    (B*K, N)           True = token hidden from the encoder (tube mask)
    decoder_mask   bool    (B*K, N)           True = masked token the decoder reconstructs
    label          int64   (B*K,)             class id, -1 when unlabelled
    clip_id        list[str] (B*K)
    meta           list[dict] (B*K)           the shard json (+ "shard": its URL)

with ``N = (T / tubelet) * (S / patch)^2`` tokens in (t, h, w) order (see :mod:`mgfm.data.masking`);
the K views of one clip are adjacent rows. ``cfg.batch_size`` counts clips, so a batch has
``batch_size * K`` rows.

Sources: a local shard folder (its ``manifest.json`` maps split -> shards), a manifest URL or a remote
folder URL ending in ``/`` (``http(s)://``, ``s3://``, ...), a brace pattern (``shards/train-{000000..000009}.tar``,
``http://host/train-{000000..000009}.tar``; ``{split}`` is substituted), or a list of URLs. Remote shards
are opened with :func:`webdataset.gopen.gopen` (``http(s)`` via curl, ``pipe:CMD``); URL schemes in
``cfg.remote_commands`` are turned into ``pipe:`` commands, e.g. ``s3://b/k`` -> ``pipe:aws s3 cp 's3://b/k' -``.

Splitting across processes. The stream does its own node and worker splitting and the loader must NOT
be passed through ``accelerator.prepare()``: Accelerate re-shards or broadcasts IterableDatasets
(``dispatch_batches``), which fights WebDataset's shard-level splitting and can duplicate or drop
samples. Rank and world come from ``torch.distributed`` when it is initialised (under DeepSpeed on CPU
``accelerator.num_processes`` can say 1 while the process group has 2 ranks), else env
``RANK``/``WORLD_SIZE``, else 0/1 (:mod:`mgfm.runtime`); they are read once in
:func:`make_loader` and travel with the dataset into the DataLoader workers. Shards are assigned
hierarchically: to ranks first (disjoint shard sets whenever there are at least as many shards as ranks,
balanced by sample count), then to the rank's DataLoader workers. Where a level has fewer shards than
slots, slots share a shard and keep disjoint samples by index modulo (:func:`assign_shards`).

* ``train``: each epoch permutes the shard list with ``(seed, epoch)`` (the same on every rank) and cuts the
  clips into contiguous ranges of whole batches, one per rank and worker (:func:`assignment.epoch_tasks`):
  every clip at most once per epoch, those past a rank's last whole batch left for later epochs; a worker
  shuffles its range in a buffer, and the rank yields exactly ``batches_per_epoch`` full batches, so ranks
  never wait on each other. Only when skipped samples leave a worker short does it top up from another pass
  over its range; weighted mixtures, shard sets of unknown size and an explicit ``batches_per_epoch`` beyond
  the data resample their shards endlessly instead. Every random draw of a sample (frame windows, crops,
  flips, masks) comes from a generator of its own, seeded by ``(seed, epoch, rank, worker, its position)``,
  so the loader's ``state_dict()`` (torchdata's ``StatefulDataLoader``) resumes an epoch exactly.
* ``eval``: every sample exactly once across all ranks and workers, in a deterministic order, last batch
  partial; ranks may get different numbers of batches (gather results, do not all-reduce per batch).

Decoding: PyAV from bytes (``cfg.backend``), only what the sampled frames need (a non-reference picture no
sampled frame needs is skipped, decoding starts at the last IDR keyframe before them: the same pixels as
decoding it all), with ``cfg.fallback_backend`` (decord) tried when it fails.
Temporal sampling: :mod:`mgfm.data.sampling`; spatial transforms: :mod:`mgfm.data.transforms`. Horizontal
flip is off by default: flipping swaps the hand a gesture is made with, which a dataset may label or a
model may use (iMiGUE's and SMG's classes are side-agnostic, so ``flip=True`` is label-safe there).
Repeated sampling (``repeats=K``) decodes a clip once and yields K crops + masks of it.

Where the time goes (see ``benchmarks/bench_loader.py``; decoding is most of it): a worker decodes a
batch's clips back to back (the decoder is faster with warm caches), then crops and resizes them
straight into a planar uint8 batch buffer. Batches cross the process boundary as uint8 and the main
process converts them to normalised float32 (shared memory for 4x the bytes costs more than the
conversion); with ``video_dtype="uint8"`` that step is left to the accelerator
(:func:`mgfm.data.transforms.normalise`), which also moves 4x less over PCIe. Workers take turns
(``in_order``): the batch order is a function of the seed, not of which worker was ready first.

Errors: a sample with a bad json, a missing member or an undecodable video is skipped; a shard that
cannot be opened or is truncated is abandoned where it breaks. Both are counted, never crash, never
sleep. Any other exception is a bug in our code, not bad data: it stops the stream with its traceback. Counts travel to the main process inside the batches (and a final marker item per worker that
the loader drops), land in the :class:`SkipCounter`, and are logged when an epoch ends.
"""

from mgfm.data.stream.assignment import ShardTask, Slot, assign_shards, split_tasks
from mgfm.data.stream.config import StreamConfig
from mgfm.data.stream.decode import collate, finish_batch
from mgfm.data.stream.loader import ClipStream, StreamLoader, make_loader, pin_memory
from mgfm.data.stream.memory import MemoryClips
from mgfm.data.stream.epochs import EpochStream
from mgfm.data.stream.skips import SkipCounter, SplitRead, expected_clips, printable

__all__ = ["ClipStream", "EpochStream", "MemoryClips", "ShardTask", "SkipCounter", "Slot", "SplitRead", "StreamConfig", "StreamLoader",
           "assign_shards", "collate", "expected_clips", "finish_batch", "make_loader", "pin_memory", "printable",
           "split_tasks"]
