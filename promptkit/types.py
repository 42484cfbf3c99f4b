"""Core data types: documents, examples, segmented prompts and generations.

A prompt is an ordered list of segments, from the most shared to the least
shared (system, instruction, exemplars, context, question, answer prefix), so
that prompts built by the same pipeline share a token prefix the engine can
prefill once.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    """One contiguous piece of a prompt."""

    kind: SegmentKind
    text: str


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

    def with_segment(self, kind: SegmentKind | str, text: str | None) -> Prompt:
        """A copy with the segment of ``kind`` set to ``text`` (removed if None or empty)."""
        kind = SegmentKind(kind)
        parts = {s.kind.value: s.text for s in self.segments}
        parts[kind.value] = text  # type: ignore[assignment]
        return Prompt.from_parts(**parts)

    def text(self, sep: str = "\n\n", include: set[SegmentKind] | None = None) -> str:
        """The segments' texts joined with ``sep`` (system included)."""
        return sep.join(s.text for s in self.segments if include is None or s.kind in include)

    def __len__(self) -> int:
        return len(self.segments)


class Usage(BaseModel):
    """Token accounting for one call."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens actually computed (not served from the prefix cache)."""
        return self.prompt_tokens - self.cached_tokens


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
