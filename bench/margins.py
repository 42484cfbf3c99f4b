"""Writing in the Margins vs plain long-context answering, on SQuAD dev with long contexts.

Each sampled SQuAD v1.1 dev question gets the BM25 top-``k`` paragraphs of all 2,067 dev
paragraphs as its context (its own paragraph among them when BM25 finds it). Both real models
(SmolLM2-135M-Instruct with its chat template; Gemma 3 270M, a base model, on plain text) answer
it plainly and with ``margins`` (a note after each paragraph, the relevant notes before the
question). Reported: token F1 with 95 % intervals and the paired interval of the difference,
the extra tokens the margins generate and prefill, and seconds. The prefix cache is cleared
before each run.

    PROMPTKIT_DATA=/work/shared/data python bench/margins.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit, log, machine, stage  # noqa: E402
from evaldata import load_squad, load_squad_dev  # noqa: E402

from promptkit import BuildPrompt, Document, Generate, Record, get_lm  # noqa: E402
from promptkit.metrics import bootstrap_ci, paired_bootstrap_ci, token_f1  # noqa: E402
from retrievers import BM25, english  # noqa: E402

MODELS = {"smollm2-135m-instruct": None, "gemma3-270m": False}  # chat: the model's default, or plain text
PAPER = "Writing in the Margins (Russak et al.): +7.5 % on multi-hop reasoning (HotpotQA, MultiHop-RAG), " \
        "+30 % F1 on aggregation (CWE), 7B-70B models"
LAYOUT = BuildPrompt(system="You answer questions using only the given context.",
                     instruction="Use the context to answer the question in a few words.")


def long_context_records(n: int, k: int, seed: int) -> tuple[list[Record], list[list[str]], float]:
    """Records with their BM25 top-``k`` dev paragraphs; the gold answers; BM25 recall@k."""
    paras = load_squad_dev()
    docs = [Document(id=str(i), text=p["context"]) for i, p in enumerate(paras)]
    own = {p["context"]: str(i) for i, p in enumerate(paras)}
    bm25 = BM25(tokenizer=english()).index(docs)
    items = load_squad(n=n, seed=seed)
    hits = bm25.search_many([q["question"] for q in items], k)
    records = [Record(inputs={"question": q["question"]}, documents=h) for q, h in zip(items, hits)]
    recall = sum(own[q["context"]] in {d.id for d in h} for q, h in zip(items, hits)) / len(items)
    return LAYOUT.process(records), [q["answers"] for q in items], recall


def answer(lm_name: str, chat: bool | None, records: list[Record], margins: bool, batch: int) -> dict:
    """F1 per question, tokens and seconds of one run (batches of ``batch`` questions)."""
    lm = get_lm(lm_name)
    lm.backend.clear_cache()
    # no stop string: the base model opens its answer with a line break; the first line is the answer
    stage_ = Generate(model=lm_name, chat=chat, max_tokens=16, margins=margins or None)
    before, t0, generated, extra = lm.stats(), time.perf_counter(), 0, 0
    outputs = []
    for i in range(0, len(records), batch):
        chunk = [r.model_copy(deep=True) for r in records[i:i + batch]]
        for r in stage_.process(chunk):
            outputs.append(first_line(r.output or ""))
            generated += r.usage.completion_tokens if r.usage else 0
        if margins:
            extra += stage_.margin_outcome.usage.completion_tokens
    seconds = time.perf_counter() - t0
    after = lm.stats()
    return {"outputs": outputs, "seconds": seconds, "generated": generated + extra, "margin_tokens": extra,
            "prefilled": after["tokens_prefilled"] - before["tokens_prefilled"]}


def bench_model(name: str, chat: bool | None, records: list[Record], golds: list[list[str]], batch: int) -> dict:
    runs = {}
    for mode in ("plain", "margins"):
        with stage(f"{name}: {mode} on {len(records)} questions"):
            runs[mode] = answer(name, chat, records, mode == "margins", batch)
    f1 = {m: [token_f1(o, g) for o, g in zip(r["outputs"], golds)] for m, r in runs.items()}
    plain, marg = runs["plain"], runs["margins"]
    out = {"plain": {"f1": round(sum(f1["plain"]) / len(golds), 4), "f1_ci": rounded(bootstrap_ci(f1["plain"])),
                     "seconds": round(plain["seconds"], 1), "prefilled_tokens": plain["prefilled"],
                     "generated_tokens": plain["generated"]},
           "margins": {"f1": round(sum(f1["margins"]) / len(golds), 4), "f1_ci": rounded(bootstrap_ci(f1["margins"])),
                       "difference_ci": rounded(paired_bootstrap_ci(f1["margins"], f1["plain"])),
                       "extra_tokens": marg["margin_tokens"], "extra_generated_tokens": marg["generated"] - plain["generated"],
                       "extra_prefilled_tokens": marg["prefilled"] - plain["prefilled"],
                       "prefilled_tokens": marg["prefilled"], "seconds": round(marg["seconds"], 1)},
           "examples": [{"gold": g[0], "plain": p, "margins": m}
                        for g, p, m in list(zip(golds, plain["outputs"], marg["outputs"]))[:3]]}
    log(f"{name}: {out['plain']} vs {out['margins']}")
    return out


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def rounded(ci: tuple[float, float]) -> list[float]:
    return [round(x, 4) for x in ci]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 questions, top-5 paragraphs")
    ap.add_argument("--n", type=int, default=None, help="questions (default 3 quick, 60)")
    ap.add_argument("--k", type=int, default=None, help="paragraphs per context (default 5 quick, 10)")
    ap.add_argument("--batch", type=int, default=8, help="questions answered together")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    n, k = args.n or (3 if args.quick else 60), args.k or (5 if args.quick else 10)
    with stage(f"SQuAD dev: BM25 over all dev paragraphs, top-{k} for {n} questions"):
        records, golds, recall = long_context_records(n, k, seed=0)
    result = {"paper": PAPER, "n": n, "k": k, "bm25_recall_at_k": round(recall, 4), "machine": machine(), "models": {}}
    for name in args.models:
        result["models"][name] = bench_model(name, MODELS[name], records, golds, args.batch)
    emit(result)


if __name__ == "__main__":
    main()
