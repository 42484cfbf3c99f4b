"""Retrieval for promptkit: BM25, dense FAISS, hybrid fusion, reranking, query rewriting, chunking.

Every retriever returns :class:`promptkit.types.Document` copies with ``score``
set, saves to an index directory (never pickles) and is available as a
pipeline stage (see :mod:`retrievers.stages`).
"""

from .base import Retriever
from .bm25 import BM25
from .corpus import load_corpus
from .errors import CorpusError, IndexFormatError
from .tokenize import Tokenizer

__all__ = ["BM25", "CorpusError", "IndexFormatError", "Retriever", "Tokenizer", "load_corpus"]
