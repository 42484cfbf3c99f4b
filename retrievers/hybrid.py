"""Hybrid retrieval: any retrievers, fused by reciprocal rank or by weighted normalized scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from promptkit.types import Document

from .base import Filter, Retriever, check_k, check_query
from .fusion import reciprocal_rank_fusion, weighted_score_fusion
from .storage import manifest_settings, read_manifest, write_index_dir

Method = Literal["rrf", "weighted"]


class Hybrid(Retriever):
    """Run several retrievers and fuse their top-``depth`` lists.

    >>> Hybrid([BM25().index(docs), Dense().index(docs)], method="rrf").search("query")
    """

    kind: ClassVar[str] = "hybrid"

    def __init__(self, retrievers: Sequence[Retriever], method: Method = "rrf", weights: Sequence[float] | None = None,
                 rrf_k: int = 60, depth: int = 100) -> None:
        if not retrievers:
            raise ValueError("a hybrid retriever needs at least one retriever")
        if method not in ("rrf", "weighted"):
            raise ValueError(f"unknown fusion method {method!r}; choose 'rrf' or 'weighted'")
        if weights is not None and len(weights) != len(retrievers):
            raise ValueError(f"{len(retrievers)} retrievers but {len(weights)} weights")
        self.retrievers, self.method = list(retrievers), method
        self.weights = None if weights is None else [float(w) for w in weights]
        self.rrf_k, self.depth = rrf_k, depth

    def __len__(self) -> int:
        return len(self.retrievers[0])  # type: ignore[arg-type]

    def fuse(self, rankings: Sequence[Sequence[Document]], k: int) -> list[Document]:
        """Fuse one query's result lists (one per retriever) and keep the best ``k``."""
        if self.method == "rrf":
            return reciprocal_rank_fusion(rankings, self.rrf_k, self.weights, top=k)
        return weighted_score_fusion(rankings, self.weights, top=k)

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Document]:
        return self.search_many([check_query(query)], k, filter)[0]

    def search_many(self, queries: Sequence[str], k: int = 10, filter: Filter | None = None) -> list[list[Document]]:
        """Each retriever searches all queries as a batch; lists are fused per query."""
        depth = max(check_k(k), self.depth)
        per_retriever = [r.search_many(queries, depth, filter) for r in self.retrievers]
        return [self.fuse([lists[q] for lists in per_retriever], k) for q in range(len(queries))]

    def add(self, docs: Sequence[Document]) -> None:
        for r in self.retrievers:
            r.add(docs)

    def settings(self) -> dict:
        return {"method": self.method, "weights": self.weights, "rrf_k": self.rrf_k, "depth": self.depth,
                "parts": [f"{i}-{r.kind}" for i, r in enumerate(self.retrievers)]}

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Each retriever in its own sub-directory, under one manifest."""

        def write(tmp: Path) -> None:
            for name, r in zip(self.settings()["parts"], self.retrievers):
                r.save(tmp / name)

        return write_index_dir(path, self.kind, self.settings(), write, force=force)

    @classmethod
    def load(cls, path: str | Path) -> Hybrid:
        from .index import load_index

        path = Path(path)
        s = read_manifest(path, kind=cls.kind)["settings"]
        with manifest_settings(path):
            parts = [load_index(path / name) for name in s["parts"]]
            return cls(parts, method=s["method"], weights=s["weights"], rrf_k=int(s["rrf_k"]), depth=int(s["depth"]))
