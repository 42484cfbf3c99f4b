"""Beyond one machine: evaluations, searches and serving on Ray.

* :class:`RayExecutor` runs ``evaluate(..., executor=ex)`` and every optimizer's candidate
  evaluations (``JointSearch(..., executor=ex)``) on engine actors, each unit of work on
  the worker that already holds its prefix (:mod:`promptkit.distributed.units`).
* :class:`LocalExecutor` runs them in this process, as without an executor.
* :mod:`promptkit.distributed.serve` puts N engine replicas behind Ray Serve with a
  prefix-aware request router (``promptkit serve --replicas N``).

Ray is an optional extra (``pip install 'promptkit[ray]'``); nothing here imports it
until a Ray object is made.
"""

from __future__ import annotations

from typing import Any

from .executor import Executor, Job, LocalExecutor, RunReport, ShardedPipeline, WorkerReport, split_at_lm

__all__ = ["Executor", "Job", "LocalExecutor", "ProgressSnapshot", "RayExecutor", "RunReport", "ShardedPipeline",
           "WorkerReport", "ray_available", "require_ray", "split_at_lm"]

_LAZY = {"RayExecutor": "ray_executor", "ProgressSnapshot": "ray_executor", "require_ray": "ray_executor"}


def ray_available() -> bool:
    """Whether Ray can be imported here."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
