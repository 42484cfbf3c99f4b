"""Writing in the Margins (WiM): answer over a long context with notes written chunk by chunk.

Russak et al. (2024), "Writing in the Margins: Better Inference Pattern for Long Context
Retrieval". The context is prefilled a chunk at a time (a chunk is ``docs_per_chunk`` of the
prompt's documents); after each chunk the model writes a short "margin" about the question,
conditioned on everything read so far, and says whether the chunk helps (``YES#<note>`` or
``NO#``, WiM's own format, decoded under a regular expression). The margins judged relevant are
added after the context, before the question, and the final answer is generated.

Chunk ``i``'s prompt is chunk ``i-1``'s context plus one more chunk, followed by the margin
request; the prefix cache therefore serves everything up to the end of the previous chunk and
each chunk is prefilled once. Margins of all records are decoded together, one engine batch per
chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .lm import LM
from .types import Prompt, SegmentKind, Usage

MARGIN_REQUEST = ("Does the context above help answer this question? {question}\n"
                  "If it does, write YES# and copy the facts that answer it; if it does not, write NO#.")
MARGIN_REGEX = r"YES#[^\n]+|NO#"  # an irrelevant chunk costs no note
MARGIN_REGEX_ALL = r"(?:YES|NO)#[^\n]+"


class Margins(BaseModel):
    """Settings of Writing in the Margins (see the module doc).

    ``request`` asks for one margin (``{question}``: the record's question segment); ``max_tokens``
    bounds a margin; ``keep`` is ``relevant`` (the margins the model marked YES) or ``all`` (every
    non-empty margin); the kept margins follow the context under ``header``, one per line.
    """

    model_config = ConfigDict(extra="forbid")

    docs_per_chunk: int = Field(default=1, ge=1)
    max_tokens: int = Field(default=48, ge=1)
    request: str = MARGIN_REQUEST
    keep: Literal["relevant", "all"] = "relevant"
    header: str = "Notes on the context:"

    def regex(self) -> str:
        """What a margin must match: a note only where it is kept."""
        return MARGIN_REGEX if self.keep == "relevant" else MARGIN_REGEX_ALL


class MarginOutcome(BaseModel):
    """The margins written for each record and what they cost."""

    margins: list[list[str]]  # per record, per chunk: the margin text ("" for a chunk judged irrelevant)
    relevant: list[list[bool]]
    usages: list[list[Usage]] = Field(default_factory=list)  # per record, per chunk
    calls: int = 0

    @property
    def usage(self) -> Usage:
        """All margin calls together."""
        return sum((u for row in self.usages for u in row), Usage())


def chunk_ends(prompt: Prompt, docs_per_chunk: int) -> list[int]:
    """Character offsets in the context segment where each chunk ends (after its last document)."""
    ctx = next((s for s in prompt.segments if s.kind == SegmentKind.context), None)
    if ctx is None or not ctx.spans:
        return []
    last = [min(i + docs_per_chunk, len(ctx.spans)) - 1 for i in range(0, len(ctx.spans), docs_per_chunk)]
    return [ctx.spans[j][1] for j in last]


def chunk_prompt(prompt: Prompt, end: int, request: str) -> Prompt:
    """The prompt read up to ``end`` of its context, asking for a margin."""
    ctx = next(s for s in prompt.segments if s.kind == SegmentKind.context)
    spans = [(a, b) for a, b in ctx.spans if b <= end]
    question = prompt.get(SegmentKind.question) or ""
    return (prompt.with_segment(SegmentKind.context, ctx.text[:end], spans)
            .with_segment(SegmentKind.question, request.replace("{question}", question))
            .with_segment(SegmentKind.answer_prefix, None))


def parse_margin(text: str) -> tuple[str, bool]:
    """A margin's note and whether the model judged its chunk relevant."""
    head, _, note = text.partition("#")
    return note.strip().lstrip(".:;,- ").strip(), head.strip().upper() == "YES"


def with_margins(prompt: Prompt, notes: Sequence[str], header: str) -> Prompt:
    """``prompt`` with ``notes`` after its context (its documents' spans unchanged)."""
    if not notes:
        return prompt
    ctx = next(s for s in prompt.segments if s.kind == SegmentKind.context)
    text = ctx.text + f"\n\n{header}\n" + "\n".join(f"- {n}" for n in notes)
    return prompt.with_segment(SegmentKind.context, text, ctx.spans)


def write_margins(lm: LM, prompts: Sequence[Prompt], settings: Margins, chat: bool | None = None) -> MarginOutcome:
    """Write one margin per chunk of each prompt's context; one engine batch per chunk position."""
    ends = [chunk_ends(p, settings.docs_per_chunk) for p in prompts]
    margins: list[list[str]] = [[] for _ in prompts]
    relevant: list[list[bool]] = [[] for _ in prompts]
    usages: list[list[Usage]] = [[] for _ in prompts]
    calls = 0
    for c in range(max(map(len, ends), default=0)):
        todo = [i for i, e in enumerate(ends) if c < len(e)]
        asks = [chunk_prompt(prompts[i], ends[i][c], settings.request) for i in todo]
        gens = lm.generate(asks, regex=settings.regex(), max_tokens=settings.max_tokens, chat=chat)
        for i, g in zip(todo, gens):
            note, rel = parse_margin(g.text)
            margins[i].append(note)
            relevant[i].append(rel)
            usages[i].append(g.usage)
        calls += len(todo)
    return MarginOutcome(margins=margins, relevant=relevant, usages=usages, calls=calls)


def kept_notes(margins: Sequence[str], relevant: Sequence[bool], keep: str) -> list[str]:
    """The margins that go before the final answer."""
    return [m for m, r in zip(margins, relevant) if m and (r or keep == "all")]


def margin_records(stage: Any, records: list[Any], settings: Margins) -> MarginOutcome:
    """Give each record's prompt the margins kept for it (a :class:`~promptkit.stages.Generate`
    with ``margins``); records without documents in their context are left as they are."""
    out = write_margins(stage.lm(), [r.prompt for r in records], settings, chat=stage.chat)
    for r, ms, rel in zip(records, out.margins, out.relevant):
        r.prompt = with_margins(r.prompt, kept_notes(ms, rel, settings.keep), settings.header)
    return out
