"""Fusing ranked lists: reciprocal rank fusion and weighted min-max-normalized score fusion."""

from __future__ import annotations

from collections.abc import Sequence

from promptkit.types import Document


def _check_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"{n} result lists but {len(weights)} weights")
    return [float(w) for w in weights]


def _ranked(scores: dict[str, float], docs: dict[str, Document], k: int | None) -> list[Document]:
    order = sorted(scores, key=lambda i: -scores[i])  # stable: ties keep first-seen order
    return [docs[i].model_copy(update={"score": scores[i]}) for i in order[:k]]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Document]], k: int = 60,
                           weights: Sequence[float] | None = None, top: int | None = None) -> list[Document]:
    """Fuse ranked lists by ``sum(w / (k + rank))`` (Cormack et al., 2009; rank starts at 1)."""
    w = _check_weights(len(rankings), weights)
    scores: dict[str, float] = {}
    docs: dict[str, Document] = {}
    for wi, ranking in zip(w, rankings):
        for rank, d in enumerate(ranking, 1):
            scores[d.id] = scores.get(d.id, 0.0) + wi / (k + rank)
            docs.setdefault(d.id, d)
    return _ranked(scores, docs, top)


def minmax(values: Sequence[float]) -> list[float]:
    """Scale to [0, 1]; a constant list maps to all ones."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    return [1.0] * len(values) if hi == lo else [(v - lo) / (hi - lo) for v in values]


def weighted_score_fusion(rankings: Sequence[Sequence[Document]], weights: Sequence[float] | None = None,
                          top: int | None = None) -> list[Document]:
    """Fuse by the weighted sum of each list's min-max-normalized scores (missing = 0)."""
    w = _check_weights(len(rankings), weights)
    scores: dict[str, float] = {}
    docs: dict[str, Document] = {}
    for wi, ranking in zip(w, rankings):
        norm = minmax([d.score if d.score is not None else 0.0 for d in ranking])
        for d, s in zip(ranking, norm):
            scores[d.id] = scores.get(d.id, 0.0) + wi * s
            docs.setdefault(d.id, d)
    return _ranked(scores, docs, top)
