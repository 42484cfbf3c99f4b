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

    def context_block(self, documents: Sequence[Document]) -> str | None:
        if not documents:
            return None
        lines = [
            fill(self.document_format, {"index": i + 1, "id": d.id, "text": d.text, **d.metadata})
            for i, d in enumerate(documents)
        ]
        return "\n".join(([self.context_header] if self.context_header else []) + lines)

    def build(
        self,
        inputs: Mapping[str, Any],
        exemplars: Sequence[Example] = (),
        documents: Sequence[Document] = (),
    ) -> Prompt:
        """Fill the template for one input."""
        return Prompt.from_parts(
            system=self.system,
            instruction=self.instruction,
            exemplars=self.exemplar_block(exemplars),
            context=self.context_block(documents),
            question=fill(self.input_format, inputs),
            answer_prefix=self.answer_prefix,
        )


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
