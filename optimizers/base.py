"""The optimizer protocol, its report, and the pipeline edits every optimizer shares."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from promptkit.metrics import Metric, get_metric
from promptkit.pipeline import Pipeline, Stage
from promptkit.stages import BuildPrompt
from promptkit.types import Example

from .errors import BudgetExhausted, OptimizerError
from .schedule import CandidateScore, PrefixScheduler, split_pipeline

Candidate = tuple[str, Pipeline, dict[str, Any]]


class Report(BaseModel):
    """What an optimizer tried and what it cost."""

    optimizer: str
    metric: str
    baseline_score: float | None = None
    best_score: float
    best: dict[str, Any] = Field(default_factory=dict)
    candidates: list[CandidateScore] = Field(default_factory=list)
    lm_calls: int = 0
    budget_exhausted: bool = False
    tokens_requested: int = 0  # engine: prompt tokens asked for (what the cache-off engine prefills)
    tokens_prefilled: int = 0  # engine: prompt tokens computed
    tokens_cached: int = 0  # engine: prompt tokens served from the prefix cache
    evictions: int = 0
    expected_prefilled: int | None = None  # predicted from token counts by the scheduler
    naive_tokens: int | None = None  # predicted: every prompt token of every request
    seconds: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def prefill_ratio(self) -> float:
        """Prefilled tokens over what the same calls would prefill with the cache off."""
        naive = self.tokens_requested or self.naive_tokens or 0
        return self.tokens_prefilled / naive if naive else 1.0

    def summary(self) -> str:
        base = "?" if self.baseline_score is None else f"{self.baseline_score:.3f}"
        return (f"{self.optimizer}: {self.metric} {base} -> {self.best_score:.3f} "
                f"({len(self.candidates)} candidates, {self.lm_calls} LM calls, "
                f"prefilled {self.tokens_prefilled}/{self.tokens_requested} tokens, {self.seconds:.1f} s)")


class Optimizer(BaseModel):
    """Base class: ``compile(pipeline, trainset, metric, valset=None) -> (Pipeline, Report)``.

    Subclasses implement :meth:`search`, which proposes candidate pipelines and
    evaluates them with ``self._scheduler``; the baseline (the pipeline as given)
    is always evaluated first, so the result never scores below it on the
    validation set. Without a ``valset`` the trainset is split in two (seeded):
    demonstrations come from one half, scores from the other.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    seed: int = 0
    max_calls: int | None = None
    _scheduler: Any = PrivateAttr(None)
    _rng: random.Random = PrivateAttr(default_factory=random.Random)
    _tried: list[CandidateScore] = PrivateAttr(default_factory=list)
    _exhausted: bool = PrivateAttr(False)
    _info: dict[str, Any] = PrivateAttr(default_factory=dict)  # optimizer-specific findings for the report

    @field_validator("max_calls")
    @classmethod
    def _positive_budget(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"max_calls must be a positive number of LM calls or None (no limit); got {v}")
        return v

    def compile(self, pipeline: Pipeline | Stage, trainset: Sequence[Example], metric: str | Metric,
                valset: Sequence[Example] | None = None) -> tuple[Pipeline, Report]:
        """Search for a better pipeline; return it with a :class:`Report`."""
        pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
        _, lm_stage = split_pipeline(pipe)
        prompt_stage(pipe)  # every optimizer edits (or feeds) the prompt stage
        train, val = split_data(trainset, valset, self.seed)
        fn = get_metric(metric)
        name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
        lm = lm_stage.lm()
        self._scheduler = PrefixScheduler(val, fn, lm, self.max_calls, name)
        self._rng = random.Random(self.seed)
        self._tried, self._info = [], {}
        before, t0 = lm.stats(), time.perf_counter()
        self._exhausted = False
        try:
            base = self.evaluate([("baseline", pipe, {})])[0]
        except BudgetExhausted:
            raise OptimizerError(f"max_calls={self.max_calls} cannot pay for one evaluation of "
                                 f"{len(val)} validation examples") from None
        best_pipe, best = pipe, base
        try:
            for cand_pipe, res in self.search(pipe, train):
                if res.key > best.key:
                    best_pipe, best = cand_pipe, res
        except BudgetExhausted:
            self._exhausted = True
        after = lm.stats()
        delta = {k: int(after.get(k, 0)) - int(before.get(k, 0))
                 for k in ("tokens_requested", "tokens_prefilled", "tokens_cached", "evictions")}
        sched = self._scheduler
        report = Report(optimizer=type(self).__name__, metric=name, baseline_score=base.score,
                        best_score=best.score, best={"name": best.name, **best.settings},
                        candidates=self._tried, lm_calls=sched.calls, budget_exhausted=self._exhausted,
                        expected_prefilled=sched.expected_prefilled if sched.tokenizes else None,
                        naive_tokens=sched.naive_tokens if sched.tokenizes else None,
                        seconds=time.perf_counter() - t0, extra=self.extra(), **delta)
        return best_pipe, report

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        """Yield ``(candidate pipeline, its score)`` pairs; the best is kept."""
        raise NotImplementedError

    def extra(self) -> dict[str, Any]:
        """Optimizer-specific findings for the report."""
        return dict(self._info)

    def evaluate(self, candidates: Sequence[Candidate]) -> list[CandidateScore]:
        """Score candidates on the validation set (prefix-aware order), recording them.

        When the budget cannot pay for all of them, the first ones that fit are
        scored (the result is shorter) and the search ends after this round.
        """
        sched = self._scheduler
        if sched.max_calls is not None:
            room = (sched.max_calls - sched.calls) // len(sched.examples)
            if room <= 0:
                raise BudgetExhausted(f"budget of {sched.max_calls} LM calls spent")
            if room < len(candidates):
                candidates, self._exhausted = list(candidates)[:room], True
        results = sched.evaluate(candidates)
        self._tried.extend(results)
        return results

    def evaluate_pipes(self, candidates: Sequence[Candidate]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        """:meth:`evaluate`, yielding each scored pipeline with its score."""
        for (_, pipe, _), res in zip(candidates, self.evaluate(candidates)):
            yield pipe, res


def split_data(trainset: Sequence[Example], valset: Sequence[Example] | None,
               seed: int) -> tuple[list[Example], list[Example]]:
    """Check the data; without a valset, split the trainset in two halves (seeded)."""
    train = list(trainset) if trainset is not None else []
    if not train:
        raise OptimizerError("the trainset is empty: an optimizer needs labelled examples to learn from")
    for i, ex in enumerate(train):
        if not isinstance(ex, Example):
            raise OptimizerError(f"trainset[{i}] is a {type(ex).__name__}, not a promptkit Example")
        if ex.output is None:
            raise OptimizerError(f"trainset[{i}] has no gold output (field {ex.output_key!r}): {ex.inputs}")
    if valset is not None:
        val = list(valset)
        if not val:
            raise OptimizerError("the valset is empty; pass None to split the trainset instead")
        return train, val
    if len(train) < 2:
        raise OptimizerError("with no valset the trainset is split in two, so it needs at least 2 examples")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    half = len(train) // 2
    return [train[i] for i in order[half:]], [train[i] for i in order[:half]]


# -- pipeline edits ------------------------------------------------------------------------
def prompt_stage(pipeline: Pipeline) -> tuple[int, BuildPrompt]:
    """The pipeline's ``prompt`` stage and its index."""
    for i, s in enumerate(pipeline.stages):
        if isinstance(s, BuildPrompt):
            return i, s
    names = [s.stage_name for s in pipeline.stages]
    raise OptimizerError(f"the pipeline has no 'prompt' stage to optimize; its stages are {names}")


def with_prompt(pipeline: Pipeline, **updates: Any) -> Pipeline:
    """A copy of ``pipeline`` whose prompt stage has ``updates`` applied (validated)."""
    i, stage = prompt_stage(pipeline)
    new = type(stage)(**{**stage.model_dump(), **updates})
    return replace_stage(pipeline, i, new)


def replace_stage(pipeline: Pipeline, i: int, stage: Stage, insert: bool = False) -> Pipeline:
    stages = list(pipeline.stages)
    if insert:
        stages.insert(i, stage)
    else:
        stages[i] = stage
    return Pipeline(*stages, name=pipeline.name, input_key=pipeline.input_key)


def as_demos(examples: Sequence[Example]) -> list[dict[str, Any]]:
    """Examples as the ``exemplars`` setting of a prompt stage."""
    return [dict(ex.fields) for ex in examples]


def sample_demos(pool: Sequence[Example], k: int, rng: random.Random, balanced: bool = True) -> list[Example]:
    """``k`` distinct examples; with ``balanced``, round-robin over gold outputs so no label dominates."""
    k = min(k, len(pool))
    if not balanced:
        return rng.sample(list(pool), k)
    by_label: dict[str, list[Example]] = {}
    for ex in pool:
        by_label.setdefault(str(ex.output), []).append(ex)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
    rng.shuffle(queues)
    out: list[Example] = []
    while len(out) < k:
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop())
    rng.shuffle(out)
    return out
