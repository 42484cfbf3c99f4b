"""Core data types: documents, examples, segmented prompts and generations.

A prompt is an ordered list of segments, from the most shared to the least
shared (system, instruction, exemplars, context, question, answer prefix), so
that prompts built by the same pipeline share a token prefix the engine can
prefill once.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field


class Document(BaseModel):
    """A unit of retrievable text."""

    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    score: float | None = None


class Example(BaseModel):
    """A labelled (or unlabelled) data point: named input fields and an output.

    ``Example(question="2+2?", answer="4")`` keeps every keyword as a field;
    ``output_key`` says which field holds the gold output.
    """

    model_config = ConfigDict(extra="allow")

    output_key: str = Field(default="answer", exclude=True)

    @property
    def fields(self) -> dict[str, Any]:
        """All fields of the example (inputs and output)."""
        return dict(self.__pydantic_extra__ or {})

    @property
    def inputs(self) -> dict[str, Any]:
        """The fields other than the output."""
        return {k: v for k, v in self.fields.items() if k != self.output_key}

    @property
    def output(self) -> Any:
        """The gold output, or None."""
        return self.fields.get(self.output_key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class SegmentKind(str, Enum):
    """Segment kinds in their canonical order (most shared first)."""

    system = "system"
    instruction = "instruction"
    exemplars = "exemplars"
    context = "context"
    question = "question"
    answer_prefix = "answer_prefix"


SEGMENT_ORDER: list[SegmentKind] = list(SegmentKind)


class Segment(BaseModel):
    """One contiguous piece of a prompt.

    ``spans`` are the character ranges ``[start, end)`` of the documents inside ``text``
    (the context segment), so the engine can reuse each document's KV wherever it lands.
    """

    kind: SegmentKind
    text: str
    spans: list[tuple[int, int]] = Field(default_factory=list)


class Prompt(BaseModel):
    """An ordered list of segments.

    Segments are kept in canonical order; there is at most one segment of each
    kind. Stages edit segments through :meth:`with_segment` and friends rather
    than rewriting a flat string.
    """

    segments: list[Segment] = Field(default_factory=list)

    @classmethod
    def from_parts(cls, **parts: str | None) -> Prompt:
        """Build a prompt from keyword parts named after :class:`SegmentKind`."""
        unknown = set(parts) - {k.value for k in SegmentKind}
        if unknown:
            raise ValueError(
                f"unknown segment kind(s) {sorted(unknown)}; allowed: {[k.value for k in SegmentKind]}"
            )
        return cls(
            segments=[
                Segment(kind=k, text=parts[k.value])  # type: ignore[arg-type]
                for k in SEGMENT_ORDER
                if parts.get(k.value) not in (None, "")
            ]
        )

    def get(self, kind: SegmentKind | str) -> str | None:
        """Text of the segment of ``kind``, or None."""
        kind = SegmentKind(kind)
        for s in self.segments:
            if s.kind == kind:
                return s.text
        return None

    def with_segment(self, kind: SegmentKind | str, text: str | None,
                     spans: list[tuple[int, int]] | None = None) -> Prompt:
        """A copy with the segment of ``kind`` set to ``text`` (removed if None or empty), its
        documents at ``spans``; the other segments are kept as they are."""
        kind = SegmentKind(kind)
        segs = {s.kind: s for s in self.segments}
        segs.pop(kind, None)
        if text not in (None, ""):
            segs[kind] = Segment(kind=kind, text=text, spans=list(spans or []))  # type: ignore[arg-type]
        return Prompt(segments=[segs[k] for k in SEGMENT_ORDER if k in segs])

    def document_spans(self, sep: str = "\n\n", include: set[SegmentKind] | None = None) -> list[tuple[int, int]]:
        """Character spans of the documents in :meth:`text` (same ``sep`` and ``include``)."""
        out, at = [], 0
        for s in (s for s in self.segments if include is None or s.kind in include):
            out += [(at + a, at + b) for a, b in s.spans]
            at += len(s.text) + len(sep)
        return out

    def text(self, sep: str = "\n\n", include: set[SegmentKind] | None = None) -> str:
        """The segments' texts joined with ``sep`` (system included)."""
        return sep.join(s.text for s in self.segments if include is None or s.kind in include)

    def __len__(self) -> int:
        return len(self.segments)


class Usage(BaseModel):
    """Token accounting for one call.

    ``cached_tokens`` came from the prefix cache; ``reused_tokens`` are document tokens whose KV
    came from the chunk store (computed alone, moved to their position) and was kept;
    ``recomputed_tokens`` document tokens taken from the store and recomputed in context;
    ``stored_tokens`` document tokens encoded alone into the store for this call (once per document).
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    stored_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens computed in place (neither cached nor reused; recomputed ones included)."""
        return self.prompt_tokens - self.cached_tokens - self.reused_tokens

    def __add__(self, other: Usage) -> Usage:
        add = {k: getattr(self, k) + getattr(other, k) for k in
               ("prompt_tokens", "cached_tokens", "reused_tokens", "recomputed_tokens", "stored_tokens",
                "completion_tokens", "seconds")}
        return Usage(**add, first_token_seconds=self.first_token_seconds)


class Generation(BaseModel):
    """The result of one generation request."""

    text: str
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None  # per generated token: the most likely tokens
    finish_reason: str = "length"
    usage: Usage = Field(default_factory=Usage)


class TokenLogprobs(BaseModel):
    """Per-token log-probabilities of a text under a model (first token has none)."""

    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]
    offsets: list[tuple[int, int]] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None  # per token, when asked for (first has none)
