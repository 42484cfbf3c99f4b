"""The optimize-and-report cookbook recipe: a real search on TREC questions, logged to a local MLflow
store, judged on held-out questions, drawn as a report page that renders in headless Chromium."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest
from shared_data import missing_data

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cookbook" / "optimize_and_report" / "optimize_and_report.py"


def test_optimize_and_report(real_lm, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the recipe needs the mlflow extra: pip install -e '.[mlflow]'")
    pytest.importorskip("plotly", reason="the recipe needs the report extra: pip install -e '.[report]'")
    os.environ.setdefault("PROMPTKIT_DATA", str(ROOT.parent / "shared" / "data"))
    ns = runpy.run_path(str(SCRIPT), run_name="cookbook_example")
    try:
        ns["load_questions"](4, 4, 4)
    except FileNotFoundError as e:
        missing_data(e)
    out = ns["main"](tmp_path / "runs", n_train=40, n_val=8, n_test=8, instructions=0, sets=1, scorers=[{}])
    assert out["val_optimized"] >= out["val_zero_shot"]
    low, high = out["test_difference_ci"]
    assert low <= out["test_optimized"] - out["test_zero_shot"] <= high
    ref = out["mlflow"]
    assert ref.tracking_uri.endswith("runs/mlflow.db")
    children = mlflow.MlflowClient(ref.tracking_uri).search_runs(
        [ref.experiment_id], f"tags.`mlflow.parentRunId` = '{ref.run_id}'")
    assert len(children) == out["candidates"] == 3  # the recipe, a fixed demonstration set, kNN demonstrations
    assert out["logging_seconds"] < out["search_seconds"]
    from test_report import CHROMIUM, render_in_browser

    page = Path(out["report"])
    assert page.parent == tmp_path / "runs" and (tmp_path / "runs" / "search.json").is_file()
    if CHROMIUM:
        render_in_browser(page, tmp_path, "cookbook-report")
