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
from promptkit.metrics import Metric, bootstrap_ci
from promptkit.pipeline import Pipeline, Record, Stage
from promptkit.stages import Classify, Generate, LMStage
from promptkit.types import Example

from .errors import BudgetExhausted, OptimizerError


class CandidateScore(BaseModel):
    """One candidate's result on (part of) the evaluation set."""

    name: str
    score: float  # mean metric
    soft: float  # mean probability of the gold label (classify), else the metric: breaks ties
    n: int
    seconds: float
    settings: dict[str, Any] = Field(default_factory=dict)
    scores: list[float] = Field(default_factory=list, repr=False)  # per example, in the order of ``indices``
    indices: list[int] = Field(default_factory=list, repr=False)  # positions in the evaluation set

    @property
    def key(self) -> tuple[float, float]:
        return (self.score, self.soft)

    @property
    def ci(self) -> tuple[float, float]:
        """95 % bootstrap interval of the score (seeded)."""
        return bootstrap_ci(self.scores) if self.scores else (self.score, self.score)

    def on(self, indices: Sequence[int]) -> list[float]:
        """This candidate's scores on the given evaluation-set positions (all of which it was scored on)."""
        at = dict(zip(self.indices, self.scores))
        return [at[i] for i in indices]

    @classmethod
    def merge(cls, parts: Sequence[CandidateScore]) -> CandidateScore:
        """One result from a candidate's scores on disjoint parts of the evaluation set."""
        n = sum(p.n for p in parts)
        first = parts[0]
        return cls(name=first.name, score=sum(p.score * p.n for p in parts) / n,
                   soft=sum(p.soft * p.n for p in parts) / n, n=n, seconds=sum(p.seconds for p in parts),
                   settings=first.settings, scores=[s for p in parts for s in p.scores],
                   indices=[i for p in parts for i in p.indices])


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
    evaluations and proposals together. A metric call is one example scored by
    the metric (``metric_calls``; GEPA's budget unit).
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
        self.metric_calls = 0
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
                 examples: Sequence[Example] | None = None,
                 indices: Sequence[int] | None = None) -> list[CandidateScore]:
        """Score each ``(name, pipeline, settings)``; results come back in the given order.

        On the evaluation set, or on its positions ``indices``, or on other ``examples``.
        Raises :class:`BudgetExhausted` (before any LM call) if the budget cannot pay for them all.
        """
        if indices is not None:
            exs, idx = [self.examples[i] for i in indices], list(indices)
        elif examples is not None:
            exs, idx = list(examples), []
        else:
            exs, idx = self.examples, list(range(len(self.examples)))
        if self.max_calls is not None and self.calls + len(exs) * len(candidates) > self.max_calls:
            raise BudgetExhausted(f"{len(candidates)} candidates on {len(exs)} examples exceed the budget "
                                  f"of {self.max_calls} LM calls ({self.calls} used)")
        prepared = [(i, *self._prepare(pipe, exs)) for i, (_, pipe, _) in enumerate(candidates)]
        prepared.sort(key=lambda p: p[3])  # rendered prompt of the first example: shared prefixes adjacent
        results: dict[int, CandidateScore] = {}
        for i, records, stage, _ in prepared:
            name, _, settings = candidates[i]
            results[i] = self._evaluate_prepared(name, settings, records, stage, exs, idx)[1]
        return [results[i] for i in range(len(candidates))]

    def trace(self, name: str, pipeline: Pipeline, examples: Sequence[Example],
              settings: dict[str, Any] | None = None) -> tuple[list[Record], CandidateScore]:
        """Run and score one pipeline on ``examples``, returning its records too (what it answered)."""
        exs = list(examples)
        records, stage, _ = self._prepare(pipeline, exs)
        return self._evaluate_prepared(name, settings or {}, records, stage, exs, [])

    def _evaluate_prepared(self, name: str, settings: dict[str, Any], records: list[Record], stage: LMStage,
                           exs: list[Example], idx: list[int]) -> tuple[list[Record], CandidateScore]:
        self.charge(len(records))
        t0 = time.perf_counter()
        records = self._run_lm(stage, records)
        return records, self._score(name, records, exs, settings, time.perf_counter() - t0, idx)

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
               seconds: float, indices: list[int]) -> CandidateScore:
        scores, soft = [], []
        for rec, ex in zip(records, exs):
            try:
                s = float(self.metric(rec.output, ex.output))
            except Exception as e:  # a broken metric must name the example it broke on
                raise OptimizerError(f"metric {self.metric_name!r} raised on example {ex.inputs} "
                                     f"(prediction {rec.output!r}, gold {ex.output!r}): {e!r}") from e
            if not math.isfinite(s):  # NaN or an infinity would swamp the mean and every comparison
                raise OptimizerError(f"metric {self.metric_name!r} returned {s} on example {ex.inputs}; "
                                     "a metric must return a finite number")
            scores.append(s)
            soft.append(gold_probability(rec, ex, s))
        n = len(scores)
        self.metric_calls += n
        return CandidateScore(name=name, score=sum(scores) / n, soft=sum(soft) / n, n=n, seconds=seconds,
                              settings=settings, scores=scores, indices=indices)

    # -- token accounting ---------------------------------------------------------------
    def _account(self, stage: LMStage, records: list[Record]) -> None:
        """Predict prefilled tokens for the requests ``stage`` sends for ``records`` (mirrors the engine)."""
        if not self.tokenizes:
            return
        be = self.lm.backend
        prompts = [r.prompt for r in records]
        if isinstance(stage, Classify):
            self._account_scores(stage, prompts, be)
            if stage.calibrate and records:
                self._account_scores(stage, stage.content_free_prompts(records), be)
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


class CostEstimate(BaseModel):
    """What a search will cost at most, from the budget and token counts of the prompts (before any LM call)."""

    metric_calls: int  # examples scored, at most
    lm_calls: int  # prompts sent to the model, at most (scored examples plus proposals)
    proposals: int  # LM generations that propose candidates, at most
    candidates: int  # candidate prompts scored, at most
    prompt_tokens: int  # prompt tokens of all those calls (what the cache-off engine prefills)
    shared_prefix_tokens: int  # tokens one candidate's prompts share (instruction, fixed exemplars)
    prefilled_tokens: int  # expected with the prefix cache: each candidate's shared prefix once

    def describe(self) -> str:
        share = self.prefilled_tokens / max(1, self.prompt_tokens)
        return (f"at most {self.lm_calls} LM calls ({self.metric_calls} scored examples, {self.proposals} proposals, "
                f"{self.candidates} candidates); about {self.prompt_tokens:,} prompt tokens, of which each candidate's "
                f"{self.shared_prefix_tokens} shared-prefix tokens are prefilled once: about "
                f"{self.prefilled_tokens:,} tokens prefilled ({share:.0%})")


def estimate_cost(sched: PrefixScheduler, pipeline: Pipeline, metric_calls: int, proposals: int, candidates: int,
                  proposal_tokens: int = 0, sample: int = 16) -> CostEstimate:
    """Cost of ``metric_calls`` scored examples over ``candidates`` candidates like ``pipeline``, plus
    ``proposals`` generations of about ``proposal_tokens`` prompt tokens each.

    Token counts come from the pipeline's prompts for the first ``sample`` evaluation examples (the
    tokenizer only, no model call); without a tokenizer (a remote backend) they are 0.
    """
    records, stage, _ = sched._prepare(pipeline, sched.examples[:sample])
    per_call, shared = 0.0, 0
    if sched.tokenizes and records and records[0].prompt is not None:
        be = sched.lm.backend
        ids = [be.encode(sched.lm.render(r.prompt, chat=stage.chat)) for r in records]
        shared = len(ids[0])
        for other in ids[1:]:  # the prefix every sampled prompt shares
            common = next((j for j, (a, b) in enumerate(zip(ids[0], other)) if a != b), min(len(ids[0]), len(other)))
            shared = min(shared, common)
        per_call = sum(map(len, ids)) / len(ids)
        if isinstance(stage, Classify):  # each label is scored as a continuation of the prompt
            per_call += sum(len(be.encode_continuation(w)) for w in stage.words())
    prompt_tokens = int(metric_calls * per_call + proposals * proposal_tokens)
    prefilled = int(metric_calls * (per_call - shared) + min(candidates, metric_calls) * shared
                    + proposals * proposal_tokens)
    return CostEstimate(metric_calls=metric_calls, lm_calls=metric_calls + proposals, proposals=proposals,
                        candidates=candidates, prompt_tokens=prompt_tokens, shared_prefix_tokens=shared,
                        prefilled_tokens=prefilled)


def gold_probability(record: Record, example: Example, fallback: float) -> float:
    """Normalized probability of the gold label among the scored labels, or ``fallback``."""
    scores = record.label_scores
    if not scores or str(example.output) not in scores:
        return fallback
    top = max(scores.values())
    z = sum(math.exp(v - top) for v in scores.values())
    return math.exp(scores[str(example.output)] - top) / z
