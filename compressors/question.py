"""Question-aware coarse-to-fine compression (LongLLMLingua).

Coarse: the documents of the context are ranked by how likely each makes the
question (log p(question | document), one shared-prefix batch); each gets a
share of the budget that falls with its rank, and the lowest may get none.
Fine: tokens are scored by self-information plus how much more likely the
question makes them (contrastive: log p(token | question, prefix) -
log p(token | prefix)), so surprising and question-relevant tokens survive.
Optionally the documents are reordered best first, against lost-in-the-middle.
"""

from __future__ import annotations

import re

from promptkit import Prompt, SegmentKind

from .base import Compressor, Piece, merge_words, token_pieces

_NUMBERED = re.compile(r"(?m)^\[\d+\] ")


def split_documents(text: str) -> tuple[str, list[str]]:
    """A header (e.g. ``Context:``) and the documents: numbered ``[i]`` lines, else paragraphs."""
    marks = [m.start() for m in _NUMBERED.finditer(text)]
    if marks:
        edges = marks + [len(text)]
        return text[: marks[0]], [text[a:b] for a, b in zip(edges, edges[1:])]
    parts = re.split(r"(\n\s*\n)", text)
    docs = ["".join(parts[i : i + 2]) for i in range(0, len(parts), 2)]
    return "", [d for d in docs if d]


class QuestionAwareCompressor(Compressor):
    """Rank documents by the question, give better ones more budget, keep question-relevant tokens."""

    method: str = "question"
    reorder: bool = False
    contrast_weight: float = 1.0

    def rank(self, docs: list[str], question: str) -> list[float]:
        """log p(question | document) for each document."""
        lm = self.lm()
        return [row[0] for row in lm.score_many([d.strip() + "\n\nQuestion:" for d in docs],
                                                [[" " + question.strip()]] * len(docs), chat=False)]

    def pieces(self, prompt: Prompt, texts: dict[SegmentKind, str], question: str, budget: int) -> list[Piece]:
        lm = self.lm()
        out: list[Piece] = []
        before = sum(self.count(t) for t in texts.values())
        for seg, text in list(texts.items()):
            header, docs = split_documents(text)
            scores = self.rank(docs, question) if question.strip() and len(docs) > 1 else [0.0] * len(docs)
            order = sorted(range(len(docs)), key=lambda i: -scores[i])
            if self.reorder:
                docs = [docs[i] for i in order]
                order = list(range(len(docs)))
                text = texts[seg] = header + "".join(docs)
            seg_budget = budget * self.count(text) / before
            sizes = [max(1, self.count(d)) for d in docs]
            weights = {i: len(docs) - r for r, i in enumerate(order)}  # linear in rank
            total_w = sum(weights[i] * sizes[i] for i in range(len(docs)))
            offset = len(header)
            if header:
                out.extend(Piece(seg, p.start, p.end, 1e6) for p in token_pieces(lm, seg, header))
            for i, doc in enumerate(docs):
                keep_frac = min(1.0, seg_budget * weights[i] / total_w) if total_w else 0.0
                plain = token_pieces(lm, seg, doc)
                given_q = token_pieces(lm, seg, doc, f"Question: {question.strip()}\n\n") if question.strip() else plain
                if len(given_q) == len(plain):
                    for p, g in zip(plain, given_q):
                        p.score += self.contrast_weight * max(0.0, p.score - g.score)
                plain = merge_words(plain, doc)
                raw = [p.score for p in plain]
                ranked = sorted(range(len(plain)), key=lambda j: -raw[j])
                for r, j in enumerate(ranked):
                    pct = 1.0 - r / max(1, len(plain))  # 1 for the doc's best token
                    p = plain[j]
                    parts = [Piece(seg, x.start + offset, x.end + offset, 0.0) for x in p.parts] if p.parts else None
                    out.append(Piece(seg, p.start + offset, p.end + offset, pct - (1.0 - keep_frac), p.tokens, parts))
                offset += len(doc)
        return out
