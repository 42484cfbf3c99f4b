"""RAG whose retrieved documents are prefilled once, ever, wherever they land in the prompt.

    python cookbook/rag_kv_reuse/rag_kv_reuse.py "Who was the Super Bowl 50 MVP?" "Who was the Panthers quarterback in Super Bowl 50?"

The recipe answers with ``kv_reuse: blend``. The first question's documents are
encoded alone into the engine's chunk store; a second question that retrieves
some of them, in any order, takes their KV from the store and recomputes only
a share of their tokens, so its first token comes sooner. The script answers the
last question again with ``kv_reuse: full`` (every document prefilled, the
exact reference) and prints both times to first token and the tokens each
request reused, recomputed and prefilled.
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import load_recipe

RECIPE = Path(__file__).with_name("recipe.yaml")
# the same three documents, retrieved in another order
QUESTIONS = ["Who was the Super Bowl 50 MVP?", "Who was the Panthers quarterback in Super Bowl 50?"]


def main(questions: list[str], max_tokens: int | None = None) -> list[dict]:
    """Answer each question with the recipe (blend), then the last one with full prefill."""
    pipe = load_recipe(RECIPE)
    generate = pipe.stages[-1]
    settings = {**generate.model_dump(), **({"max_tokens": max_tokens} if max_tokens else {})}
    rows = []
    runs = [(q, "blend") for q in questions] + [(questions[-1], "full")]
    for question, mode in runs:  # one at a time: each time to first token is a question's own
        pipe.stages[-1] = type(generate)(**{**settings, "kv_reuse": mode})
        r = pipe(question)
        u = r.generation.usage
        rows.append({"question": question, "mode": mode, "answer": r.output, "sources": [d.id for d in r.documents],
                     "ttft": u.first_token_seconds, "prompt_tokens": u.prompt_tokens, "cached": u.cached_tokens,
                     "reused": u.reused_tokens, "recomputed": u.recomputed_tokens, "prefilled": u.prefilled_tokens,
                     "stored": u.stored_tokens})
    return rows


if __name__ == "__main__":
    for row in main(sys.argv[1:] or QUESTIONS):
        print(f"[{row['mode']}] {row['question']}\n  -> {row['answer']}   [{', '.join(row['sources'])}]\n"
              f"     first token after {row['ttft']:.2f} s; of {row['prompt_tokens']} prompt tokens "
              f"{row['cached']} cached, {row['reused']} reused, {row['recomputed']} recomputed, "
              f"{row['prefilled']} prefilled in place ({row['stored']} encoded alone into the store)")
