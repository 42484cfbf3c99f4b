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

from .base import Compressor, Piece, merge_words, token_pieces_many

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
        q = question.strip()
        before = sum(self.count(t) for t in texts.values())
        plans = []  # per segment: header, documents, rank order, token budget
        for seg, text in list(texts.items()):
            header, docs = split_documents(text)
            scores = self.rank(docs, q) if q and len(docs) > 1 else [0.0] * len(docs)
            order = sorted(range(len(docs)), key=lambda i: -scores[i])
            if self.reorder:
                docs = [docs[i] for i in order]
                order = list(range(len(docs)))
                text = texts[seg] = header + "".join(docs)
            plans.append((seg, header, docs, order, budget * self.count(text) / before))
        # One engine batch: headers, every document alone, every document after the question.
        heads = [h for _, h, _, _, _ in plans if h]
        docs_all = [d for _, _, docs, _, _ in plans for d in docs]
        cond = [f"Question: {q}\n\n"] * len(docs_all) if q else []
        scored = token_pieces_many(self.lm(), SegmentKind.context, heads + docs_all + docs_all[: len(cond)],
                                   [""] * (len(heads) + len(docs_all)) + cond)
        head_pieces, plain_all = scored[: len(heads)], scored[len(heads) : len(heads) + len(docs_all)]
        given_all = scored[len(heads) + len(docs_all) :] or plain_all
        out: list[Piece] = []
        k, heads_left = 0, iter(head_pieces)
        for seg, header, docs, order, seg_budget in plans:
            if header:  # the header is kept
                out.extend(Piece(seg, p.start, p.end, 1e6) for p in next(heads_left))
            offset = len(header)
            sizes = [max(1, self.count(d)) for d in docs]
            weights = {i: len(docs) - r for r, i in enumerate(order)}  # linear in rank
            total_w = sum(weights[i] * sizes[i] for i in range(len(docs)))
            for i, doc in enumerate(docs):
                keep_frac = min(1.0, seg_budget * weights[i] / total_w) if total_w else 0.0
                out.extend(self._doc_pieces(seg, doc, plain_all[k], given_all[k], keep_frac, offset))
                offset += len(doc)
                k += 1
        return out

    def _doc_pieces(self, seg: SegmentKind, doc: str, plain: list[Piece], given_q: list[Piece],
                    keep_frac: float, offset: int) -> list[Piece]:
        """Whole-word pieces of one document, scored by rank within it shifted by the doc's keep share."""
        if len(given_q) == len(plain):  # contrastive: how much the question makes the token likelier
            for p, g in zip(plain, given_q):
                p.score += self.contrast_weight * max(0.0, p.score - g.score)
        words = merge_words(plain, doc)
        ranked = sorted(range(len(words)), key=lambda j: -words[j].score)
        out = []
        for r, j in enumerate(ranked):
            pct = 1.0 - r / max(1, len(words))  # 1 for the doc's best word
            w = words[j]
            parts = [Piece(seg, x.start + offset, x.end + offset, 0.0) for x in w.parts] if w.parts else None
            out.append(Piece(seg, w.start + offset, w.end + offset, pct - (1.0 - keep_frac), w.tokens, parts))
        return out
