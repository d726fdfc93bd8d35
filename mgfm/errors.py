"""The errors a user can fix, as one family.

Entry points (:mod:`mgfm.cli`, ``python -m mgfm.shards``, the demo) print an :class:`MgfmError` (and a
missing file) as one ``error:`` line; any other exception is a bug and keeps its traceback. Each kind
subclasses it: :class:`~mgfm.config.RecipeError`, :class:`~mgfm.sources.clip_index.AnnotationError`,
:class:`~mgfm.model.hf.EncoderFolderError`, :class:`~mgfm.evaluate.featureset.FeatureError`,
:class:`~mgfm.files.StorageError`, ... and :class:`InputError` for the rest (shard sets, paths, data that
does not fit the run).
"""

from __future__ import annotations


class MgfmError(Exception):
    """A problem with what the user gave or with their machine, stated in one line."""


class InputError(MgfmError, ValueError):
    """Input that does not fit: a shard set, a path, an option that contradicts the data or another option."""


class Interrupted(MgfmError):
    """Work that stopped on request (a signal, Ctrl-C) after saving what a rerun resumes from: reported as one
    line without ``error:``, the process ending with ``exit_code``."""

    exit_code: int = 130
