"""Long-context question answering with prompt compression.

    python cookbook/long_doc_compression/long_doc_compression.py "Who invented the Fresnel lens?"

All documents of ./docs go into the context; the ``compress`` stage keeps a
third of its tokens (the sentences most similar to the question, in their
original order) and the embedded SmolLM2 answers from what is left.
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import get_lm, load_recipe

RECIPE = Path(__file__).with_name("recipe.yaml")


def main(questions: list[str]) -> list[dict]:
    """Answer each question; report the context's tokens before and after compression."""
    pipe = load_recipe(RECIPE)
    lm = get_lm()
    rows = []
    for r in pipe.run(questions):
        before = sum(len(lm.backend.encode_continuation(d.text)) for d in r.documents)
        after = len(lm.backend.encode_continuation(r.prompt.get("context") or ""))
        rows.append({"question": r.inputs["question"], "answer": r.output.strip(),
                     "context_tokens_before": before, "context_tokens_after": after})
    return rows


if __name__ == "__main__":
    for row in main(sys.argv[1:] or ["Who invented the Fresnel lens?"]):
        print(f"{row['question']}\n  -> {row['answer']}   "
              f"(context {row['context_tokens_before']} -> {row['context_tokens_after']} tokens)")
