"""BM25: scores equal rank_bm25's, incremental add, save/load, RM3, filters, metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rank_bm25 import BM25L, BM25Okapi, BM25Plus

from promptkit.types import Document
from retrievers import BM25, RM3, IndexFormatError, Tokenizer, english
from retrievers.base import top_k
from retrievers.metrics import evaluate_run, mrr_at_k, ndcg_at_k, recall_at_k
from retrievers.samples import python_reference, python_reference_paragraphs

QUERIES = ["the assert statement raises AssertionError", "how does a for loop iterate over a sequence",
           "the the the", "lambda expressions create anonymous functions", "unknownword zzz", "with statement"]


@pytest.fixture(scope="module")
def paragraphs():
    return python_reference_paragraphs()[:600]


@pytest.mark.parametrize("variant,reference", [("okapi", BM25Okapi), ("plus", BM25Plus), ("l", BM25L)])
@pytest.mark.parametrize("tokenizer", [Tokenizer(), english()])
def test_scores_equal_rank_bm25(paragraphs, variant, reference, tokenizer):
    ours = BM25(variant, tokenizer=tokenizer).index(paragraphs)
    ref = reference([tokenizer(d.text) for d in paragraphs])
    for q in QUERIES:
        np.testing.assert_allclose(ours.get_scores(q), ref.get_scores(tokenizer(q)), rtol=1e-12, atol=1e-12)


def test_okapi_idf_floor_matches_rank_bm25():
    # "common" is in 3 of 4 documents: its idf is negative and is floored at epsilon * mean idf
    toks = [["common", "apple"], ["common", "pear"], ["common", "plum"], ["fig"]]
    docs = [Document(id=str(i), text=" ".join(t)) for i, t in enumerate(toks)]
    ours = BM25("okapi", epsilon=0.25).index(docs)
    ref = BM25Okapi(toks, epsilon=0.25)
    assert ours.idf[ours.vocab["common"]] == pytest.approx(ref.idf["common"], abs=1e-15)
    assert ref.idf["common"] == pytest.approx(0.25 * ref.average_idf) and ref.idf["common"] > 0
    np.testing.assert_allclose(ours.get_scores(["common", "fig"]), ref.get_scores(["common", "fig"]), atol=1e-15)


def test_repeated_query_terms_count_each_time(paragraphs):
    bm25 = BM25().index(paragraphs)
    np.testing.assert_allclose(bm25.get_scores("loop loop"), 2 * bm25.get_scores("loop"))


def test_incremental_add_equals_full_build(paragraphs):
    full = BM25("plus", tokenizer=english()).index(paragraphs)
    inc = BM25("plus", tokenizer=english()).index(paragraphs[:250])
    inc.add(paragraphs[250:400])
    inc.add(paragraphs[400:])
    for q in QUERIES:
        np.testing.assert_allclose(inc.get_scores(q), full.get_scores(q), rtol=1e-12)
    assert [d.id for d in inc.search(QUERIES[0], 5)] == [d.id for d in full.search(QUERIES[0], 5)]


def test_add_refuses_duplicate_ids(paragraphs):
    bm25 = BM25().index(paragraphs[:10])
    with pytest.raises(ValueError, match="duplicate document ids"):
        bm25.add([paragraphs[3]])
    assert len(bm25) == 10


def test_search_returns_scored_copies_best_first(paragraphs):
    bm25 = BM25(tokenizer=english()).index(paragraphs)
    hits = bm25.search("assert statement AssertionError", k=5)
    assert len(hits) == 5 and hits[0].metadata["topic"] == "assert"
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(bm25.get_scores("assert statement AssertionError").max())
    assert paragraphs[0].score is None  # stored documents are not mutated


def test_top_k_ties_and_infinities():
    s = np.array([1.0, 3.0, 3.0, -np.inf, 2.0])
    assert top_k(s, 3).tolist() == [1, 2, 4]
    assert top_k(s, 10).tolist() == [1, 2, 4, 0]


def test_filter(paragraphs):
    bm25 = BM25().index(paragraphs)
    hits = bm25.search("statement", k=20, filter={"topic": ["assert", "break"]})
    assert hits and {h.metadata["topic"] for h in hits} == {"assert", "break"}


def test_bad_query_and_k(paragraphs):
    bm25 = BM25().index(paragraphs[:5])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        bm25.search("x", k=0)
    with pytest.raises(TypeError, match="query must be a string"):
        bm25.search(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown BM25 variant"):
        BM25("bm42")  # type: ignore[arg-type]


def test_save_load_roundtrip_without_pickle(paragraphs, tmp_path):
    bm25 = BM25("l", k1=1.2, b=0.7, tokenizer=english()).index(paragraphs)
    out = bm25.save(tmp_path / "idx")
    with np.load(out / "bm25.npz", allow_pickle=False) as z:
        assert z["data"].dtype != object
    loaded = BM25.load(out)
    assert (loaded.variant, loaded.k1, loaded.b, loaded.tokenizer) == ("l", 1.2, 0.7, english())
    for q in QUERIES:
        np.testing.assert_array_equal(loaded.get_scores(q), bm25.get_scores(q))
    assert [d.model_dump() for d in loaded.search("loop", 3)] == [d.model_dump() for d in bm25.search("loop", 3)]


def test_save_refuses_existing_dir_and_keeps_it(paragraphs, tmp_path):
    first = BM25().index(paragraphs[:20]).save(tmp_path / "idx")
    before = (first / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        BM25().index(paragraphs[20:40]).save(first)
    assert (first / "manifest.json").read_bytes() == before
    BM25().index(paragraphs[20:40]).save(first, force=True)
    assert [d.id for d in BM25.load(first).docs] == [d.id for d in paragraphs[20:40]]


def test_truncated_or_corrupted_or_other_version_is_a_clear_error(paragraphs, tmp_path):
    out = BM25().index(paragraphs[:50]).save(tmp_path / "idx")
    data = (out / "bm25.npz").read_bytes()
    (out / "bm25.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match="truncated"):
        BM25.load(out)
    (out / "bm25.npz").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IndexFormatError, match="checksum"):
        BM25.load(out)
    (out / "bm25.npz").write_bytes(data)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(IndexFormatError, match="version 99"):
        BM25.load(out)
    with pytest.raises(IndexFormatError, match="not an index directory"):
        BM25.load(tmp_path)


def test_rm3_expands_with_feedback_terms_and_keeps_query():
    docs, queries = python_reference()
    bm25 = BM25(tokenizer=english()).index(docs)
    rm3 = RM3(bm25, fb_docs=5, fb_terms=8, orig_weight=0.6)
    weights = rm3.expand("assert statement")
    inv = {i: t for t, i in bm25.vocab.items()}
    terms = {inv[i] for i in weights}
    assert {"assert", "statement"} <= terms and len(terms) > 2
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights[bm25.vocab["assert"]] >= 0.3  # the query keeps orig_weight / 2 at least
    assert not terms & {"the", "a", "is"}
    run = {t: [d.id for d in rm3.search(q, 10)] for t, q in queries.items()}
    assert evaluate_run(run, {t: {t: 1} for t in queries})["recall@10"] > 0.8


def test_bm25_finds_python_reference_topics_by_title():
    docs, queries = python_reference()
    bm25 = BM25(tokenizer=english()).index(docs)
    run = {t: [d.id for d in bm25.search(q, 10)] for t, q in queries.items()}
    scores = evaluate_run(run, {t: {t: 1} for t in queries})
    assert scores["recall@10"] > 0.85 and scores["mrr@10"] > 0.6


def test_tokenizer():
    assert Tokenizer()("Hello, WORLD! x2") == ["hello", "world", "x2"]
    assert english()("The runners were running") == ["runner", "run"]
    assert Tokenizer(stopwords=["foo"])("foo bar") == ["bar"]
    with pytest.raises(ValueError, match="unknown stemmer"):
        Tokenizer(stemmer="klingon")


def test_metrics_hand_computed():
    ranked = ["d3", "d1", "d7", "d2"]
    qrels = {"d1": 2, "d2": 1, "d9": 1}
    assert recall_at_k(ranked, qrels, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, qrels, 4) == pytest.approx(2 / 3)
    assert mrr_at_k(ranked, qrels, 10) == pytest.approx(0.5)
    assert mrr_at_k(ranked, qrels, 1) == 0.0
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, qrels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["d1", "d2", "d9"], qrels, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x"], {"d1": 0}, 10) == 0.0
    assert evaluate_run({"q": ranked}, {"q": qrels, "empty": {}})["mrr@10"] == pytest.approx(0.5)
