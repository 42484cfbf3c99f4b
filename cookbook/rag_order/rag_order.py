"""Choose how many retrieved passages a RAG pipeline reads, and in which order, on validation data.

    python cookbook/rag_order/rag_order.py

A small model is easily distracted by extra passages ("Long-context LLMs meet RAG": quality
first rises with the number of passages, then falls), so ``k`` and the passage order are
settings to choose, like demonstrations. ``RAGSearch`` scores every ``k`` × order on the
validation questions (SQuAD v1.1 questions about the paragraphs in ./docs, in
``questions.jsonl``), keeps the best, and the script scores it and the recipe as written on
held-out questions, with the 95 % interval of the difference. The winner is saved as
``chosen.yaml``, a recipe like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

from optimizers import RAGSearch
from promptkit import load_recipe
from promptkit.evaluate import evaluate
from promptkit.metrics import paired_bootstrap_ci
from promptkit.types import Example

HERE = Path(__file__).parent


def load_questions(n_val: int, n_test: int) -> tuple[list[Example], list[Example]]:
    """Validation and held-out questions (the file is already shuffled, seeded)."""
    rows = [json.loads(line) for line in (HERE / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    examples = [Example(question=r["question"], answer=r["answer"]) for r in rows]
    return examples[:n_val], examples[n_val:n_val + n_test]


def main(out: str | Path = HERE / "chosen.yaml", n_val: int = 40, n_test: int = 100,
         ks: tuple[int, ...] = (1, 2, 3, 5), orders: tuple[str, ...] = ("score", "best_last", "ends")) -> dict:
    """Choose ``k`` and the order on validation, save the winner; return its settings and held-out F1."""
    pipe = load_recipe(HERE / "recipe.yaml")
    val, test = load_questions(n_val, n_test)
    chosen, report = RAGSearch(ks=list(ks), orders=list(orders)).compile(pipe, val, "f1", valset=val)
    chosen.save(out)
    given, best = evaluate(pipe, test, "f1"), evaluate(chosen, test, "f1")
    diff = paired_bootstrap_ci([r.score for r in best.results], [r.score for r in given.results])
    return {"chosen": report.best, "val_given": report.baseline_score, "val_chosen": report.best_score,
            "candidates": {c.name: round(c.score, 3) for c in report.candidates},
            "test_given": given.score, "test_chosen": best.score, "test_difference_ci": diff, "saved": str(out)}


if __name__ == "__main__":
    result = main()
    print(f"chosen on {len(result['candidates'])} candidates: {result['chosen']}")
    print(f"validation F1 {result['val_given']:.3f} -> {result['val_chosen']:.3f}")
    print(f"held-out F1 {result['test_given']:.3f} -> {result['test_chosen']:.3f} "
          f"(difference 95 % CI [{result['test_difference_ci'][0]:+.3f}, {result['test_difference_ci'][1]:+.3f}])")
