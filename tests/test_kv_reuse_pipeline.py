"""KV reuse through the public layers: prompts that carry document spans, the LM, pipelines and
recipes, `promptkit index build --kv`, and the server with the OpenAI client (real SmolLM2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptkit import LM, Document, PromptTemplate, load_recipe
from promptkit.engine.chunk_store import StaleKVError
from promptkit.pipeline import Pipeline, Record
from promptkit.prompt import render_with_documents
from promptkit.recipes import RecipeError, recipe_from_dict
from promptkit.stages import BuildPrompt, Classify, Generate

DOCS = Path(__file__).resolve().parent.parent / "cookbook" / "rag_kv_reuse" / "docs"


def docs(*names: str) -> list[Document]:
    return [Document(id=n, text=(DOCS / f"{n}.md").read_text(encoding="utf-8").strip()) for n in names]


@pytest.fixture(scope="module")
def lm(real_lm):
    """An LM of its own (a fresh engine and chunk store) on the shared SmolLM2 weights."""
    return LM(real_lm.model, model_obj=real_lm.backend.model, tokenizer=real_lm.backend.tokenizer)


def test_context_segment_carries_document_spans():
    ds = [Document(id="a", text="Alpha text."), Document(id="b", text="Beta text, longer.")]
    p = PromptTemplate(system="S", instruction="Answer.").build({"question": "Q?"}, documents=ds)
    ctx = p.get("context")
    assert [ctx[a:b] for a, b in p.segments[2].spans] == [d.text for d in ds]
    flat = p.text()
    assert [flat[a:b] for a, b in p.document_spans()] == [d.text for d in ds]
    kept = p.with_segment("question", "Another?")  # editing a segment keeps the others' spans
    assert kept.segments[2].spans == p.segments[2].spans and kept.get("question") == "Another?"
    assert p.with_segment("context", "compressed").segments[2].spans == []  # new text: no documents
    template = lambda msgs: "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs)  # noqa: E731
    text, spans = render_with_documents(p, template)
    assert [text[a:b] for a, b in spans] == [d.text for d in ds]
    assert render_with_documents("plain", None) == ("plain", [])


def test_document_tokens_are_the_same_wherever_a_document_lands(lm):
    a, b, c = docs("game-summary", "panthers-season", "the-game")
    tokens = {}
    for order in ([a, b, c], [c, a, b], [b, c, a]):
        p = PromptTemplate(instruction="Answer.").build({"question": "Who won?"}, documents=order)
        text, spans = render_with_documents(p, lm.backend.apply_chat_template)
        ids, tok = lm.backend.encode_documents(text, spans)
        assert len(tok) == 3
        for d, (s, e) in zip(order, tok):
            assert lm.backend.decode(ids[s:e]).strip() == d.text
            tokens.setdefault(d.id, set()).add(tuple(ids[s:e]))
    assert all(len(v) == 1 for v in tokens.values())


def test_lm_modes_reuse_stored_documents_and_blend_at_full_ratio_is_exact(lm):
    question = {"question": "Who was the Super Bowl 50 MVP?"}
    template = PromptTemplate(instruction="Answer the question with a short span copied from the context.")
    first = template.build(question, documents=docs("game-summary", "panthers-season", "the-game"))
    second = template.build(question, documents=docs("the-game", "game-summary", "panthers-season"))
    g1 = lm.generate(first, max_tokens=8, kv_reuse="blend")[0]
    assert g1.usage.stored_tokens > 0 and g1.usage.reused_tokens > 0
    n_doc = g1.usage.stored_tokens
    for mode, recomputed in (("blend", -(-n_doc * 15 // 100)), ("sink", 48), ("none", 0)):
        g = lm.generate(second, max_tokens=8, kv_reuse=mode)[0]
        u = g.usage
        assert (u.stored_tokens, u.recomputed_tokens, u.reused_tokens) == (0, recomputed, n_doc - recomputed), mode
        assert u.prefilled_tokens == u.prompt_tokens - u.cached_tokens - u.reused_tokens and u.first_token_seconds
    exact = lm.generate(second, max_tokens=12, kv_reuse={"mode": "blend", "recompute_ratio": 1.0})[0]
    full = lm.generate(second, max_tokens=12, kv_reuse="full")[0]  # after the reuse calls: nothing reused leaks in
    assert exact.text == full.text and full.usage.reused_tokens == 0
    stats = lm.stats()
    assert stats["chunk_hits"] >= 9 and stats["chunk_misses"] == 3
    with pytest.raises(ValueError, match="local backend"):
        LM(lm.model, backend=_NoReuse(lm.backend)).generate(second, kv_reuse="blend")


class _NoReuse:
    """A backend without a chunk store (as the OpenAI client backend is)."""

    def __init__(self, inner):
        self.inner, self.is_chat, self.model_name, self.max_context = inner, inner.is_chat, "x", inner.max_context

    def apply_chat_template(self, messages):
        return self.inner.apply_chat_template(messages)


def test_generate_and_classify_take_kv_reuse_and_trace_the_tokens(lm, monkeypatch):
    monkeypatch.setattr("promptkit.stages.get_lm", lambda *a, **k: lm)
    ds = docs("television", "advertising", "the-game")
    build = BuildPrompt(instruction="Answer the question with a short span copied from the context.")

    def record():
        return Record(inputs={"question": "Which network broadcast Super Bowl 50 in the U.S.?"}, documents=ds)

    out = Pipeline(build, Generate(max_tokens=8, kv_reuse="sink")).process([record()])[0]
    usage = out.trace[-1].changed["usage"]  # the trace says what the generate stage's request reused
    assert usage.reused_tokens > 0 and usage.recomputed_tokens == 48 and out.usage == usage
    exact = Classify(labels=["CBS", "NBC"], kv_reuse={"mode": "blend", "recompute_ratio": 1.0})
    a = Pipeline(build, exact).process([record()])[0]
    b = Pipeline(build, Classify(labels=["CBS", "NBC"])).process([record()])[0]
    assert a.usage.reused_tokens == 0 and a.usage.recomputed_tokens > 0  # every document token recomputed
    assert a.label_scores == pytest.approx(b.label_scores, abs=1e-3) and a.output == b.output
    cfg = Generate(kv_reuse={"mode": "blend", "recompute_ratio": 0.3}).config()
    assert cfg["kv_reuse"] == {"mode": "blend", "recompute_ratio": 0.3}


def test_recipes_validate_kv_reuse(tmp_path):
    stages = [{"stage": "prompt"}, {"stage": "generate", "kv_reuse": "blend"}]
    assert recipe_from_dict({"stages": stages}).stages[-1].kv_reuse.mode == "blend"
    stages[-1]["kv_reuse"] = {"mode": "sink", "sink_tokens": 4}
    assert recipe_from_dict({"stages": stages}).stages[-1].kv_reuse.sink_tokens == 4
    stages[-1]["kv_reuse"] = "fast"
    with pytest.raises(RecipeError, match="kv_reuse.*'full', 'blend', 'sink' or 'none'"):
        recipe_from_dict({"stages": stages})
    assert len(load_recipe(Path(__file__).resolve().parent.parent / "cookbook/rag_kv_reuse/recipe.yaml").stages) == 3


def test_index_build_kv_saves_documents_that_a_recipe_reuses(lm, tmp_path, monkeypatch):
    from retrievers.cli import app

    monkeypatch.setattr("promptkit.lm.get_lm", lambda *a, **k: lm)  # the CLI and the stages share this LM
    monkeypatch.setattr("promptkit.stages.get_lm", lambda *a, **k: lm)
    corpus = tmp_path / "docs"
    shutil.copytree(DOCS, corpus)
    res = CliRunner().invoke(app, ["build", str(corpus), "--out", str(tmp_path / "idx"), "--kv"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "idx" / "kv.safetensors").is_file() and "saved the KV of 9 documents" in res.output
    lm.backend.clear_cache()  # nothing left of the build but the file
    pipe = recipe_from_dict({"stages": [{"stage": "bm25", "index": str(tmp_path / "idx"), "k": 3},
                                        {"stage": "prompt", "instruction": "Answer briefly."},
                                        {"stage": "generate", "max_tokens": 6, "kv_reuse": "none"}]})
    r = pipe("Which network broadcast Super Bowl 50 in the U.S.?")
    assert all(d.metadata["kv_store"].endswith("kv.safetensors") for d in r.documents)
    assert r.usage.stored_tokens == 0 and r.usage.reused_tokens > 0  # every document came from the file
    assert lm.stats()["chunks"] == 9
    other = LM(lm.model, model_obj=lm.backend.model, tokenizer=lm.backend.tokenizer, kv_lead_in="Another lead-in")
    with pytest.raises(StaleKVError, match="lead-in"):
        other.load_kv_store(str(tmp_path / "idx" / "kv.safetensors"))
    lm.backend.clear_cache()


def test_server_reuses_documents_sent_as_content_parts(real_lm):
    from openai import OpenAI

    from promptkit.server import BackgroundServer, create_app

    served = LM(real_lm.model, model_obj=real_lm.backend.model, tokenizer=real_lm.backend.tokenizer,
                kv_reuse="blend")  # what `promptkit serve --kv-reuse blend` builds
    a, b, c = (d.text for d in docs("game-summary", "panthers-season", "the-game"))
    question = "Who was the Super Bowl 50 MVP? Answer briefly."
    with BackgroundServer(create_app(served)) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="-")
        parts = [{"type": "text", "text": t} for t in (a, b, c, question)]
        r1 = client.chat.completions.create(model=served.model, max_tokens=8,
                                            messages=[{"role": "user", "content": parts}])
        assert r1.choices[0].message.content
        s1 = served.stats()
        assert (s1["chunk_misses"], s1["chunk_hits"]) == (3, 0)
        # the same documents as separate user messages, in another order: all three found in the store
        msgs = [{"role": "user", "content": t} for t in (c, a, b)] + [{"role": "user", "content": question}]
        r2 = client.chat.completions.create(model=served.model, max_tokens=8, messages=msgs)
        assert r2.choices[0].message.content
        s2 = served.stats()
        assert (s2["chunk_misses"], s2["chunk_hits"]) == (3, 3) and s2["tokens_reused"] > 0
        # a plain chat (alternating roles) has no documents
        client.chat.completions.create(model=served.model, max_tokens=4, messages=[
            {"role": "user", "content": a}, {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": question}])
        assert served.stats()["chunk_hits"] == 3


def test_serve_refuses_an_unknown_kv_reuse_mode():
    from promptkit.cli import app

    res = CliRunner().invoke(app, ["serve", "--kv-reuse", "fast"])
    assert res.exit_code == 1 and "unknown --kv-reuse 'fast'" in res.output


def test_a_corrupt_kv_store_is_a_clear_error(tmp_path):
    import torch

    from promptkit.engine.chunk_store import read_meta, write_store

    path = tmp_path / "kv.safetensors"
    kv = torch.zeros(2, 2, 1, 5, 4)
    assert write_store(path, [(kv, [1, 2, 3, 4, 5], [2, 3])], [7, 8], {"model": "m"}) == 2
    assert read_meta(path)["lead_in"] == [7, 8]
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], data[:6], b"not safetensors at all"):
        path.write_bytes(broken)
        with pytest.raises(StaleKVError, match=r"corrupt or truncated .*rebuild it with promptkit index build --kv"):
            read_meta(path)
