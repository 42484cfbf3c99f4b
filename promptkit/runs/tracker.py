"""Trackers: what ``evaluate(..., tracker=)`` and ``Optimizer.compile(..., tracker=)`` hand their results to.

A :class:`Tracker` turns an evaluation or a search into a :class:`~promptkit.runs.schema.RunFile`
(kept as ``tracker.run``, written to ``results`` when given) at the end of the run;
:class:`~promptkit.runs.mlflow_tracker.MlflowTracker` also logs it to MLflow. The run
itself only pays for reading the engine's counters: everything is logged once it is over.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..metrics import paired_bootstrap_ci
from ..pipeline import Pipeline, Record
from .schema import (CandidateRow, EvalSection, HeldOut, ItemResult, ModelInfo, RetrievedDocument, RunFile,
                     SearchSection, Tokens, answer_rank)

# An optimizer and its report (optimizers.Optimizer, optimizers.Report): the core does not import the
# stage packages, so they are typed by what is read from them.
OptimizerLike = Any
SearchReport = Any

if TYPE_CHECKING:
    from ..evaluate import EvalResult
    from ..lm import LM

SCORER_KEYS = ("calibrate", "chat", "verbalizers", "content_free", "temperature", "max_tokens")


# -- the pipeline's models and their counters ------------------------------------------------
def pipeline_lms(pipeline: Pipeline) -> list[tuple[Any, LM]]:
    """Each distinct language model the pipeline's LM stages call, with the first stage that calls it."""
    from ..stages import LMStage

    seen: dict[int, tuple[Any, LM]] = {}
    for stage in pipeline.stages:
        if isinstance(stage, LMStage):
            lm = stage.lm()
            seen.setdefault(id(lm), (stage, lm))
    return list(seen.values())


def model_infos(pipeline: Pipeline) -> list[ModelInfo]:
    """Model, backend, weight format and engine settings of each model the pipeline calls."""
    infos = []
    for stage, lm in pipeline_lms(pipeline):
        stats = lm.stats()
        config = getattr(getattr(lm.backend, "engine", None), "config", None)
        engine = config.model_dump(mode="json") if isinstance(config, BaseModel) else {}
        infos.append(ModelInfo(model=lm.model, backend=stage.backend, weights=stats.get("weights"),
                               device=stats.get("device"), chat=lm.chat, engine=engine))
    return infos


class EngineMeter:
    """The prompt tokens a pipeline's models were asked for, prefilled and served from cache since it started."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.lms = [lm for _, lm in pipeline_lms(pipeline)]
        self.start = self.read()

    def read(self) -> Tokens:
        totals = Tokens()
        for lm in self.lms:
            stats = lm.stats()
            totals.requested += int(stats.get("tokens_requested", 0))
            totals.prefilled += int(stats.get("tokens_prefilled", 0))
            totals.cached += int(stats.get("tokens_cached", 0))
        return totals

    def delta(self) -> Tokens:
        now = self.read()
        return Tokens(requested=now.requested - self.start.requested, prefilled=now.prefilled - self.start.prefilled,
                      cached=now.cached - self.start.cached)


# -- building run sections ---------------------------------------------------------------------
def item_results(result: EvalResult, records: Sequence[Record] | None) -> list[ItemResult]:
    """Each example's result, with what its record holds: label scores, retrieved documents, token usage."""
    items = []
    for i, res in enumerate(result.results):
        item = ItemResult(index=i, inputs=res.inputs, gold=res.gold, prediction=_plain(res.prediction),
                          score=res.score)
        if records is not None and i < len(records):
            _describe_record(item, records[i])
        items.append(item)
    return items


def _describe_record(item: ItemResult, record: Record) -> None:
    item.label_scores = record.label_scores
    if record.documents:
        item.documents = [RetrievedDocument(id=d.id, rank=r, score=d.score) for r, d in enumerate(record.documents, 1)]
        item.answer_rank = answer_rank(record.documents, item.gold)
    usage = record.usage
    if usage is not None:
        item.prompt_tokens, item.cached_tokens = usage.prompt_tokens, usage.cached_tokens
        item.prefilled_tokens, item.completion_tokens = usage.prefilled_tokens, usage.completion_tokens
        item.first_token_seconds = usage.first_token_seconds


def _plain(value: Any) -> Any:
    """A prediction as JSON can hold it (structured outputs are pydantic models)."""
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def eval_section(result: EvalResult, records: Sequence[Record] | None = None, tokens: Tokens | None = None,
                 name: str = "eval", dataset: str | None = None) -> EvalSection:
    """An evaluation's section of a run file."""
    return EvalSection(name=name, metric=result.metric, score=result.score, ci=result.ci, n=result.n,
                       seconds=result.seconds, dataset=dataset, tokens=tokens, items=item_results(result, records))


def candidate_rows(report: SearchReport, pipeline: Pipeline, val_size: int, rungs: list[int] | None,
                   usage: dict[str, dict[str, float]]) -> list[CandidateRow]:
    """The report's candidates in the order they were tried, each with its effective instruction and
    demonstrations, the rung of the race it reached, and its calls and tokens."""
    prompt = next((s for s in pipeline.stages if s.stage_name == "prompt"), None)
    base_instruction = getattr(prompt, "instruction", None)
    base_demos = list(getattr(prompt, "exemplars", []) or [])
    rows = []
    for order, cand in enumerate(report.candidates):
        settings = dict(cand.settings)
        instruction = settings.pop("instruction", base_instruction)
        demos = settings.pop("exemplars", [] if "knn" in settings or "strategy" in settings else base_demos)
        scorer = {k: settings.pop(k) for k in SCORER_KEYS if k in settings}
        cost = usage.get(cand.name)
        rows.append(CandidateRow(
            order=order, name=cand.name, score=cand.score, ci=cand.ci, n=cand.n,
            rung=_rung(cand.n, rungs), raced_out=cand.n < val_size, winner=cand.name == report.best.get("name"),
            baseline=order == 0, instruction=instruction, demonstrations=demos, scorer=scorer, settings=settings,
            lm_calls=int(cost["lm_calls"]) if cost else None, seconds=cand.seconds,
            tokens=Tokens(requested=int(cost["tokens_requested"]), prefilled=int(cost["tokens_prefilled"]),
                          cached=int(cost["tokens_cached"])) if cost else None))
    return rows


def _rung(n: int, rungs: list[int] | None) -> int | None:
    if not rungs:
        return None
    return next((i for i, size in enumerate(rungs, 1) if n <= size), len(rungs))


def search_section(optimizer: OptimizerLike, report: SearchReport, pipeline: Pipeline, train_size: int, val_size: int,
                   usage: dict[str, dict[str, float]]) -> SearchSection:
    """A search's section of a run file."""
    racing = getattr(optimizer, "racing", None)
    rungs = racing.rungs(val_size) if racing is not None else None
    settings = optimizer.model_dump(mode="json", exclude_defaults=True)
    return SearchSection(
        optimizer=report.optimizer, settings=settings, metric=report.metric, seed=report.seed, train_size=train_size,
        val_size=val_size, rungs=rungs, baseline_score=report.baseline_score, baseline_ci=report.baseline_ci,
        best_score=report.best_score, best_ci=report.best_ci, best_name=str(report.best.get("name")),
        lm_calls=report.lm_calls, metric_calls=report.metric_calls,
        tokens=Tokens(requested=report.tokens_requested, prefilled=report.tokens_prefilled,
                      cached=report.tokens_cached),
        naive_tokens=report.naive_tokens, seconds=report.seconds, budget_exhausted=report.budget_exhausted,
        candidates=candidate_rows(report, pipeline, val_size, rungs, usage), extra=_jsonable(report.extra))


def _jsonable(value: Any) -> Any:
    import json

    from pydantic_core import to_jsonable_python

    return json.loads(json.dumps(value, default=to_jsonable_python))


def heldout_section(zero_shot: EvalResult, optimized: EvalResult) -> HeldOut:
    """Zero-shot against the optimized pipeline on the same held-out examples, with the paired interval."""
    if zero_shot.n != optimized.n:
        raise ValueError(f"the held-out evaluations cover {zero_shot.n} and {optimized.n} examples; "
                         "evaluate both pipelines on the same examples")
    low, high = paired_bootstrap_ci(optimized.scores, zero_shot.scores)
    return HeldOut(zero_shot=eval_section(zero_shot, name="zero-shot"),
                   optimized=eval_section(optimized, name="optimized"),
                   difference=optimized.score - zero_shot.score, difference_ci=(low, high))


def dataset_name(dataset: Any) -> str:
    """How a run names its dataset: the file's path, or the number of in-memory examples."""
    if isinstance(dataset, (str, Path)):
        return os.fspath(dataset)
    return f"{len(dataset)} examples" if hasattr(dataset, "__len__") else "examples"


# -- sessions ---------------------------------------------------------------------------------
class EvalSession:
    """One evaluation in progress: the records it produced and the engine counters since it began."""

    def __init__(self, tracker: Tracker, pipeline: Pipeline, dataset: Any) -> None:
        self.tracker, self.pipeline, self.dataset = tracker, pipeline, dataset
        self.records: list[Record] = []
        self.meter = EngineMeter(pipeline)

    def add(self, records: Iterable[Record]) -> None:
        """Keep a batch of finished records (their traces become MLflow traces)."""
        self.records.extend(records)

    def finish(self, result: EvalResult) -> RunFile:
        """Build the run file and hand it to the tracker."""
        t0 = time.perf_counter()
        section = eval_section(result, self.records, self.meter.delta(), dataset=dataset_name(self.dataset))
        title = self.tracker.title or f"{self.pipeline.name}: {result.metric} on {section.dataset}"
        run = RunFile(kind="eval", title=title, pipeline=self.pipeline.config(), models=model_infos(self.pipeline),
                      eval=section)
        self.tracker.record_eval(run, self.pipeline, self.records)
        self.tracker.seconds += time.perf_counter() - t0
        return run


class SearchSession:
    """One optimizer search in progress."""

    def __init__(self, tracker: Tracker, optimizer: OptimizerLike, pipeline: Pipeline, train_size: int,
                 val_size: int) -> None:
        self.tracker, self.optimizer, self.pipeline = tracker, optimizer, pipeline
        self.train_size, self.val_size = train_size, val_size

    def finish(self, report: SearchReport, best_pipeline: Pipeline, usage: dict[str, dict[str, float]]) -> RunFile:
        """Build the run file from the optimizer's report and per-candidate usage; hand it to the tracker."""
        t0 = time.perf_counter()
        section = search_section(self.optimizer, report, self.pipeline, self.train_size, self.val_size, usage)
        title = self.tracker.title or f"{report.optimizer} on {self.pipeline.name}: {report.metric}"
        run = RunFile(kind="search", title=title, pipeline=self.pipeline.config(),
                      best_pipeline=best_pipeline.config(), models=model_infos(self.pipeline), search=section)
        self.tracker.record_search(run, self.pipeline, best_pipeline)
        self.tracker.seconds += time.perf_counter() - t0
        return run


class Tracker:
    """Keeps each evaluation and search as a run file (``tracker.run``: the latest).

    ``results``: also write every run file there (JSON, for ``promptkit report``).
    ``recipe``: the recipe file the pipeline came from (MLflow logs it as an artifact).
    ``title``: the runs' title (default: pipeline, metric and dataset).
    """

    def __init__(self, results: str | Path | None = None, recipe: str | Path | None = None,
                 title: str | None = None) -> None:
        self.results = Path(results) if results is not None else None
        self.recipe = Path(recipe) if recipe is not None else None
        self.title = title
        self.run: RunFile | None = None
        self.error: Exception | None = None  # the last failure to publish a run
        self.seconds = 0.0  # time spent building and publishing runs (what tracking cost)

    # -- called by evaluate() and Optimizer.compile() -----------------------------------------
    def start_evaluation(self, pipeline: Pipeline, dataset: Any = None) -> EvalSession:
        """Begin tracking one evaluation (reads the engine counters)."""
        return EvalSession(self, pipeline, dataset)

    def start_search(self, optimizer: OptimizerLike, pipeline: Pipeline, train_size: int, val_size: int) -> SearchSession:
        """Begin tracking one optimizer search."""
        return SearchSession(self, optimizer, pipeline, train_size, val_size)

    # -- called by the user after a search ---------------------------------------------------
    def log_heldout(self, zero_shot: EvalResult, optimized: EvalResult) -> RunFile:
        """Add the zero-shot and the optimized pipeline's results on held-out data to the last search."""
        if self.run is None or self.run.kind != "search":
            raise ValueError("log_heldout adds to a search: run compile(..., tracker=tracker) first")
        t0 = time.perf_counter()
        self.run.heldout = heldout_section(zero_shot, optimized)
        self._publish(self.publish_heldout, self.run)
        self._write()
        self.seconds += time.perf_counter() - t0
        return self.run

    def save(self, path: str | Path) -> Path:
        """Write the latest run file."""
        if self.run is None:
            raise ValueError("nothing tracked yet")
        return self.run.save(path)

    # -- sessions hand their runs here ---------------------------------------------------------
    def record_eval(self, run: RunFile, pipeline: Pipeline, records: list[Record]) -> None:
        self.run = run
        self._publish(self.publish_eval, run, pipeline, records)
        self._write()

    def record_search(self, run: RunFile, pipeline: Pipeline, best_pipeline: Pipeline) -> None:
        self.run = run
        self._publish(self.publish_search, run, pipeline, best_pipeline)
        self._write()

    def _publish(self, publish: Any, *args: Any) -> None:
        """Publish a finished run; a failure to log warns (the run it describes is over and is kept)."""
        try:
            publish(*args)
        except Exception as e:  # a tracking server that is down must not throw away an evaluation or a search
            self.error = e
            warnings.warn(f"{type(self).__name__} could not log the run ({type(e).__name__}: {e}); "
                          "it is kept as tracker.run", RuntimeWarning, stacklevel=3)

    def _write(self) -> None:
        if self.results is not None and self.run is not None:
            self.run.save(self.results)

    # -- what subclasses publish -------------------------------------------------------------
    def publish_eval(self, run: RunFile, pipeline: Pipeline, records: list[Record]) -> None:
        """Publish a finished evaluation (the base class keeps it only)."""

    def publish_search(self, run: RunFile, pipeline: Pipeline, best_pipeline: Pipeline) -> None:
        """Publish a finished search."""

    def publish_heldout(self, run: RunFile) -> None:
        """Publish a search's held-out comparison."""
