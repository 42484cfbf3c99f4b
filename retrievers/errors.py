"""Errors raised on bad corpora and bad index directories."""

from __future__ import annotations


class CorpusError(ValueError):
    """A corpus that cannot be indexed (empty, duplicate ids, unreadable file, ...)."""


class IndexFormatError(ValueError):
    """An index directory that is missing, truncated, corrupted or of another format/version/embedder."""
