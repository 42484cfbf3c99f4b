"""Stages the optimizers add to pipelines: per-query exemplar selection by embedding (kNN, MMR)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, PrivateAttr, model_validator

from promptkit.embed import get_embedder
from promptkit.models import DEFAULT_EMBEDDER
from promptkit.pipeline import MissingInputError, Record, Stage
from promptkit.registry import register_stage
from promptkit.types import Example


def mmr(query: np.ndarray, cands: np.ndarray, k: int, lam: float) -> list[int]:
    """Maximal marginal relevance: greedily trade similarity to the query against redundancy.

    ``query`` (d,) and ``cands`` (n, d) are unit vectors; ``lam`` = 1 is plain kNN.
    """
    rel = cands @ query
    chosen: list[int] = []
    left = list(range(len(cands)))
    while left and len(chosen) < k:
        if chosen:
            red = (cands[left] @ cands[chosen].T).max(axis=1)
            gain = lam * rel[left] - (1 - lam) * red
        else:
            gain = rel[left]
        chosen.append(left.pop(int(np.argmax(gain))))
    return chosen


@register_stage("knn_exemplars")
class KNNExemplars(Stage):
    """Give each record the ``k`` pool examples nearest to its input (sentence embeddings).

    ``strategy="mmr"`` picks a diverse set instead (maximal marginal relevance
    with weight ``diversity`` on novelty). The most similar exemplar comes last,
    next to the question. Per-query exemplars make each prompt's prefix unique,
    so they cost more prefill than a fixed set.
    """

    pool: list[dict[str, Any]] = Field(min_length=1)
    k: int = Field(default=4, ge=1)
    input_key: str = "text"
    output_key: str = "answer"
    strategy: Literal["knn", "mmr"] = "knn"
    diversity: float = Field(default=0.3, ge=0.0, le=1.0)
    embedder: str = DEFAULT_EMBEDDER
    _vectors: np.ndarray | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> KNNExemplars:
        for i, ex in enumerate(self.pool):
            if self.input_key not in ex:
                raise ValueError(f"pool[{i}] has no field {self.input_key!r} (input_key); fields: {sorted(ex)}")
        return self

    def examples(self) -> list[Example]:
        return [Example(output_key=self.output_key, **ex) for ex in self.pool]

    def _pool_vectors(self) -> np.ndarray:
        if self._vectors is None:
            self._vectors = get_embedder(self.embedder).encode([str(ex[self.input_key]) for ex in self.pool])
        return self._vectors

    def process(self, records: list[Record]) -> list[Record]:
        for i, r in enumerate(records):
            if self.input_key not in r.inputs:
                raise MissingInputError(f"record {i} has no input {self.input_key!r}; inputs: {sorted(r.inputs)}")
        if not records:
            return records
        pool, vecs = self.examples(), self._pool_vectors()
        queries = get_embedder(self.embedder).encode([str(r.inputs[self.input_key]) for r in records])
        lam = 1.0 if self.strategy == "knn" else 1.0 - self.diversity
        for r, q in zip(records, queries):
            # Skip the input itself when it is in the pool (a demo that gives the answer away).
            keep = [j for j, ex in enumerate(self.pool) if ex[self.input_key] != r.inputs[self.input_key]]
            picked = mmr(q, vecs[keep], self.k, lam)
            r.exemplars = [pool[keep[j]] for j in reversed(picked)]
        return records
