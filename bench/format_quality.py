"""Answer quality of each weight format against float32 on human-written data.

Two tasks, each run in every ``--formats`` format on the same items:

- QA: SQuAD v1.1 dev questions (``$PROMPTKIT_DATA/squad/dev-v1.1.json``) with
  their gold paragraph (a seeded sample of ``--qa``), a chat prompt asking for a
  short answer, greedy, up to 24 new tokens; token F1 and exact match against
  every human answer;
- classification: SNIPS intents, utterances of the official test split
  (``$PROMPTKIT_DATA/snips/test``, 700; the first ``--cls`` in a seeded order),
  zero-shot with the library's pipeline (``BuildPrompt`` >> ``Classify``: label
  words scored, contextual calibration on), as in ``bench/optimizers.py``;
  accuracy.

For each format: the score with its 95 % bootstrap interval, the paired
difference to float32 (and to bfloat16) with its interval, and the share of QA
answers identical to float32's. A difference whose interval holds 0 is noise,
not a result.

    python bench/format_quality.py            # 200 questions, 312 utterances; float32, bfloat16, int4+bf16
    python bench/format_quality.py --quick    # 40 questions, 60 utterances
"""

from __future__ import annotations

import argparse
import os

import _common  # noqa: F401  (puts bench/ on sys.path)
from _common import emit, log, machine, stage
from evaldata import load_snips, load_squad

from promptkit import LM, BuildPrompt, Classify, Pipeline, get_lm
from promptkit.lm import _shared as shared_lms
from promptkit.metrics import bootstrap_ci, exact_match, paired_bootstrap_ci, token_f1

QA_PROMPT = ("Answer the question with a short phrase taken from the passage.\n\nPassage: {context}\n\n"
             "Question: {question}")


def run_qa(lm: LM, items: list[dict]) -> tuple[list[str], list[float], list[float]]:
    prompts = [QA_PROMPT.format(context=it["context"], question=it["question"]) for it in items]
    answers = [g.text.strip() for g in lm.generate(prompts, max_tokens=24)]
    return (answers, [token_f1(a, it["answers"]) for a, it in zip(answers, items)],
            [exact_match(a, it["answers"]) for a, it in zip(answers, items)])


def run_cls(items: list[dict], labels: list[str]) -> list[float]:
    """Accuracy per item of the zero-shot pipeline (its stage runs on the shared LM, see main)."""
    clf = Pipeline(BuildPrompt(instruction="Classify the intent of the request.", input_format="Request: {text}",
                               answer_prefix="Intent:"),
                   Classify(labels=labels, calibrate=True))
    records = clf.run([{"text": it["text"]} for it in items])
    return [float(r.output == it["label"]) for r, it in zip(records, items)]


def summary(values: list[float], scale: float) -> dict:
    lo, hi = bootstrap_ci(values)
    return {"mean": round(scale * sum(values) / len(values), 2), "ci95": [round(scale * lo, 2), round(scale * hi, 2)]}


def difference(a: list[float], b: list[float], scale: float) -> dict:
    lo, hi = paired_bootstrap_ci(a, b)
    return {"diff": round(scale * (sum(a) - sum(b)) / len(a), 2), "ci95": [round(scale * lo, 2), round(scale * hi, 2)],
            "interval_holds_0": lo <= 0 <= hi}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 questions, 60 utterances")
    ap.add_argument("--formats", default="float32,bfloat16,int4+bf16", help="comma-separated; float32 first")
    ap.add_argument("--qa", type=int, default=None, help="SQuAD questions (200; 40 with --quick)")
    ap.add_argument("--cls", type=int, default=None, help="SNIPS test utterances (312 of the 700; 60 with --quick)")
    args = ap.parse_args()
    formats = args.formats.split(",")
    if formats[0] != "float32":
        ap.error("--formats must start with float32, the reference")
    qa_items = load_squad(n=args.qa or (40 if args.quick else 200), seed=0)
    _, test, labels, _ = load_snips()
    cls_items = test[: args.cls or (60 if args.quick else 312)]
    res: dict = {"bench": "format_quality", "qa_items": len(qa_items), "cls_items": len(cls_items), **machine()}
    answers, f1, em, acc = {}, {}, {}, {}
    for fmt in formats:
        os.environ["PROMPTKIT_WEIGHTS"] = fmt  # the shared LM that pipeline stages use is loaded in this format
        lm = get_lm()
        with stage(f"{fmt}: {len(qa_items)} SQuAD questions, {len(cls_items)} SNIPS utterances"):
            answers[fmt], f1[fmt], em[fmt] = run_qa(lm, qa_items)
            acc[fmt] = run_cls(cls_items, labels)
        lm.backend.engine.close()
        shared_lms.clear()
        row = {"qa_f1": summary(f1[fmt], 100), "qa_em": summary(em[fmt], 100), "cls_accuracy": summary(acc[fmt], 100)}
        for ref in ("float32", "bfloat16"):
            if ref in answers and ref != fmt:
                same = sum(a == b for a, b in zip(answers[fmt], answers[ref])) / len(qa_items)
                row[f"vs_{ref}"] = {"qa_f1": difference(f1[fmt], f1[ref], 100),
                                    "cls_accuracy": difference(acc[fmt], acc[ref], 100),
                                    "qa_answers_identical": round(same, 3)}
        res[fmt] = row
        log(f"{fmt}: {row}")
    emit(res)


if __name__ == "__main__":
    main()
