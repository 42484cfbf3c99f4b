"""Batched classification: many inputs in one prompt, asked in several orders and voted.

    python cookbook/batch_classification/batch_classify.py "What a waste of money." "Lovely cafe."

``batch_prompt`` on the classify stage lists the inputs as numbered lines in one prompt; the
model answers ``1: <label>`` per line under a regular expression, so each input always gets a
label. With ``permutations`` the batch is asked again in other orders and the labels voted;
``seas`` stops asking an input the model is already sure of. Fewer, longer prompts: whether that
is cheaper than one prompt per input depends on the engine (``bench/batch_prompt.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import load_recipe

RECIPE = Path(__file__).with_name("recipe.yaml")


def main(texts: list[str]) -> dict:
    """Label every text; return the labels, each input's votes, and the prompts it took."""
    pipe = load_recipe(RECIPE)
    records = pipe.run([{"text": t} for t in texts])
    outcomes = pipe.stages[-1].batch_outcomes
    votes = [v for o in outcomes for v in o.votes]
    return {"rows": [{"text": r.inputs["text"], "label": r.output, "votes": [x.answer for x in v]}
                     for r, v in zip(records, votes)],
            "lm_calls": sum(o.calls for o in outcomes), "rounds": max(o.rounds for o in outcomes)}


if __name__ == "__main__":
    out = main(sys.argv[1:] or ["What a waste of money, it stopped working at once.",
                                "Lovely little cafe with the kindest owners.",
                                "The plot made no sense and the dialogue was painful.",
                                "An absolute delight from start to finish."])
    for row in out["rows"]:
        print(f"{row['label']:>8}  {row['text']}   (votes: {', '.join(row['votes'])})")
    print(f"{out['lm_calls']} prompts over {out['rounds']} rounds")
