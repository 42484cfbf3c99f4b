"""Pipeline stages: retrieve (bm25, dense, hybrid), rerank and chunk the documents of each record.

A retriever stage reads an index directory (``index``) or builds one in memory
from a corpus (``corpus``: a JSONL with id/text or a folder of .txt/.md), takes
each record's query from ``record.inputs[query_key]`` and fills
``record.documents`` (and the context segment, with each document's span, when
a prompt is already built). Documents from an index built with ``--kv`` name
its KV store (``metadata["kv_store"]``), which LM stages with ``kv_reuse`` load.

``order`` places the documents in the context (:func:`retrievers.order.order_passages`):
``score`` best first, ``best_last`` best nearest the question, ``ends`` best at both ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from promptkit.models import DEFAULT_EMBEDDER, DEFAULT_LLM
from promptkit.lm import get_lm
from promptkit.pipeline import MissingInputError, Record, Stage
from promptkit.prompt import PromptTemplate
from promptkit.registry import register_stage
from promptkit.types import Document

from .base import Retriever
from .bm25 import BM25
from .chunk import chunk_documents
from .corpus import load_corpus
from .dense import Dense
from .hybrid import Hybrid
from .index import load_index
from .order import PassageOrder, order_passages
from .rerank import CrossEncoderReranker, LMReranker
from .rewrite import RM3, GenQREnsemble, HyDE
from .tokenize import english


def _queries(records: list[Record], key: str) -> list[str]:
    out = []
    for r in records:
        if key not in r.inputs:
            raise MissingInputError(f"record has no input {key!r} to use as the query; inputs: "
                                    f"{sorted(r.inputs)} (set query_key)")
        out.append(str(r.inputs[key]))
    return out


KV_STORE = "kv.safetensors"  # documents' KV saved next to an index (promptkit index build --kv)


def _set_documents(r: Record, docs: list[Document], order: PassageOrder = "score") -> None:
    docs = order_passages(docs, order)
    r.documents = docs
    if r.prompt is not None:
        r.prompt = r.prompt.with_segment("context", *PromptTemplate().context_segment(docs))


class RetrieverStage(Stage):
    """Base of the retriever stages: where the index comes from, how many documents, which input."""

    index: str | None = None
    corpus: str | None = None
    k: int = Field(default=5, ge=1)
    query_key: str = "question"
    filter: dict[str, Any] | None = None
    hyde: bool = False
    genqr: Literal["expand", "fusion"] | None = Field(
        default=None, description="rewrite queries with LM keywords from an ensemble of instructions: "
        "'expand' (GenQREnsemble) or 'fusion' (GenQRFusion)")
    lm_model: str = DEFAULT_LLM
    order: PassageOrder = "score"
    _retriever: Retriever | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_source(self) -> RetrieverStage:
        if (self.index is None) == (self.corpus is None):
            raise ValueError(f"stage {self.stage_name!r} needs exactly one of 'index' (a saved index directory) "
                             "or 'corpus' (a JSONL file or a folder of .txt/.md files)")
        if self.hyde and self.genqr:
            raise ValueError("choose one query rewriting: hyde or genqr")
        return self

    def build(self, docs: list[Document]) -> Retriever:
        raise NotImplementedError

    def open(self) -> Retriever:
        """Load the index (or build it from the corpus); wrap it for query rewriting."""
        if self.index is not None:
            base = load_index(self.index)
            if base.kind != self.stage_name:
                raise ValueError(f"{self.index} is a {base.kind!r} index; stage {self.stage_name!r} needs a "
                                 f"{self.stage_name!r} one")
        else:
            base = self.build(load_corpus(self.corpus))  # type: ignore[arg-type]
        if self.genqr is not None:
            return GenQREnsemble(base, get_lm(self.lm_model), mode=self.genqr)
        return HyDE(base, get_lm(self.lm_model)) if self.hyde else base

    def retriever(self) -> Retriever:
        if self._retriever is None:
            self._retriever = self.open()
        return self._retriever

    def process(self, records: list[Record]) -> list[Record]:
        results = self.retriever().search_many(_queries(records, self.query_key), self.k, self.filter)
        store = Path(self.index) / KV_STORE if self.index is not None else None
        for r, docs in zip(records, results):
            if store is not None and store.is_file():
                docs = [d.model_copy(update={"metadata": {**d.metadata, "kv_store": str(store)}}) for d in docs]
            _set_documents(r, docs, self.order)
        return records


@register_stage("bm25")
class BM25Stage(RetrieverStage):
    """BM25 retrieval (a corpus is indexed with English stop words and stemming); ``rm3`` expands queries."""

    variant: Literal["okapi", "plus", "l"] = "okapi"
    k1: float = 1.5
    b: float = 0.75
    rm3: bool = False

    def build(self, docs: list[Document]) -> Retriever:
        return BM25(variant=self.variant, k1=self.k1, b=self.b, tokenizer=english()).index(docs)

    def open(self) -> Retriever:
        base = super().open()
        return RM3(base) if self.rm3 and isinstance(base, BM25) else base


@register_stage("dense")
class DenseStage(RetrieverStage):
    """Dense retrieval with a sentence embedder and FAISS."""

    embedder: str = DEFAULT_EMBEDDER
    index_type: Literal["auto", "flat", "hnsw", "ivf"] = "auto"

    def build(self, docs: list[Document]) -> Retriever:
        return Dense(embedder=self.embedder, index_type=self.index_type).index(docs)


@register_stage("hybrid")
class HybridStage(RetrieverStage):
    """BM25 + dense, fused by reciprocal rank (``rrf``) or weighted normalized scores (``weighted``)."""

    method: Literal["rrf", "weighted"] = "rrf"
    weights: list[float] | None = None
    embedder: str = DEFAULT_EMBEDDER

    def build(self, docs: list[Document]) -> Retriever:
        return Hybrid([BM25(tokenizer=english()).index(docs), Dense(embedder=self.embedder).index(docs)],
                      method=self.method, weights=self.weights)


@register_stage("rerank")
class RerankStage(Stage):
    """Reorder each record's documents by LM relevance (query likelihood or yes/no), or by a cross-encoder
    when ``cross_encoder`` is a path; ``order`` places them in the context (see the module doc)."""

    k: int | None = Field(default=None, ge=1)
    query_key: str = "question"
    model: str = DEFAULT_LLM
    method: Literal["yes_no", "query_likelihood"] = "query_likelihood"
    cross_encoder: str | None = None
    order: PassageOrder = "score"
    _reranker: Any = PrivateAttr(default=None)

    def reranker(self) -> LMReranker | CrossEncoderReranker:
        if self._reranker is None:
            self._reranker = (CrossEncoderReranker(self.cross_encoder) if self.cross_encoder
                              else LMReranker(get_lm(self.model), method=self.method))
        return self._reranker

    def process(self, records: list[Record]) -> list[Record]:
        ranked = self.reranker().rerank_many(_queries(records, self.query_key), [r.documents for r in records], self.k)
        for r, docs in zip(records, ranked):
            _set_documents(r, docs, self.order)
        return records


@register_stage("chunk")
class ChunkStage(Stage):
    """Split each record's documents into token-bounded, overlapping chunks (ids ``doc#n``, offsets kept)."""

    max_tokens: int = Field(default=256, ge=1)
    overlap: int = Field(default=1, ge=0)
    by: Literal["sentence", "paragraph"] = "sentence"

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            _set_documents(r, chunk_documents(r.documents, self.max_tokens, self.overlap, self.by))
        return records
