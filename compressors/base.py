"""What every compressor shares: the budget, the units of text it keeps or drops, exact-budget selection.

A compressor edits the compressible segments of a :class:`Prompt` (exemplars and
context by default); instruction and question are kept. The budget is counted in
the LM's tokens over the compressible segments: ``rate=0.5`` asks for half of
them, ``target_tokens=300`` for 300. The delivered count — the compressed text
re-tokenized — is within one token of the budget whenever the input is larger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from promptkit import LM, Prompt, SegmentKind, get_lm

DEFAULT_SEGMENTS = (SegmentKind.exemplars, SegmentKind.context)


class CompressionResult(BaseModel):
    """The compressed prompt and what compression achieved."""

    prompt: Prompt
    tokens_before: int
    tokens_after: int
    target_tokens: int
    rate_reached: float
    seconds: float
    method: str = ""


@dataclass
class Piece:
    """A span of one segment's text (a token, a sentence) with a keep-score."""

    segment: SegmentKind
    start: int
    end: int
    score: float
    tokens: int = 1
    parts: list[Piece] | None = None  # the tokens of a merged word, to fill the last gap exactly


def spans_from_offsets(offsets: Sequence[tuple[int, int]], skip_before: int, end: int) -> list[tuple[int, int, int]]:
    """(token index, start, end) per token past ``skip_before``; a span starts where the previous
    ended, so it carries its leading whitespace and any subset in order is a subsequence."""
    out, prev_end = [], skip_before
    for i, (a, b) in enumerate(offsets):
        if b <= skip_before or a == b:
            continue
        start = max(prev_end, skip_before)
        if b > start:
            out.append((i, start, b))
            prev_end = b
    if out:
        i, start, _ = out[-1]
        out[-1] = (i, start, end)  # trailing text belongs to the last token
    return out


def token_pieces(lm: LM, segment: SegmentKind, text: str, context: str = "") -> list[Piece]:
    """One piece per token of ``text``, scored by its self-information given ``context + text``."""
    return token_pieces_many(lm, segment, [text], [context])[0]


def token_pieces_many(lm: LM, segment: SegmentKind, texts: Sequence[str],
                      contexts: Sequence[str]) -> list[list[Piece]]:
    """:func:`token_pieces` for many (text, context) pairs in one engine batch (shared prefixes prefilled once)."""
    tls = lm.token_logprobs([c + t for c, t in zip(contexts, texts)])
    out = []
    for tl, text, context in zip(tls, texts, contexts):
        n = len(context)
        out.append([Piece(segment, a - n, b - n, -(tl.logprobs[i] or 0.0))
                    for i, a, b in spans_from_offsets(tl.offsets, n, n + len(text))])
    return out


def merge_words(pieces: list[Piece], text: str, reduce: Callable[[list[float]], float] = max,
                max_tokens: int = 6) -> list[Piece]:
    """Merge token pieces into whole words (a word ends at whitespace, or after ``max_tokens``
    tokens, as in scripts written without spaces), scored by ``reduce``.

    Pruning whole words keeps a number like 1953 (four digit tokens) intact or drops it whole.
    """
    words: list[list[Piece]] = []
    for p in pieces:
        prev = text[words[-1][0].start : words[-1][-1].end] if words else ""
        fresh = not prev.strip() == "" and (text[p.start : p.end][:1].isspace() or prev[-1:].isspace())
        if not words or fresh or len(words[-1]) >= max_tokens:
            words.append([p])
        else:
            words[-1].append(p)
    return [Piece(w[0].segment, w[0].start, w[-1].end, reduce([p.score for p in w]), len(w), w if len(w) > 1 else None)
            for w in words]


def resolve_budget(before: int, target_tokens: int | None, rate: float | None) -> int:
    """Tokens to keep from ``before``: exactly one of ``target_tokens`` and ``rate``."""
    if (target_tokens is None) == (rate is None):
        raise ValueError("give exactly one of target_tokens and rate")
    if rate is not None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        return max(1, round(before * rate))
    if target_tokens is not None and target_tokens < 1:
        raise ValueError(f"target_tokens must be positive, got {target_tokens}")
    return int(target_tokens)  # type: ignore[arg-type]


def select_exact(pieces: Sequence[Piece], budget: int, texts: dict[SegmentKind, str],
                 count: Callable[[str], int]) -> dict[SegmentKind, str]:
    """Keep the best-scoring pieces so the re-tokenized kept text holds ``budget`` tokens: never
    more, and fewer only when no piece left fits the gap (within one token on real text).

    Kept pieces stay in their original order, so each segment's new text is a
    subsequence of the old. Pieces are added best-first; re-tokenizing may merge
    or split tokens, so the selection is corrected until the count settles.
    """
    pieces = list(pieces)
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].score)
    keep: set[int] = set()
    used = 0
    for i in order:  # estimate by piece token counts
        if used + pieces[i].tokens <= budget:
            keep.add(i)
            used += pieces[i].tokens

    def render(chosen: set[int]) -> dict[SegmentKind, str]:
        out = {k: [] for k in texts}
        for i in sorted(chosen, key=lambda i: (pieces[i].segment.value, pieces[i].start)):
            p = pieces[i]
            out[p.segment].append(texts[p.segment][p.start : p.end])
        return {k: "".join(v) for k, v in out.items()}

    def total(chosen: set[int]) -> int:
        return sum(count(t) for t in render(chosen).values() if t)

    # Re-tokenizing the kept text can merge or split tokens: correct with exact counts,
    # never above the budget, and filled up to it where the pieces allow.
    n = total(keep)
    while keep and n > budget:  # drop the worst pieces until it fits
        keep.discard(min(keep, key=lambda i: pieces[i].score))
        n = total(keep)
    for i in order:  # top up with the best pieces that still fit
        if n >= budget:
            break
        if i not in keep and pieces[i].tokens <= budget - n + 1:
            trial = keep | {i}
            m = total(trial)
            if m <= budget:
                keep, n = trial, m
    if n < budget:  # the gap is smaller than any whole word left: fill it with single tokens
        for i in [i for i in order if i not in keep and pieces[i].parts]:
            for part in pieces[i].parts:  # type: ignore[union-attr]
                if n >= budget:
                    break
                pieces.append(Piece(part.segment, part.start, part.end, pieces[i].score))
                trial = keep | {len(pieces) - 1}
                m = total(trial)
                if m <= budget:
                    keep, n = trial, m
    return render(keep)


def window_bounds(lm: LM, text: str, window: int) -> list[tuple[int, int]]:
    """Character spans of consecutive windows of about ``window`` tokens that together cover ``text``."""
    enc = lm.backend.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    if len(offs) <= window:
        return [(0, len(text))]
    cuts = [offs[i][0] for i in range(window, len(offs), window)]
    edges = [0] + cuts + [len(text)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class Compressor(BaseModel):
    """Base class: subclasses score pieces of the compressible segments."""

    model_config = {"arbitrary_types_allowed": True, "extra": "forbid"}
    model: str = "smollm2-135m-instruct"
    segments: list[SegmentKind] = Field(default_factory=lambda: list(DEFAULT_SEGMENTS))
    method: str = "base"

    def lm(self) -> LM:
        return get_lm(self.model)

    def count(self, text: str) -> int:
        """Tokens of ``text`` as the LM sees it inside a prompt (no special tokens)."""
        return len(self.lm().backend.encode_continuation(text)) if text else 0

    def pieces(self, prompt: Prompt, texts: dict[SegmentKind, str], question: str, budget: int) -> list[Piece]:
        raise NotImplementedError

    def compress(self, prompt: Prompt, target_tokens: int | None = None, rate: float | None = None,
                 question: str | None = None) -> CompressionResult:
        """Compress ``prompt``'s compressible segments to the budget."""
        t0 = time.perf_counter()
        texts = {k: prompt.get(k) for k in self.segments}
        texts = {k: v for k, v in texts.items() if v and v.strip()}
        before = sum(self.count(t) for t in texts.values())
        budget = resolve_budget(before, target_tokens, rate)  # validates the request even with nothing to compress
        budget = budget if before else 0
        q = question if question is not None else (prompt.get(SegmentKind.question) or "")
        if before <= budget or not texts:
            return CompressionResult(prompt=prompt, tokens_before=before, tokens_after=before,
                                     target_tokens=budget, rate_reached=1.0, seconds=time.perf_counter() - t0,
                                     method=self.method)
        kept = select_exact(self.pieces(prompt, texts, q, budget), budget, texts, self.count)
        out = prompt
        for k, v in kept.items():
            out = out.with_segment(k, v if v.strip() else None)
        after = sum(self.count(t) for t in kept.values() if t)
        return CompressionResult(prompt=out, tokens_before=before, tokens_after=after, target_tokens=budget,
                                 rate_reached=after / before, seconds=time.perf_counter() - t0, method=self.method)
