"""GenQREnsemble / GenQRFusion: keyword reformulations from several instructions, expanded or fused."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from promptkit.types import Document
from retrievers import BM25, GenQREnsemble
from retrievers.fusion import reciprocal_rank_fusion
from retrievers.rewrite import GENQR_INSTRUCTIONS, clean_terms
from retrievers.stages import BM25Stage

DOCS = [Document(id=str(i), text=t) for i, t in enumerate([
    "Paris is the capital and largest city of France.",
    "The Nile is a major river in northeastern Africa.",
    "Photosynthesis converts light energy into chemical energy in green plants.",
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
])]


def test_prompts_run_instruction_by_instruction_and_terms_are_cleaned():
    rewriter = GenQREnsemble(BM25().index(DOCS), lm=object(), n_instructions=3)  # type: ignore[arg-type]
    prompts = rewriter.prompts(["capital of France", "longest river"])
    assert len(prompts) == 6
    for i, ins in enumerate(GENQR_INSTRUCTIONS[:3]):  # each instruction's prompts are neighbours
        assert prompts[2 * i].startswith(ins) and prompts[2 * i + 1].startswith(ins)
    assert clean_terms('1. "Paris", France; 2) capital') == "Paris France; capital"
    assert rewriter.reformulations("q", ["a b", "", "c"]) == ["q a b c"]
    with pytest.raises(ValueError, match="n_instructions"):
        GenQREnsemble(BM25().index(DOCS), lm=object(), n_instructions=11)  # type: ignore[arg-type]


def test_fusion_fuses_one_result_list_per_instruction(real_lm):
    bm25 = BM25().index(DOCS)
    fusion = GenQREnsemble(bm25, real_lm, mode="fusion", n_instructions=2, max_tokens=8)
    query = "Which city is the capital of France?"
    (terms,) = fusion.keywords([query])
    assert len(terms) == 2 and any(terms)
    hits = fusion.search_keywords([query], [terms], k=4)[0]
    lists = [bm25.search(q, 100) for q in [query, *[f"{query} {t}" for t in terms if t]]]
    assert len(lists) >= 2
    assert [d.id for d in hits] == [d.id for d in reciprocal_rank_fusion(lists, top=4)]
    assert hits[0].id in ("0", "3")
    expand = GenQREnsemble(bm25, real_lm, mode="expand", n_instructions=2, max_tokens=8)
    assert [d.id for d in expand.search_keywords([query], [terms], k=2)[0]] == \
        [d.id for d in bm25.search(" ".join([query, *[t for t in terms if t]]), 2)]


def test_stage_option_wraps_the_retriever(real_lm, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(d.model_dump_json(include={"id", "text"}) for d in DOCS), encoding="utf-8")
    stage = BM25Stage(corpus=str(corpus), k=2, genqr="fusion")
    assert isinstance(stage.retriever(), GenQREnsemble) and stage.retriever().mode == "fusion"
    with pytest.raises(ValueError, match="one query rewriting"):
        BM25Stage(corpus=str(corpus), hyde=True, genqr="expand")


def test_cookbook_genqr_retrieval(real_lm):
    ns = runpy.run_path(str(Path(__file__).resolve().parent.parent / "cookbook" / "genqr_retrieval" /
                            "genqr_retrieval.py"), run_name="cookbook_example")
    (row,) = ns["main"](["Which network broadcast the game?"], instructions=2)
    assert len(row["keywords"]) == 2 and len(row["fused"]) == 2 and "television.md" in row["fused"]
