"""Retrieval quality and BM25 speed.

Quality (nDCG@10) on a real IR collection from bench/evaldata.py: BM25,
dense (MiniLM + FAISS), hybrid (RRF), and hybrid + LM rerank of the top 20.
Query rewriting (``rewrite``): nDCG@10 and recall@10, with bootstrap intervals over queries and
the paired interval of the difference to BM25, of BM25, RM3, HyDE, GenQREnsemble (the query
expanded with keywords from 10 paraphrased instructions) and GenQRFusion (one search per
instruction, fused by RRF), on the Lee judgments and on SQuAD dev as a retrieval set (all 2,067
dev paragraphs; each of 300 sampled questions has its own paragraph as the one relevant
document; needs ``$PROMPTKIT_DATA``). GenQREnsemble's paper reports up to +18 % nDCG@10.
Speed (P4): index time and queries/second of our BM25 vs bm25s and rank_bm25
on the same corpus and the same tokens (Wikipedia paragraphs + BBC News
articles, real text; queries are Wikipedia titles and BBC headlines), plus the
largest |score difference| between our Okapi scores and rank_bm25's.

    python bench/retrieval.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit, log, stage  # noqa: E402
from evaldata import load_classification, load_ir_collection, load_wikipedia_articles  # noqa: E402

from promptkit.types import Document  # noqa: E402
from retrievers import BM25, Dense, Hybrid, LMReranker, english  # noqa: E402
from retrievers.metrics import evaluate_run, ndcg_at_k  # noqa: E402


def run_of(results, qids, exclude_self: bool):
    return {q: [d.id for d in docs if not (exclude_self and d.id == q)] for q, docs in zip(qids, results)}


def quality(name: str, rerank_queries: int, doc_chars: int, method: str) -> dict:
    corpus, queries, qrels, info = load_ir_collection(name)
    excl = bool(info.get("exclude_self"))
    docs = [Document(id=i, text=(d.get("title", "") + "\n" + d["text"]).strip()) for i, d in corpus.items()]
    qids = list(queries)
    qtexts = [queries[q] for q in qids]
    depth = 21 if excl else 20  # the query's own document drops out of query-by-document rankings
    with stage(f"{name}: indexing {len(docs)} documents (BM25, MiniLM + FAISS) and searching {len(qids)} queries"):
        bm25 = BM25(tokenizer=english()).index(docs)
        dense = Dense().index(docs)
        hybrid = Hybrid([bm25, dense], method="rrf")
        runs = {"bm25": bm25.search_many(qtexts, 100), "dense": dense.search_many(qtexts, 100),
                "hybrid": hybrid.search_many(qtexts, 100)}
    out = {f"ndcg10_{k}": round(evaluate_run(run_of(v, qids, excl), qrels)["ndcg@10"], 4) for k, v in runs.items()}
    log(f"{name}: {len(docs)} docs, {len(qids)} queries: {out}")
    # rerank the hybrid top 20 of a query subset (all queries without --quick)
    sub = [i for i, q in enumerate(qids) if q in qrels][:rerank_queries]
    cands = [[d for d in runs["hybrid"][i][:depth] if not (excl and d.id == qids[i])][:20] for i in sub]
    timing: dict = {}
    with stage(f"LM reranking ({method}) of the hybrid top 20 for {len(sub)} queries", timing, "s"):
        reranker = LMReranker(max_doc_chars=doc_chars, max_query_chars=doc_chars // 2, method=method)
        reranked = reranker.rerank_many([qtexts[i] for i in sub], cands)
    secs = timing["s"]
    base = [ndcg_at_k([d.id for d in c], qrels[qids[i]]) for i, c in zip(sub, cands)]
    rr = [ndcg_at_k([d.id for d in c], qrels[qids[i]]) for i, c in zip(sub, reranked)]
    out.update(ndcg10_rerank=round(float(np.mean(rr)), 4), ndcg10_hybrid_rerank_subset=round(float(np.mean(base)), 4),
               rerank_queries=len(sub), rerank_method=method, rerank_seconds=round(secs, 1),
               published_bm25_ndcg10=info.get("published_bm25_ndcg10"))
    log(f"rerank on {len(sub)} queries: hybrid {out['ndcg10_hybrid_rerank_subset']} -> {out['ndcg10_rerank']} "
        f"({secs:.1f} s)")
    return out


def speed_corpus(n_docs: int, n_queries: int) -> tuple[list[str], list[str]]:
    """Real paragraphs (Wikipedia, BBC News) and real short queries (titles, headlines)."""
    wiki = load_wikipedia_articles()
    train, test, _, _ = load_classification()
    bbc = [r["text"] for r in train + test]
    paras = [p.strip() for t in [a["text"] for a in wiki] + bbc for p in t.split("\n") if len(p.strip()) > 80]
    rng = np.random.default_rng(0)
    texts = [paras[i] for i in rng.permutation(len(paras))[:n_docs]]
    heads = [t.strip().splitlines()[0] for t in bbc] + [a["title"] for a in wiki]
    queries = [heads[i] for i in rng.permutation(len(heads))[:n_queries]]
    return texts, queries


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def speed(n_docs: int, n_queries: int, n_rank_queries: int) -> dict:
    import bm25s
    from rank_bm25 import BM25Okapi

    with stage(f"speed corpus: {n_docs} paragraphs, {n_queries} queries, tokenized once for all three"):
        texts, queries = speed_corpus(n_docs, n_queries)
        tok = english()
        doc_toks, q_toks = tok.many(texts), tok.many(queries)
    docs = [Document(id=str(i), text=t) for i, t in enumerate(texts)]
    log("indexing and querying: ours, bm25s, rank_bm25")
    t_ours, ours = timed(lambda: BM25(tokenizer=tok).index(docs, tokens=doc_toks))
    t_bm25s, ref_s = timed(lambda: _bm25s_index(bm25s, doc_toks))
    t_rank, ref_r = timed(lambda: BM25Okapi(doc_toks))
    q_ours, _ = timed(lambda: [ours.retrieve_ids(q, 10) for q in q_toks])
    q_bm25s, _ = timed(lambda: ref_s.retrieve(q_toks, k=10, show_progress=False))
    few = q_toks[:n_rank_queries]
    q_rank, ref_scores = timed(lambda: [(s := ref_r.get_scores(q), np.argsort(-s)[:10])[0] for q in few])
    diff = max(float(np.abs(ours.get_scores(q) - s).max()) for q, s in zip(few, ref_scores))
    out = {"speed_docs": len(texts), "speed_queries": len(queries),
           "index_s_ours": round(t_ours, 3), "index_s_bm25s": round(t_bm25s, 3), "index_s_rank_bm25": round(t_rank, 3),
           "qps_ours": round(len(q_toks) / q_ours, 1), "qps_bm25s": round(len(q_toks) / q_bm25s, 1),
           "qps_rank_bm25": round(len(few) / q_rank, 1), "max_score_diff_vs_rank_bm25": diff}
    log(f"speed on {len(texts)} docs: {out}")
    return out


def _bm25s_index(bm25s, doc_toks):
    r = bm25s.BM25(k1=1.5, b=0.75)
    r.index(doc_toks, show_progress=False)
    return r


# -- query rewriting: BM25 vs RM3, HyDE, GenQREnsemble and GenQRFusion -------------------------
def _per_query(run: dict, qrels: dict, qids: list) -> dict[str, list[float]]:
    from retrievers.metrics import recall_at_k

    return {"ndcg@10": [ndcg_at_k(run.get(q, []), qrels[q], 10) for q in qids],
            "recall@10": [recall_at_k(run.get(q, []), qrels[q], 10) for q in qids]}


def _rows(runs: dict, qrels: dict, qids: list) -> dict:
    """Per method: mean nDCG@10 and recall@10 with bootstrap intervals over queries, and the paired
    interval of the difference to BM25."""
    from promptkit.metrics import bootstrap_ci, paired_bootstrap_ci

    per = {m: _per_query(run, qrels, qids) for m, run in runs.items()}
    out = {}
    for m, scores in per.items():
        row = {}
        for metric, xs in scores.items():
            row[metric] = round(float(np.mean(xs)), 4)
            row[f"{metric}_ci"] = [round(x, 4) for x in bootstrap_ci(xs)]
            if m != "bm25":
                row[f"{metric}_vs_bm25_ci"] = [round(x, 4) for x in paired_bootstrap_ci(xs, per["bm25"][metric])]
        out[m] = row
    return out


def squad_collection(n: int) -> tuple[dict, dict, dict, dict]:
    """SQuAD v1.1 dev as a retrieval set: every dev paragraph a document, ``n`` sampled questions,
    each question's own paragraph the one relevant document."""
    from evaldata import load_squad, load_squad_dev

    paras = load_squad_dev()
    corpus = {str(i): {"title": "", "text": p["context"]} for i, p in enumerate(paras)}
    ids = {p["context"]: str(i) for i, p in enumerate(paras)}
    items = load_squad(n=n, seed=0)
    queries = {q["id"]: q["question"] for q in items}
    qrels = {q["id"]: {ids[q["context"]]: 1} for q in items}
    return corpus, queries, qrels, {"exclude_self": False}


def rewriting(name: str, n_queries: int | None, n_instructions: int, hyde_tokens: int) -> dict:
    """nDCG@10 and recall@10 of BM25, RM3, HyDE, GenQREnsemble (expand) and GenQRFusion."""
    from promptkit import get_lm
    from retrievers import RM3, GenQREnsemble, HyDE

    corpus, queries, qrels, info = squad_collection(n_queries or 300) if name == "squad" else load_ir_collection(name)
    excl = bool(info.get("exclude_self"))
    qids = [q for q in queries if q in qrels][: n_queries or None]
    texts = [queries[q] for q in qids]
    docs = [Document(id=i, text=(d.get("title", "") + "\n" + d["text"]).strip()) for i, d in corpus.items()]
    k = 11 if excl else 10  # the query's own document drops out of query-by-document rankings
    bm25, lm = BM25(tokenizer=english()).index(docs), get_lm()
    runs, seconds = {}, {}
    methods = {"bm25": bm25, "rm3": RM3(bm25), "hyde": HyDE(bm25, lm, max_tokens=hyde_tokens),
               "genqr": GenQREnsemble(bm25, lm, mode="expand", n_instructions=n_instructions),
               "genqr_fusion": GenQREnsemble(bm25, lm, mode="fusion", n_instructions=n_instructions)}
    terms = None
    for m, retriever in methods.items():
        t0 = time.perf_counter()
        with stage(f"{name}: {m} on {len(texts)} queries"):
            if m.startswith("genqr"):  # both GenQR variants search with the same generated terms
                terms = terms or retriever.keywords(texts)
                results = retriever.search_keywords(texts, terms, k)
            else:
                results = retriever.search_many(texts, k)
        seconds[m] = round(time.perf_counter() - t0, 1)
        runs[m] = run_of(results, qids, excl)
    out = {"queries": len(qids), "documents": len(docs), "instructions": n_instructions,
           "methods": _rows(runs, qrels, qids), "seconds": seconds}
    log(f"{name} rewriting: " + ", ".join(f"{m} nDCG@10 {r['ndcg@10']}" for m, r in out["methods"].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (2 rerank queries, 5k docs for speed)")
    ap.add_argument("--dataset", default="lee", choices=["lee", "wiki-titles"])
    ap.add_argument("--rerank-method", default="query_likelihood", choices=["yes_no", "query_likelihood"])
    ap.add_argument("--rerank-queries", type=int, default=None, help="queries to rerank (default 2 quick, all)")
    ap.add_argument("--only-rewrite", action="store_true", help="only the query-rewriting rows")
    ap.add_argument("--rewrite-queries", type=int, default=None,
                    help="queries per set for rewriting (default 8 quick; all Lee queries and 300 SQuAD questions)")
    args = ap.parse_args()
    n_rw = args.rewrite_queries or (8 if args.quick else None)
    rewrite = {name: rewriting(name, n_rw, 3 if args.quick else 10, 48 if args.quick else 96)
               for name in ("lee", "squad")}
    if args.only_rewrite:
        emit({"rewrite": rewrite, "paper": "GenQREnsemble: up to +18 % nDCG@10 (BEIR, flan-t5)"})
        return
    result = {"dataset": args.dataset}
    n_rerank = args.rerank_queries or (2 if args.quick else 1000)
    result.update(quality(args.dataset, n_rerank, 300 if args.quick else 600, args.rerank_method))
    result.update(speed(5000 if args.quick else 20000, 500 if args.quick else 2000, 20 if args.quick else 100))
    result["baseline"] = "bm25s 0.3 (lucene, numpy backend) and rank_bm25 0.2.2 BM25Okapi, same tokens"
    fields = ["dataset", "ndcg10_bm25", "ndcg10_dense", "ndcg10_hybrid", "ndcg10_rerank", "published_bm25_ndcg10",
              "qps_ours", "qps_bm25s", "qps_rank_bm25", "max_score_diff_vs_rank_bm25"]
    result["rewrite"] = rewrite
    emit({**{k: result[k] for k in fields}, **{k: v for k, v in result.items() if k not in fields}})


if __name__ == "__main__":
    main()
