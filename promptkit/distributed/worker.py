"""The Ray actor that holds one engine (or one OpenAI-backend client) and runs tasks of records on it.

This module does not import Ray: :class:`EngineWorker` is a plain class that the
executor turns into an actor with ``ray.remote``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..pipeline import Pipeline, Record

COUNTERS = ("tokens_requested", "tokens_prefilled", "tokens_cached")


@dataclass
class TaskResult:
    """What one task returned: the records per job, the worker's seconds and its engine counters' change."""

    records: dict[int, list[Record]]
    seconds: float
    counters: dict[str, int] = field(default_factory=dict)
    pid: int = 0


def engine_counters() -> dict[str, int]:
    """Token counters summed over every LM this process has loaded (the shared, per-process LMs)."""
    from ..lm import _shared

    total = dict.fromkeys(COUNTERS, 0)
    for lm in list(_shared.values()):
        stats = lm.stats()
        for k in COUNTERS:
            total[k] += int(stats.get(k, 0) or 0)
    return total


class EngineWorker:
    """One worker: ``threads`` torch threads, the process's shared LMs, and the stages it is sent."""

    def __init__(self, threads: int = 1, env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})
        import torch

        torch.set_num_threads(max(1, threads))
        self.started = time.time()

    def ready(self) -> dict[str, Any]:
        """Where this worker runs (answers once the actor is up)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started}

    def warm(self, stages: list[Any]) -> dict[str, Any]:
        """Load the models the stages use (before any clock starts)."""
        for s in stages:
            if hasattr(s, "lm") and hasattr(s, "model"):
                s.lm()
        return self.ready()

    def run(self, parts: list[tuple[int, Pipeline, list[Record]]]) -> TaskResult:
        """Run each job's stages on its records; the records come back in the order sent."""
        before, t0 = engine_counters(), time.perf_counter()
        out = {job: stages.process(records) for job, stages, records in parts}
        after = engine_counters()
        return TaskResult(out, time.perf_counter() - t0, {k: after[k] - before[k] for k in COUNTERS}, os.getpid())

    def counters(self) -> dict[str, int]:
        return engine_counters()

    def clear_cache(self) -> None:
        """Drop every cached prefix of every LM held here."""
        from ..lm import _shared

        for lm in list(_shared.values()):
            clear = getattr(lm.backend, "clear_cache", None)
            if clear is not None:
                clear()
