"""LM reranking and HyDE rewriting on the real embedded SmolLM2 (kept to a handful of calls)."""

from __future__ import annotations

import math

import pytest

from promptkit.types import Document
from retrievers import BM25, HyDE, LMReranker
from retrievers.fusion import reciprocal_rank_fusion

DOCS = [
    Document(id="bio", text="Photosynthesis converts light energy into chemical energy in green plants.", score=3.0),
    Document(id="paris", text="Paris is the capital and largest city of France.", score=1.0),
]


def test_lm_reranker_scores_are_yes_probabilities_in_one_batch(real_lm):
    rr = LMReranker(real_lm, method="yes_no")
    query = "What is the capital of France?"
    ranked = rr.rerank(query, DOCS)
    yes, no = real_lm.score(rr.prompt(query, DOCS[1]), [" yes", " no"])
    expected = yes - math.log(math.exp(yes) + math.exp(no))
    by_id = {d.id: d for d in ranked}
    assert by_id["paris"].score == pytest.approx(expected, abs=1e-4)
    assert [d.id for d in ranked] == ["paris", "bio"]  # the relevant passage wins
    assert by_id["paris"].metadata["first_stage_score"] == 1.0 and DOCS[1].score == 1.0
    prompt = rr.prompt(query, DOCS[1]).text()
    assert prompt.index(rr.instruction) < prompt.index(DOCS[1].text) < prompt.index(query)
    assert rr.rerank_many([query, query], [DOCS, DOCS[:1]], k=1)[1][0].id == "bio"


def test_hyde_generates_passages_and_fuses_result_lists(real_lm):
    docs = [Document(id=str(i), text=t) for i, t in enumerate([
        "Paris is the capital and largest city of France.",
        "The Nile is a major river in northeastern Africa.",
        "Photosynthesis converts light energy into chemical energy in green plants.",
    ])]
    bm25 = BM25().index(docs)
    hyde = HyDE(bm25, real_lm, max_tokens=8)  # a few words suffice; decoding is the slow part
    query = "Which city is the capital of France?"
    (passage,), = hyde.passages([query])
    assert passage.strip()
    hits = hyde.search_passages([query], [[passage]], k=3)[0]
    expect = reciprocal_rank_fusion([bm25.search(query, 100), bm25.search(passage, 100)], top=3)
    assert [d.id for d in hits] == [d.id for d in expect]
    assert hits[0].id == "0"


def test_query_likelihood_reranker_scores_the_query_after_the_document(real_lm):
    rr = LMReranker(real_lm)  # query likelihood is the default
    query = "capital of France"
    ranked = rr.rerank(query, DOCS)
    (expected,) = real_lm.score(rr.prompt(query, DOCS[1]), [" " + query])
    assert {d.id: d.score for d in ranked}["paris"] == pytest.approx(expected, abs=1e-4)
    assert [d.id for d in ranked] == ["paris", "bio"]
    with pytest.raises(ValueError, match="unknown rerank method"):
        LMReranker(real_lm, method="pointwise")  # type: ignore[arg-type]
