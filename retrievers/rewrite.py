"""Query rewriting: RM3 pseudo-relevance feedback (BM25), HyDE hypothetical passages (LM) and
GenQREnsemble / GenQRFusion keyword reformulations from an ensemble of instructions (LM)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from promptkit.lm import LM, get_lm
from promptkit.types import Document

from .base import Filter, Retriever, check_k, check_query
from .bm25 import BM25
from .dense import Dense
from .fusion import reciprocal_rank_fusion
from .tokenize import ENGLISH_STOPWORDS


class RM3(Retriever):
    """BM25 with RM3 query expansion (Lavrenko & Croft's relevance model, as in Anserini).

    The first pass takes the top ``fb_docs`` documents; each contributes its
    terms' relative frequencies weighted by its (first-pass) score; the best
    ``fb_terms`` terms, L1-normalized, are mixed with the L1-normalized query
    as ``orig_weight * query + (1 - orig_weight) * feedback``.
    """

    kind = "rm3"

    def __init__(self, bm25: BM25, fb_docs: int = 10, fb_terms: int = 10, orig_weight: float = 0.5) -> None:
        if not 0.0 <= orig_weight <= 1.0:
            raise ValueError(f"orig_weight must lie in [0, 1], got {orig_weight}")
        self.bm25, self.fb_docs, self.fb_terms, self.orig_weight = bm25, fb_docs, fb_terms, orig_weight

    def _stop_ids(self) -> list[int]:
        # stop words never make good expansion terms, even when the index keeps them
        vocab, tok = self.bm25.vocab, self.bm25.tokenizer
        return sorted({vocab[t] for w in ENGLISH_STOPWORDS for t in tok(w) if t in vocab})

    def __len__(self) -> int:
        return len(self.bm25)

    def expand(self, query: str) -> dict[int, float]:
        """Term id -> weight of the expanded query."""
        q = self.bm25.query_weights(query)
        if not q:
            return q
        idx, scores = self.bm25.retrieve_ids(query, self.fb_docs)
        keep = scores > 0
        idx, scores = idx[keep], scores[keep]
        if idx.size == 0:
            return q
        rows = self.bm25.tf[idx]  # feedback documents x terms
        rel = rows.multiply(1.0 / np.maximum(self.bm25.doc_len[idx], 1)[:, None])
        fb = np.asarray(rel.T @ (scores / scores.sum())).ravel()
        fb[self._stop_ids()] = 0.0
        top = np.argsort(-fb, kind="stable")[: self.fb_terms]
        top = top[fb[top] > 0]
        fb_total, q_total = fb[top].sum(), sum(q.values())
        out = {t: self.orig_weight * w / q_total for t, w in q.items()}
        for t in top:
            out[int(t)] = out.get(int(t), 0.0) + float((1 - self.orig_weight) * fb[t] / fb_total)
        return out

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Document]:
        return self.bm25.search_weights(self.expand(check_query(query)), check_k(k), filter)


HYDE_PROMPT = "Write a short passage that answers the question.\nQuestion: {query}\nPassage:"


class HyDE(Retriever):
    """Search with LM-written hypothetical passages (Gao et al., 2022).

    The LM writes ``n`` passages per query. With a dense retriever the query and
    passage embeddings are averaged (as in the paper); with any other retriever
    the result lists of the query and each passage are fused by RRF.
    """

    kind = "hyde"

    def __init__(self, retriever: Retriever, lm: LM | None = None, n: int = 1, max_tokens: int = 96,
                 temperature: float = 0.0, template: str = HYDE_PROMPT, depth: int = 100) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.retriever, self.lm, self.n, self.max_tokens = retriever, lm or get_lm(), n, max_tokens
        self.temperature, self.template, self.depth = (0.7 if n > 1 and temperature == 0 else temperature,
                                                       template, depth)

    def __len__(self) -> int:
        return len(self.retriever)  # type: ignore[arg-type]

    def passages(self, queries: Sequence[str]) -> list[list[str]]:
        """``n`` hypothetical passages per query, generated as one batch."""
        prompts = [self.template.format(query=q) for q in queries for _ in range(self.n)]
        gens = self.lm.generate(prompts, max_tokens=self.max_tokens, temperature=self.temperature, seed=0)
        texts = [g.text.strip() for g in gens]
        return [texts[i * self.n:(i + 1) * self.n] for i in range(len(queries))]

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Document]:
        return self.search_many([check_query(query)], k, filter)[0]

    def search_many(self, queries: Sequence[str], k: int = 10, filter: Filter | None = None) -> list[list[Document]]:
        return self.search_passages(queries, self.passages(queries), k, filter)

    def search_passages(self, queries: Sequence[str], hyps: Sequence[Sequence[str]], k: int = 10,
                        filter: Filter | None = None) -> list[list[Document]]:
        """Search with given hypothetical passages (one list per query) alongside the queries."""
        k = check_k(k)
        if isinstance(self.retriever, Dense):
            vecs = [self.retriever.encode([q, *h]).mean(axis=0) for q, h in zip(queries, hyps)]
            vecs = np.stack(vecs)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            return self.retriever.search_vectors(vecs, k, filter)
        out = []
        for q, h in zip(queries, hyps):
            lists = self.retriever.search_many([q, *[p for p in h if p]], max(k, self.depth), filter)
            out.append(reciprocal_rank_fusion(lists, top=k))
        return out


# Paraphrases of one instruction (Dhole & Agichtein, 2024): each asks for expansion keywords.
GENQR_INSTRUCTIONS = [
    "Improve the search effectiveness by suggesting expansion terms for the query",
    "Recommend expansion terms for the query to improve search results",
    "Improve the search effectiveness by suggesting useful expansion terms for the query",
    "Maximize search utility by suggesting relevant expansion phrases for the query",
    "Enhance search efficiency by proposing valuable terms to expand the query",
    "Elevate search performance by recommending relevant expansion phrases for the query",
    "Boost the search accuracy by providing helpful expansion terms to enrich the query",
    "Increase the search efficacy by offering beneficial expansion keywords for the query",
    "Optimize search results by suggesting meaningful expansion terms to enhance the query",
    "Enhance search outcomes by recommending beneficial expansion terms to supplement the query",
]
GENQR_PROMPT = "{instruction}.\nQuery: {query}\nExpansion terms:"


class GenQREnsemble(Retriever):
    """Search with keyword reformulations written by the LM under an ensemble of instructions
    (Dhole & Agichtein, 2024).

    Each of ``n_instructions`` paraphrased instructions asks the LM for expansion terms for the
    query (one line). ``mode="expand"`` (GenQREnsemble) searches once with the query, repeated
    ``query_repeats`` times, followed by every instruction's terms; ``mode="fusion"``
    (GenQRFusion) searches with the query plus each instruction's terms separately and fuses the
    result lists, the query's own included, by reciprocal rank. All prompts of a batch of queries
    are generated as one engine batch, each instruction's prompts together, so the instruction is
    a prefix the engine prefills once. ``max_query_chars`` cuts a long query (a whole document)
    in the prompt only.
    """

    kind = "genqr"

    def __init__(self, retriever: Retriever, lm: LM | None = None, mode: Literal["expand", "fusion"] = "expand",
                 instructions: Sequence[str] = GENQR_INSTRUCTIONS, n_instructions: int = 10, max_tokens: int = 24,
                 template: str = GENQR_PROMPT, query_repeats: int = 1, max_query_chars: int = 600,
                 depth: int = 100) -> None:
        if mode not in ("expand", "fusion"):
            raise ValueError(f"mode must be 'expand' or 'fusion', got {mode!r}")
        if not 1 <= n_instructions <= len(instructions):
            raise ValueError(f"n_instructions must lie in 1..{len(instructions)}, got {n_instructions}")
        self.retriever, self.lm, self.mode = retriever, lm or get_lm(), mode
        self.instructions = list(instructions)[:n_instructions]
        self.max_tokens, self.template, self.query_repeats = max_tokens, template, query_repeats
        self.max_query_chars, self.depth = max_query_chars, depth

    def __len__(self) -> int:
        return len(self.retriever)  # type: ignore[arg-type]

    def prompts(self, queries: Sequence[str]) -> list[str]:
        """The reformulation prompts, instruction-major: each instruction's prompts are neighbours."""
        return [self.template.format(instruction=ins, query=" ".join(q.split())[: self.max_query_chars])
                for ins in self.instructions for q in queries]

    def keywords(self, queries: Sequence[str]) -> list[list[str]]:
        """Per query, the expansion terms each instruction got (one batch of generations)."""
        gens = self.lm.generate(self.prompts(queries), max_tokens=self.max_tokens, temperature=0.0,
                                regex=r"[^\n]*")
        texts = [clean_terms(g.text) for g in gens]
        n = len(queries)
        return [[texts[i * n + j] for i in range(len(self.instructions))] for j in range(n)]

    def reformulations(self, query: str, terms: Sequence[str]) -> list[str]:
        """The queries searched: one expanded query, or the query and one per instruction (fusion)."""
        if self.mode == "expand":
            return [" ".join([query] * self.query_repeats + [t for t in terms if t])]
        return [query, *[f"{query} {t}" for t in terms if t]]

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Document]:
        return self.search_many([check_query(query)], k, filter)[0]

    def search_many(self, queries: Sequence[str], k: int = 10, filter: Filter | None = None) -> list[list[Document]]:
        return self.search_keywords(queries, self.keywords(queries), k, filter)

    def search_keywords(self, queries: Sequence[str], terms: Sequence[Sequence[str]], k: int = 10,
                        filter: Filter | None = None) -> list[list[Document]]:
        """Search with given expansion terms (one list per query, one entry per instruction)."""
        k = check_k(k)
        out = []
        for q, t in zip(queries, terms):
            reforms = self.reformulations(q, t)
            if len(reforms) == 1:
                out.append(self.retriever.search(reforms[0], k, filter))
                continue
            lists = self.retriever.search_many(reforms, max(k, self.depth), filter)
            out.append(reciprocal_rank_fusion(lists, top=k))
        return out


def clean_terms(text: str) -> str:
    """Expansion terms as one line of words: list markers, numbering and quotes dropped."""
    text = re.sub(r"(^|[\s,;])(?:\d+[.)]|[-*•])\s*", r"\1", text.strip())
    return " ".join(re.sub(r"[\"“”]", " ", text).replace(",", " ").split())
