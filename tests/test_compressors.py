"""Compressors on real text: exact budgets, subsequences, protected segments, edge inputs."""

import importlib.util
import os

import pytest

from compressors import COMPRESSORS, resolve_budget
from compressors.base import Piece, select_exact
from compressors.extractive import sentence_spans
from compressors.question import split_documents
from promptkit import Prompt, SegmentKind

_spec = importlib.util.spec_from_file_location(
    "bench_datasets", os.path.join(os.path.dirname(__file__), "..", "bench", "evaldata.py"))
_datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_datasets)
load_qa = _datasets.load_qa

METHODS = sorted(COMPRESSORS)


def is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


@pytest.fixture(scope="module")
def qa():
    return load_qa()


def qa_prompt(items, docs: int) -> Prompt:
    ctx = "Context:\n" + "\n".join(f"[{i + 1}] {x['context']}" for i, x in enumerate(items[:docs]))
    return Prompt.from_parts(instruction="Answer the question briefly.", context=ctx,
                             question="Question: " + items[0]["question"], answer_prefix="Answer:")


@pytest.mark.parametrize("method", METHODS)
def test_budget_subsequence_and_protected_segments(method, qa, real_lm):
    comp = COMPRESSORS[method]()
    for docs, rate in ((1, 0.5), (4, 0.33)):  # short and long inputs
        p = qa_prompt(qa, docs)
        res = comp.compress(p, rate=rate)
        assert abs(res.tokens_after - res.target_tokens) <= 1, (method, docs, res.tokens_after, res.target_tokens)
        assert res.target_tokens == round(res.tokens_before * rate)
        assert comp.count(res.prompt.get("context")) == res.tokens_after
        assert is_subsequence(res.prompt.get("context"), p.get("context"))
        for kind in ("instruction", "question", "answer_prefix"):
            assert res.prompt.get(kind) == p.get(kind)
        assert res.rate_reached == pytest.approx(res.tokens_after / res.tokens_before)


@pytest.mark.parametrize("method", METHODS)
def test_budget_above_input_and_edge_inputs(method, real_lm):
    comp = COMPRESSORS[method]()
    p = Prompt.from_parts(context="A short context.", question="Question: what?")
    assert comp.compress(p, target_tokens=100).prompt == p
    assert comp.compress(p, rate=1.0).prompt == p
    for empty in ("", "   \n  "):
        q = Prompt.from_parts(context=empty, question="Question: what?")
        res = comp.compress(q, rate=0.5)
        assert res.tokens_before == 0 and res.prompt.get("question") == "Question: what?"
    for text in ("Москва — столица России. Город основан в 1147 году. Население более двенадцати миллионов человек. "
                 "Через город протекает Москва-река.",
                 "北京是中国的首都。它有三千多年的历史。北京是政治和文化中心。长城位于北京北部。"):
        p = Prompt.from_parts(context=text, question="Question: когда основан город? 何时?")
        res = comp.compress(p, rate=0.5)
        assert abs(res.tokens_after - res.target_tokens) <= 1 and is_subsequence(res.prompt.get("context"), text)


def test_exemplars_are_compressed_too(qa, real_lm):
    shots = "\n\n".join(f"Question: {x['question']}\nAnswer: {x['answers'][0]}" for x in qa[:6])
    p = Prompt.from_parts(instruction="Answer.", exemplars=shots, question="Question: " + qa[7]["question"])
    res = COMPRESSORS["selfinfo"]().compress(p, rate=0.3)
    assert abs(res.tokens_after - res.target_tokens) <= 1 and is_subsequence(res.prompt.get("exemplars"), shots)


def test_question_aware_ranks_the_source_document_first(qa, real_lm):
    from compressors import QuestionAwareCompressor

    comp = QuestionAwareCompressor(reorder=True)
    for source, others in ((5, (40, 80, 120)), (60, (3, 90, 150))):
        picked = [others[0], others[1], source, others[2]]  # the source paragraph third, mid-context
        ctx = "Context:\n" + "\n".join(f"[{k + 1}] {qa[i]['context']}" for k, i in enumerate(picked))
        p = Prompt.from_parts(context=ctx, question="Question: " + qa[source]["question"])
        res = comp.compress(p, rate=0.5)
        head = res.prompt.get("context")[len("Context:\n") :].split()[:6]  # reordered: the source comes first
        assert is_subsequence(head, f"[3] {qa[source]['context']}".split()), head


def test_bad_budgets():
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(100, None, None)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(100, 10, 0.5)
    with pytest.raises(ValueError, match="rate must be"):
        resolve_budget(100, None, 1.5)
    with pytest.raises(ValueError, match="positive"):
        resolve_budget(100, 0, None)


def test_select_exact_prefers_high_scores_in_order():
    text = "alpha beta gamma delta"
    pieces = [Piece(SegmentKind.context, a, b, s) for (a, b), s in
              zip([(0, 5), (5, 10), (10, 16), (16, 22)], [0.1, 3.0, 0.2, 2.0])]
    count = lambda t: len(t.split())
    assert select_exact(pieces, 2, {SegmentKind.context: text}, count)[SegmentKind.context] == " beta delta"


def test_splitting_helpers():
    assert [("Context:\n"), ["[1] a\n", "[2] b"]] == list(split_documents("Context:\n[1] a\n[2] b"))
    text = "One. Two!  Three?\nFour"
    assert ["".join(text[a:b]) for a, b in sentence_spans(text)] == ["One. ", "Two!  ", "Three?\n", "Four"]


def test_compress_stage_in_a_pipeline(qa, real_lm):
    from promptkit import BuildPrompt, Document, Pipeline
    from promptkit.pipeline import Record
    from promptkit.registry import get_stage_class

    Compress = get_stage_class("compress")
    docs = [Document(id=str(i), text=x["context"]) for i, x in enumerate(qa[:3])]
    rec = Record(inputs={"question": qa[0]["question"]}, documents=docs)
    full = BuildPrompt(instruction="Answer.").process([rec.model_copy(deep=True)])[0].prompt
    pipe = Pipeline(BuildPrompt(instruction="Answer."), Compress(method="extractive", target_tokens=60))
    out = pipe.run([rec])[0].prompt
    comp = COMPRESSORS["extractive"]()
    assert abs(comp.count(out.get("context")) - 60) <= 1
    assert is_subsequence(out.get("context"), full.get("context"))
    assert out.get("question") == full.get("question") and out.get("instruction") == "Answer."
    with pytest.raises(ValueError, match="exactly one"):
        Compress(method="selfinfo")


@pytest.mark.parametrize("method", METHODS)
def test_a_bad_rate_is_refused_even_with_nothing_to_compress(method, real_lm):
    for prompt in (Prompt.from_parts(question="Question: what?"), Prompt.from_parts(context="  \n", question="q")):
        with pytest.raises(ValueError, match="rate must be"):
            COMPRESSORS[method]().compress(prompt, rate=1.5)


@pytest.mark.parametrize("method", ["question", "attention"])
def test_one_document_longer_than_half_the_context_is_read_in_windows(method, qa, real_lm, monkeypatch):
    comp = COMPRESSORS[method]()
    monkeypatch.setattr(comp.lm().backend, "max_context", 512)  # the same shape as a 9,000-token document at 8k
    text = " ".join(x["context"].replace("\n", " ") for x in qa[:4])  # one paragraph, no blank lines
    assert comp.count(text) > 600
    p = Prompt.from_parts(context=text, question="Question: " + qa[0]["question"])
    res = comp.compress(p, rate=0.3)
    assert abs(res.tokens_after - res.target_tokens) <= 1
    assert is_subsequence(res.prompt.get("context"), text)
