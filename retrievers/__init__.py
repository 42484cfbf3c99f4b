"""Retrieval for promptkit: BM25, dense FAISS, hybrid fusion, reranking, query rewriting, chunking.

Every retriever returns :class:`promptkit.types.Document` copies with ``score``
set, saves to an index directory (never pickles) and is available as a
pipeline stage (see :mod:`retrievers.stages`).
"""

from .base import Retriever
from .bm25 import BM25
from .chunk import chunk_documents, chunk_text
from .corpus import load_corpus
from .dense import Dense
from .errors import CorpusError, IndexFormatError
from .fusion import reciprocal_rank_fusion, weighted_score_fusion
from .hybrid import Hybrid
from .index import build_index, load_index
from .order import order_passages
from .rerank import CrossEncoderReranker, LMReranker
from .rewrite import RM3, GenQREnsemble, HyDE
from .tokenize import Tokenizer, english

__all__ = [
    "BM25", "RM3", "CorpusError", "CrossEncoderReranker", "Dense", "GenQREnsemble", "HyDE", "Hybrid", "IndexFormatError",
    "LMReranker", "Retriever", "Tokenizer", "build_index", "chunk_documents", "chunk_text", "english",
    "load_corpus", "load_index", "order_passages", "reciprocal_rank_fusion", "weighted_score_fusion",
]
