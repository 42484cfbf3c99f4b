"""The Ray executor: engine actors on a Ray cluster, units placed by the prefixes they share.

Each worker is a Ray actor holding one engine (:class:`~promptkit.distributed.worker.EngineWorker`).
A run reads every item's prompt as a chain of prefixes, cuts the prefix tree into groups
and places them (:mod:`promptkit.distributed.units`); each worker gets its groups as
tasks of at most ``task_items`` records, two in flight at a time. An idle worker takes
queued groups nobody has started from the busiest one, so a wrong estimate does not
leave it waiting. The executor remembers what each worker holds from run to run (the
rounds of a search), so a candidate's prefix goes back to the engine that has it.

Faults: a task whose worker dies is run again elsewhere (``retries``), the dead
worker's queue goes to the others (``moved``), and results already returned are
kept. Ray restarts the actor (up to ``max_restarts``) and it rejoins with an empty
cache.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pipeline import Pipeline, Record
from .executor import Job, RunReport, ShardedPipeline, TaskLog, WorkerReport, job_items
from .units import HeldPrefixes, Item, Plan, Task, place_affinity, place_round_robin
from .worker import COUNTERS, EngineWorker, TaskResult

INSTALL_HINT = "the Ray executor needs Ray: pip install 'promptkit[ray]'  (or: pip install 'ray[serve]>=2.60')"
PLACEMENTS = ("affinity", "round_robin")


def require_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ray


@dataclass
class ProgressSnapshot:
    """Where a run stands (handed to ``on_progress`` after every finished task)."""

    done: int
    total: int
    workers_alive: int
    retries: int
    pids: list[int | None]
    in_flight: list[int]  # tasks sent to each worker and not yet returned
    seconds: float


def forwarded_env() -> dict[str, str]:
    """The environment workers need to behave as this process does (weights format, data, cache dirs)."""
    keep = ("PROMPTKIT_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


class RayExecutor:
    """Runs evaluations and searches on ``workers`` engine actors of a Ray cluster.

    ``address``: None starts (or joins) a local Ray on this machine; ``"auto"`` or
    ``"ray://host:10001"`` joins a cluster. ``threads``: torch threads (and CPUs
    reserved) per worker. ``placement``: ``"affinity"`` (units go to the worker that
    holds their prefix) or ``"round_robin"`` (the same units dealt to the workers in
    turn, blind to prefixes: the baseline). ``task_items``: records per call.
    ``checkpoint``: a JSON-lines file that an evaluation appends finished records to
    and resumes from. ``on_progress``: called with a :class:`ProgressSnapshot` after
    every finished task. ``keep_items``: keep each run's items (``item_log``) for
    :func:`~promptkit.distributed.projection.project`.

    >>> with RayExecutor(workers=2) as ex:
    ...     result = evaluate(pipeline, examples, "accuracy", executor=ex)
    ...     ex.last_report.retries
    """

    def __init__(self, address: str | None = None, workers: int = 2, threads: int = 1, placement: str = "affinity",
                 task_items: int = 32, max_retries: int = 3, max_restarts: int = 1,
                 checkpoint: str | Path | None = None, env: dict[str, str] | None = None,
                 init_options: dict[str, Any] | None = None, worker_cache_tokens: int = 1_000_000,
                 on_progress: Callable[[ProgressSnapshot], None] | None = None, keep_items: bool = False) -> None:
        require_ray()
        if workers < 1:
            raise ValueError(f"workers must be at least 1; got {workers}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose {' or '.join(PLACEMENTS)}")
        self.address, self.workers, self.threads, self.placement = address, workers, threads, placement
        self.task_items, self.max_retries, self.max_restarts = task_items, max_retries, max_restarts
        self.checkpoint, self.on_progress = checkpoint, on_progress
        self.env = {**forwarded_env(), **(env or {})}
        self.init_options = dict(init_options or {})
        self.held = [HeldPrefixes(worker_cache_tokens) for _ in range(workers)]
        self.actors: list[Any] = []
        self.pids: list[int | None] = [None] * workers
        self.alive = [True] * workers
        self.call_seconds = 0.0
        self.reports: list[RunReport] = []
        self.pings: dict[Any, int] = {}  # workers that died, asked whether Ray brought them back
        self.keep_items = keep_items
        self._turn = 0  # round-robin: the worker the next unit goes to
        self.item_log: list[list[Item]] = []
        self._started_ray = False

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Connect to Ray (starting a local one if none runs) and start the workers; idempotent."""
        if self.actors:
            return
        ray = require_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **self.init_options)
            self._started_ray = True
        need, free = self.workers * self.threads, ray.available_resources().get("CPU", 0)
        if self.address is None and free < need:
            raise ValueError(f"{self.workers} workers of {self.threads} thread(s) need {need} CPUs and this Ray has "
                             f"{free:g} free: ask for fewer workers, or start Ray with more (ray.init(num_cpus=...))")
        remote = ray.remote(EngineWorker).options(num_cpus=self.threads, max_restarts=self.max_restarts,
                                                  max_task_retries=0, max_concurrency=1)
        self.actors = [remote.remote(self.threads, self.env) for _ in range(self.workers)]
        info = ray.get([a.ready.remote() for a in self.actors])
        self.pids = [i["pid"] for i in info]
        self.call_seconds = self._measure_call()

    def _measure_call(self, n: int = 8) -> float:
        ray = require_ray()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ray.get(self.actors[0].ready.remote())
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def close(self) -> None:
        """Stop the workers (and the local Ray this executor started)."""
        if not self.actors:
            return
        ray = require_ray()
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def clear_caches(self) -> None:
        """Empty every worker's prefix cache (and what the executor believes they hold)."""
        self.start()
        self._call_live("clear_cache")
        for h in self.held:
            h.clear()

    def _call_live(self, method: str, *args: Any) -> None:
        """Call ``method`` on every live worker and wait; a worker that fails is marked down."""
        ray = require_ray()
        refs = {getattr(a, method).remote(*args): w for w, a in enumerate(self.actors) if self.alive[w]}
        for ref, w in refs.items():
            try:
                ray.get(ref)
            except _worker_failures():
                self.mark_down(w)

    def mark_down(self, w: int) -> None:
        """Worker ``w`` died: forget what it held, and ask Ray whether it comes back (if it may restart)."""
        if not self.alive[w]:
            return
        self.alive[w], self.pids[w] = False, None
        self.held[w].clear()
        if self.max_restarts:
            self.pings[self.actors[w].ready.remote()] = w

    def worker_pids(self) -> list[int | None]:
        """Each worker's process id (None while it is down)."""
        return list(self.pids)

    # -- the executor protocol ---------------------------------------------------------------
    def bind(self, pipeline: Pipeline, progress: bool = False) -> ShardedPipeline:
        """A stand-in for ``pipeline`` whose ``process`` runs it on the workers (what evaluate uses)."""
        return ShardedPipeline(self, pipeline, progress, self.checkpoint)

    def scheduler(self, scheduler: Any) -> Any:
        """An optimizer's scheduler whose candidate evaluations run on the workers."""
        from .search import DistributedScheduler

        return DistributedScheduler(scheduler, self)

    @property
    def last_report(self) -> RunReport | None:
        return self.reports[-1] if self.reports else None

    def stats(self) -> dict[str, int]:
        """Token counters of every task the workers returned, over all runs."""
        return {k: sum(getattr(r, k) for r in self.reports) for k in COUNTERS}

    # -- running -------------------------------------------------------------------------------
    def run_jobs(self, jobs: Sequence[Job], progress: bool = False,
                 on_result: Callable[[int, int, Record], None] | None = None, resumed: int = 0) -> list[list[Record]]:
        """Run every job's stages on its records on the workers; the records per job, in their order."""
        self.start()
        self._rejoin_restarted()
        items = job_items(jobs)
        if self.keep_items:
            self.item_log.append(items)
        t0 = time.perf_counter()
        if items:
            self.warm([s for job in jobs for s in job.stages.stages])
        warm = time.perf_counter() - t0
        live = [w for w in range(self.workers) if self.alive[w]]
        if not live:
            raise RuntimeError("no worker is alive")
        t1 = time.perf_counter()
        plan = self._plan(items, live)
        run = _Run(self, jobs, items, plan, on_result)
        report = run.report
        report.plan_seconds, report.warm_seconds, report.resumed = time.perf_counter() - t1, warm, resumed
        self.reports.append(report)
        run.execute(progress)
        return [[run.results[(j, i)] for i in range(len(job.records))] for j, job in enumerate(jobs)]

    def rejoin(self, ping: Any) -> int | None:
        """The worker whose ``ping`` answered (Ray restarted it, with an empty cache), or None if it is not back."""
        ray = require_ray()
        w = self.pings.pop(ping)
        try:
            info = ray.get(ping)
        except ray.exceptions.ActorUnavailableError:  # still restarting: ask again shortly
            time.sleep(0.25)
            self.pings[self.actors[w].ready.remote()] = w
            return None
        except _worker_failures():  # gone for good
            return None
        self.alive[w], self.pids[w] = True, info["pid"]
        self.held[w].clear()
        return w

    def wait_for_workers(self, timeout: float = 60.0) -> int:
        """Wait until the workers Ray is restarting are back, or ``timeout`` seconds; the number alive."""
        ray = require_ray()
        deadline = time.monotonic() + timeout
        while self.pings and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.pings), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ping in ready:
                self.rejoin(ping)
        return sum(self.alive)

    def _rejoin_restarted(self) -> None:
        if self.pings:
            ray = require_ray()
            ready, _ = ray.wait(list(self.pings), num_returns=len(self.pings), timeout=0)
            for ping in ready:
                self.rejoin(ping)

    def warm(self, stages: Sequence[Any]) -> None:
        """Load the models of these stages on every live worker (once; later calls return at once)."""
        self.start()
        todo, seen = [], set()
        for s in stages:
            key = (getattr(s, "model", None), getattr(s, "backend", None), str(getattr(s, "sparse", "")))
            if hasattr(s, "lm") and hasattr(s, "model") and key not in seen:
                seen.add(key)
                todo.append(s)
        if todo:
            self._call_live("warm", todo)

    def _plan(self, items: list[Item], live: list[int]) -> Plan:
        size = max(1, min(self.task_items, -(-len(items) // len(live))))  # every worker gets some
        if self.placement == "round_robin":
            plan = place_round_robin(items, len(live), size, self._turn)
            self._turn += len(plan.groups)
        else:
            plan = place_affinity(items, [self.held[w] for w in live], size)
        for t in plan.tasks:
            t.worker = live[t.worker]  # type: ignore[index]
        return plan


class _Run:
    """One run's dispatch: a queue per worker, two tasks in flight per worker; tasks of a worker that
    died wait in a shared queue while no worker is alive."""

    DEPTH = 2

    def __init__(self, ex: RayExecutor, jobs: Sequence[Job], items: list[Item], plan: Plan,
                 on_result: Callable[[int, int, Record], None] | None) -> None:
        self.ex, self.jobs, self.plan, self.on_result = ex, jobs, plan, on_result
        self.by_key = {(it.job, it.index): it for it in items}
        self.total = len(items)
        self.results: dict[tuple[int, int], Record] = {}
        self.shared: deque[Task] = deque(t for t in plan.tasks if t.worker is None)
        self.queues: list[deque[Task]] = [deque(t for t in plan.tasks if t.worker == w) for w in range(ex.workers)]
        self.inflight: dict[Any, tuple[Task, int, float]] = {}
        self.pings = ex.pings
        self.started: set[int] = set()
        self.heads: dict[str, set[int]] = {}
        self.t0 = time.perf_counter()
        self.report = RunReport(placement=plan.placement, workers=ex.workers, workers_alive=sum(ex.alive),
                                items=self.total, tasks=len(plan.tasks), groups=len(plan.groups),
                                call_seconds=ex.call_seconds,
                                per_worker=[WorkerReport(worker=w, pid=ex.pids[w], alive=ex.alive[w])
                                            for w in range(ex.workers)])

    # -- the loop ----------------------------------------------------------------------------
    def execute(self, progress: bool) -> None:
        ray = require_ray()
        bar = _Bar(self.total, progress)
        try:
            while len(self.results) < self.total:
                self._fill()
                waiting = list(self.inflight) + list(self.pings)
                if not waiting:
                    raise RuntimeError(f"every worker died; {self.total - len(self.results)} items were not run")
                ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in self.pings:
                        self._rejoin(ref)
                    else:
                        self._finish(ref)
                bar.update(len(self.results), sum(self.ex.alive), self.ex.workers, self.report.retries)
        except BaseException:
            for ref in self.inflight:
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # a task already running on its actor finishes; its result is dropped
                    pass
            raise
        finally:
            bar.close()
            self._close_report()

    def _fill(self) -> None:
        for w in range(self.ex.workers):
            while self.ex.alive[w] and self._in_flight(w) < self.DEPTH:
                task = self._next(w)
                if task is None:
                    break
                self._submit(task, w)

    def _in_flight(self, w: int) -> int:
        return sum(1 for _, (_, v, _) in self.inflight.items() if v == w)

    def _next(self, w: int) -> Task | None:
        if self.shared:
            return self.shared.popleft()
        if self.queues[w]:
            return self.queues[w].popleft()
        return self._steal(w) if self.plan.placement == "affinity" else None

    def _steal(self, w: int) -> Task | None:
        """The tail of the busiest queue, whole groups only, none of them started anywhere."""
        victims = sorted((v for v in range(self.ex.workers) if v != w and self.queues[v]),
                         key=lambda v: -sum(t.cost for t in self.queues[v]))
        for v in victims:
            queue = self.queues[v]
            block = [queue[-1]]
            groups = set(queue[-1].groups)
            for t in reversed(list(queue)[:-1]):
                if not groups & t.groups:
                    break
                block.insert(0, t)
                groups |= t.groups
            if groups & self.started or len(block) == len(queue) and self._in_flight(v) == 0:
                continue
            for _ in block:
                queue.pop()
            self.report.stolen += len(block)
            self.queues[w].extend(block[1:])
            return block[0]
        return None

    def _submit(self, task: Task, w: int) -> None:
        parts = [(job, self.jobs[job].stages, [self.jobs[job].records[i] for i in idx])
                 for job, idx in task.parts.items()]
        t0 = time.perf_counter()
        ref = self.ex.actors[w].run.remote(parts)
        self.inflight[ref] = (task, w, time.perf_counter() - t0)
        self.started |= task.groups
        held = self.ex.held[w]
        for job, idx in task.parts.items():
            for i in idx:
                for level in self.by_key[(job, i)].chain:
                    held.add(level.key, level.tokens)

    def _finish(self, ref: Any) -> None:
        ray = require_ray()
        task, w, send_seconds = self.inflight.pop(ref)
        t0 = time.perf_counter()
        try:
            res: TaskResult = ray.get(ref)
        except _worker_failures() as e:
            self._failed(task, w, e)
            return
        except ray.exceptions.RayTaskError as e:  # the pipeline raised: as it would have here
            raise e.as_instanceof_cause() from None
        move = send_seconds + time.perf_counter() - t0
        for job, recs in res.records.items():
            for i, rec in zip(task.parts[job], recs):
                self.results[(job, i)] = rec
                self.heads.setdefault(self.by_key[(job, i)].head, set()).add(w)
                if self.on_result:
                    self.on_result(job, i, rec)
        self._account(task, w, res, move)

    def _account(self, task: Task, w: int, res: TaskResult, move: float) -> None:
        r, pw = self.report, self.report.per_worker[w]
        pw.tasks += 1
        pw.items += task.size
        pw.busy_seconds += res.seconds
        for k in COUNTERS:
            setattr(pw, k, getattr(pw, k) + res.counters.get(k, 0))
            setattr(r, k, getattr(r, k) + res.counters.get(k, 0))
        r.task_log.append(TaskLog(worker=w, items=task.size, seconds=res.seconds, move_seconds=move,
                                  tokens_prefilled=res.counters.get("tokens_prefilled", 0), attempt=task.attempts))
        if self.ex.on_progress:
            self.ex.on_progress(ProgressSnapshot(len(self.results), self.total, sum(self.ex.alive), r.retries,
                                                 self.ex.worker_pids(), [self._in_flight(v) for v in range(self.ex.workers)],
                                                 time.perf_counter() - self.t0))

    # -- faults ----------------------------------------------------------------------------------
    def _failed(self, task: Task, w: int, error: Exception) -> None:
        task.attempts += 1
        self.report.retries += 1
        if task.attempts > self.ex.max_retries:
            raise RuntimeError(f"a task of {task.size} items failed {task.attempts} times; last: {error}") from error
        if self.ex.alive[w]:
            self._down(w)
        self._requeue([task])

    def _down(self, w: int) -> None:
        """Worker ``w`` died: hand its queue to the others."""
        self.ex.mark_down(w)
        self.report.per_worker[w].alive = False
        pending, self.queues[w] = list(self.queues[w]), deque()
        self.report.moved += len(pending)
        self._requeue(pending)

    def _requeue(self, tasks: list[Task]) -> None:
        live = [w for w in range(self.ex.workers) if self.ex.alive[w]]
        if not live:  # whoever comes back first takes them
            self.shared.extendleft(reversed(tasks))
            return
        chosen: dict[int, int] = {}
        for t in tasks:
            w = next((chosen[g] for g in t.groups if g in chosen), None)
            if w is None:
                w = min(live, key=lambda v: sum(q.cost for q in self.queues[v]) + self._in_flight(v))
            chosen.update(dict.fromkeys(t.groups, w))
            self.queues[w].append(t)

    def _rejoin(self, ref: Any) -> None:
        w = self.ex.rejoin(ref)
        if w is not None:
            self.report.per_worker[w].alive, self.report.per_worker[w].pid = True, self.ex.pids[w]
            self.report.restarts += 1

    def _close_report(self) -> None:
        r = self.report
        r.done = len(self.results)
        r.lost = r.items - r.done
        r.seconds = time.perf_counter() - self.t0
        r.workers_alive = sum(self.ex.alive)
        r.prefix_workers = {k: sorted(v) for k, v in self.heads.items()}


def _worker_failures() -> tuple[type[BaseException], ...]:
    ray = require_ray()
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.NodeDiedError, e.OutOfMemoryError,
            e.LocalRayletDiedError)


class _Bar:
    """One progress bar over the whole run: items, items per second, workers alive, retries."""

    def __init__(self, total: int, show: bool) -> None:
        self.bar = None
        if not show:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.t0 = time.perf_counter()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} items/s"), TextColumn("workers {task.fields[alive]}"),
                            TextColumn("retries {task.fields[retries]}"), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        self.task = self.bar.add_task("ray", total=total, rate="-", alive="-", retries=0)

    def update(self, done: int, alive: int, workers: int, retries: int) -> None:
        if self.bar is None:
            return
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        self.bar.update(self.task, completed=done, rate=f"{rate:.1f}", alive=f"{alive}/{workers}", retries=retries)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
