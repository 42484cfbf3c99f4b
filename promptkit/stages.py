"""The core stages: build a prompt, generate an answer, classify by scoring labels."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator

from .engine.config import KVReuse
from .engine.models import DEFAULT_LLM
from .lm import LM, get_lm
from .pipeline import Record, Stage
from .prompt import PromptTemplate
from .registry import register_stage
from .types import Example


class LMStage(Stage):
    """A stage that calls a language model (shared per process by name).

    ``kv_reuse``: how the retrieved documents in each prompt's context reuse KV computed for
    them alone (local backend): ``full`` (prefill them, the reference), ``blend``, ``sink`` or
    ``none``, or KVReuse settings (``{mode: blend, recompute_ratio: 0.2}``). Documents that
    come from an index built with ``--kv`` find their KV there.
    """

    model: str = DEFAULT_LLM
    backend: str = "local"
    chat: bool | None = None
    sparse: bool | dict[str, Any] = Field(
        default=False, description="sparse prefill for long prompts (local backend): true, or SparseConfig settings")
    kv_reuse: KVReuse | None = None

    def lm(self) -> LM:
        return get_lm(self.model, self.backend, **({"sparse": self.sparse} if self.sparse else {}))

    def reuse_lm(self, records: list[Record]) -> LM:
        """The LM, with the KV stores saved next to the records' documents loaded when reusing."""
        lm = self.lm()
        if self.kv_reuse is not None and self.kv_reuse.reuses:
            for path in sorted({d.metadata["kv_store"] for r in records for d in r.documents
                                if d.metadata.get("kv_store")}):
                lm.load_kv_store(path)
        return lm


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
        gens = self.reuse_lm(records).generate(
            [r.prompt for r in records], max_tokens=self.max_tokens, temperature=self.temperature,  # type: ignore[misc]
            top_p=self.top_p, stop=self.stop, seed=self.seed, chat=self.chat, kv_reuse=self.kv_reuse)
        for r, g in zip(records, gens):
            r.generation, r.output, r.usage = g, g.text.strip(), g.usage
        return records


@register_stage("classify")
class Classify(LMStage):
    """Pick a label by the log-likelihood of its verbalizer after the prompt.

    All labels of one input are scored in one prefix-shared batch. With
    ``calibrate``, the label bias measured on content-free inputs is removed
    (contextual calibration): probabilities are divided by those the model
    gives to each label when the input is ``"N/A"``, ``""`` or ``"[MASK]"``.
    """

    labels: list[str]
    verbalizers: dict[str, str] = Field(default_factory=dict)
    calibrate: bool = False
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

    def bias(self, probe: Record) -> list[float]:
        """Mean content-free probability of each label (log), in ``probe``'s prompt layout."""
        assert probe.prompt is not None
        question = probe.prompt.get("question") or ""
        text = str(probe.inputs.get(self.input_key, ""))
        prompts = [probe.prompt.with_segment("question", question.replace(text, cf) if text else cf)
                   for cf in self.content_free]
        rows = self.lm().score_many(prompts, self.words(), chat=self.chat, kv_reuse=self.kv_reuse)
        probs = [[math.exp(x) for x in self._log_probs(row)] for row in rows]
        return [math.log(sum(col) / len(col)) for col in zip(*probs)]

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            _ensure_prompt(r)
        rows, usages = self.reuse_lm(records).score_with_usage(
            [r.prompt for r in records], self.words(), chat=self.chat, kv_reuse=self.kv_reuse)  # type: ignore[misc]
        bias = self.bias(records[0]) if self.calibrate and records else [0.0] * len(self.labels)
        for r, row, usage in zip(records, rows, usages):
            r.usage = usage
            adjusted = [lp - b for lp, b in zip(self._log_probs(row), bias)]
            r.label_scores = dict(zip(self.labels, adjusted))
            r.output = self.labels[max(range(len(adjusted)), key=adjusted.__getitem__)]
        return records
