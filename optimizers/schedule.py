"""Prefix-aware evaluation: score K candidate pipelines on N examples so shared prefixes prefill once.

Prompts are laid out instruction → exemplars → input (the segment order of
:class:`promptkit.prompt.PromptTemplate`), so every prompt of one candidate
shares the candidate's prefix. The scheduler runs all N examples of one
candidate together (in chunks the engine admits at once) and visits
candidates in sorted order of their rendered prompts, so candidates sharing a
longer prefix (same instruction, same first exemplars) run back to back while
that prefix is still cached.

It also predicts the engine's work from token counts: a token-prefix trie of
everything already prefilled gives, per request, the tokens the radix cache
cannot serve. ``naive`` is what the same calls cost with the cache off (every
prompt token prefilled).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from promptkit.lm import LM
from promptkit.metrics import Metric
from promptkit.pipeline import Pipeline, Record, Stage
from promptkit.stages import Classify, Generate, LMStage
from promptkit.types import Example

from .errors import BudgetExhausted, OptimizerError


class CandidateScore(BaseModel):
    """One candidate's result on the evaluation set."""

    name: str
    score: float  # mean metric
    soft: float  # mean probability of the gold label (classify), else the metric: breaks ties
    n: int
    seconds: float
    settings: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> tuple[float, float]:
        return (self.score, self.soft)


class PrefixTrie:
    """Token prefixes already prefilled (what an unbounded radix cache would hold)."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}
        self.size = 0

    def match(self, tokens: Sequence[int]) -> int:
        node, n = self.root, 0
        for t in tokens:
            node = node.get(t)  # type: ignore[assignment]
            if node is None:
                break
            n += 1
        return n

    def insert(self, tokens: Sequence[int]) -> None:
        node = self.root
        for t in tokens:
            if t not in node:
                node[t] = {}
                self.size += 1
            node = node[t]

    def request(self, tokens: Sequence[int], limit: int, keep: int) -> int:
        """Tokens a request prefills: all but the cached prefix (at most ``limit`` tokens are served);
        its first ``keep`` tokens stay cached afterwards."""
        matched = min(self.match(tokens), limit)
        self.insert(tokens[:keep])
        return len(tokens) - matched


def split_pipeline(pipeline: Pipeline) -> tuple[list[Stage], LMStage]:
    """The stages before the LM call, and the LM stage that ends the pipeline."""
    if not pipeline.stages or not isinstance(pipeline.stages[-1], LMStage):
        names = [s.stage_name for s in pipeline.stages]
        raise OptimizerError(f"the pipeline must end with an LM stage ('classify' or 'generate'); it has {names}")
    return list(pipeline.stages[:-1]), pipeline.stages[-1]  # type: ignore[return-value]


class PrefixScheduler:
    """Evaluates candidate pipelines on a fixed example set, in prefix-sharing order, under a call budget.

    One LM call is one prompt sent to the model (a classified input with all its
    labels scored, or one generation). ``max_calls`` bounds the calls of all
    evaluations and proposals together.
    """

    def __init__(self, examples: Sequence[Example], metric: Metric, lm: LM, max_calls: int | None = None,
                 metric_name: str = "metric") -> None:
        if not examples:
            raise OptimizerError("nothing to evaluate on: the evaluation set is empty")
        self.examples = list(examples)
        self.metric, self.metric_name = metric, metric_name
        self.lm = lm
        self.max_calls = max_calls
        self.calls = 0
        self.trie = PrefixTrie()
        self.expected_prefilled = 0
        self.naive_tokens = 0
        self.tokenizes = hasattr(lm.backend, "encode") and hasattr(lm.backend, "encode_continuation")

    # -- budget -------------------------------------------------------------------
    def charge(self, calls: int) -> None:
        """Count ``calls`` LM calls, or raise :class:`BudgetExhausted` if they do not fit the budget."""
        if self.max_calls is not None and self.calls + calls > self.max_calls:
            raise BudgetExhausted(f"budget of {self.max_calls} LM calls spent ({self.calls} used)")
        self.calls += calls

    # -- evaluation -----------------------------------------------------------------
    def evaluate(self, candidates: Sequence[tuple[str, Pipeline, dict[str, Any]]],
                 examples: Sequence[Example] | None = None) -> list[CandidateScore]:
        """Score each ``(name, pipeline, settings)``; results come back in the given order.

        Raises :class:`BudgetExhausted` (before any LM call) if the budget cannot pay for them all.
        """
        exs = list(examples) if examples is not None else self.examples
        if self.max_calls is not None and self.calls + len(exs) * len(candidates) > self.max_calls:
            raise BudgetExhausted(f"{len(candidates)} candidates on {len(exs)} examples exceed the budget "
                                  f"of {self.max_calls} LM calls ({self.calls} used)")
        prepared = [(i, *self._prepare(pipe, exs)) for i, (_, pipe, _) in enumerate(candidates)]
        prepared.sort(key=lambda p: p[3])  # rendered prompt of the first example: shared prefixes adjacent
        results: dict[int, CandidateScore] = {}
        for i, records, stage, _ in prepared:
            name, _, settings = candidates[i]
            self.charge(len(records))
            t0 = time.perf_counter()
            records = self._run_lm(stage, records)
            res = self._score(name, records, exs, settings, time.perf_counter() - t0)
            results[i] = res
        return [results[i] for i in range(len(candidates))]

    def run(self, pipeline: Pipeline, examples: Sequence[Example]) -> list[Record]:
        """Run one pipeline on ``examples`` (charged to the budget) and return the records."""
        records, stage, _ = self._prepare(pipeline, list(examples))
        self.charge(len(records))
        return self._run_lm(stage, records)

    def generate(self, prompt: Any, chat: bool | None = None, **params: Any) -> Any:
        """One LM generation (a proposal), charged to the budget and counted in the token accounting."""
        self.charge(1)
        if self.tokenizes:
            ids = self.lm.backend.encode(self.lm.render(prompt, chat=chat))
            self.naive_tokens += len(ids)
            self.expected_prefilled += self.trie.request(ids, len(ids) - 1, len(ids))
        return self.lm.generate(prompt, chat=chat, **params)[0]

    def _prepare(self, pipeline: Pipeline, exs: list[Example]) -> tuple[list[Record], LMStage, str]:
        head, stage = split_pipeline(pipeline)
        records = [Record(inputs=ex.inputs) for ex in exs]
        for s in head:
            records = s.process(records)
        key = self.lm.render(records[0].prompt, chat=stage.chat) if records[0].prompt is not None else ""
        return records, stage, key

    def _run_lm(self, stage: LMStage, records: list[Record]) -> list[Record]:
        per_record = len(stage.labels) if isinstance(stage, Classify) else 1
        running = getattr(getattr(self.lm.backend, "engine", None), "max_running", 64)
        # Chunks the engine admits in one step: no request waits while a neighbour holds an uncached prefix.
        size = max(1, running // per_record - (1 if isinstance(stage, Classify) and stage.calibrate else 0))
        out: list[Record] = []
        for i in range(0, len(records), size):
            chunk = records[i : i + size]
            self._account(stage, chunk)
            out.extend(stage.process(chunk))
        return out

    def _score(self, name: str, records: list[Record], exs: list[Example], settings: dict[str, Any],
               seconds: float) -> CandidateScore:
        scores, soft = [], []
        for rec, ex in zip(records, exs):
            try:
                s = float(self.metric(rec.output, ex.output))
            except Exception as e:  # a broken metric must name the example it broke on
                raise OptimizerError(f"metric {self.metric_name!r} raised on example {ex.inputs} "
                                     f"(prediction {rec.output!r}, gold {ex.output!r}): {e!r}") from e
            if math.isnan(s):
                raise OptimizerError(f"metric {self.metric_name!r} returned NaN on example {ex.inputs}")
            scores.append(s)
            soft.append(gold_probability(rec, ex, s))
        n = len(scores)
        return CandidateScore(name=name, score=sum(scores) / n, soft=sum(soft) / n, n=n, seconds=seconds,
                              settings=settings)

    # -- token accounting ---------------------------------------------------------------
    def _account(self, stage: LMStage, records: list[Record]) -> None:
        """Predict prefilled tokens for the requests ``stage`` sends for ``records`` (mirrors the engine)."""
        if not self.tokenizes:
            return
        be = self.lm.backend
        prompts = [r.prompt for r in records]
        if isinstance(stage, Classify):
            if stage.calibrate and records:
                prompts_cf = _content_free_prompts(stage, records[0])
                self._account_scores(stage, prompts, be)
                self._account_scores(stage, prompts_cf, be)
                return
            self._account_scores(stage, prompts, be)
        elif isinstance(stage, Generate):
            reqs = sorted(be.encode(self.lm.render(p, chat=stage.chat)) for p in prompts)
            for ids in reqs:
                self.naive_tokens += len(ids)
                self.expected_prefilled += self.trie.request(ids, len(ids) - 1, len(ids))

    def _account_scores(self, stage: Classify, prompts: list[Any], be: Any) -> None:
        conts = [be.encode_continuation(w) for w in stage.words()]
        reqs = []
        for p in prompts:
            ctx = be.encode(self.lm.render(p, chat=stage.chat))
            reqs.extend((ctx + c, len(ctx)) for c in conts)
        for ids, n_ctx in sorted(reqs):
            self.naive_tokens += len(ids)
            self.expected_prefilled += self.trie.request(ids, n_ctx - 1, n_ctx)


def _content_free_prompts(stage: Classify, probe: Record) -> list[Any]:
    """The prompts :meth:`Classify.bias` scores (content-free inputs in the probe's layout)."""
    question = probe.prompt.get("question") or ""  # type: ignore[union-attr]
    text = str(probe.inputs.get(stage.input_key, ""))
    return [probe.prompt.with_segment("question", question.replace(text, cf) if text else cf)  # type: ignore[union-attr]
            for cf in stage.content_free]


def gold_probability(record: Record, example: Example, fallback: float) -> float:
    """Normalized probability of the gold label among the scored labels, or ``fallback``."""
    scores = record.label_scores
    if not scores or str(example.output) not in scores:
        return fallback
    top = max(scores.values())
    z = sum(math.exp(v - top) for v in scores.values())
    return math.exp(scores[str(example.output)] - top) / z
