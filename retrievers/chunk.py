"""Token-aware chunking with overlap, by sentences or paragraphs, keeping ids and character offsets."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Literal

from promptkit.types import Document

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")
_WORD = re.compile(r"\S+")

CountTokens = Callable[[str], int]


def _spans_between(text: str, start: int, end: int, sep: re.Pattern) -> list[tuple[int, int]]:
    """Non-blank spans of ``text[start:end]`` separated by ``sep`` (whitespace trimmed)."""
    spans, pos = [], start
    for m in sep.finditer(text, start, end):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, end))
    out = []
    for a, b in spans:
        seg = text[a:b]
        if seg.strip():
            a += len(seg) - len(seg.lstrip())
            b -= len(seg) - len(seg.rstrip())
            out.append((a, b))
    return out


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (paragraph breaks also end a sentence)."""
    return [s for a, b in _spans_between(text, 0, len(text), _PARAGRAPH)
            for s in _spans_between(text, a, b, _SENTENCE_END)]


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the paragraphs of ``text`` (separated by blank lines)."""
    return _spans_between(text, 0, len(text), _PARAGRAPH)


@lru_cache(maxsize=4)
def embedder_token_counter(model: str | None = None) -> CountTokens:
    """Token counter of an embedder's tokenizer (default: the embedded MiniLM), special tokens excluded."""
    from transformers import AutoTokenizer

    from promptkit.models import DEFAULT_EMBEDDER, resolve_embedder

    tok = AutoTokenizer.from_pretrained(resolve_embedder(model or DEFAULT_EMBEDDER))
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _fit(text: str, spans: list[tuple[int, int]], count: CountTokens, max_tokens: int) -> list[tuple[int, int]]:
    """Split spans longer than ``max_tokens`` at word boundaries."""
    out = []
    for a, b in spans:
        if count(text[a:b]) <= max_tokens:
            out.append((a, b))
            continue
        words = [(m.start(), m.end()) for m in _WORD.finditer(text, a, b)]
        cur = words[0][0]
        last = cur
        for ws, we in words:
            if we > cur and count(text[cur:we]) > max_tokens and last > cur:
                out.append((cur, last))
                cur = ws
            last = we
        out.append((cur, last))
    return out


def chunk_text(text: str, max_tokens: int = 256, overlap: int = 1, by: Literal["sentence", "paragraph"] = "sentence",
               count_tokens: CountTokens | None = None) -> list[tuple[int, int]]:
    """Character spans of chunks of at most ``max_tokens`` tokens.

    Units (sentences or paragraphs; a unit over the budget is split at words)
    are packed greedily; each chunk after the first starts with the last
    ``overlap`` units of the previous one, when they leave room for a new unit.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if by not in ("sentence", "paragraph"):
        raise ValueError(f"unknown unit {by!r}; choose 'sentence' or 'paragraph'")
    count = count_tokens or embedder_token_counter()
    units = _fit(text, sentence_spans(text) if by == "sentence" else paragraph_spans(text), count, max_tokens)
    chunks: list[tuple[int, int]] = []
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and count(text[units[i][0]:units[j][1]]) <= max_tokens:
            j += 1
        chunks.append((units[i][0], units[j - 1][1]))
        if j >= len(units):
            break
        nxt = max(j - overlap, i + 1)  # always move forward
        while nxt < j and count(text[units[nxt][0]:units[j][1]]) > max_tokens:
            nxt += 1  # drop overlap that leaves no room for the next unit
        i = nxt
    return chunks


def chunk_documents(docs: Sequence[Document], max_tokens: int = 256, overlap: int = 1,
                    by: Literal["sentence", "paragraph"] = "sentence",
                    count_tokens: CountTokens | None = None) -> list[Document]:
    """Split documents into chunks ``"{id}#{n}"`` with ``doc_id``, ``chunk``, ``start`` and ``end`` (char offsets)."""
    out = []
    for d in docs:
        for n, (a, b) in enumerate(chunk_text(d.text, max_tokens, overlap, by, count_tokens)):
            meta = {**d.metadata, "doc_id": d.id, "chunk": n, "start": a, "end": b}
            out.append(Document(id=f"{d.id}#{n}", text=d.text[a:b], metadata=meta))
    return out
