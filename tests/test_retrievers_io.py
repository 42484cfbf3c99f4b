"""Corpora, the index CLI, pipeline stages and chunking."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from promptkit.pipeline import InputError, MissingInputError, Pipeline
from promptkit.registry import get_stage_class
from promptkit.stages import BuildPrompt
from promptkit.types import Document
from retrievers import BM25, CorpusError, IndexFormatError, chunk_documents, chunk_text, load_corpus, load_index
from retrievers.chunk import paragraph_spans, sentence_spans
from retrievers.cli import app
from retrievers.samples import python_reference

runner = CliRunner()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    docs, _ = python_reference(max_chars=800)
    path = tmp_path_factory.mktemp("corpus") / "ref.jsonl"
    path.write_text("\n".join(json.dumps({"id": d.id, "text": d.text, "section": d.metadata["section"]})
                              for d in docs), encoding="utf-8")
    return path


def test_load_jsonl_and_folder(jsonl, tmp_path):
    docs = load_corpus(jsonl)
    assert len(docs) == 79 and docs[0].id == "assert" and docs[0].metadata == {"section": "assert"}
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# beta", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert [(d.id, d.text) for d in load_corpus(tmp_path)] == [("a.txt", "alpha text"), ("sub/b.md", "# beta")]


def test_bad_corpora_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="empty corpus"):
        load_corpus(empty)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "1", "text": "a"}\n{"id": "1", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"duplicate document ids \['1'\]"):
        load_corpus(dup)
    bad = tmp_path / "latin" / "x.txt"
    bad.parent.mkdir()
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"x\.txt: not valid UTF-8"):
        load_corpus(bad.parent)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"id": "1", "text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"nokey\.jsonl:2: each line needs 'id' and 'text'"):
        load_corpus(nokey)
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus(tmp_path / "missing.jsonl")


def test_cli_build_and_search(jsonl, tmp_path):
    out = tmp_path / "idx"
    res = runner.invoke(app, ["build", str(jsonl), "--kind", "bm25", "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["search", str(out), "The assert statement", "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert len(hits) == 3 and hits[0]["id"] == "assert" and set(hits[0]) == {"id", "score", "text"}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    table = runner.invoke(app, ["search", str(out), "The assert statement", "--k", "2"])
    assert table.exit_code == 0 and "assert" in table.stdout


def test_cli_refuses_existing_dir_and_bad_input(jsonl, tmp_path):
    out = tmp_path / "idx"
    assert runner.invoke(app, ["build", str(jsonl), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = runner.invoke(app, ["build", str(jsonl), "--out", str(out)])
    assert res.exit_code == 1 and "already exists" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "1", "text": "a"}\n{"id": "1", "text": "b"}\n', encoding="utf-8")
    res = runner.invoke(app, ["build", str(dup), "--out", str(tmp_path / "new")])
    assert res.exit_code == 1 and "duplicate" in res.output and not (tmp_path / "new").exists()
    res = runner.invoke(app, ["build", str(jsonl), "--kind", "colbert", "--out", str(tmp_path / "new")])
    assert res.exit_code == 1 and "unknown --kind" in res.output
    res = runner.invoke(app, ["search", str(tmp_path), "x"])
    assert res.exit_code == 1 and "not an index directory" in res.output


def test_force_replaces_only_an_index_directory(jsonl, tmp_path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha text", encoding="utf-8")
    (corpus / "b.md").write_text("beta text", encoding="utf-8")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine", encoding="utf-8")
    single = tmp_path / "file.txt"
    single.write_text("mine", encoding="utf-8")
    snapshot = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    before = snapshot()
    for out, why in [(corpus, "overlaps the corpus"), (tmp_path, "overlaps the corpus"),
                     (corpus / "idx", "overlaps the corpus"), (notes, "not a promptkit index"),
                     (single, "not a directory")]:
        res = runner.invoke(app, ["build", str(corpus), "--out", str(out), "--force"])
        assert res.exit_code == 1 and why in res.output and "Traceback" not in res.output, (out, res.output)
        assert snapshot() == before
    with pytest.raises(IndexFormatError, match="not a promptkit index"):
        BM25().index(load_corpus(corpus)).save(notes, force=True)
    with pytest.raises(IndexFormatError, match="not a directory"):
        BM25().index(load_corpus(corpus)).save(single, force=True)
    assert snapshot() == before
    # an index directory, or an empty one, is replaced
    idx = tmp_path / "idx"
    assert runner.invoke(app, ["build", str(jsonl), "--out", str(idx)]).exit_code == 0
    res = runner.invoke(app, ["build", str(corpus), "--out", str(idx), "--force"])
    assert res.exit_code == 0, res.output
    assert len(load_index(idx).search("alpha", 5)) == 2
    (tmp_path / "empty").mkdir()
    assert runner.invoke(app, ["build", str(corpus), "--out", str(tmp_path / "empty"), "--force"]).exit_code == 0


def test_bad_manifests_are_index_format_errors(jsonl, tmp_path):
    idx = tmp_path / "idx"
    assert runner.invoke(app, ["build", str(jsonl), "--out", str(idx)]).exit_code == 0
    manifest = json.loads((idx / "manifest.json").read_text(encoding="utf-8"))

    def rewrite(m):
        (idx / "manifest.json").write_text(json.dumps(m), encoding="utf-8")

    for bad, why in [([1, 2], "a JSON list, not an object"),
                     ({**manifest, "settings": {**manifest["settings"], "k1": "abc"}}, "invalid settings"),
                     ({**manifest, "settings": {k: v for k, v in manifest["settings"].items() if k != "b"}},
                      "missing setting 'b'"),
                     ({k: v for k, v in manifest.items() if k != "files"}, "'files' must list"),
                     ({**manifest, "files": {"docs.jsonl": {"bytes": "many"}}}, "'files' must list")]:
        rewrite(bad)
        with pytest.raises(IndexFormatError, match=why):
            load_index(idx)
        res = runner.invoke(app, ["search", str(idx), "assert"])
        assert res.exit_code == 1 and "Traceback" not in res.output and why in res.output, res.output
    rewrite(manifest)
    assert load_index(idx).search("The assert statement", 1)[0].id == "assert"


def test_index_build_kv_with_an_unknown_model_writes_nothing(jsonl, tmp_path):
    out = tmp_path / "idx"
    res = runner.invoke(app, ["build", str(jsonl), "--out", str(out), "--kv", "--model", "nope"])
    assert res.exit_code == 1 and "unknown model 'nope'" in res.output and "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_run_cli_names_a_wrong_input_key_and_a_non_object_line(jsonl, tmp_path):
    from promptkit.cli import app as main_app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - stage: bm25\n    corpus: {jsonl}\n    k: 2\n", encoding="utf-8")
    wrong = tmp_path / "w.jsonl"
    wrong.write_text('{"q": "How tall is Everest?"}\n', encoding="utf-8")
    res = runner.invoke(main_app, ["run", str(recipe), "--input-file", str(wrong)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "no input 'question'" in res.output and "['q']" in res.output
    wrong.write_text('{"question": "assert"}\n[1, 2]\n', encoding="utf-8")
    res = runner.invoke(main_app, ["run", str(recipe), "--input-file", str(wrong)])
    assert res.exit_code == 1 and "w.jsonl:2" in res.output and "JSON list" in res.output, res.output
    with pytest.raises(InputError, match="got list"):
        Pipeline(get_stage_class("bm25")(corpus=str(jsonl)))([[1, 2]])


def test_retriever_stages_fill_documents_and_context(jsonl, tmp_path):
    index = tmp_path / "idx"
    assert runner.invoke(app, ["build", str(jsonl), "--out", str(index)]).exit_code == 0
    bm25 = get_stage_class("bm25")
    pipe = Pipeline(BuildPrompt(), bm25(index=str(index), k=2))
    rec = pipe("The assert statement")
    assert [d.id for d in rec.documents][0] == "assert" and len(rec.documents) == 2
    assert rec.prompt.get("context").startswith("Context:\n[1] Assert statements")
    from_corpus = bm25(corpus=str(jsonl), k=3, rm3=True, query_key="q")
    rec = Pipeline(from_corpus).run([{"q": "The raise statement"}])[0]
    assert "raise" in [d.id for d in rec.documents] and len(rec.documents) == 3
    assert from_corpus.config() == {"stage": "bm25", "corpus": str(jsonl), "k": 3, "rm3": True, "query_key": "q"}
    with pytest.raises(MissingInputError, match="no input 'q'") as e:
        Pipeline(from_corpus)("no q here")
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)
    with pytest.raises(ValueError, match="exactly one of 'index'"):
        bm25(index=str(index), corpus=str(jsonl))
    with pytest.raises(ValueError, match="is a 'bm25' index"):
        Pipeline(get_stage_class("dense")(index=str(index)))("x")


def test_chunk_spans_respect_budget_overlap_and_offsets():
    docs, _ = python_reference(max_chars=None)
    text = docs[0].text + "\n\n" + docs[1].text
    words = lambda s: len(s.split())  # noqa: E731
    spans = chunk_text(text, max_tokens=60, overlap=1, count_tokens=words)
    sents = sentence_spans(text)
    assert spans[0][0] == sents[0][0] and spans[-1][1] == sents[-1][1]
    assert all(words(text[a:b]) <= 60 for a, b in spans)
    covered = set()
    for a, b in spans:
        covered.update(i for i, (s, e) in enumerate(sents) if a <= s and e <= b)
    assert covered == set(range(len(sents))) or all(words(text[s:e]) > 60 for i, (s, e) in enumerate(sents)
                                                      if i not in covered)
    assert sum(1 for (a1, b1), (a2, b2) in zip(spans, spans[1:]) if a2 < b1) > 0  # consecutive chunks overlap
    no_overlap = chunk_text(text, max_tokens=60, overlap=0, count_tokens=words)
    assert all(a2 >= b1 for (_, b1), (a2, _) in zip(no_overlap, no_overlap[1:]))
    assert len(paragraph_spans(text)) == text.count("\n\n") + 1 - sum(
        1 for p in text.split("\n\n") if not p.strip())


def test_chunk_documents_keep_ids_offsets_and_model_token_budget():
    docs, _ = python_reference(max_chars=None)
    chunks = chunk_documents(docs[:3], max_tokens=64, overlap=1)
    from retrievers.chunk import embedder_token_counter

    count = embedder_token_counter()
    by_id = {d.id: d for d in docs}
    for c in chunks:
        src = by_id[c.metadata["doc_id"]]
        assert c.text == src.text[c.metadata["start"]:c.metadata["end"]]
        assert c.id == f"{src.id}#{c.metadata['chunk']}"
        assert count(c.text) <= 64
    assert {c.metadata["doc_id"] for c in chunks} == {d.id for d in docs[:3]}
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        chunk_text("x", max_tokens=0)


def test_chunk_stage():
    stage = get_stage_class("chunk")(max_tokens=20, overlap=0)
    rec = Pipeline(stage).run([{"question": "q"}])[0]
    assert rec.documents == []
    from promptkit.pipeline import Record

    r = Record(inputs={"question": "q"}, documents=[Document(id="d", text="One two three. Four five six. " * 10)])
    out = stage.process([r])[0]
    assert len(out.documents) > 1 and all(d.metadata["doc_id"] == "d" for d in out.documents)


def test_an_index_directory_gets_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        docs = [Document(id=str(i), text=t) for i, t in enumerate(["green tea", "black rock", "blue sea"])]
        out = BM25().index(docs).save(tmp_path / "idx")
    finally:
        os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o755
