"""Retrieval with GenQRFusion: LM keyword reformulations from an ensemble of instructions, fused.

    python cookbook/genqr_retrieval/genqr_retrieval.py "Which network broadcast the game?"

Prints, for each question, the keywords every instruction produced, the documents plain BM25
finds and those the fused reformulations find, and the answer from the recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import Pipeline, Record, load_recipe

RECIPE = Path(__file__).with_name("recipe.yaml")


def main(questions: list[str], instructions: int | None = None) -> list[dict]:
    """Answer each question; return the keywords, the plain and fused rankings and the answer."""
    pipe = load_recipe(RECIPE)
    rewriter = pipe.stages[0].retriever()  # a GenQREnsemble around the BM25 index
    if instructions:
        rewriter.instructions = rewriter.instructions[:instructions]
    k = pipe.stages[0].k
    terms = rewriter.keywords(questions)  # what the bm25 stage does inside, kept here to show the keywords
    plain = rewriter.retriever.search_many(questions, k)
    fused = rewriter.search_keywords(questions, terms, k)
    answer = Pipeline(*pipe.stages[1:])  # the prompt and generate stages, on the fused documents
    records = answer.process([Record(inputs={"question": q}, documents=d) for q, d in zip(questions, fused)])
    return [{"question": q, "keywords": t, "bm25": [d.id for d in p], "fused": [d.id for d in r.documents],
             "answer": (r.output or "").strip()} for q, t, p, r in zip(questions, terms, plain, records)]


if __name__ == "__main__":
    for row in main(sys.argv[1:] or ["Which network broadcast the game?"]):
        print(row["question"])
        for kw in row["keywords"]:
            print(f"  keywords: {kw}")
        print(f"  BM25: {row['bm25']}\n  GenQRFusion: {row['fused']}\n  -> {row['answer']}")
