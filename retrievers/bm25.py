"""BM25 (Okapi, BM25+, BM25L) over a sparse matrix of precomputed term scores.

As in bm25s, the score every (term, document) pair contributes is computed at
index time and kept in a term-major CSR matrix, so a query is a gather of a few
rows plus a ``bincount`` (one sparse vector product) and an ``argpartition``.

Scores equal ``rank_bm25``'s (``BM25Okapi``, ``BM25Plus``, ``BM25L``) on the
same tokens, including its conventions:

* Okapi idf is ``log(N - n + 0.5) - log(n + 0.5)``; a negative idf (a term in
  more than half the documents) is replaced by ``epsilon * mean idf`` (mean
  over the whole vocabulary before flooring).
* BM25+ idf is ``log((N + 1) / n)`` and every document gets ``idf * delta``
  for each query term, matching or not (kept as a dense per-term base).
* BM25L idf is ``log(N + 1) - log(n + 0.5)`` and the term part is multiplied
  by the term frequency, as rank_bm25 does.
* A query term counts once per occurrence in the query.

Adding documents changes N, document frequencies and the mean length, so
:meth:`BM25.add` recomputes the score matrix from the stored term counts
(linear in the number of postings).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import scipy.sparse as sp

from promptkit.types import Document

from .base import Filter, Retriever, check_k, check_query, filter_mask, top_k, with_score
from .corpus import check_documents
from .errors import IndexFormatError
from .storage import DOCS, manifest_settings, read_docs, read_manifest, write_docs, write_index_dir
from .tokenize import Tokenizer

Variant = Literal["okapi", "plus", "l"]
_DEFAULT_DELTA = {"okapi": 0.0, "plus": 1.0, "l": 0.5}


class BM25(Retriever):
    """A BM25 index.

    >>> bm25 = BM25(variant="okapi").index(docs)
    >>> bm25.search("how do vaccines work", k=5)
    """

    kind: ClassVar[str] = "bm25"

    def __init__(self, variant: Variant = "okapi", k1: float = 1.5, b: float = 0.75, delta: float | None = None,
                 epsilon: float = 0.25, tokenizer: Tokenizer | None = None, dtype: str = "float64") -> None:
        if variant not in _DEFAULT_DELTA:
            raise ValueError(f"unknown BM25 variant {variant!r}; choose 'okapi', 'plus' or 'l'")
        self.variant, self.k1, self.b, self.epsilon = variant, float(k1), float(b), float(epsilon)
        self.delta = _DEFAULT_DELTA[variant] if delta is None else float(delta)
        self.tokenizer = tokenizer or Tokenizer()
        self.dtype = np.dtype(dtype)
        self.docs: list[Document] = []
        self.vocab: dict[str, int] = {}
        self.tf = sp.csr_matrix((0, 0), dtype=np.int32)  # documents x terms, raw counts
        self.doc_len = np.zeros(0, dtype=np.int64)
        self.idf = np.zeros(0)
        self.base = np.zeros(0)  # per-term score every document gets (BM25+ only)
        self.scores = sp.csr_matrix((0, 0))  # terms x documents, precomputed contributions

    def __len__(self) -> int:
        return len(self.docs)

    def settings(self) -> dict:
        return {"variant": self.variant, "k1": self.k1, "b": self.b, "delta": self.delta,
                "epsilon": self.epsilon, "tokenizer": self.tokenizer.model_dump(), "dtype": self.dtype.name}

    # -- building ------------------------------------------------------------
    def index(self, docs: Sequence[Document], tokens: Sequence[list[str]] | None = None) -> BM25:
        """Index ``docs`` (replacing anything indexed before); ``tokens`` overrides the tokenizer."""
        self.docs, self.vocab = [], {}
        self.tf = sp.csr_matrix((0, 0), dtype=np.int32)
        self.doc_len = np.zeros(0, dtype=np.int64)
        self.add(docs, tokens)
        return self

    def add(self, docs: Sequence[Document], tokens: Sequence[list[str]] | None = None) -> None:
        """Add documents; ids must be new. Scores of all documents are updated."""
        docs = list(docs)
        check_documents(self.docs + docs, source="BM25 index")
        toks = self.tokenizer.many(d.text for d in docs) if tokens is None else [list(t) for t in tokens]
        if len(toks) != len(docs):
            raise ValueError(f"{len(docs)} documents but {len(toks)} token lists")
        lens = np.fromiter(map(len, toks), np.int64, len(toks))
        vocab = self.vocab
        cols = np.fromiter((vocab.setdefault(t, len(vocab)) for doc_toks in toks for t in doc_toks), np.int64,
                           int(lens.sum()))
        rows = np.repeat(np.arange(len(toks)), lens)
        # COO -> CSR sums the duplicate (doc, term) entries into term counts
        new = sp.csr_matrix((np.ones(len(cols), np.int32), (rows, cols)), shape=(len(docs), len(vocab)))
        new.sum_duplicates()
        old = self.tf
        old.resize((old.shape[0], len(self.vocab)))
        self.tf = sp.vstack([old, new], format="csr") if old.shape[0] else new
        self.doc_len = np.concatenate([self.doc_len, lens])
        self.docs += docs
        self._compute_scores()

    def _idf(self, df: np.ndarray, n: int) -> np.ndarray:
        if self.variant == "okapi":
            idf = np.log(n - df + 0.5) - np.log(df + 0.5)
            # rank_bm25's floor: negative idfs become epsilon times the mean idf
            return np.where(idf < 0, self.epsilon * idf.mean(), idf) if idf.size else idf
        if self.variant == "plus":
            return np.log((n + 1) / df)
        return np.log(n + 1) - np.log(df + 0.5)

    def _compute_scores(self) -> None:
        n = len(self.docs)
        by_term = self.tf.T.tocsr()  # terms x documents
        df = np.diff(by_term.indptr).astype(np.float64)
        self.idf = self._idf(df, n)
        tf = by_term.data.astype(np.float64)
        terms = np.repeat(np.arange(by_term.shape[0]), np.diff(by_term.indptr))
        norm = 1 - self.b + self.b * self.doc_len[by_term.indices] / max(self.doc_len.mean(), 1e-12)
        idf = self.idf[terms]
        k1 = self.k1
        if self.variant == "okapi":
            vals = idf * (tf * (k1 + 1) / (tf + k1 * norm))
        elif self.variant == "plus":
            vals = idf * (tf * (k1 + 1) / (k1 * norm + tf))
        else:
            ctd = tf / norm
            vals = idf * tf * (k1 + 1) * (ctd + self.delta) / (k1 + ctd + self.delta)
        self.base = self.idf * self.delta if self.variant == "plus" else np.zeros_like(self.idf)
        self.scores = sp.csr_matrix((vals.astype(self.dtype), by_term.indices, by_term.indptr), shape=by_term.shape)

    # -- querying ------------------------------------------------------------
    def query_weights(self, query: str | Sequence[str]) -> dict[int, float]:
        """Term id -> weight (occurrences) of a query string or token list; unknown terms are dropped."""
        toks = self.tokenizer(query) if isinstance(query, str) else query
        weights: dict[int, float] = {}
        for t in toks:
            i = self.vocab.get(t)
            if i is not None:
                weights[i] = weights.get(i, 0.0) + 1.0
        return weights

    def score_weights(self, weights: dict[int, float]) -> np.ndarray:
        """Scores of all documents for a weighted bag of term ids."""
        n = len(self.docs)
        if not weights:
            return np.zeros(n)
        ids = np.fromiter(weights, np.int64, len(weights))
        w = np.fromiter(weights.values(), np.float64, len(weights))
        ptr = self.scores.indptr
        starts, ends = ptr[ids], ptr[ids + 1]
        lens = ends - starts
        # positions of all postings of the query terms, without a Python loop
        pos = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        out = np.bincount(self.scores.indices[pos], weights=self.scores.data[pos] * np.repeat(w, lens), minlength=n)
        return out + float(w @ self.base[ids]) if self.variant == "plus" else out

    def get_scores(self, query: str | Sequence[str]) -> np.ndarray:
        """BM25 score of every document for ``query`` (a string or a token list), in index order."""
        return self.score_weights(self.query_weights(query))

    def _top(self, scores: np.ndarray, k: int, filter: Filter | None) -> list[Document]:
        mask = filter_mask(self.docs, filter)
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        return [with_score(self.docs[i], scores[i]) for i in top_k(scores, k)]

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Document]:
        """The ``k`` best documents for ``query``."""
        return self._top(self.get_scores(check_query(query)), check_k(k), filter)

    def search_weights(self, weights: dict[int, float], k: int = 10, filter: Filter | None = None) -> list[Document]:
        """The ``k`` best documents for a weighted bag of term ids (see :meth:`query_weights`)."""
        return self._top(self.score_weights(weights), check_k(k), filter)

    def retrieve_ids(self, query: str | Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the ``k`` best documents (no Document objects: the fast path)."""
        scores = self.get_scores(query)
        idx = top_k(scores, k)
        return idx, scores[idx]

    # -- persistence -----------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the index directory: term counts (.npz), vocabulary (JSON), documents (JSONL)."""
        if not self.docs:
            raise ValueError("nothing to save: the BM25 index is empty")

        def write(tmp: Path) -> None:
            np.savez(tmp / "bm25.npz", data=self.tf.data, indices=self.tf.indices, indptr=self.tf.indptr,
                     shape=np.asarray(self.tf.shape), doc_len=self.doc_len)
            terms = sorted(self.vocab, key=self.vocab.__getitem__)
            (tmp / "vocab.json").write_text(json.dumps(terms, ensure_ascii=False), encoding="utf-8")
            write_docs(tmp / DOCS, self.docs)

        return write_index_dir(path, self.kind, self.settings(), write, force=force)

    @classmethod
    def load(cls, path: str | Path) -> BM25:
        """Read an index directory written by :meth:`save`."""
        path = Path(path)
        s = read_manifest(path, kind=cls.kind)["settings"]
        with manifest_settings(path):
            self = cls(variant=s["variant"], k1=s["k1"], b=s["b"], delta=s["delta"], epsilon=s["epsilon"],
                       tokenizer=Tokenizer(**s["tokenizer"]), dtype=s.get("dtype", "float64"))
        with np.load(path / "bm25.npz", allow_pickle=False) as z:
            self.tf = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
            self.doc_len = z["doc_len"]
        terms = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        self.vocab = {t: i for i, t in enumerate(terms)}
        self.docs = read_docs(path / DOCS)
        if not (len(self.docs) == self.tf.shape[0] == len(self.doc_len)) or len(terms) != self.tf.shape[1]:
            raise IndexFormatError(f"{path}: documents, term counts and vocabulary disagree in size")
        self._compute_scores()
        return self
