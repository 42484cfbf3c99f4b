"""Passage count and order for RAG, chosen on validation data, judged on held-out SQuAD dev questions.

BM25 over all 2,067 SQuAD v1.1 dev paragraphs; the default model answers from the retrieved
paragraphs (the ``cookbook/rag_qa`` prompt). ``RAGSearch`` scores every ``k`` × order (best
first, best last, best at both ends) on validation questions; the chosen setting and the default
(``k=3``, by score) are then scored on disjoint held-out questions: token F1 with 95 % intervals
and the paired interval of the difference. For reference, the held-out F1 with the question's own
paragraph alone in the context, and BM25's recall at each ``k``.

    PROMPTKIT_DATA=/work/shared/data python bench/rag_order.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

# bench/optimizers.py shadows the optimizers package while bench/ is on sys.path: import the package first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from optimizers import RAGSearch  # noqa: E402

sys.path.insert(0, _HERE)
from _common import emit, log, machine, stage  # noqa: E402
from evaldata import load_squad, load_squad_dev  # noqa: E402

from promptkit import BuildPrompt, Document, Generate, Pipeline, Record  # noqa: E402
from promptkit.evaluate import evaluate  # noqa: E402
from promptkit.metrics import bootstrap_ci, paired_bootstrap_ci, token_f1  # noqa: E402
from promptkit.types import Example  # noqa: E402
from retrievers.stages import BM25Stage  # noqa: E402

PAPER = ("Long-context LLMs meet RAG (Jin et al.): F1 rises then falls as retrieved passages grow; retrieval "
         "reordering (best at both ends) recovers part of the loss. Measured here before (CLI, 40 SQuAD dev "
         "questions, BM25 recall@3 0.975): top-3 F1 0.135, top-1 0.186, gold paragraph alone 0.213")
PROMPT = BuildPrompt(system="You answer questions using only the given context.",
                     instruction="Use the context to answer the question in a few words.")


def pipeline(corpus: str, k: int = 3, order: str = "score") -> Pipeline:
    return Pipeline(BM25Stage(corpus=corpus, k=k, order=order), PROMPT, Generate(max_tokens=16, stop=["\n"]))


def gold_alone(items: list[dict]) -> list[float]:
    """F1 with the question's own paragraph as the whole context."""
    records = [Record(inputs={"question": q["question"]}, documents=[Document(id="gold", text=q["context"])])
               for q in items]
    out = Generate(max_tokens=16, stop=["\n"]).process(PROMPT.process(records))
    return [token_f1(r.output, q["answers"]) for r, q in zip(out, items)]


def recall_at(stage: BM25Stage, items: list[dict], ids: dict[str, str], ks: list[int]) -> dict[str, float]:
    hits = stage.retriever().search_many([q["question"] for q in items], max(ks))
    return {str(k): round(sum(ids[q["context"]] in {d.id for d in h[:k]} for q, h in zip(items, hits)) / len(items), 4)
            for k in ks}


def ci(xs) -> list[float]:
    return [round(x, 4) for x in xs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 validation and 8 held-out questions, k in {1, 3}")
    ap.add_argument("--n-val", type=int, default=None, help="validation questions (default 8 quick, 40)")
    ap.add_argument("--n-test", type=int, default=None, help="held-out questions (default 8 quick, 150)")
    args = ap.parse_args()
    n_val, n_test = args.n_val or (8 if args.quick else 40), args.n_test or (8 if args.quick else 150)
    ks = [1, 3] if args.quick else [1, 2, 3, 5]
    orders = ["score", "ends"] if args.quick else ["score", "best_last", "ends"]
    paras = load_squad_dev()
    ids = {p["context"]: str(i) for i, p in enumerate(paras)}
    corpus = os.path.join(tempfile.mkdtemp(prefix="squad-dev-"), "paragraphs.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": str(i), "text": p["context"]}) + "\n" for i, p in enumerate(paras))
    items = load_squad(n=n_val + n_test, seed=0)
    val, test = items[:n_val], items[n_val:]
    as_examples = lambda part: [Example(question=q["question"], answer=q["answers"]) for q in part]  # noqa: E731
    default = pipeline(corpus)
    result: dict = {"paper": PAPER, "n_val": n_val, "n_test": n_test, "ks": ks, "orders": orders, "machine": machine()}
    with stage(f"RAGSearch over k in {ks} x {orders} on {n_val} validation questions"):
        chosen, report = RAGSearch(ks=ks, orders=orders).compile(default, as_examples(val), "f1",
                                                                 valset=as_examples(val))
    result["val"] = {c.name: {"f1": round(c.score, 4), "ci": ci(c.ci)} for c in report.candidates}
    result["chosen"] = report.best
    log(f"chosen {report.best}; validation {result['val']}")
    with stage(f"held-out: default k=3 by score vs the chosen setting on {n_test} questions"):
        base = evaluate(default, as_examples(test), "f1")
        best = evaluate(chosen, as_examples(test), "f1") if report.best.get("name") != "baseline" else base
    with stage("held-out: the question's own paragraph alone"):
        gold = gold_alone(test)
    b, c = [r.score for r in base.results], [r.score for r in best.results]
    result["test"] = {"default_k3_score": {"f1": round(base.score, 4), "ci": ci(base.ci)},
                      "chosen": {"f1": round(best.score, 4), "ci": ci(best.ci), **report.best},
                      "difference_ci": ci(paired_bootstrap_ci(c, b)),
                      "gold_paragraph_alone": {"f1": round(sum(gold) / len(gold), 4), "ci": ci(bootstrap_ci(gold))},
                      "bm25_recall": recall_at(default.stages[0], test, ids, sorted({*ks, 3, 10}))}
    result["search_cost"] = {"lm_calls": report.lm_calls, "tokens_prefilled": report.tokens_prefilled,
                             "tokens_requested": report.tokens_requested, "seconds": round(report.seconds, 1)}
    emit(result)


if __name__ == "__main__":
    main()
