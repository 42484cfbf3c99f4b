"""Prompt optimization of a classifier: search demonstrations and instructions, save the winner.

    python cookbook/prompt_optimization/optimize.py

Starts from the zero-shot classifier in ``recipe.yaml`` and 36 labelled
messages in ``examples.jsonl`` (half to choose from, half to score on). Two
optimizers run one after the other, each on the previous one's result:
``RandomFewShot`` tries ordered sets of demonstrations, then ``InstructionSearch``
asks the LM for better instructions (OPRO-style). An optimizer keeps the
pipeline as given when nothing beats it on the validation half. The result is
written as ``optimized.yaml``, a recipe like any other:
``promptkit run cookbook/prompt_optimization/optimized.yaml --input "..."``.
Candidates share their instruction and demonstrations, so the engine's prefix
cache prefills each shared part once: the report shows how little was prefilled.
"""

from __future__ import annotations

import sys
from pathlib import Path

from optimizers import InstructionSearch, RandomFewShot
from promptkit import load_recipe
from promptkit.data import load_examples

HERE = Path(__file__).parent


def main(out: str | Path = HERE / "optimized.yaml", candidates: int = 4) -> dict:
    """Optimize the classifier, save it to ``out``; return the scores and what it cost."""
    pipe = load_recipe(HERE / "recipe.yaml")
    examples = load_examples(HERE / "examples.jsonl", output_key="label")
    train, val = examples[0::2], examples[1::2]  # every label on both sides
    steps = [RandomFewShot(k=3, num_candidates=candidates, seed=0),
             InstructionSearch(rounds=1, proposals_per_round=candidates, seed=0)]
    reports = []
    for opt in steps:
        pipe, report = opt.compile(pipe, train, "accuracy", valset=val)
        reports.append(report)
        print(report.summary(), file=sys.stderr)
    pipe.save(out)
    return {"zero_shot_accuracy": reports[0].baseline_score, "optimized_accuracy": reports[-1].best_score,
            "chosen": [r.best for r in reports], "saved": str(out),
            "prefilled_fraction": [round(r.prefill_ratio, 3) for r in reports]}


if __name__ == "__main__":
    result = main()
    print(f"validation accuracy {result['zero_shot_accuracy']:.2f} -> {result['optimized_accuracy']:.2f}; "
          f"saved {result['saved']}")
