"""Executors: where the LM work of an evaluation or a search runs.

:class:`LocalExecutor` runs it in this process, as :func:`~promptkit.evaluate.evaluate`
always has. :class:`~promptkit.distributed.RayExecutor` sends it to engine actors on a
Ray cluster. Both take a pipeline through :meth:`Executor.bind` (what ``evaluate``
calls) and an optimizer's scheduler through :meth:`Executor.scheduler`.

A pipeline is cut at its first LM stage: the stages before it (retrieval, exemplar
selection, prompt building) run here and give each record its segmented prompt; the
LM stage and what follows run wherever the executor puts them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from ..pipeline import Pipeline, Record, Stage
from .units import Item, extra_cost, prefix_chain, render_mode


class SupportsProcess(Protocol):
    def process(self, records: list[Record]) -> list[Record]: ...


class Executor(Protocol):
    """Runs a pipeline's records, and an optimizer's candidate evaluations, somewhere."""

    def bind(self, pipeline: Pipeline, progress: bool = False) -> SupportsProcess:
        """Something whose ``process(records)`` runs ``pipeline`` on the records and returns them in order."""
        ...

    def scheduler(self, scheduler: Any) -> Any:
        """The optimizer's scheduler, with its candidate evaluations handed to this executor."""
        ...


@dataclass
class Job:
    """Records that go through the same stages (one evaluation, or one candidate of a search)."""

    stages: Pipeline
    records: list[Record]


def job_items(jobs: Sequence[Job]) -> list[Item]:
    """Every record of every job as an item: its prompt's chain of prefixes and its cost beyond the prompt."""
    items = []
    for j, job in enumerate(jobs):
        mode, extra = render_mode(job.stages.stages), extra_cost(job.stages.stages)
        items += [Item(j, i, prefix_chain(r, mode), extra) for i, r in enumerate(job.records)]
    return items


def split_at_lm(pipeline: Pipeline) -> tuple[Pipeline, Pipeline]:
    """The stages before the first LM stage (run here) and the rest (run by the executor)."""
    from ..stages import LMStage

    stages = list(pipeline.stages)
    at = next((i for i, s in enumerate(stages) if isinstance(s, LMStage)), 0)
    kw = {"name": pipeline.name, "input_key": pipeline.input_key}
    return Pipeline(*stages[:at], **kw), Pipeline(*stages[at:], **kw)


class WorkerReport(BaseModel):
    """One worker's share of a run."""

    worker: int
    pid: int | None = None
    alive: bool = True
    tasks: int = 0
    items: int = 0
    busy_seconds: float = 0.0
    tokens_prefilled: int = 0
    tokens_cached: int = 0
    tokens_requested: int = 0


class TaskLog(BaseModel):
    """One finished task: where it ran, how much it held, and what it cost."""

    worker: int
    items: int
    seconds: float  # on the worker
    move_seconds: float  # here: sending the records and receiving the results
    tokens_prefilled: int
    attempt: int


class RunReport(BaseModel):
    """What a distributed run did: items, losses, retries, placement and the engines' token counters."""

    placement: str
    workers: int
    workers_alive: int
    items: int
    done: int = 0
    resumed: int = 0  # taken from a checkpoint, not run again
    lost: int = 0  # asked for and never returned
    retries: int = 0  # tasks run again because their worker died
    moved: int = 0  # queued tasks handed to another worker when theirs died
    stolen: int = 0  # queued tasks an idle worker took from a busy one
    restarts: int = 0  # workers that came back after dying
    tasks: int = 0
    groups: int = 0
    seconds: float = 0.0
    prepare_seconds: float = 0.0  # stages before the LM stage, here
    plan_seconds: float = 0.0
    warm_seconds: float = 0.0
    call_seconds: float = 0.0  # one empty call to a worker and back (median)
    tokens_prefilled: int = 0
    tokens_cached: int = 0
    tokens_requested: int = 0
    per_worker: list[WorkerReport] = Field(default_factory=list)
    prefix_workers: dict[str, list[int]] = Field(default_factory=dict)  # unit head -> workers that ran it
    task_log: list[TaskLog] = Field(default_factory=list, repr=False)

    @property
    def items_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


class Checkpoint:
    """Records finished by an earlier, interrupted run of the same pipeline on the same inputs (JSON lines)."""

    def __init__(self, path: str | Path, pipeline: Pipeline, records: Sequence[Record]) -> None:
        self.path = Path(path)
        config = json.dumps(pipeline.config(), sort_keys=True, default=str)
        self.fingerprint = hashlib.blake2b(f"{config}|{len(records)}".encode(), digest_size=12).hexdigest()
        self.records = records

    def load(self) -> dict[int, Record]:
        """The records already finished, by position; refuses a file written for another pipeline or data."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return {}
        done: dict[int, Record] = {}
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the line an interrupted write cut short
                    continue
                if n == 0:
                    self._check_header(row)
                    continue
                i, rec = int(row["i"]), Record.model_validate(row["record"])
                if i >= len(self.records) or rec.inputs != self.records[i].inputs:
                    raise ValueError(f"{self.path}: item {i} has other inputs than this dataset's; "
                                     "delete the file or give another path")
                done[i] = rec
        return done

    def _check_header(self, row: dict[str, Any]) -> None:
        if row.get("checkpoint") != self.fingerprint:
            raise ValueError(f"{self.path} was written by another pipeline or dataset; delete it or give another path")

    def open(self) -> Callable[[int, Record], None]:
        """A writer that appends one finished record (the header first, for a new file)."""
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        f = open(self.path, "a", encoding="utf-8")
        if fresh:
            f.write(json.dumps({"checkpoint": self.fingerprint, "items": len(self.records)}) + "\n")
            f.flush()
        self._file = f

        def write(i: int, rec: Record) -> None:
            f.write(json.dumps({"i": i, "record": rec.model_dump(mode="json")}) + "\n")
            f.flush()

        return write

    def close(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()


class ShardedPipeline:
    """A pipeline whose LM work runs on a distributed executor (what ``executor.bind`` returns)."""

    def __init__(self, executor: Any, pipeline: Pipeline, progress: bool = False,
                 checkpoint: str | Path | None = None) -> None:
        self.executor, self.pipeline, self.progress, self.checkpoint = executor, pipeline, progress, checkpoint

    def process(self, records: list[Record]) -> list[Record]:
        """Run the pipeline on ``records``; the result is in their order (resumed ones included)."""
        import time

        head, tail = split_at_lm(self.pipeline)
        ckpt = Checkpoint(self.checkpoint, self.pipeline, records) if self.checkpoint else None
        done = ckpt.load() if ckpt else {}
        todo = [i for i in range(len(records)) if i not in done]
        t0 = time.perf_counter()
        prepared = head.process([records[i] for i in todo]) if todo and head.stages else [records[i] for i in todo]
        prepare_seconds = time.perf_counter() - t0
        write = ckpt.open() if ckpt else None
        try:
            on_result = (lambda job, k, rec: write(todo[k], rec)) if write else None
            outputs = self.executor.run_jobs([Job(tail, prepared)], progress=self.progress,
                                             on_result=on_result, resumed=len(done))
        finally:
            if ckpt:
                ckpt.close()
        report = getattr(self.executor, "last_report", None)
        if report is not None:
            report.prepare_seconds = prepare_seconds
        out = dict(done)
        out.update(zip(todo, outputs[0]))
        return [out[i] for i in range(len(records))]


class LocalExecutor:
    """Runs everything in this process, in batches (what evaluate and the optimizers do without an executor)."""

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size

    def bind(self, pipeline: Pipeline, progress: bool = False) -> SupportsProcess:
        return _Batched(pipeline, self.batch_size, progress)

    def scheduler(self, scheduler: Any) -> Any:
        return scheduler


@dataclass
class _Batched:
    pipeline: Stage
    batch_size: int
    progress: bool

    def process(self, records: list[Record]) -> list[Record]:
        out: list[Record] = []
        bar = _bar(len(records)) if self.progress else None
        try:
            for i in range(0, len(records), self.batch_size):
                chunk = records[i : i + self.batch_size]
                out.extend(self.pipeline.process(chunk))
                if bar:
                    bar[0].advance(bar[1], len(chunk))
        finally:
            if bar:
                bar[0].stop()
        return out


def _bar(total: int) -> tuple[Any, Any]:
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    return bar, bar.add_task("evaluating", total=total)
