"""Dense retrieval: normalized sentence embeddings in a FAISS inner-product index.

The FAISS index type follows the corpus size unless set: an exact flat index
up to ``flat_max`` documents, HNSW beyond (or IVF when asked). Vectors are
unit length, so inner product is cosine similarity. The index directory keeps
the embedder name and dimension, so an index is never queried with vectors
from another model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from promptkit.embed import Embedder, get_embedder
from promptkit.models import DEFAULT_EMBEDDER
from promptkit.types import Document

from .base import Filter, Retriever, check_k, check_query, filter_mask, with_score
from .corpus import check_documents
from .errors import IndexFormatError
from .storage import DOCS, manifest_settings, read_docs, read_manifest, write_docs, write_index_dir

IndexType = Literal["auto", "flat", "hnsw", "ivf"]


class Dense(Retriever):
    """A dense retriever over a FAISS index.

    >>> dense = Dense().index(docs)          # the embedded all-MiniLM-L6-v2
    >>> dense.search("why is the sky blue", k=5, filter={"lang": "en"})
    """

    kind: ClassVar[str] = "dense"

    def __init__(self, embedder: str = DEFAULT_EMBEDDER, index_type: IndexType = "auto", flat_max: int = 50_000,
                 hnsw_m: int = 32, ef_search: int = 128, nlist: int | None = None, nprobe: int = 16,
                 batch_size: int = 64, progress: bool | None = None) -> None:
        if index_type not in ("auto", "flat", "hnsw", "ivf"):
            raise ValueError(f"unknown index_type {index_type!r}; choose 'auto', 'flat', 'hnsw' or 'ivf'")
        self.embedder_name, self.index_type, self.flat_max = embedder, index_type, flat_max
        self.hnsw_m, self.ef_search, self.nlist, self.nprobe = hnsw_m, ef_search, nlist, nprobe
        self.batch_size, self.progress = batch_size, progress
        self.docs: list[Document] = []
        self.faiss_index: Any = None
        self.dim: int | None = None
        self._embedder: Embedder | None = None

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def embedder(self) -> Embedder:
        """The sentence embedder (loaded on first use, shared per process)."""
        if self._embedder is None:
            self._embedder = get_embedder(self.embedder_name)
            if self.dim is not None and self._embedder.dim != self.dim:
                raise IndexFormatError(f"embedder {self.embedder_name!r} gives {self._embedder.dim}-d vectors "
                                       f"but the index holds {self.dim}-d vectors")
        return self._embedder

    def settings(self) -> dict[str, Any]:
        return {"embedder": self.embedder_name, "dim": self.dim, "index_type": self.resolved_type(),
                "hnsw_m": self.hnsw_m, "ef_search": self.ef_search, "nlist": self.nlist, "nprobe": self.nprobe}

    def resolved_type(self, n: int | None = None) -> str:
        """The FAISS index type in use, or the one ``auto`` picks for ``n`` documents."""
        if self.index_type != "auto":
            return self.index_type
        if self.faiss_index is not None:
            return _type_of(self.faiss_index)
        return "flat" if (len(self.docs) if n is None else n) <= self.flat_max else "hnsw"

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
        """Unit-length float32 vectors of ``texts``, encoded in batches (progress bar for large inputs)."""
        show = (len(texts) > 2000) if progress is None else progress
        return self.embedder.encode(list(texts), batch_size=self.batch_size, progress=show)

    # -- building ------------------------------------------------------------
    def index(self, docs: Sequence[Document], vectors: np.ndarray | None = None) -> Dense:
        """Index ``docs`` (replacing anything indexed before); ``vectors`` skips encoding."""
        self.docs, self.faiss_index = [], None
        self.add(docs, vectors)
        return self

    def add(self, docs: Sequence[Document], vectors: np.ndarray | None = None) -> None:
        """Encode and add documents; ids must be new. The index type stays the one chosen at first build."""
        docs = list(docs)
        check_documents(self.docs + docs, source="dense index")
        vecs = self.encode([d.text for d in docs], self.progress) if vectors is None else _as_vectors(vectors)
        if vecs.shape[0] != len(docs):
            raise ValueError(f"{len(docs)} documents but {vecs.shape[0]} vectors")
        if self.dim is not None and vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vecs.shape[1]}, the index {self.dim}")
        self.dim = int(vecs.shape[1])
        if self.faiss_index is None:
            self.faiss_index = self._new_index(vecs)
        self.faiss_index.add(vecs)
        self.docs += docs

    def _new_index(self, train: np.ndarray) -> Any:
        import faiss

        kind, d = self.resolved_type(len(train)), self.dim
        if kind == "flat":
            return faiss.IndexFlatIP(d)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
            return index
        nlist = self.nlist or max(1, min(int(4 * np.sqrt(len(train))), len(train) // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.nprobe = self.nprobe
        return index

    # -- querying ------------------------------------------------------------
    def _params(self, filter: Filter | None) -> tuple[Any, Any]:
        import faiss

        mask = filter_mask(self.docs, filter)
        if mask is None:
            return None, None
        sel = faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
        kind = _type_of(self.faiss_index)
        if kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search), sel
        if kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe), sel
        return faiss.SearchParameters(sel=sel), sel

    def search_vectors(self, vecs: np.ndarray, k: int = 10, filter: Filter | None = None) -> list[list[Document]]:
        """The ``k`` nearest documents of each query vector."""
        if self.faiss_index is None or not self.docs:
            return [[] for _ in range(len(vecs))]
        params, _sel = self._params(filter)  # _sel must outlive the search
        scores, ids = self.faiss_index.search(_as_vectors(vecs), min(check_k(k), len(self.docs)), params=params)
        return [[with_score(self.docs[i], s) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Document]:
        """The ``k`` documents closest to ``query`` in embedding space."""
        return self.search_many([check_query(query)], k, filter)[0]

    def search_many(self, queries: Sequence[str], k: int = 10, filter: Filter | None = None) -> list[list[Document]]:
        """Search many queries with one encoding batch and one FAISS call."""
        if not queries:
            return []
        return self.search_vectors(self.encode([check_query(q) for q in queries], progress=False), k, filter)

    # -- persistence -----------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the index directory: FAISS index, documents (JSONL), embedder name and dimension."""
        import faiss

        if self.faiss_index is None or not self.docs:
            raise ValueError("nothing to save: the dense index is empty")

        def write(tmp: Path) -> None:
            faiss.write_index(self.faiss_index, str(tmp / "dense.faiss"))
            write_docs(tmp / DOCS, self.docs)

        return write_index_dir(path, self.kind, self.settings(), write, force=force)

    @classmethod
    def load(cls, path: str | Path, embedder: str | None = None) -> Dense:
        """Read an index directory; ``embedder``, if given, must be the one the index was built with."""
        import faiss

        path = Path(path)
        s = read_manifest(path, kind=cls.kind)["settings"]
        with manifest_settings(path):
            if embedder is not None and embedder != s["embedder"]:
                raise IndexFormatError(f"{path}: built with embedder {s['embedder']!r}, not {embedder!r}; "
                                       "query it with the same embedder or rebuild it")
            self = cls(embedder=str(s["embedder"]), index_type=s["index_type"], hnsw_m=int(s["hnsw_m"]),
                       ef_search=int(s["ef_search"]), nlist=None if s["nlist"] is None else int(s["nlist"]),
                       nprobe=int(s["nprobe"]))
            self.dim = int(s["dim"])
        try:
            self.faiss_index = faiss.read_index(str(path / "dense.faiss"))
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
            raise IndexFormatError(f"{path / 'dense.faiss'}: unreadable FAISS index ({reason})") from None
        self.docs = read_docs(path / DOCS)
        if self.faiss_index.d != self.dim or self.faiss_index.ntotal != len(self.docs):
            raise IndexFormatError(f"{path}: FAISS index ({self.faiss_index.ntotal} x {self.faiss_index.d}) does "
                                   f"not match the manifest ({len(self.docs)} x {self.dim})")
        if hasattr(self.faiss_index, "hnsw"):
            self.faiss_index.hnsw.efSearch = self.ef_search
        if hasattr(self.faiss_index, "nprobe"):
            self.faiss_index.nprobe = self.nprobe
        return self


def _type_of(index: Any) -> str:
    name = type(index).__name__
    return "hnsw" if "HNSW" in name else "ivf" if "IVF" in name else "flat"


def _as_vectors(vecs: np.ndarray) -> np.ndarray:
    vecs = np.asarray(vecs, dtype=np.float32)
    if vecs.ndim != 2:
        raise ValueError(f"vectors must be a 2-d array, got shape {vecs.shape}")
    return np.ascontiguousarray(vecs)
