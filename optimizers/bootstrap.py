"""Bootstrapped demonstrations (DSPy's BootstrapFewShot with random search over demo subsets)."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from promptkit.pipeline import Pipeline
from promptkit.types import Example

from .base import Optimizer, as_demos, sample_demos, with_prompt
from .errors import OptimizerError
from .schedule import CandidateScore


class BootstrapFewShot(Optimizer):
    """Run the pipeline (the teacher) on the trainset; traces whose output passes the metric
    become demonstrations (input plus the pipeline's own output); then ``num_candidates``
    random subsets of at most ``max_demos`` of them are scored and the best kept.

    ``teacher`` is another pipeline to bootstrap from (default: the pipeline itself).
    """

    max_demos: int = Field(default=4, ge=1)
    num_candidates: int = Field(default=6, ge=1)
    threshold: float = 1.0
    max_bootstrapped: int = Field(default=16, ge=1)
    teacher: Pipeline | None = None

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        teacher = self.teacher or pipeline
        pool = self._rng.sample(train, min(len(train), self.max_bootstrapped * 2))
        records = self._scheduler.run(teacher, pool)
        demos = []
        for ex, rec in zip(pool, records):
            self._scheduler.metric_calls += 1  # a trace's check counts toward the budget like any score
            try:
                ok = float(self._scheduler.metric(rec.output, ex.output)) >= self.threshold
            except Exception as e:
                raise OptimizerError(f"metric {self._scheduler.metric_name!r} raised on trainset example "
                                     f"{ex.inputs}: {e!r}") from e
            if ok and len(demos) < self.max_bootstrapped:
                demos.append(Example(output_key=ex.output_key, **{**ex.inputs, ex.output_key: rec.output}))
        self._info.update(traces=len(pool), passed=len(demos))
        if not demos:
            return
        cands, seen = [], set()
        for c in range(self.num_candidates):
            k = self._rng.randint(1, min(self.max_demos, len(demos)))
            chosen = as_demos(sample_demos(demos, k, self._rng))
            if repr(chosen) in seen:  # a few demos give few distinct subsets: score each once
                continue
            seen.add(repr(chosen))
            cands.append((f"demos{c}", with_prompt(pipeline, exemplars=chosen), {"exemplars": chosen}))
        yield from self.evaluate_pipes(cands)
