"""Evaluate a pipeline on a dataset with a metric."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from .data import load_examples
from .metrics import Metric, bootstrap_ci, format_ci, get_metric, mean
from .pipeline import Pipeline, Record, Stage
from .types import Example

if TYPE_CHECKING:
    from .distributed import Executor
    from .runs.tracker import Tracker


class ExampleResult(BaseModel):
    inputs: dict[str, Any]
    gold: Any
    prediction: Any
    score: float


class EvalResult(BaseModel):
    """Mean score with its 95 % bootstrap interval, per-example results and the LM counters of one evaluation."""

    metric: str
    score: float
    ci: tuple[float, float]  # 95 % percentile bootstrap over the examples (seeded)
    n: int
    seconds: float
    results: list[ExampleResult] = Field(default_factory=list)
    lm_stats: dict[str, Any] = Field(default_factory=dict)

    @property
    def scores(self) -> list[float]:
        """Per-example scores, in dataset order (pair them with another run's for a paired interval)."""
        return [r.score for r in self.results]

    def write_jsonl(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for r in self.results:
                f.write(r.model_dump_json() + "\n")


def evaluate(
    pipeline: Stage,
    dataset: Sequence[Example] | str | Path,
    metric: str | Metric = "exact_match",
    batch_size: int = 16,
    output_key: str = "answer",
    progress: bool = False,
    tracker: Tracker | None = None,
    executor: Executor | None = None,
) -> EvalResult:
    """Run ``pipeline`` on every example (in batches) and score its outputs against the gold field.

    ``tracker`` (a :class:`~promptkit.runs.Tracker`, e.g. ``MlflowTracker()``) records the run once it
    is over: the metric with its interval, tokens, seconds, per-item results and the records' traces.

    ``executor``: where the pipeline runs; ``RayExecutor(workers=N)`` (:mod:`promptkit.distributed`) sends
    the whole set to engine actors, each unit that shares a prefix to the worker that holds it.
    """
    examples = load_examples(dataset, output_key) if isinstance(dataset, (str, Path)) else list(dataset)
    if not examples:
        raise ValueError("evaluate needs at least one example")
    fn = get_metric(metric)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline(pipeline)
    session = tracker.start_evaluation(pipe, dataset) if tracker is not None else None
    if executor is not None:  # one batch: the executor cuts it into units that share a prefix
        pipe, batch_size, progress = executor.bind(pipe, progress), len(examples), False
    t0 = time.perf_counter()
    results: list[ExampleResult] = []
    batches = range(0, len(examples), batch_size)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"evaluating {name}", total=len(examples))
    try:
        for i in batches:
            chunk = examples[i : i + batch_size]
            records = pipe.process([Record(inputs=ex.inputs) for ex in chunk])
            for ex, rec in zip(chunk, records):
                try:
                    s = float(fn(rec.output, ex.output))
                except Exception as e:  # a metric bug should name the example, not vanish
                    raise RuntimeError(f"metric {name!r} failed on example {ex.inputs}: {e}") from e
                results.append(ExampleResult(inputs=ex.inputs, gold=ex.output, prediction=rec.output, score=s))
            if session is not None:
                session.add(records)
            if bar:
                bar.advance(task, len(chunk))
    finally:
        if bar:
            bar.stop()
    scores = [r.score for r in results]
    result = EvalResult(metric=name, score=mean(scores), ci=bootstrap_ci(scores), n=len(results),
                        seconds=time.perf_counter() - t0, results=results)
    if session is not None:
        session.finish(result)
    return result


def print_result(result: EvalResult, limit: int = 10) -> None:
    """A rich table of the first results and the mean score."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.metric}: {format_ci(result.score, result.ci)} (95 % CI) over {result.n} examples "
                        f"({result.seconds:.1f} s)")
    for col in ("input", "gold", "prediction", "score"):
        table.add_column(col, overflow="fold")
    for r in result.results[:limit]:
        table.add_row(json.dumps(r.inputs)[:80], str(r.gold)[:40], str(r.prediction)[:60], f"{r.score:.2f}")
    Console().print(table)
