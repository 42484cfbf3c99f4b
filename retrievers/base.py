"""The retriever interface, shared top-k selection and metadata filters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from promptkit.types import Document

# A filter maps a metadata key to a required value, a list of allowed values, or a predicate.
Filter = Mapping[str, Any]

def matches(metadata: Mapping[str, Any], filter: Filter | None) -> bool:
    """Whether a document's metadata passes ``filter`` (all keys must pass)."""
    if not filter:
        return True
    for key, want in filter.items():
        if key not in metadata:
            return False
        have = metadata[key]
        if callable(want):
            if not want(have):
                return False
        elif isinstance(want, (list, tuple, set, frozenset)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True

def filter_mask(docs: Sequence[Document], filter: Filter | None) -> np.ndarray | None:
    """Boolean mask of the documents passing ``filter`` (None when there is no filter)."""
    if not filter:
        return None
    return np.fromiter((matches(d.metadata, filter) for d in docs), dtype=bool, count=len(docs))

def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, best first; ties go to the earlier index."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return idx[np.isfinite(scores[idx])]

def with_score(doc: Document, score: float, **meta: Any) -> Document:
    """A copy of ``doc`` carrying ``score`` (the stored document is never mutated)."""
    return doc.model_copy(update={"score": float(score), "metadata": {**doc.metadata, **meta}} if meta
                          else {"score": float(score)})

class Retriever(ABC):
    """Something that returns the ``k`` best documents for a query.

    Retrievers hold their documents, so results are :class:`Document` copies
    with ``score`` set. Indexes that live on disk implement :meth:`save` and
    :meth:`load` over an index directory (see :mod:`retrievers.storage`).
    """

    kind: ClassVar[str] = "retriever"

    @abstractmethod
    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Document]:
        """The ``k`` best documents for ``query``, best first."""

    def search_many(self, queries: Sequence[str], k: int = 10, filter: Filter | None = None) -> list[list[Document]]:
        """:meth:`search` for each query."""
        return [self.search(q, k, filter) for q in queries]

    def add(self, docs: Sequence[Document]) -> None:
        """Add documents to the index."""
        raise NotImplementedError(f"{type(self).__name__} does not support adding documents")

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the index to directory ``path``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

def check_query(query: Any) -> str:
    if not isinstance(query, str):
        raise TypeError(f"a query must be a string, got {type(query).__name__}")
    return query

def check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)
