"""Building segmented prompts from templates, and rendering them for a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from .types import Document, Example, Prompt, SegmentKind


class TemplateError(ValueError):
    """A template names a field the input does not have."""


def fill(template: str, fields: Mapping[str, Any]) -> str:
    """``template.format_map(fields)`` with an error that names the missing field."""
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise TemplateError(
            f"template {template!r} needs field {e.args[0]!r}; available: {sorted(fields)}"
        ) from None


class PromptTemplate(BaseModel):
    """How inputs, exemplars and documents become prompt segments.

    The defaults give a plain question-answering layout::

        [instruction]

        Question: ...
        Answer: ...          (one block per exemplar)

        Context:
        [1] ...

        Question: {question}
        Answer:
    """

    system: str | None = None
    instruction: str | None = None
    input_format: str = "Question: {question}"
    output_format: str = "Answer: {answer}"
    answer_prefix: str | None = "Answer:"
    exemplar_separator: str = "\n\n"
    context_header: str = "Context:"
    document_format: str = "[{index}] {text}"

    def exemplar_block(self, exemplars: Sequence[Example]) -> str | None:
        if not exemplars:
            return None
        blocks = [
            fill(self.input_format, ex.fields) + "\n" + fill(self.output_format, ex.fields) for ex in exemplars
        ]
        return self.exemplar_separator.join(blocks)

    def context_segment(self, documents: Sequence[Document]) -> tuple[str | None, list[tuple[int, int]]]:
        """The context text and the character span of each document's text inside it."""
        if not documents:
            return None, []
        text, spans = self.context_header or "", []
        for i, d in enumerate(documents):
            # Metadata fields come first: one named index, id or text must not replace the document's own.
            line = fill(self.document_format, {**d.metadata, "index": i + 1, "id": d.id, "text": d.text})
            text += "\n" if i or self.context_header else ""
            at = line.find(d.text) if d.text else -1
            if at >= 0:  # a format that rewrites the text leaves the document unmarked
                spans.append((len(text) + at, len(text) + at + len(d.text)))
            text += line
        return text, spans

    def build(
        self,
        inputs: Mapping[str, Any],
        exemplars: Sequence[Example] = (),
        documents: Sequence[Document] = (),
    ) -> Prompt:
        """Fill the template for one input."""
        prompt = Prompt.from_parts(
            system=self.system,
            instruction=self.instruction,
            exemplars=self.exemplar_block(exemplars),
            question=fill(self.input_format, inputs),
            answer_prefix=self.answer_prefix,
        )
        return prompt.with_segment(SegmentKind.context, *self.context_segment(documents))


def to_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages for a prompt: the system segment alone, the rest (but the answer prefix) as the user turn."""
    body = {k for k in SegmentKind if k not in (SegmentKind.system, SegmentKind.answer_prefix)}
    messages = []
    system = prompt.get(SegmentKind.system)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt.text(include=body)})
    return messages


def render(prompt: Prompt | str, apply_chat_template: Any | None) -> str:
    """The text a model sees.

    With a chat template, the answer prefix opens the assistant turn so the
    model continues it; without one, segments are joined by blank lines.
    """
    if isinstance(prompt, str):
        prompt = Prompt.from_parts(question=prompt)
    if apply_chat_template is None:
        prefix = prompt.get(SegmentKind.answer_prefix)
        head = prompt.text(include={k for k in SegmentKind if k != SegmentKind.answer_prefix})
        return head + ("\n" + prefix if prefix else "")
    text = apply_chat_template(to_messages(prompt))
    prefix = prompt.get(SegmentKind.answer_prefix)
    return text + prefix if prefix else text


def render_with_documents(prompt: Prompt | str, apply_chat_template: Any | None) -> tuple[str, list[tuple[int, int]]]:
    """:func:`render`, and the character spans of the prompt's documents in the rendered text."""
    text = render(prompt, apply_chat_template)
    if isinstance(prompt, str):
        return text, []
    flat = prompt.text()
    docs = [flat[a:b] for a, b in prompt.document_spans()]
    context = prompt.get(SegmentKind.context) or ""
    return text, locate(text, docs, start=max(0, text.find(context)) if docs else 0)


def locate(text: str, documents: Sequence[str], start: int = 0) -> list[tuple[int, int]]:
    """Spans of ``documents`` found in order in ``text`` (one not found is skipped)."""
    spans = []
    for d in documents:
        at = text.find(d, start) if d else -1
        if at >= 0:
            spans.append((at, at + len(d)))
            start = at + len(d)
    return spans
