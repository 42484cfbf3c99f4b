"""Long-context question answering with sparse prefill.

    python cookbook/sparse_long_context/sparse_long_context.py "What year was engraved on the brass compass?"

The whole field log in ./docs (about 3,300 tokens) goes into the context of
every question; the ``generate`` stage runs on an LM with sparse prefill
(``sparse:`` in ``recipe.yaml``), so attention over the long prompt is
computed only on the blocks that matter. The script reports how sparse the
attention was, layer by layer, next to the answer; ``--dense`` answers with
dense attention too, to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

from promptkit import Document, load_recipe
from promptkit.pipeline import Pipeline, Record

HERE = Path(__file__).parent


def main(questions: list[str], dense: bool = False) -> list[dict]:
    """Answer each question over the whole log; report prompt tokens and the sparsity reached."""
    pipe = load_recipe(HERE / "recipe.yaml")
    docs = [Document(id=p.name, text=p.read_text(encoding="utf-8")) for p in sorted((HERE / "docs").glob("*.md"))]

    def records() -> list[Record]:  # a pipeline fills in the records it runs, so each run gets fresh ones
        return [Record(inputs={"question": q}, documents=docs) for q in questions]

    rows = [{"question": r.inputs["question"], "answer": r.output.strip(),
             "prompt_tokens": r.generation.usage.prompt_tokens} for r in pipe.run(records())]
    sparsity = pipe.stages[-1].lm().stats().get("sparse_mean_sparsity", 0.0)
    for row in rows:
        row["sparsity"] = round(sparsity, 3)
    if dense:  # the same pipeline with sparse prefill off
        prompt, generate = pipe.stages
        plain = Pipeline(prompt, type(generate)(**{**generate.model_dump(), "sparse": False}))
        for row, r in zip(rows, plain.run(records())):
            row["dense_answer"] = r.output.strip()
    return rows


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--dense"]
    for row in main(args or ["What year was engraved on the brass compass?"], dense="--dense" in sys.argv):
        extra = f", dense: {row['dense_answer']!r}" if "dense_answer" in row else ""
        print(f"{row['question']}\n  -> {row['answer']}   ({row['prompt_tokens']} prompt tokens, "
              f"{row['sparsity']:.0%} of attention blocks skipped{extra})")
