"""Extractive compression: the sentences most similar to the question, diverse by MMR, in original order."""

from __future__ import annotations

import re

import numpy as np

from promptkit import Prompt, SegmentKind
from promptkit.embed import get_embedder

from .base import Compressor, Piece, token_pieces

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences; each span carries the whitespace before the next sentence."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > start and text[start : m.start()].strip():
            spans.append((start, m.end()))
            start = m.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    elif spans:
        spans[-1] = (spans[-1][0], len(text))
    return spans


def mmr_order(sims: np.ndarray, vecs: np.ndarray, lam: float) -> list[int]:
    """Indices in maximal-marginal-relevance order: relevance minus redundancy with those chosen."""
    chosen: list[int] = []
    left = list(range(len(sims)))
    while left:
        if chosen:
            redundancy = (vecs[left] @ vecs[chosen].T).max(axis=1)
        else:
            redundancy = np.zeros(len(left))
        best = int(np.argmax(lam * sims[left] - (1 - lam) * redundancy))
        chosen.append(left.pop(best))
    return chosen


class ExtractiveCompressor(Compressor):
    """Keep whole sentences by MMR over embedding similarity to the question; the last one is cut to fit."""

    method: str = "extractive"
    embedder: str = "minilm-l6-v2"
    diversity: float = 0.3  # 0: relevance only

    def pieces(self, prompt: Prompt, texts: dict[SegmentKind, str], question: str, budget: int) -> list[Piece]:
        sents = [(seg, a, b) for seg, text in texts.items() for a, b in sentence_spans(text)]
        emb = get_embedder(self.embedder)
        vecs = emb.encode([texts[seg][a:b] for seg, a, b in sents])
        q = emb.encode([question or " "])[0]
        order = mmr_order(vecs @ q, vecs, 1.0 - self.diversity)
        out: list[Piece] = []
        used, cut = 0, False
        for rank, i in enumerate(order):
            seg, a, b = sents[i]
            n = self.count(texts[seg][a:b])
            score = 2.0 + len(order) - rank  # whole sentences first, by MMR rank
            if not cut and used + n > budget:
                # the sentence that does not fit: its tokens, earliest first, fill the rest exactly
                for j, p in enumerate(token_pieces(self.lm(), seg, texts[seg][a:b])):
                    out.append(Piece(seg, p.start + a, p.end + a, 1.0 - j * 1e-4))
                cut = True
                continue
            out.append(Piece(seg, a, b, score if not cut else -float(rank), n))
            used += n if not cut else 0
        return out
