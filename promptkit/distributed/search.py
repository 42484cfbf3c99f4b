"""An optimizer's scheduler whose candidate evaluations run on a distributed executor.

:class:`DistributedScheduler` wraps the optimizer's own prefix scheduler (any object
with its ``evaluate``, ``_prepare``, ``charge`` and ``_score``) without importing the
optimizers package: the stages before the LM call run here, as they do locally; the
LM calls of every candidate of one ``evaluate`` go to the executor at once, so
candidates that share an instruction and demonstrations are placed together; the
scores are computed here by the wrapped scheduler, so they are the local ones.
Proposals (``generate``), traces and ``run`` stay on the local LM.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..pipeline import Pipeline
from .executor import Job


class DistributedScheduler:
    """The wrapped scheduler, with :meth:`evaluate` run on ``executor``; every other attribute is the wrapped one's."""

    def __init__(self, local: Any, executor: Any) -> None:
        object.__setattr__(self, "_local", local)
        object.__setattr__(self, "_executor", executor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._local, name, value)

    def stats(self) -> dict[str, Any]:
        """The local LM's counters plus every worker's (what the optimizer's report adds up)."""
        out = dict(self._local.lm.stats())
        for k, v in self._executor.stats().items():
            out[k] = int(out.get(k, 0) or 0) + v
        return out

    def evaluate(self, candidates: Sequence[tuple[str, Pipeline, dict[str, Any]]], examples: Sequence[Any] | None = None,
                 indices: Sequence[int] | None = None) -> list[Any]:
        """Score each ``(name, pipeline, settings)`` as the wrapped scheduler would, the LM calls on the workers."""
        local = self._local
        if indices is not None:
            exs, idx = [local.examples[i] for i in indices], list(indices)
        elif examples is not None:
            exs, idx = list(examples), []
        else:
            exs, idx = local.examples, list(range(len(local.examples)))
        local.charge(len(exs) * len(candidates))  # raises before any LM call when over the budget
        prepared = [local._prepare(pipe, exs) for _, pipe, _ in candidates]
        jobs = [Job(Pipeline(stage), records) for records, stage, _ in prepared]
        t0 = time.perf_counter()
        outputs = self._executor.run_jobs(jobs)
        seconds = _seconds_per_job(jobs, time.perf_counter() - t0)
        return [local._score(name, records, exs, settings, seconds[j], idx)
                for j, ((name, _, settings), records) in enumerate(zip(candidates, outputs))]


def _seconds_per_job(jobs: Sequence[Job], wall: float) -> list[float]:
    """The run's wall time shared among the jobs by their records."""
    total = sum(len(j.records) for j in jobs) or 1
    return [wall * len(j.records) / total for j in jobs]
