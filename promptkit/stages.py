"""The core stages: build a prompt, generate an answer, classify by scoring labels."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator

from .engine.models import DEFAULT_LLM
from .lm import LM, get_lm
from .pipeline import Record, Stage
from .prompt import PromptTemplate
from .registry import register_stage
from .types import Example, SegmentKind


class LMStage(Stage):
    """A stage that calls a language model (shared per process by name)."""

    model: str = DEFAULT_LLM
    backend: str = "local"
    chat: bool | None = None
    sparse: bool | dict[str, Any] = Field(
        default=False, description="sparse prefill for long prompts (local backend): true, or SparseConfig settings")

    def lm(self) -> LM:
        return get_lm(self.model, self.backend, **({"sparse": self.sparse} if self.sparse else {}))


@register_stage("prompt")
class BuildPrompt(PromptTemplate, Stage):
    """Fill the prompt segments from the record's inputs, exemplars and documents.

    ``exemplars`` here are fixed demonstrations; a record's own exemplars
    (set by a selector stage) take precedence.
    """

    exemplars: list[dict[str, Any]] = Field(default_factory=list)

    def process(self, records: list[Record]) -> list[Record]:
        fixed = [Example(**e) for e in self.exemplars]
        for r in records:
            r.prompt = self.build(r.inputs, r.exemplars or fixed, r.documents)
        return records


def _ensure_prompt(r: Record) -> None:
    if r.prompt is None:
        r.prompt = PromptTemplate().build(r.inputs)


@register_stage("generate")
class Generate(LMStage):
    """Generate the output text for each record's prompt, as one batch."""

    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            _ensure_prompt(r)
        gens = self.lm().generate([r.prompt for r in records], max_tokens=self.max_tokens,  # type: ignore[misc]
                                  temperature=self.temperature, top_p=self.top_p, stop=self.stop,
                                  seed=self.seed, chat=self.chat)
        for r, g in zip(records, gens):
            r.generation, r.output = g, g.text.strip()
        return records


@register_stage("classify")
class Classify(LMStage):
    """Pick a label by the log-likelihood of its verbalizer after the prompt.

    All labels of one input are scored in one prefix-shared batch. With
    ``calibrate`` (the default), the label bias measured on content-free inputs
    is removed (contextual calibration): probabilities are divided by those the
    model gives to each label when the input is ``"N/A"``, ``""`` or
    ``"[MASK]"`` in the same prompt layout (the same instruction and exemplars).
    That costs three prompts per layout — per batch with fixed exemplars, per
    input with exemplars chosen per input, where they share the input's prefix —
    and is worth many points to a small model zero-shot.
    """

    labels: list[str]
    verbalizers: dict[str, str] = Field(default_factory=dict)
    calibrate: bool = True
    content_free: list[str] = Field(default_factory=lambda: ["N/A", "", "[MASK]"])
    input_key: str = "text"

    @model_validator(mode="after")
    def _check(self) -> Classify:
        if len(self.labels) < 2:
            raise ValueError("classify needs at least two labels")
        unknown = set(self.verbalizers) - set(self.labels)
        if unknown:
            raise ValueError(f"verbalizers for unknown labels {sorted(unknown)}; labels: {self.labels}")
        return self

    def words(self) -> list[str]:
        return [" " + self.verbalizers.get(lab, lab) for lab in self.labels]

    def _log_probs(self, scores: list[float]) -> list[float]:
        top = max(scores)
        z = top + math.log(sum(math.exp(s - top) for s in scores))
        return [s - z for s in scores]

    def content_free_prompts(self, records: list[Record]) -> list[Any]:
        """The prompts calibration scores for ``records``: each content-free input in each distinct layout.

        A layout is a prompt without its input (system, instruction, exemplars,
        context, answer prefix): records with fixed exemplars share one; a
        record with exemplars chosen for it has its own, and its content-free
        prompts share its prefix (cheap with a prefix cache).
        """
        return [p for probe in _layouts(records).values() for p in self._content_free(probe)]

    def _content_free(self, probe: Record) -> list[Any]:
        assert probe.prompt is not None
        question = probe.prompt.get("question") or ""
        text = str(probe.inputs.get(self.input_key, ""))
        return [probe.prompt.with_segment("question", question.replace(text, cf) if text else cf)
                for cf in self.content_free]

    def biases(self, records: list[Record]) -> list[list[float]]:
        """Per record, the mean content-free probability of each label (log) in the record's own layout."""
        layouts = _layouts(records)
        rows = self.lm().score_many(self.content_free_prompts(records), self.words(), chat=self.chat)
        n, by_layout = len(self.content_free), {}
        for j, key in enumerate(layouts):
            probs = [[math.exp(x) for x in self._log_probs(row)] for row in rows[j * n : (j + 1) * n]]
            by_layout[key] = [math.log(sum(col) / len(col)) for col in zip(*probs)]
        return [by_layout[_layout_key(r)] for r in records]

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            _ensure_prompt(r)
        rows = self.lm().score_many([r.prompt for r in records], self.words(), chat=self.chat)  # type: ignore[misc]
        biases = self.biases(records) if self.calibrate and records else [[0.0] * len(self.labels)] * len(records)
        for r, row, bias in zip(records, rows, biases):
            adjusted = [lp - b for lp, b in zip(self._log_probs(row), bias)]
            r.label_scores = dict(zip(self.labels, adjusted))
            r.output = self.labels[max(range(len(adjusted)), key=adjusted.__getitem__)]
        return records


def _layout_key(record: Record) -> tuple:
    assert record.prompt is not None
    return tuple((s.kind, s.text) for s in record.prompt.segments if s.kind != SegmentKind.question)


def _layouts(records: list[Record]) -> dict[tuple, Record]:
    """The first record of each distinct prompt layout, in order."""
    out: dict[tuple, Record] = {}
    for r in records:
        out.setdefault(_layout_key(r), r)
    return out
