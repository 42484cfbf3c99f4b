"""RAG question answering over a folder of documents.

    python cookbook/rag_qa/rag_qa.py "How tall is Olympus Mons?"

The recipe retrieves with BM25 from ./docs, builds a prompt whose shared
parts (system, instruction) come first so the engine prefills them once,
and answers with the embedded SmolLM2. Point the recipe's ``corpus`` at your
own folder to use it on your documents.
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import load_recipe

RECIPE = Path(__file__).with_name("recipe.yaml")


def main(questions: list[str], max_tokens: int | None = None) -> list[dict]:
    """Answer each question; return the answers with the ids of the documents they came from."""
    pipe = load_recipe(RECIPE)
    if max_tokens:
        pipe.stages[-1].max_tokens = max_tokens  # the generate stage
    return [{"question": r.inputs["question"], "answer": r.output.strip(), "sources": [d.id for d in r.documents]}
            for r in pipe.run(questions)]


if __name__ == "__main__":
    for row in main(sys.argv[1:] or ["How tall is Olympus Mons?", "Who invented the Fresnel lens?"]):
        print(f"{row['question']}\n  -> {row['answer']}   [{', '.join(row['sources'])}]")
