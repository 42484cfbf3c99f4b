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
from promptkit.types import TokenLogprobs

from .base import Compressor, Piece, merge_words, spans_from_offsets, window_bounds

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

    def _windows(self, doc: str, longest: int) -> list[str]:
        """``doc`` as consecutive pieces of at most about ``longest`` tokens."""
        if self.count(doc) <= longest:
            return [doc]
        return [doc[a:b] for a, b in window_bounds(self.lm(), doc, longest)]

    def pieces(self, prompt: Prompt, texts: dict[SegmentKind, str], question: str, budget: int) -> list[Piece]:
        q = question.strip()
        before = sum(self.count(t) for t in texts.values())
        # A document and the question must fit one prompt: a longer document is ranked in windows.
        longest = max(64, self.lm().backend.max_context // 2 - self.count(q) - 16)
        split = {seg: (header, [w for d in docs for w in self._windows(d, longest)])
                 for seg, (header, docs) in ((seg, split_documents(text)) for seg, text in texts.items())}
        docs_all = [d for _, docs in split.values() for d in docs]
        heads = [h for h, _ in split.values() if h]
        # One engine batch. "document, then question" gives each document's tokens unconditioned
        # and log p(question | document) (the rank); "question, then document" the conditioned tokens.
        plain_texts = [d.rstrip() + "\n\nQuestion: " + q if q else d for d in docs_all]
        prefix = f"Question: {q}\n\n"
        cond = [prefix + d for d in docs_all] if q else []
        tls = self.lm().token_logprobs(plain_texts + cond + heads)
        ranks, plain_all = zip(*(_doc_then_question(tl, d, len(t) - len(q) - 1 if q else len(t))
                                 for tl, d, t in zip(tls, docs_all, plain_texts))) if docs_all else ((), ())
        given_all = [_pieces(tl, len(prefix), len(prefix) + len(d))
                     for tl, d in zip(tls[len(docs_all) :], docs_all)] if q else list(plain_all)
        head_pieces = iter(tls[len(docs_all) + len(cond) :])
        out: list[Piece] = []
        k = 0
        for seg, (header, docs) in split.items():
            n = len(docs)
            scores, plain, given = ranks[k : k + n], list(plain_all[k : k + n]), given_all[k : k + n]
            k += n
            order = sorted(range(n), key=lambda i: -scores[i])
            if self.reorder:  # best first, against lost-in-the-middle
                docs, plain, given = ([x[i] for i in order] for x in (docs, plain, given))
                order = list(range(n))
                texts[seg] = header + "".join(docs)
            if header:  # the header is kept
                out.extend(Piece(seg, p.start, p.end, 1e6) for p in _pieces(next(head_pieces), 0, len(header)))
            seg_budget = budget * self.count(texts[seg]) / before
            sizes = [max(1, self.count(d)) for d in docs]
            weights = {i: n - r for r, i in enumerate(order)}  # linear in rank
            total_w = sum(weights[i] * sizes[i] for i in range(n))
            offset = len(header)
            for i, doc in enumerate(docs):
                keep_frac = min(1.0, seg_budget * weights[i] / total_w) if total_w else 0.0
                out.extend(self._doc_pieces(seg, doc, plain[i], given[i], keep_frac, offset))
                offset += len(doc)
        return out

    def _doc_pieces(self, seg: SegmentKind, doc: str, plain: list[Piece], given_q: list[Piece],
                    keep_frac: float, offset: int) -> list[Piece]:
        """Whole-word pieces of one document, scored by rank within it shifted by the doc's keep share."""
        given = {g.start: g.score for g in given_q}
        for p in plain:  # contrastive: how much likelier the question makes the token
            if p.start in given:
                p.score += self.contrast_weight * max(0.0, p.score - given[p.start])
        words = merge_words(plain, doc)
        ranked = sorted(range(len(words)), key=lambda j: -words[j].score)
        out = []
        for r, j in enumerate(ranked):
            pct = 1.0 - r / max(1, len(words))  # 1 for the doc's best word
            w = words[j]
            parts = [Piece(seg, x.start + offset, x.end + offset, 0.0) for x in w.parts] if w.parts else None
            out.append(Piece(seg, w.start + offset, w.end + offset, pct - (1.0 - keep_frac), w.tokens, parts))
        return out


def _pieces(tl: TokenLogprobs, start: int, end: int) -> list[Piece]:
    """Pieces (document-relative) for the characters ``start:end`` of a scored text."""
    offs = [(a, b) if a < end else (a, a) for a, b in tl.offsets]  # tokens past ``end`` are skipped
    return [Piece(SegmentKind.context, a - start, b - start, -(tl.logprobs[i] or 0.0))
            for i, a, b in spans_from_offsets(offs, start, end)]


def _doc_then_question(tl: TokenLogprobs, doc: str, q_start: int) -> tuple[float, list[Piece]]:
    """From ``document + question``: log p(question | document) and the document's token pieces."""
    rank = sum(lp for lp, (a, _) in zip(tl.logprobs, tl.offsets) if a >= q_start and lp is not None)
    return rank, _pieces(tl, 0, len(doc))
