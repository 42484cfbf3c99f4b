"""KV reuse of retrieved documents (TurboRAG, CacheBlend, EPIC) on SQuAD v1.1 dev.

Each question gets the BM25 top-k paragraphs (of all 2,067 dev paragraphs) as its context.
Modes, each on the same prompts in the same run:

* ``full``: every document prefilled in place (the engine as before, prefix cache on): the reference;
* ``blend``: documents' KV from the chunk store, re-rotated, 15 % of their tokens recomputed
  (those whose KV deviates most at layer 1);
* ``sink``: the same, recomputing the first 16 tokens of each document;
* ``none``: the same, recomputing nothing.

Every paragraph the questions retrieve is encoded once, alone, after the prompt's lead-in
(what ``promptkit index build --kv`` does offline) and reused by every question that
retrieves it. Reported per mode: time to first token and its ratio to ``full``; token F1 and
exact match against the human answers, with 95 % bootstrap intervals and the paired
difference to ``full``; token F1 and exact match of each answer against ``full``'s answer to
the same prompt (how close the mode stays to the exact computation); tokens reused /
recomputed / prefilled per question.

    python bench/kv_reuse.py            # 200 questions
    python bench/kv_reuse.py --quick    # 3 questions, 3 paragraphs each: a smoke test
    python bench/kv_reuse.py --model gemma3   # Gemma 3 270M (pip install -e '.[gemma]')
"""

from __future__ import annotations

import argparse
import random

import numpy as np

import _common  # noqa: F401  (puts bench/ on sys.path)
from _common import emit, log, machine, stage, track

from promptkit import LM, Example, PromptTemplate
from promptkit.backends.local import LocalBackend
from promptkit.models import DEFAULT_LLM
from promptkit.metrics import exact_match, token_f1
from promptkit.prompt import render_with_documents
from promptkit.types import Document

MODES = ("full", "blend", "sink", "none")
INSTRUCTION = "Answer the question with a short span copied from the context."


def squad_setup(n: int, articles: int, shots: int, seed: int):
    """Corpus (every dev paragraph), ``n`` questions from ``articles`` random articles, and
    ``shots`` exemplars from other articles."""
    from evaldata import load_squad_dev

    paras = load_squad_dev()
    corpus = [Document(id=f"p{i}", text=p["context"], metadata={"title": p["title"]}) for i, p in enumerate(paras)]
    rng = random.Random(seed)
    titles = sorted({p["title"] for p in paras})
    chosen = set(rng.sample(titles, articles))
    pool = [(i, qa) for i, p in enumerate(paras) if p["title"] in chosen for qa in p["qas"]]
    questions = [{"question": qa["question"], "answers": qa["answers"], "paragraph": i}
                 for i, qa in rng.sample(pool, min(n, len(pool)))]
    others = [qa for p in paras if p["title"] not in chosen for qa in p["qas"] if len(qa["answers"][0]) < 30]
    exemplars = [Example(question=qa["question"], answer=qa["answers"][0]) for qa in rng.sample(others, shots)]
    return corpus, questions, exemplars, sorted(chosen)


def bootstrap(values: np.ndarray, reps: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (reps, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def ratio_interval(num: np.ndarray, den: np.ndarray, reps: int = 2000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of mean(num) / mean(den) over paired samples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), (reps, len(num)))
    r = num[idx].mean(1) / den[idx].mean(1)
    return [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]


def fill_store(backend: LocalBackend, texts: list[str], spans: list[list[tuple[int, int]]]) -> dict:
    """Encode every distinct document of the prompts alone, after the prompts' common lead-in."""
    lead, chunks, seen = None, [], set()
    for text, sp in zip(texts, spans):
        ids, tok = backend.encode_documents(text, sp)
        if lead is None:
            lead = ids[: tok[0][0]]
        assert ids[: tok[0][0]] == lead, "the prompts must share their text before the first document"
        for s, e in tok:
            if tuple(ids[s:e]) not in seen:
                seen.add(tuple(ids[s:e]))
                chunks.append(ids[s:e])
    tokens = sum(map(len, chunks))
    need = tokens * backend.engine.bytes_per_token
    log(f"{len(chunks)} distinct documents, {tokens:,} tokens, {need / 2**30:.2f} GiB of KV "
        f"(budget {backend.engine.pool.capacity * backend.engine.bytes_per_token / 2**30:.2f} GiB)")
    for i in track(range(0, len(chunks), 16), "encoding documents alone"):
        backend.engine.store_chunks(lead, chunks[i : i + 16])
    return {"documents": len(chunks), "tokens": tokens, "bytes": need, "lead_in_tokens": len(lead or [])}


def oracle_selection(backend: LocalBackend) -> None:
    """Make ``blend`` rank document tokens by the attention the question pays them in a full prefill."""
    assembler = backend.engine.reuse
    layers = backend.model.config.get_text_config().num_hidden_layers

    def by_full_attention(plans, layer):
        out = []
        for p in plans:
            r = p.r
            attn = assembler.runner.attention_to(list(r.tokens[: r.prompt_len]), p.spans[-1][1], layers)
            out.append(attn[r.kv.cached_len : r.kv.cached_len + p.probe_len].cpu())
        return out

    assembler._deviations = by_full_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 questions, 3 paragraphs each, 8 new tokens")
    ap.add_argument("--n", type=int, default=200, help="questions")
    ap.add_argument("--articles", type=int, default=5, help="articles the questions come from (the corpus is all)")
    ap.add_argument("--k", type=int, default=5, help="paragraphs retrieved per question")
    ap.add_argument("--shots", type=int, default=0, help="exemplars (other articles' questions with their "
                    "short answers) in the prompt; the 135M model tends to copy their answers")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--recompute-ratio", type=float, default=0.15)
    ap.add_argument("--sink-tokens", type=int, default=16)
    ap.add_argument("--kv-bytes", default="4GiB", help="KV budget of the reuse engine (chunk store + requests)")
    ap.add_argument("--full-kv-bytes", default="1GiB", help="KV budget of the full-prefill engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=DEFAULT_LLM, help="model name or path (default: the embedded SmolLM2)")
    ap.add_argument("--oracle", action="store_true", help="blend recomputes the document tokens the question "
                    "attends to most in a full prefill of the prompt (all layers) instead of those whose KV "
                    "deviates most: not a usable mode (it runs the full prefill), a bound on what a better "
                    "choice of tokens gives")
    args = ap.parse_args()
    if args.quick:
        args.n, args.articles, args.k, args.max_tokens = 3, 1, 3, 8
    modes = args.modes.split(",")
    result: dict = {"bench": "kv_reuse", "machine": machine(), "args": vars(args),
                    "data": "SQuAD v1.1 dev ($PROMPTKIT_DATA/squad/dev-v1.1.json), "
                            "all 2,067 paragraphs as the corpus"}

    from retrievers.bm25 import BM25
    from retrievers.tokenize import english

    with stage("data and BM25", result, "setup_seconds"):
        corpus, questions, shots, titles = squad_setup(args.n, args.articles, args.shots, args.seed)
        bm25 = BM25(k1=0.9, b=0.4, tokenizer=english(stem=False)).index(corpus)
        retrieved = bm25.search_many([q["question"] for q in questions], args.k)
        own = [f"p{q['paragraph']}" in {d.id for d in docs} for q, docs in zip(questions, retrieved)]
        result["articles"], result["recall_at_k"] = titles, float(np.mean(own))
        log(f"{len(questions)} questions from {titles}; own paragraph in the top {args.k}: {np.mean(own):.2f}")

    with stage("loading the model (two engines on the same weights)"):
        full_lm = LM(args.model, max_kv_bytes=args.full_kv_bytes)
        reuse_backend = LocalBackend(full_lm.model, model_obj=full_lm.backend.model,
                                     tokenizer=full_lm.backend.tokenizer, max_kv_bytes=args.kv_bytes)
        reuse_lm = LM(full_lm.model, backend=reuse_backend)
        if args.oracle:
            oracle_selection(reuse_backend)
    template = PromptTemplate(instruction=INSTRUCTION, answer_prefix="Answer:")
    prompts = [template.build({"question": q["question"]}, shots, docs) for q, docs in zip(questions, retrieved)]
    rendered = [render_with_documents(p, reuse_backend.apply_chat_template) for p in prompts]
    result["prompt_tokens_mean"] = float(np.mean([len(reuse_backend.encode(t)) for t, _ in rendered]))

    with stage("warming both engines' shared prefix (one question outside the set)"):
        warm = template.build({"question": "What is this about?"}, shots, retrieved[0][::-1])
        for mode in modes:
            (full_lm if mode == "full" else reuse_lm).generate(warm, max_tokens=1, kv_reuse=mode)
    if any(m != "full" for m in modes):
        with stage("encoding the retrieved paragraphs once (as index build --kv does)", result, "store_seconds"):
            result["store"] = fill_store(reuse_backend, [t for t, _ in rendered], [s for _, s in rendered])
    reuse_backend.engine.chunks.stats.hits = reuse_backend.engine.chunks.stats.misses = 0

    rows: dict[str, list[dict]] = {m: [] for m in modes}
    for i, (q, prompt) in enumerate(track(list(zip(questions, prompts)), "questions")):
        for mode in modes[i % len(modes):] + modes[: i % len(modes)]:  # rotate the order: load hits all alike
            lm = full_lm if mode == "full" else reuse_lm
            cfg = {"mode": mode, "recompute_ratio": args.recompute_ratio, "sink_tokens": args.sink_tokens}
            g = lm.generate(prompt, max_tokens=args.max_tokens, stop=["\n"], kv_reuse=cfg)[0]
            u = g.usage
            rows[mode].append({"ttft": u.first_token_seconds, "text": g.text.strip(),
                               "f1": token_f1(g.text.strip(), q["answers"]), "em": exact_match(g.text.strip(), q["answers"]),
                               "prompt": u.prompt_tokens, "cached": u.cached_tokens, "reused": u.reused_tokens,
                               "recomputed": u.recomputed_tokens, "prefilled": u.prefilled_tokens,
                               "stored": u.stored_tokens})
    result["chunk_store"] = {k: v for k, v in reuse_lm.stats().items() if k.startswith("chunk")}
    result["kv_high_water_bytes"] = reuse_lm.stats()["kv_high_water_bytes"]
    result["kv_budget_bytes"] = reuse_lm.stats()["kv_budget_bytes"]

    per_mode = {}
    ref = rows.get("full")
    for mode, rs in rows.items():
        col = lambda k: np.array([r[k] for r in rs], dtype=float)  # noqa: E731
        out = {"ttft_mean": float(col("ttft").mean()), "ttft_median": float(np.median(col("ttft"))),
               "f1": float(col("f1").mean()), "f1_ci": bootstrap(col("f1")),
               "em": float(col("em").mean()), "em_ci": bootstrap(col("em")),
               **{f"{k}_tokens_mean": float(col(k).mean()) for k in ("prompt", "cached", "reused", "recomputed",
                                                                      "prefilled", "stored")}}
        if ref is not None and mode != "full":
            rcol = lambda k: np.array([r[k] for r in ref], dtype=float)  # noqa: E731
            out["ttft_speedup"] = float(rcol("ttft").mean() / col("ttft").mean())
            out["ttft_speedup_ci"] = ratio_interval(rcol("ttft"), col("ttft"))
            out["ttft_speedup_median"] = float(np.median(rcol("ttft") / col("ttft")))
            out["f1_minus_full"] = float((col("f1") - rcol("f1")).mean())
            out["f1_minus_full_ci"] = bootstrap(col("f1") - rcol("f1"))
            out["em_minus_full"] = float((col("em") - rcol("em")).mean())
            out["em_minus_full_ci"] = bootstrap(col("em") - rcol("em"))
            agree_f1 = np.array([token_f1(a["text"], [b["text"]]) for a, b in zip(rs, ref)])
            agree_em = np.array([exact_match(a["text"], [b["text"]]) for a, b in zip(rs, ref)])
            out["f1_vs_full_answer"], out["f1_vs_full_answer_ci"] = float(agree_f1.mean()), bootstrap(agree_f1)
            out["em_vs_full_answer"], out["em_vs_full_answer_ci"] = float(agree_em.mean()), bootstrap(agree_em)
            out["same_answer_as_full"] = float(np.mean([a["text"] == b["text"] for a, b in zip(rs, ref)]))
        per_mode[mode] = out
        log(f"{mode:5s} TTFT {out['ttft_mean']:.2f}s (x{out.get('ttft_speedup', 1):.2f})  F1 {100 * out['f1']:.1f} "
            f"EM {100 * out['em']:.1f}  vs full's answer: F1 {100 * out.get('f1_vs_full_answer', 1):.1f} "
            f"EM {100 * out.get('em_vs_full_answer', 1):.1f}  reused {out['reused_tokens_mean']:.0f} "
            f"recomputed {out['recomputed_tokens_mean']:.0f} prefilled {out['prefilled_tokens_mean']:.0f} tokens")
    result["modes"] = per_mode
    result["examples"] = [{"question": q["question"], "gold": q["answers"][0],
                           **{m: rows[m][i]["text"] for m in modes}} for i, q in enumerate(questions[:5])]
    goal = [m for m in ("blend", "sink") if m in per_mode and "ttft_speedup" in per_mode[m]
            and per_mode[m]["ttft_speedup"] >= 3 and 100 * per_mode[m]["f1_minus_full"] >= -2]
    result["goal_met_by"] = goal
    emit(result)


if __name__ == "__main__":
    main()
