"""The ``compress`` stage: compress each record's prompt (exemplars and context) under a budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from promptkit import PromptTemplate
from promptkit.pipeline import Record, Stage
from promptkit.registry import register_stage

from . import COMPRESSORS


@register_stage("compress")
class Compress(Stage):
    """Compress the prompt's exemplars and context to ``rate`` of their tokens (or ``target_tokens``)."""

    method: Literal["selfinfo", "question", "extractive", "attention"] = "question"
    rate: float | None = Field(default=None, gt=0.0, le=1.0)
    target_tokens: int | None = Field(default=None, ge=1)
    model: str = "smollm2-135m-instruct"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_budget(self) -> "Compress":
        if (self.rate is None) == (self.target_tokens is None):
            raise ValueError("give exactly one of rate and target_tokens")
        return self

    def process(self, records: list[Record]) -> list[Record]:
        comp = COMPRESSORS[self.method](model=self.model, **self.options)
        for r in records:
            if r.prompt is None:
                r.prompt = PromptTemplate().build(r.inputs, r.exemplars, r.documents)
            res = comp.compress(r.prompt, target_tokens=self.target_tokens, rate=self.rate)
            r.prompt = res.prompt
        return records
