"""Building and opening index directories of any kind."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from promptkit.types import Document

from .base import Retriever
from .bm25 import BM25
from .dense import Dense
from .errors import IndexFormatError
from .hybrid import Hybrid
from .storage import read_manifest
from .tokenize import english

KINDS = ("bm25", "dense", "hybrid")


def build_index(docs: Sequence[Document], kind: str = "bm25", **options) -> Retriever:
    """An in-memory retriever of ``kind`` over ``docs`` (BM25 with English stop words and stemming;
    hybrid = that BM25 + dense, fused by RRF)."""
    if kind == "bm25":
        return BM25(**{"tokenizer": english(), **options}).index(docs)
    if kind == "dense":
        return Dense(**options).index(docs)
    if kind == "hybrid":
        return Hybrid([BM25(tokenizer=english()).index(docs), Dense().index(docs)], **options)
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


def load_index(path: str | Path) -> Retriever:
    """Open an index directory of any kind (checks format, version and file checksums)."""
    kind = read_manifest(path, verify=False)["kind"]  # each loader verifies its files
    if kind == "bm25":
        return BM25.load(path)
    if kind == "dense":
        return Dense.load(path)
    if kind == "hybrid":
        return Hybrid.load(path)
    raise IndexFormatError(f"{path}: unknown index kind {kind!r}")
