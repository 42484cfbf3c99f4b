"""Sentence embeddings (default: the embedded all-MiniLM-L6-v2), L2-normalized."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from .models import DEFAULT_EMBEDDER, resolve_embedder
from .engine.threads import on_fresh_thread


class Embedder:
    """A sentence-transformers model that returns float32, unit-length vectors."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.model = on_fresh_thread(SentenceTransformer, resolve_embedder(model), device=device or "cpu")
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # On a thread of its own: its OpenMP team must not outlive it (see engine/threads.py).
        vecs = on_fresh_thread(self.model.encode, list(texts), batch_size=batch_size, show_progress_bar=progress,
                               convert_to_numpy=True, normalize_embeddings=True)
        return np.ascontiguousarray(vecs, dtype=np.float32)


_shared: dict[str, Embedder] = {}
_lock = threading.Lock()


def get_embedder(model: str = DEFAULT_EMBEDDER) -> Embedder:
    """A process-wide shared embedder per model name."""
    with _lock:
        if model not in _shared:
            _shared[model] = Embedder(model)
        return _shared[model]
