"""A model of how a measured run would scale to more workers (a projection, not a measurement).

From a run on a few workers it takes: each task's seconds on its worker, tokens
prefilled and items (fitted as ``seconds = a * prefilled + b * items``); the cost of
moving a task (sending its records and receiving its results, plus one empty call);
and the time the driver spends on its own (stages before the LM call, planning,
proposals). For ``W`` workers it plans the same items again, for prefix affinity
and for round-robin, estimates each worker's prefill from the prefix tree (scaled
so that the estimate for the measured worker count equals the measurement), and
takes the slowest worker's time plus the driver's.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from .executor import RunReport
from .units import HeldPrefixes, Item, estimate_prefill, place_affinity, place_round_robin


class CostModel(BaseModel):
    """Seconds per prefilled token and per item on one worker, and per task moved."""

    seconds_per_token: float
    seconds_per_item: float
    seconds_per_move: float


class Projection(BaseModel):
    """Projected wall seconds, items per second and prefilled tokens on ``workers`` workers."""

    workers: int
    placement: str
    seconds: float
    items_per_second: float
    prefilled_tokens: int


def fit_costs(reports: Sequence[RunReport]) -> CostModel:
    """Least squares of each task's worker seconds on its prefilled tokens and items (both kept non-negative)."""
    import numpy as np

    logs = [t for r in reports for t in r.task_log]
    if not logs:
        raise ValueError("no finished task to fit")
    x = np.array([[t.tokens_prefilled, t.items] for t in logs], dtype=float)
    y = np.array([t.seconds for t in logs], dtype=float)
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    if a < 0 or b < 0:  # one regressor explains the time alone
        a, b = (0.0, y.sum() / max(1.0, x[:, 1].sum())) if a < 0 else (y.sum() / max(1.0, x[:, 0].sum()), 0.0)
    calls = [r.call_seconds for r in reports]
    move = sum(t.move_seconds for t in logs) / len(logs) + sum(calls) / len(calls)
    return CostModel(seconds_per_token=float(a), seconds_per_item=float(b), seconds_per_move=float(move))


def _worker_times(items: Sequence[Item], workers: int, placement: str, costs: CostModel, scale: float,
                  task_items: int) -> tuple[float, float]:
    size = max(1, min(task_items, -(-len(items) // workers)))
    plan = (place_affinity(items, [HeldPrefixes() for _ in range(workers)], size) if placement == "affinity"
            else place_round_robin(items, workers, size))
    prefill = estimate_prefill(plan, items, workers)
    n_items, n_tasks = [0] * workers, [0] * workers
    for t in plan.tasks:
        w = t.worker or 0
        n_items[w] += t.size
        n_tasks[w] += 1
    times = [costs.seconds_per_token * scale * prefill[w] + costs.seconds_per_item * n_items[w]
             + costs.seconds_per_move * n_tasks[w] for w in range(workers)]
    return max(times), scale * sum(prefill)


def project(runs: Sequence[tuple[Sequence[Item], RunReport]], driver_seconds: float, workers: Sequence[int],
            costs: CostModel | None = None, task_items: int = 32) -> list[Projection]:
    """Projections for each worker count and placement of a workload measured as ``runs``
    (each run's items and its report, all on the same workers) plus ``driver_seconds`` of the driver's own work."""
    costs = costs or fit_costs([r for _, r in runs])
    total_items = sum(len(items) for items, _ in runs)
    out = []
    for w in workers:
        for placement in ("affinity", "round_robin"):
            seconds, tokens = driver_seconds, 0.0
            for items, report in runs:
                if not items:
                    continue
                measured_w = report.workers
                _, estimated = _worker_times(items, measured_w, report.placement, costs, 1.0, task_items)
                scale = report.tokens_prefilled / estimated if estimated else 1.0
                t, p = _worker_times(items, w, placement, costs, scale, task_items)
                seconds += t
                tokens += p
            out.append(Projection(workers=w, placement=placement, seconds=round(seconds, 2),
                                  items_per_second=round(total_items / seconds, 2) if seconds else 0.0,
                                  prefilled_tokens=int(tokens)))
    return out
