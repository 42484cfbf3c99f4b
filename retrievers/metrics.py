"""Ranking metrics: Recall@k, MRR@k, nDCG@k (as trec_eval / BEIR compute them).

``ranked`` is a list of document ids, best first; ``qrels`` maps the relevant
document ids of one query to their graded relevance (> 0 means relevant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _relevant(qrels: Mapping[str, float]) -> set[str]:
    return {d for d, g in qrels.items() if g > 0}


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents found in the top ``k`` (0 when nothing is relevant)."""
    rel = _relevant(qrels)
    return len(rel.intersection(ranked[:k])) / len(rel) if rel else 0.0


def mrr_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int = 10) -> float:
    """1 / rank of the first relevant document in the top ``k``, else 0."""
    rel = _relevant(qrels)
    return next((1.0 / i for i, d in enumerate(ranked[:k], 1) if d in rel), 0.0)


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int = 10) -> float:
    """Normalized DCG with linear gains ``rel / log2(rank + 1)`` (trec_eval's ndcg_cut)."""
    dcg = sum(qrels.get(d, 0) / math.log2(i + 1) for i, d in enumerate(ranked[:k], 1) if qrels.get(d, 0) > 0)
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal, 1))
    return dcg / idcg if idcg else 0.0


def evaluate_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
                 k_values: Sequence[int] = (10, 100)) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@k over the queries that have judgments."""
    qids = [q for q in qrels if _relevant(qrels[q])]
    if not qids:
        raise ValueError("no query has a relevant document in qrels")
    out = {"ndcg@10": sum(ndcg_at_k(run.get(q, []), qrels[q], 10) for q in qids) / len(qids),
           "mrr@10": sum(mrr_at_k(run.get(q, []), qrels[q], 10) for q in qids) / len(qids)}
    for k in k_values:
        out[f"recall@{k}"] = sum(recall_at_k(run.get(q, []), qrels[q], k) for q in qids) / len(qids)
    return out
