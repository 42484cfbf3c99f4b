"""The optimizer protocol, its report, and the pipeline edits every optimizer shares."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from promptkit.metrics import Metric, format_ci, get_metric
from promptkit.pipeline import Pipeline, Stage
from promptkit.stages import BuildPrompt
from promptkit.types import Example

from .errors import BudgetExhausted, OptimizerError
from .racing import Racing, race
from .schedule import CandidateScore, PrefixScheduler, split_pipeline

if TYPE_CHECKING:
    from promptkit.runs.tracker import Tracker

Candidate = tuple[str, Pipeline, dict[str, Any]]
USAGE_COUNTERS = ("tokens_requested", "tokens_prefilled", "tokens_cached")


class Report(BaseModel):
    """What an optimizer tried and what it cost: seed, calls, tokens, seconds, and the scores' 95 % intervals."""

    optimizer: str
    metric: str
    seed: int = 0
    baseline_score: float | None = None
    baseline_ci: tuple[float, float] | None = None
    best_score: float
    best_ci: tuple[float, float] | None = None
    best: dict[str, Any] = Field(default_factory=dict)
    candidates: list[CandidateScore] = Field(default_factory=list)
    lm_calls: int = 0
    metric_calls: int = 0  # examples scored by the metric (every candidate on every example it was run on)
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
        def fmt(score: float | None, ci: tuple[float, float] | None) -> str:
            return "?" if score is None else format_ci(score, ci) if ci else f"{score:.3f}"

        return (f"{self.optimizer} (seed {self.seed}): {self.metric} {fmt(self.baseline_score, self.baseline_ci)} -> "
                f"{fmt(self.best_score, self.best_ci)} on validation (95 % CI); {len(self.candidates)} candidates, "
                f"{self.lm_calls} LM calls, prefilled {self.tokens_prefilled} of {self.tokens_requested} prompt tokens, "
                f"{self.seconds:.1f} s")


class Optimizer(BaseModel):
    """Base class: ``compile(pipeline, trainset, metric, valset=None) -> (Pipeline, Report)``.

    Subclasses implement :meth:`search`, which proposes candidate pipelines and
    evaluates them with ``self._scheduler``; the baseline (the pipeline as given)
    is always evaluated first, so the result never scores below it on the
    validation set. Without a ``valset`` the trainset is split in two (seeded):
    demonstrations come from one half, scores from the other. With ``racing``,
    a batch of candidates is raced (:mod:`optimizers.racing`) instead of each
    being scored on the whole validation set; only candidates scored on the
    whole set can be chosen. ``seed`` fixes every random choice. ``executor``
    (``RayExecutor(workers=N)`` from :mod:`promptkit.distributed`) runs the
    candidates' LM calls on engine actors, each candidate's prefix on one worker;
    the scores are the same as here.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    seed: int = 0
    max_calls: int | None = None
    racing: Racing | None = None
    executor: Any = Field(default=None, exclude=True)  # where candidates are evaluated; None: in this process
    _scheduler: Any = PrivateAttr(None)
    _rng: random.Random = PrivateAttr(default_factory=random.Random)
    _tried: list[CandidateScore] = PrivateAttr(default_factory=list)
    _exhausted: bool = PrivateAttr(False)
    _best: CandidateScore | None = PrivateAttr(None)  # best on the whole validation set so far
    _info: dict[str, Any] = PrivateAttr(default_factory=dict)  # optimizer-specific findings for the report

    @field_validator("max_calls")
    @classmethod
    def _positive_budget(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"max_calls must be a positive number of LM calls or None (no limit); got {v}")
        return v

    def compile(self, pipeline: Pipeline | Stage, trainset: Sequence[Example], metric: str | Metric,
                valset: Sequence[Example] | None = None, tracker: Tracker | None = None) -> tuple[Pipeline, Report]:
        """Search for a better pipeline; return it with a :class:`Report`.

        ``tracker`` (a :class:`~promptkit.runs.Tracker`, e.g. ``MlflowTracker()``) records the search once
        it is over: every candidate with its settings, interval, rung, calls and tokens, and the winner.
        """
        pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
        _, lm_stage = split_pipeline(pipe)
        prompt_stage(pipe)  # every optimizer edits (or feeds) the prompt stage
        train, val = split_data(trainset, valset, self.seed)
        fn = get_metric(metric)
        name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
        lm = lm_stage.lm()
        session = tracker.start_search(self, pipe, len(train), len(val)) if tracker is not None else None
        scheduler = MeteredScheduler if session is not None else PrefixScheduler
        self._scheduler = scheduler(val, fn, lm, self.max_calls, name)
        if self.executor is not None:  # candidate evaluations run there; proposals stay on ``lm``
            self._scheduler = self.executor.scheduler(self._scheduler)
        stats = getattr(self._scheduler, "stats", lm.stats)  # with an executor, its workers' counters too
        self._rng = random.Random(self.seed)
        self._tried, self._info = [], {}
        before, t0 = stats(), time.perf_counter()
        self._exhausted = False
        self.before_search(pipe, train, val)
        try:
            base = self.evaluate([("baseline", pipe, {})])[0]
        except BudgetExhausted:
            raise OptimizerError(f"max_calls={self.max_calls} cannot pay for one evaluation of "
                                 f"{len(val)} validation examples") from None
        best_pipe, self._best = pipe, base
        try:
            for cand_pipe, res in self.search(pipe, train):
                if res.n == len(val) and res.key > self._best.key:  # raced-out candidates saw fewer examples
                    best_pipe, self._best = cand_pipe, res
        except BudgetExhausted:
            self._exhausted = True
        best = self._best
        after = stats()
        delta = {k: int(after.get(k, 0)) - int(before.get(k, 0))
                 for k in ("tokens_requested", "tokens_prefilled", "tokens_cached", "evictions")}
        sched = self._scheduler
        report = Report(optimizer=type(self).__name__, metric=name, seed=self.seed, baseline_score=base.score,
                        baseline_ci=base.ci, best_score=best.score, best_ci=best.ci,
                        best={"name": best.name, **best.settings}, candidates=self._tried, lm_calls=sched.calls,
                        metric_calls=sched.metric_calls, budget_exhausted=self._exhausted,
                        expected_prefilled=sched.expected_prefilled if sched.tokenizes else None,
                        naive_tokens=sched.naive_tokens if sched.tokenizes else None,
                        seconds=time.perf_counter() - t0, extra=self.extra(), **delta)
        if session is not None:
            session.finish(report, best_pipe, sched.usage)
        return best_pipe, report

    def before_search(self, pipeline: Pipeline, train: list[Example], val: list[Example]) -> None:
        """Called once the scheduler is ready, before any LM call (cost estimates go here)."""

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        """Yield ``(candidate pipeline, its score)`` pairs; the best scored on the whole validation set is kept."""
        raise NotImplementedError

    def extra(self) -> dict[str, Any]:
        """Optimizer-specific findings for the report."""
        return dict(self._info)

    def room(self, n_examples: int) -> int:
        """How many candidates the call budget can still score on ``n_examples`` examples."""
        sched = self._scheduler
        if sched.max_calls is None:
            return 1 << 30
        return max(0, (sched.max_calls - sched.calls) // max(1, n_examples))

    def evaluate(self, candidates: Sequence[Candidate]) -> list[CandidateScore]:
        """Score candidates on the validation set (prefix-aware order), recording them.

        When the budget cannot pay for all of them, the first ones that fit are
        scored (the result is shorter) and the search ends after this round.
        """
        room = self.room(len(self._scheduler.examples))
        if room <= 0:
            raise BudgetExhausted(f"budget of {self._scheduler.max_calls} LM calls spent")
        if room < len(candidates):
            candidates, self._exhausted = list(candidates)[:room], True
        results = self._scheduler.evaluate(candidates)
        self._tried.extend(results)
        return results

    def evaluate_pipes(self, candidates: Sequence[Candidate]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        """Score candidates, yielding each scored pipeline with its result, in the given order.

        With ``racing`` (and more than one candidate) they are raced: a result
        may cover part of the validation set only (``res.n``).
        """
        if self.racing is None or len(candidates) < 2:
            for (_, pipe, _), res in zip(candidates, self.evaluate(candidates)):
                yield pipe, res
            return
        if self.room(min(self.racing.min_examples, len(self._scheduler.examples))) <= 0:
            raise BudgetExhausted(f"budget of {self._scheduler.max_calls} LM calls spent")
        results = race(self, candidates, self._best)
        for i in sorted(results):
            yield candidates[i][1], results[i]


class MeteredScheduler(PrefixScheduler):
    """A :class:`PrefixScheduler` that also counts each candidate's LM calls and engine tokens (``usage``,
    by candidate name), for a tracker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage: dict[str, dict[str, float]] = {}

    def _evaluate_prepared(self, name: str, settings: dict[str, Any], records: list[Any], stage: Any,
                           exs: list[Example], idx: list[int]) -> tuple[list[Any], CandidateScore]:
        before = self.lm.stats()
        out = super()._evaluate_prepared(name, settings, records, stage, exs, idx)
        after = self.lm.stats()
        row = self.usage.setdefault(name, dict.fromkeys(("lm_calls", *USAGE_COUNTERS), 0))
        row["lm_calls"] += len(records)
        for key in USAGE_COUNTERS:
            row[key] += int(after.get(key, 0)) - int(before.get(key, 0))
        return out


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


def with_scorer(pipeline: Pipeline, settings: dict[str, Any]) -> Pipeline:
    """A copy of ``pipeline`` whose final LM stage has ``settings`` applied (``{"calibrate": False}``...)."""
    if not settings:
        return pipeline
    stage = pipeline.stages[-1]
    return replace_stage(pipeline, len(pipeline.stages) - 1, type(stage)(**{**stage.model_dump(), **settings}))


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
