"""Long-context QA with Writing in the Margins.

    python cookbook/margins_qa/margins_qa.py "Who was the Super Bowl 50 MVP?"

The generate stage's ``margins`` reads the context a document at a time and writes a note
after each; the notes judged relevant are put before the question. The script prints the notes,
the answer, and the tokens the engine prefilled against those it served from the prefix cache:
each document is prefilled once although every note reads all documents before it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import get_lm, load_recipe

RECIPE = Path(__file__).with_name("recipe.yaml")


def main(questions: list[str]) -> list[dict]:
    """Answer each question; return the notes, the answer and the margin calls' token counts."""
    pipe = load_recipe(RECIPE)
    lm = get_lm(pipe.stages[-1].model)
    before = lm.stats()
    records = pipe.run(questions)
    after, outcome = lm.stats(), pipe.stages[-1].margin_outcome
    rows = []
    for i, r in enumerate(records):
        rows.append({"question": r.inputs["question"], "answer": (r.output or "").strip(),
                     "sources": [d.id for d in r.documents],
                     "notes": [m for m, ok in zip(outcome.margins[i], outcome.relevant[i]) if ok and m],
                     "chunk_prompt_tokens": [u.prompt_tokens for u in outcome.usages[i]],
                     "chunk_cached_tokens": [u.cached_tokens for u in outcome.usages[i]]})
    rows[0]["prefilled_total"] = after["tokens_prefilled"] - before["tokens_prefilled"]
    rows[0]["cached_total"] = after["tokens_cached"] - before["tokens_cached"]
    return rows


if __name__ == "__main__":
    for row in main(sys.argv[1:] or ["Who was the Super Bowl 50 MVP?"]):
        print(row["question"])
        for note in row["notes"]:
            print(f"  note: {note}")
        print(f"  -> {row['answer']}   [{', '.join(row['sources'])}]")
        print(f"  chunk prompts {row['chunk_prompt_tokens']} tokens, of which cached {row['chunk_cached_tokens']}")
