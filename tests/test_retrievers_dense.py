"""Dense FAISS retrieval, hybrid fusion, and their index directories (real MiniLM embeddings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptkit.types import Document
from retrievers import BM25, Dense, Hybrid, IndexFormatError, english, load_index
from retrievers.fusion import minmax, reciprocal_rank_fusion, weighted_score_fusion
from retrievers.metrics import evaluate_run
from retrievers.samples import python_reference


@pytest.fixture(scope="module")
def corpus():
    return python_reference(max_chars=800)  # MiniLM reads 256 word pieces at most anyway


@pytest.fixture(scope="module")
def dense(corpus):
    return Dense().index(corpus[0])


def _run(retriever, queries, k=10):
    hits = retriever.search_many(list(queries.values()), k)
    return {t: [d.id for d in h] for t, h in zip(queries, hits)}


def test_dense_finds_topics_and_vectors_are_unit_length(dense, corpus):
    docs, queries = corpus
    vecs = dense.faiss_index.reconstruct_n(0, len(docs))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert dense.resolved_type() == "flat" and dense.dim == 384
    scores = evaluate_run(_run(dense, queries), {t: {t: 1} for t in queries})
    assert scores["recall@10"] > 0.6
    hit = dense.search("The assert statement", k=1)[0]
    q = dense.encode(["The assert statement"])[0]
    assert hit.score == pytest.approx(float(q @ vecs[[d.id for d in docs].index(hit.id)]), abs=1e-5)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_indexes_agree_with_flat_and_roundtrip(dense, corpus, index_type, tmp_path):
    docs, queries = corpus
    vecs = dense.faiss_index.reconstruct_n(0, len(docs))
    approx = Dense(index_type=index_type, nlist=4, nprobe=4).index(docs, vectors=vecs)
    qv = dense.encode(list(queries.values())[:20])
    flat_top = [h[0].id for h in dense.search_vectors(qv, 1)]
    approx_top = [h[0].id for h in approx.search_vectors(qv, 1)]
    assert sum(a == b for a, b in zip(flat_top, approx_top)) >= 18
    loaded = Dense.load(approx.save(tmp_path / index_type))
    assert loaded.resolved_type() == index_type
    assert [h[0].id for h in loaded.search_vectors(qv, 1)] == approx_top


def test_auto_index_type_follows_corpus_size(dense, corpus):
    docs, _ = corpus
    vecs = dense.faiss_index.reconstruct_n(0, len(docs))
    assert Dense(flat_max=50).index(docs, vectors=vecs).resolved_type() == "hnsw"
    assert Dense(flat_max=100).index(docs, vectors=vecs).resolved_type() == "flat"


def test_incremental_add_and_metadata_filter(dense, corpus):
    docs, _ = corpus
    vecs = dense.faiss_index.reconstruct_n(0, len(docs))
    inc = Dense().index(docs[:40], vectors=vecs[:40])
    inc.add(docs[40:], vectors=vecs[40:])
    qv = dense.encode(["exceptions are raised and caught"])
    assert [d.id for d in inc.search_vectors(qv, 5)[0]] == [d.id for d in dense.search_vectors(qv, 5)[0]]
    hits = dense.search("numbers and arithmetic", k=5, filter={"section": ["atom", "bltin"]})
    assert hits and all(h.metadata["section"] in ("atom", "bltin") for h in hits)
    with pytest.raises(ValueError, match="duplicate"):
        inc.add(docs[:1], vectors=vecs[:1])


def test_dense_index_dir_checks_embedder_and_files(dense, corpus, tmp_path):
    out = dense.save(tmp_path / "dense")
    loaded = Dense.load(out, embedder="minilm-l6-v2")
    q = "The with statement"
    assert [d.id for d in loaded.search(q, 3)] == [d.id for d in dense.search(q, 3)]
    with pytest.raises(IndexFormatError, match="built with embedder 'minilm-l6-v2'"):
        Dense.load(out, embedder="some/other-model")
    data = (out / "dense.faiss").read_bytes()
    (out / "dense.faiss").write_bytes(data[:100])
    with pytest.raises(IndexFormatError, match="truncated"):
        Dense.load(out)
    (out / "dense.faiss").write_bytes(data)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="version 0"):
        load_index(out)


def test_rrf_hand_computed():
    a = [Document(id=i, text=i) for i in ["x", "y", "z"]]
    b = [Document(id=i, text=i) for i in ["y", "w"]]
    fused = reciprocal_rank_fusion([a, b], k=60)
    assert [d.id for d in fused] == ["y", "x", "w", "z"]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1].score == pytest.approx(1 / 61)
    assert fused[2].score == pytest.approx(1 / 62) and fused[3].score == pytest.approx(1 / 63)
    assert [d.id for d in reciprocal_rank_fusion([a, b], weights=[1, 3], top=2)] == ["y", "w"]


def test_weighted_score_fusion_hand_computed():
    a = [Document(id=i, text="", score=s) for i, s in [("x", 10.0), ("y", 6.0), ("z", 2.0)]]
    b = [Document(id="z", text="", score=0.9), Document(id="x", text="", score=0.1)]
    fused = {d.id: d.score for d in weighted_score_fusion([a, b], weights=[0.3, 0.7])}
    assert fused == pytest.approx({"x": 0.3 * 1.0 + 0.7 * 0.0, "y": 0.3 * 0.5, "z": 0.3 * 0.0 + 0.7 * 1.0})
    assert minmax([2.0, 2.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="2 result lists but 1 weights"):
        weighted_score_fusion([a, b], weights=[1.0])


def test_hybrid_fuses_bm25_and_dense_and_roundtrips(dense, corpus, tmp_path):
    docs, queries = corpus
    bm25 = BM25(tokenizer=english()).index(docs)
    for method in ("rrf", "weighted"):
        hybrid = Hybrid([bm25, dense], method=method)
        q = "The for statement"
        expect = (reciprocal_rank_fusion if method == "rrf" else weighted_score_fusion)(
            [bm25.search(q, 100), dense.search(q, 79)], top=5)
        got = hybrid.search(q, 5)
        assert [d.id for d in got] == [d.id for d in expect]
        assert [d.score for d in got] == pytest.approx([d.score for d in expect])
    hybrid = Hybrid([bm25, dense])
    scores = evaluate_run(_run(hybrid, queries), {t: {t: 1} for t in queries})
    assert scores["recall@10"] > 0.85
    loaded = load_index(hybrid.save(tmp_path / "hyb"))
    assert isinstance(loaded, Hybrid) and [r.kind for r in loaded.retrievers] == ["bm25", "dense"]
    q = "The while statement"
    assert [d.id for d in loaded.search(q, 5)] == [d.id for d in hybrid.search(q, 5)]


def test_cross_encoder_reranker_from_a_local_path(tmp_path, corpus):
    from sentence_transformers import CrossEncoder

    from promptkit.models import resolve_embedder
    from retrievers import CrossEncoderReranker

    with pytest.raises(FileNotFoundError, match="does not exist"):
        CrossEncoderReranker(tmp_path / "missing")
    # a cross-encoder built from the embedded MiniLM weights (its scoring head is untrained: plumbing only)
    CrossEncoder(resolve_embedder(), num_labels=1, device="cpu").save(str(tmp_path / "ce"))
    rr = CrossEncoderReranker(tmp_path / "ce")
    docs = corpus[0][:6]
    ranked = rr.rerank("The assert statement", docs, k=4)
    expect = rr.model.predict([("The assert statement", d.text) for d in docs])
    order = np.argsort(-expect, kind="stable")[:4]
    assert [d.id for d in ranked] == [docs[i].id for i in order]
    assert [d.score for d in ranked] == pytest.approx(expect[order].tolist(), abs=1e-5)
