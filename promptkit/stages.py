"""The core stages: build a prompt, generate an answer, classify by scoring labels."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_serializer, field_validator,
                      model_validator)

from .batch_prompt import BatchOutcome, BatchPrompt, classify_records, generate_records
from .engine.config import KVReuse
from .models import DEFAULT_LLM
from .engine.selective import SelectivePrefill
from .lm import LM, get_lm
from .margins import MarginOutcome, Margins, margin_records
from .pipeline import Record, Stage
from .prompt import PromptTemplate
from .registry import register_stage
from .signature import Signature, output_model, resolve_schema, schema_path
from .types import Example, Prompt, SegmentKind


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


def _ensure_prompt(r: Record, signature: str | None = None) -> None:
    """The default prompt for a record without one; a signature's inputs each get a line."""
    if r.prompt is not None:
        return
    if signature is None:
        r.prompt = PromptTemplate().build(r.inputs)
        return
    sig = Signature.parse(signature)
    missing = [k for k in sig.inputs if k not in r.inputs]
    if missing:
        raise ValueError(f"signature {signature!r} needs inputs {missing}; the record has {sorted(r.inputs)}")
    lines = "\n".join(f"{k.replace('_', ' ').capitalize()}: {r.inputs[k]}" for k in sig.inputs)
    fields = ", ".join(f"{k} ({v})" for k, v in sig.outputs.items())
    r.prompt = Prompt.from_parts(question=f"{lines}\n\nAnswer with {fields}.")


@register_stage("generate")
class Generate(LMStage):
    """Generate the output for each record's prompt, as one batch.

    Structured output (at most one of these): ``schema`` (a pydantic model, a JSON schema, or in a
    recipe a dotted import path such as ``mypkg.models:Answer``), ``signature`` (typed outputs,
    ``"question -> answer: str, confidence: float"``), ``regex``, ``grammar`` (Lark or GBNF) or
    ``choices``. The generation is constrained to match, and ``record.output`` is the parsed,
    validated object (a model instance for a pydantic schema or a signature, a dict for a JSON
    schema, the matched text otherwise); it is None only when ``max_tokens`` cut the output short.

    ``reason_first``: write free-text reasoning (up to ``reasoning_tokens``) before filling the
    schema; it is kept on ``record.reasoning``. ``max_tokens`` defaults to 64 for free text and
    512 for structured output.

    ``batch_prompt``: answer many records in one prompt, one numbered line each, voted over orders
    (:class:`~promptkit.batch_prompt.BatchPrompt`); free text, ``choices`` or a one-line ``regex``.
    ``margins``: over a long context, write a note after each chunk of documents and answer with
    the relevant notes (Writing in the Margins, :class:`~promptkit.margins.Margins`; ``true`` for
    the defaults).
    """

    model_config = ConfigDict(populate_by_name=True)

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    output_schema: Any = Field(default=None, alias="schema")
    signature: str | None = None
    regex: str | None = None
    grammar: str | None = None
    choices: list[str] | None = None
    reason_first: bool = False
    reasoning_tokens: int = Field(default=256, ge=1)
    reasoning_prompt: str = "Let's think step by step."
    prefill: SelectivePrefill | None = Field(default=None, description="prefill only the tokens that matter "
                                             "(local backend): 'filter', or SelectivePrefill settings")
    batch_prompt: BatchPrompt | None = None
    margins: Margins | None = None
    _batches: list[BatchOutcome] = PrivateAttr(default_factory=list)
    _margins: MarginOutcome | None = PrivateAttr(default=None)

    @field_validator("margins", mode="before")
    @classmethod
    def _margins_on(cls, v: Any) -> Any:
        return {} if v is True else None if v is False else v

    @property
    def batch_outcomes(self) -> list[BatchOutcome]:
        """With ``batch_prompt``: what the last call asked (LM calls, rounds, votes), per prompt layout."""
        return self._batches

    @property
    def margin_outcome(self) -> MarginOutcome | None:
        """With ``margins``: the margins the last call wrote and what they cost."""
        return self._margins

    @field_validator("output_schema", mode="before")
    @classmethod
    def _resolve(cls, v: Any) -> Any:
        return None if v is None else resolve_schema(v)

    @field_validator("signature")
    @classmethod
    def _parse_signature(cls, v: str | None) -> str | None:
        if v is not None:
            output_model(v)  # fails early, naming what it cannot read
        return v

    @field_serializer("output_schema")
    def _dump_schema(self, v: Any) -> Any:
        if isinstance(v, type) and issubclass(v, BaseModel):
            return schema_path(v) or v.model_json_schema()
        return v

    @model_validator(mode="after")
    def _one_constraint(self) -> Generate:
        given = [k for k in ("output_schema", "signature", "regex", "grammar", "choices") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of schema, signature, regex, grammar, choices; got {given}")
        if self.reason_first and not given:
            raise ValueError("reason_first needs something to fill afterwards: schema, signature, regex, grammar or choices")
        if self.batch_prompt is not None and (self.reason_first or set(given) - {"regex", "choices"}):
            raise ValueError("batch_prompt answers one line per item: use it with free text, choices or a regex")
        return self

    def config(self) -> dict[str, Any]:
        out = super().config()
        schema = out.pop("output_schema", None)
        return {**out, "schema": schema} if schema is not None else out

    def target(self) -> Any:
        """The pydantic model or JSON schema the output must match, or None."""
        if self.signature is not None:
            return output_model(self.signature)
        return self.output_schema

    @property
    def structured(self) -> bool:
        return any(getattr(self, k) is not None for k in ("output_schema", "signature", "regex", "grammar", "choices"))

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            _ensure_prompt(r, self.signature)
        if self.margins is not None:
            self._margins = margin_records(self, records, self.margins)
        if self.batch_prompt is not None:
            self._batches = generate_records(self, records, self.batch_prompt)
            return records
        lm, target = self.reuse_lm(records), self.target()
        prompts: list[Prompt] = [r.prompt for r in records]  # type: ignore[misc]
        if self.reason_first:
            thoughts = lm.generate([_extend_answer(p, self.reasoning_prompt) for p in prompts],
                                   max_tokens=self.reasoning_tokens, temperature=self.temperature,
                                   top_p=self.top_p, seed=self.seed, chat=self.chat, kv_reuse=self.kv_reuse)
            for r, t in zip(records, thoughts):
                r.reasoning = t.text.strip()
            prompts = [_extend_answer(p, f"{self.reasoning_prompt} {r.reasoning}\n\nSo the answer is:")
                       for p, r in zip(prompts, records)]
        gens = lm.generate(prompts, max_tokens=self.max_tokens or (512 if self.structured else 64),
                           temperature=self.temperature, top_p=self.top_p, stop=self.stop, seed=self.seed,
                           chat=self.chat, json_schema=target, regex=self.regex, grammar=self.grammar,
                           choices=self.choices, kv_reuse=self.kv_reuse, prefill=self.prefill)
        for r, g in zip(records, gens):
            r.generation, r.usage = g, g.usage
            r.output = _parse(g.text, target) if target is not None else g.text if self.structured else g.text.strip()
        return records


def _extend_answer(prompt: Prompt, text: str) -> Prompt:
    """The prompt with ``text`` added to its answer prefix (what the model continues)."""
    prefix = prompt.get(SegmentKind.answer_prefix)
    return prompt.with_segment(SegmentKind.answer_prefix, f"{prefix} {text}" if prefix else text)


def _parse(text: str, target: Any) -> Any:
    """The generated JSON as the target's object (None if it was cut short)."""
    try:
        data = json.loads(text)
        return target.model_validate(data) if isinstance(target, type) else data
    except (json.JSONDecodeError, ValidationError):
        return None


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

    ``batch_prompt``: generate the labels of many inputs in one prompt instead, one numbered line
    each, constrained to the label words and voted over orders (BatchPrompt; no calibration).
    """

    labels: list[str]
    verbalizers: dict[str, str] = Field(default_factory=dict)
    calibrate: bool = True
    content_free: list[str] = Field(default_factory=lambda: ["N/A", "", "[MASK]"])
    input_key: str = "text"
    batch_prompt: BatchPrompt | None = None
    _batches: list[BatchOutcome] = PrivateAttr(default_factory=list)

    @property
    def batch_outcomes(self) -> list[BatchOutcome]:
        """With ``batch_prompt``: what the last call asked (LM calls, rounds, votes), per prompt layout."""
        return self._batches

    @model_validator(mode="after")
    def _check(self) -> Classify:
        if len(self.labels) < 2:
            raise ValueError("classify needs at least two labels")
        if any(not lab.strip() for lab in self.labels):
            raise ValueError(f"classify labels must not be empty; labels: {self.labels}")
        dup = sorted({lab for lab in self.labels if self.labels.count(lab) > 1})
        if dup:
            raise ValueError(f"duplicate labels {dup}; each label must be given once")
        unknown = set(self.verbalizers) - set(self.labels)
        if unknown:
            raise ValueError(f"verbalizers for unknown labels {sorted(unknown)}; labels: {self.labels}")
        # Labels scored by the same words would tie on every input, and an empty word scores nothing.
        words = [w.strip() for w in self.words()]
        if not all(words):
            raise ValueError(f"empty verbalizers for labels {[lab for lab, w in zip(self.labels, words) if not w]}")
        same = sorted({w for w in words if words.count(w) > 1})
        if same:
            raise ValueError(f"labels {[lab for lab, w in zip(self.labels, words) if w in same]} share the "
                             f"verbalizer(s) {same}; each label needs words of its own")
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
        rows = self.lm().score_many(self.content_free_prompts(records), self.words(), chat=self.chat,
                                    kv_reuse=self.kv_reuse)
        n, by_layout = len(self.content_free), {}
        for j, key in enumerate(layouts):
            probs = [[math.exp(x) for x in self._log_probs(row)] for row in rows[j * n : (j + 1) * n]]
            by_layout[key] = [math.log(sum(col) / len(col)) for col in zip(*probs)]
        return [by_layout[_layout_key(r)] for r in records]

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            _ensure_prompt(r)
        if self.batch_prompt is not None:
            self._batches = classify_records(self, records, self.batch_prompt)
            return records
        rows, usages = self.reuse_lm(records).score_with_usage(
            [r.prompt for r in records], self.words(), chat=self.chat, kv_reuse=self.kv_reuse)  # type: ignore[misc]
        biases = self.biases(records) if self.calibrate and records else [[0.0] * len(self.labels)] * len(records)
        for r, row, bias, usage in zip(records, rows, biases, usages):
            r.usage = usage
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
