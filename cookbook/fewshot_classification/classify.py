"""Few-shot classification with selected exemplars.

    python cookbook/fewshot_classification/classify.py "What a waste of money."

``knn_exemplars`` picks, for each input, the labelled examples closest to it
(all-MiniLM-L6-v2 embeddings); ``classify`` scores each label's log-likelihood
after the prompt and keeps the best, so the output is always a valid label.
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import load_recipe

RECIPE = Path(__file__).with_name("recipe.yaml")


def main(texts: list[str]) -> list[dict]:
    """Label each text; return the label, its score per label and the exemplars used."""
    pipe = load_recipe(RECIPE)
    return [{"text": r.inputs["text"], "label": r.output, "scores": r.label_scores,
             "exemplars": [ex.get("text") for ex in r.exemplars]} for r in pipe.run([{"text": t} for t in texts])]


if __name__ == "__main__":
    for row in main(sys.argv[1:] or ["What a waste of money, it stopped working at once.",
                                     "Lovely little cafe with the kindest owners."]):
        print(f"{row['label']:>8}  {row['text']}")
