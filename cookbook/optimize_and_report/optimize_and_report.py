"""Optimize a few-shot classifier, log the search to MLflow, open its report page.

    pip install -e '.[mlflow,report]'
    export PROMPTKIT_DATA=../shared/data
    python cookbook/optimize_and_report/optimize_and_report.py [--open]

Starts from the zero-shot question-type classifier in ``recipe.yaml`` (TREC, six
coarse types, read from ``$PROMPTKIT_DATA``) and runs ``JointSearch``: instructions
(the recipe's and LM-proposed ones) × demonstrations (fixed label-balanced sets, or
the training questions nearest each input), raced on the validation questions.
With ``tracker=MlflowTracker(...)`` the search becomes one MLflow run with a child
run per candidate; the zero-shot and the winning pipeline are then scored on
held-out questions and added to it. ``runs/`` ends up holding:

* ``mlflow.db`` and ``mlartifacts/``: the MLflow store (``mlflow ui --backend-store-uri
  sqlite:///runs/mlflow.db --default-artifact-root runs/mlartifacts``);
* ``search.json``: the run file (``promptkit report runs/search.json -o report.html``);
* ``report.html``: the report page, one file that opens offline.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import webbrowser
from pathlib import Path
from typing import Any

from optimizers import JointSearch, Racing
from promptkit import load_recipe
from promptkit.evaluate import evaluate
from promptkit.runs import MlflowTracker, write_report
from promptkit.types import Example

HERE = Path(__file__).parent
RECIPE = HERE / "recipe.yaml"
DATASETS = HERE.parents[1] / "bench" / "evaldata.py"


def load_questions(n_train: int, n_val: int, n_test: int, seed: int = 0) -> tuple[list[Example], ...]:
    """A training pool and validation questions from TREC's train split, held-out ones from its test split."""
    spec = importlib.util.spec_from_file_location("promptkit_bench_datasets", DATASETS)
    datasets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(datasets)
    train, test, _, _ = datasets.load_classification(name="trec", seed=seed)
    rows = lambda part: [Example(text=r["text"], label=r["label"], output_key="label") for r in part]  # noqa: E731
    pool = rows(train)
    return pool[n_val:][:n_train], pool[:n_val], rows(test)[:n_test]


def main(out: str | Path = HERE / "runs", n_train: int = 400, n_val: int = 60, n_test: int = 100,
         instructions: int = 1, sets: int = 1, scorers: list[dict[str, Any]] | None = None, seed: int = 0,
         store: str | None = None) -> dict[str, Any]:
    """Search, log to MLflow (``store``, default ``out``), judge on held-out questions, write the report page."""
    out = Path(out)
    pipe = load_recipe(RECIPE)
    train, val, test = load_questions(n_train, n_val, n_test, seed)
    tracker = MlflowTracker(store or out, experiment="question-types", recipe=RECIPE, results=out / "search.json")
    search = JointSearch(k=4, num_instructions=instructions, num_sets=sets, scorers=scorers,
                         racing=Racing(min_examples=max(4, n_val // 4)), seed=seed)
    best, report = search.compile(pipe, train, "accuracy", valset=val, tracker=tracker)
    print(report.summary(), file=sys.stderr)
    zero_shot, optimized = evaluate(pipe, test, "accuracy"), evaluate(best, test, "accuracy")
    run = tracker.log_heldout(zero_shot, optimized)
    page = write_report(run, out / "report.html")
    return {"report": str(page), "run_file": str(out / "search.json"), "mlflow": run.mlflow,
            "chosen": report.best["name"], "val_zero_shot": report.baseline_score, "val_optimized": report.best_score,
            "test_zero_shot": zero_shot.score, "test_optimized": optimized.score,
            "test_difference_ci": run.heldout.difference_ci if run.heldout else None,
            "candidates": len(report.candidates), "search_seconds": report.seconds,
            "logging_seconds": tracker.seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open", action="store_true", help="open the report page in a browser")
    parser.add_argument("--store", help="MLflow tracking URI or store (default: the runs/ folder)")
    args = parser.parse_args()
    r = main(store=args.store)
    print(f"{r['chosen']} won on validation ({r['val_zero_shot']:.3f} -> {r['val_optimized']:.3f}); held-out: "
          f"zero-shot {r['test_zero_shot']:.3f}, optimized {r['test_optimized']:.3f}, difference CI "
          f"[{r['test_difference_ci'][0]:+.3f}, {r['test_difference_ci'][1]:+.3f}]; logging took "
          f"{r['logging_seconds']:.2f} s of a {r['search_seconds']:.0f} s search")
    print(f"MLflow run {r['mlflow'].run_id} in {r['mlflow'].tracking_uri}\nreport: {r['report']}")
    if args.open:
        webbrowser.open(Path(r["report"]).resolve().as_uri())
