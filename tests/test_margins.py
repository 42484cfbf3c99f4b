"""Writing in the Margins: chunk prompts extend each other, so the context is prefilled once."""

from __future__ import annotations

import runpy
from pathlib import Path

from promptkit import BuildPrompt, Document, Generate, Record
from promptkit.margins import Margins, chunk_ends, chunk_prompt, parse_margin, with_margins

DOCS = [Document(id="nile", text="The Nile is a major river in northeastern Africa, flowing into the Mediterranean Sea."),
        Document(id="paris", text="Paris is the capital and largest city of France, home to the Louvre museum."),
        Document(id="leaf", text="Photosynthesis converts light energy into chemical energy in green plants.")]
LAYOUT = BuildPrompt(system="You answer questions using only the given context.",
                     instruction="Use the context to answer the question in a few words.")


def record(question: str) -> Record:
    return LAYOUT.process([Record(inputs={"question": question}, documents=DOCS)])[0]


def context_tokens(lm, prompt) -> int:
    """Tokens of the prompt up to the end of its context (and the chat turn's closing tokens)."""
    return lm.count_tokens(prompt.with_segment("question", None).with_segment("answer_prefix", None), chat=True)


def test_chunk_prompts_extend_the_previous_chunk_and_notes_follow_the_context():
    prompt = record("Which museum is in Paris?").prompt
    ends = chunk_ends(prompt, 1)
    assert len(ends) == 3 and chunk_ends(prompt, 2) == [ends[1], ends[2]]
    contexts = [chunk_prompt(prompt, e, Margins().request).get("context") for e in ends]
    assert contexts[0].endswith(DOCS[0].text) and contexts[2] == prompt.get("context")
    assert contexts[1].startswith(contexts[0]) and contexts[2].startswith(contexts[1])
    noted = with_margins(prompt, ["Paris has the Louvre."], "Notes:")
    assert noted.get("context").startswith(prompt.get("context") + "\n\nNotes:\n- Paris has the Louvre.")
    assert noted.segments[-2].kind == "question" and noted.document_spans() == prompt.document_spans()
    assert parse_margin("YES#. The Louvre.") == ("The Louvre.", True) and parse_margin("NO#") == ("", False)


def test_margins_reuse_each_chunk_prefix_and_reach_the_answer(real_lm):
    stage = Generate(max_tokens=8, margins={"max_tokens": 16})
    (rec,) = stage.process([record("Which museum is in Paris, the French capital?")])
    outcome = stage.margin_outcome
    assert outcome.calls == 3 and len(outcome.margins[0]) == 3
    (usages,) = outcome.usages
    # Chunk c's prompt starts with chunk c-1's context: the cache serves all of it, so only the new
    # document and the margin request are prefilled.
    base = record("x").prompt
    for c in (1, 2):
        read_before = context_tokens(real_lm, chunk_prompt(base, chunk_ends(base, 1)[c - 1], ""))
        assert usages[c].cached_tokens >= read_before - 6  # all but the chat turn's closing tokens
    assert rec.usage.cached_tokens >= context_tokens(real_lm, base) - 6  # the answer reads the cached context
    kept = [m for m, r in zip(outcome.margins[0], outcome.relevant[0]) if m and r]
    assert all(f"- {m}" in rec.prompt.get("context") for m in kept)


def test_cookbook_margins_qa(real_lm):
    ns = runpy.run_path(str(Path(__file__).resolve().parent.parent / "cookbook" / "margins_qa" / "margins_qa.py"),
                        run_name="cookbook_example")
    (row,) = ns["main"](["Who was the Super Bowl 50 MVP?"])
    assert row["sources"][0] == "game-summary.md" and len(row["chunk_prompt_tokens"]) == 4
    # every note reads all documents before it, yet each document is prefilled once: chunk c's cached
    # tokens are all of chunk c-1's prompt but the note request after its context (the same each time)
    prompts, cached = row["chunk_prompt_tokens"], row["chunk_cached_tokens"]
    request = [p - c for p, c in zip(prompts[:-1], cached[1:])]
    assert max(request) - min(request) <= 2 and 0 < max(request) < 0.5 * prompts[0]
    assert row["answer"]
