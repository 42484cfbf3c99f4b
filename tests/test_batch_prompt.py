"""BatchPrompt: many items per prompt, one constrained line each, voted over orders, early stopping."""

from __future__ import annotations

import random
import runpy
from pathlib import Path

import pytest

from promptkit import BuildPrompt, Classify, Generate, Pipeline
from promptkit.batch_prompt import (CLASSIFY_HEADER, BatchPrompt, Vote, batch_prompt, choice_pattern, item_regex, majority,
                                    parse_lines, run_rounds, settled)

REVIEWS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés from start to finish .",
           "an utterly charming and hilarious film .", "it 's a mess , a dull and lifeless one .",
           "one of the greatest family-oriented , fantasy-adventure movies ever .",
           "a sour little movie at its core ."]


def test_regex_and_parse_give_one_answer_per_numbered_line():
    assert item_regex(2, "a|b") == "1: (?:a|b)\n2: (?:a|b)"
    assert choice_pattern(["no", "not sure"]) == r"not\ sure|no"  # longest first: no label shadows another
    assert parse_lines("1: yes\n3: no\n2: maybe\n1: again", 4) == ["yes", "maybe", "no", None]


def test_rounds_permute_vote_and_stop_items_the_model_is_sure_of():
    calls: list[list[list[int]]] = []

    def ask(batches):  # item 0 is always answered confidently; the others never are
        calls.append(batches)
        return [[Vote(answer="x" if i == 0 else "y", probability=0.99 if i == 0 else 0.5) for i in b] for b in batches]

    settings = BatchPrompt(size=2, permutations=4, seas=True, seas_votes=2, seed=3)
    votes, n_calls, rounds = run_rounds(5, settings, ask)
    assert rounds == 4 and [len(v) for v in votes] == [2, 4, 4, 4, 4]  # item 0 settled after two sure votes
    assert n_calls == 3 + 3 + 2 + 2 and calls[0] == [[0, 1], [2, 3], [4]]  # round 0 keeps the given order
    order = [0, 1, 2, 3, 4]
    random.Random(3 * 1_000_003 + 1).shuffle(order)
    assert [i for b in calls[1] for i in b] == order  # later rounds ask in a seeded permutation
    assert settled(votes[0], settings) and not settled(votes[1], settings)
    assert majority([Vote(answer="a", probability=0.2), Vote(answer="b", probability=0.9),
                     Vote(answer="a", probability=0.1), Vote(answer="b", probability=0.1)]) == "b"  # tie: more mass


def test_generate_rejects_a_format_that_is_not_one_line_per_item():
    with pytest.raises(ValueError, match="batch_prompt"):
        Generate(batch_prompt={"size": 4}, signature="question -> answer: str")
    assert Generate(batch_prompt={"size": 4}, choices=["a", "b"]).config()["batch_prompt"] == {"size": 4}


def test_classify_batches_parse_per_item_and_votes_follow_the_permutation(real_lm):
    stage = Classify(labels=["positive", "negative"],
                     batch_prompt={"size": 3, "permutations": 2, "seed": 1})
    pipe = Pipeline(BuildPrompt(instruction="Classify the sentiment of each movie review.", input_format="Review: {text}"),
                    stage)
    records = pipe.run([{"text": t} for t in REVIEWS])
    (outcome,) = stage.batch_outcomes
    assert outcome.calls == 4 and outcome.rounds == 2  # 6 items in 2 prompts, asked twice
    assert all(len(v) == 2 and {x.answer for x in v} <= {"positive", "negative"} for v in outcome.votes)
    assert all(r.output in ("positive", "negative") and len(r.label_scores) == 2 for r in records)
    # Round 1 asked a seeded permutation: re-ask its first batch and read it line by line.
    order = list(range(6))
    random.Random(1 * 1_000_003 + 1).shuffle(order)
    first = order[:3]
    header = CLASSIFY_HEADER.replace("{labels}", "positive, negative")
    prompt = batch_prompt(records[0].prompt, [REVIEWS[i] for i in first], header, "Answers:\n")
    (gen,) = real_lm.generate([prompt], regex=item_regex(3, "positive|negative"), max_tokens=40)
    assert [outcome.votes[i][1].answer for i in first] == parse_lines(gen.text, 3)


def test_generate_batch_answers_every_item_with_a_choice(real_lm):
    stage = Generate(choices=["red", "blue", "green", "yellow"], batch_prompt={"size": 4})
    pipe = Pipeline(BuildPrompt(instruction="Name the colour of each item."), stage)
    records = pipe.run([{"question": q} for q in ["the sky on a clear day", "fresh grass", "a ripe banana",
                                                  "a fire truck", "snow"]])
    assert [o.calls for o in stage.batch_outcomes] == [2]  # 5 items: one prompt of 4 and one of 1
    assert all(r.output in ("red", "blue", "green", "yellow") for r in records)
    assert all(r.usage is not None and r.usage.prompt_tokens > 0 for r in records)


def test_cookbook_batch_classification(real_lm):
    ns = runpy.run_path(str(Path(__file__).resolve().parent.parent / "cookbook" / "batch_classification" /
                            "batch_classify.py"), run_name="cookbook_example")
    out = ns["main"](["What a waste of money, it stopped working at once.", "Lovely little cafe, kind owners."])
    assert all(r["label"] in ("positive", "negative") and 2 <= len(r["votes"]) <= 3 for r in out["rows"])
    assert out["lm_calls"] == out["rounds"] <= 3  # two reviews fit one prompt per round
