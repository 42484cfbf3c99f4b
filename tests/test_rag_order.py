"""Passage order in the retriever stages, and RAGSearch choosing k and the order on validation data."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from optimizers import RAGSearch
from optimizers.rag import arrangement
from promptkit import BuildPrompt, Document, Pipeline, Record
from retrievers import order_passages
from retrievers.stages import BM25Stage

COOKBOOK = Path(__file__).resolve().parent.parent / "cookbook" / "rag_order"
RANKED = [Document(id=f"d{i}", text=f"passage {i}") for i in range(1, 6)]


def test_orders_place_the_best_passages_as_documented():
    assert [d.id for d in order_passages(RANKED, "score")] == ["d1", "d2", "d3", "d4", "d5"]
    assert [d.id for d in order_passages(RANKED, "best_last")] == ["d5", "d4", "d3", "d2", "d1"]
    assert [d.id for d in order_passages(RANKED, "ends")] == ["d1", "d3", "d5", "d4", "d2"]  # weakest in the middle
    assert arrangement(2, "ends") == arrangement(2, "score") and arrangement(1, "best_last") == (0,)
    with pytest.raises(ValueError, match="unknown passage orders"):
        RAGSearch(orders=["random"])


def test_retriever_stage_writes_the_context_in_the_chosen_order():
    question = {"question": "Who was the Super Bowl 50 MVP?"}
    by_score = BM25Stage(corpus=str(COOKBOOK / "docs"), k=3)
    ranked = [d.id for d in by_score.process([Record(inputs=question)])[0].documents]
    stage = by_score.model_copy(update={"order": "best_last"})  # same index, another order
    (rec,) = Pipeline(BuildPrompt(), stage).process([Record(inputs=question)])
    assert [d.id for d in rec.documents] == ranked[::-1]
    context = rec.prompt.get("context")
    assert context.index(rec.documents[0].text[:40]) < context.index(rec.documents[-1].text[:40])
    assert rec.documents[-1].id == ranked[0] == "game-summary.md"  # the best passage sits next to the question


def test_rag_search_picks_k_and_order_on_validation(real_lm, tmp_path):
    result = runpy.run_path(str(COOKBOOK / "rag_order.py"), run_name="cookbook_example")["main"](
        tmp_path / "chosen.yaml", n_val=3, n_test=2, ks=(1, 2), orders=("score", "best_last"))
    scores = result["candidates"]
    assert set(scores) == {"baseline", "k1-score", "k2-score", "k2-best_last"}  # k=1 is one arrangement
    best = max(scores.values())
    assert result["val_chosen"] == pytest.approx(best, abs=1e-3) and result["val_chosen"] >= result["val_given"]
    chosen = Pipeline.load(result["saved"]).stages[0]
    if result["chosen"]["name"] != "baseline":
        assert (chosen.k, chosen.order) == (result["chosen"]["k"], result["chosen"]["order"])
    low, high = result["test_difference_ci"]
    assert low <= result["test_chosen"] - result["test_given"] <= high
