"""Runs kept across sessions: run files, MLflow tracking and tracing, and report pages with plots.

>>> tracker = MlflowTracker()                       # ./mlflow.db, or a server: MlflowTracker("http://host:5000")
>>> result = evaluate(pipe, "dev.jsonl", "accuracy", tracker=tracker)
>>> best, report = optimizer.compile(pipe, train, "accuracy", valset=val, tracker=tracker)
>>> tracker.log_heldout(evaluate(pipe, test, "accuracy"), evaluate(best, test, "accuracy"))
>>> write_report(tracker.run, "report.html")

:class:`Tracker` keeps runs as run files only (``Tracker(results="run.json")`` writes them);
MLflow (``pip install 'promptkit[mlflow]'``) and plotly (``'promptkit[report]'``) load on first use.
"""

from __future__ import annotations

from .mlflow_tracker import MlflowTracker
from .report import write_report
from .schema import FORMAT, CandidateRow, EvalSection, HeldOut, ItemResult, RunFile, SearchSection
from .sources import load_run
from .tracker import Tracker

__all__ = ["FORMAT", "CandidateRow", "EvalSection", "HeldOut", "ItemResult", "MlflowTracker", "RunFile",
           "SearchSection", "Tracker", "load_run", "write_report"]
