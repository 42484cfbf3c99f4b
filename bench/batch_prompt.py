"""BatchPrompt vs one item per call on this engine: LM calls, tokens prefilled, seconds, accuracy.

On SST-2 (test), TREC coarse (test) and BANKING77 (the first 7 intents, test), the default model
labels the same items zero-shot:

* ``batch_sizes``: the classify stage with ``batch_prompt`` (one numbered line per item, the label
  constrained to the label words) at batch sizes 1, 4, 8 and 16. Size 1 is one item per call with
  the prefix cache on: every prompt shares the instruction, which the engine prefills once.
* ``score_per_item``: today's classify stage (each label's log-likelihood after the prompt,
  contextually calibrated), one item per call, prefix-shared.
* ``bpe_seas``: batch size 16, 3 permutations voted (BPE), with early stopping (SEAS).

Each row has accuracy with its 95 % bootstrap interval, the paired interval of its difference to
batch size 1, and the cost per correct answer (seconds and prefilled tokens). The prefix cache is
cleared before each row so no row inherits another's prefixes.

    PROMPTKIT_DATA=/work/shared/data python bench/batch_prompt.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit, log, machine, stage  # noqa: E402
from evaldata import load_banking77, load_sst2, load_trec  # noqa: E402

from promptkit import BuildPrompt, Classify, Pipeline, get_lm  # noqa: E402
from promptkit.batch_prompt import BatchPrompt  # noqa: E402
from promptkit.metrics import bootstrap_ci, paired_bootstrap_ci  # noqa: E402

SETS = {
    "sst2": (lambda: load_sst2(), "Classify the sentiment of each movie review.", "Review: {text}"),
    "trec": (lambda: load_trec(), "Classify what kind of answer each question asks for.", "Question: {text}"),
    "banking77_7": (lambda: load_banking77(labels=7), "Classify the intent of each bank customer's message.",
                    "Message: {text}"),
}
PAPER = "BatchPrompt (Lin et al.): batch size 32 with BPE+SEAS, 9-16 % of the LM calls at similar accuracy " \
        "(BoolQ 90.6 -> 90.9 %, gpt-3.5/gpt-4)"


def run_row(lm, pipe: Pipeline, items: list[dict], gold: list[str]) -> tuple[dict, list[float]]:
    """Label the items with ``pipe``; accuracy, calls, prefilled tokens and seconds."""
    lm.backend.clear_cache()
    before, t0 = lm.stats(), time.perf_counter()
    records = pipe.run(items)
    seconds = time.perf_counter() - t0
    after = lm.stats()
    hits = [float(r.output == g) for r, g in zip(records, gold)]
    classify = pipe.stages[-1]
    calls = sum(o.calls for o in classify.batch_outcomes) if classify.batch_prompt else \
        len(items) + 3 * (len(items) > 0) * bool(classify.calibrate)  # calibration: 3 content-free prompts
    prefilled = after["tokens_prefilled"] - before["tokens_prefilled"]
    correct = max(1.0, sum(hits))
    row = {"accuracy": round(sum(hits) / len(hits), 4), "accuracy_ci": [round(x, 4) for x in bootstrap_ci(hits)],
           "lm_calls": calls, "prefilled_tokens": prefilled, "seconds": round(seconds, 2),
           "seconds_per_correct": round(seconds / correct, 3), "prefilled_per_correct": round(prefilled / correct, 1),
           "unanswered": sum(r.output is None for r in records)}
    return row, hits


def bench_set(lm, name: str, n: int, sizes: list[int], bpe: tuple[int, int]) -> dict:
    loader, instruction, input_format = SETS[name]
    _, test, labels, _ = loader()
    test = test[:n]
    items, gold = [{"text": r["text"]} for r in test], [r["label"] for r in test]
    prompt = BuildPrompt(instruction=instruction, input_format=input_format, answer_prefix="Label:")

    def pipe(**opts) -> Pipeline:
        return Pipeline(prompt, Classify(labels=labels, **opts))

    out: dict = {"n": len(items), "labels": labels, "batch_sizes": {}}
    scores: dict[str, list[float]] = {}
    for size in sizes:
        with stage(f"{name}: batch size {size} on {len(items)} items"):
            row, scores[str(size)] = run_row(lm, pipe(batch_prompt=BatchPrompt(size=size)), items, gold)
        out["batch_sizes"][str(size)] = row
        log(f"{name} batch {size}: {row}")
    size, perms = bpe
    with stage(f"{name}: BPE ({perms} orders) + SEAS at batch size {size}"):
        out["bpe_seas"], scores["bpe"] = run_row(
            lm, pipe(batch_prompt=BatchPrompt(size=size, permutations=perms, seas=True)), items, gold)
    with stage(f"{name}: label scoring, one item per call (calibrated)"):
        out["score_per_item"], scores["score"] = run_row(lm, pipe(), items, gold)
    base = scores[str(sizes[0])]
    for key, row in [*out["batch_sizes"].items(), ("bpe", out["bpe_seas"]), ("score", out["score_per_item"])]:
        row["difference_to_size1_ci"] = [round(x, 4) for x in paired_bootstrap_ci(scores[key], base)]
    rows = {f"batch{k}": v for k, v in out["batch_sizes"].items()} | {"bpe_seas": out["bpe_seas"],
                                                                       "score_per_item": out["score_per_item"]}
    out["cheapest_seconds_per_correct"] = min(rows, key=lambda k: rows[k]["seconds_per_correct"])
    out["cheapest_prefilled_per_correct"] = min(rows, key=lambda k: rows[k]["prefilled_per_correct"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 items per set")
    ap.add_argument("--n", type=int, default=None, help="items per set (default 16 quick, 200)")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = ap.parse_args()
    n = args.n or (16 if args.quick else 200)
    lm = get_lm()
    result = {"paper": PAPER, "model": lm.model, "weights": lm.stats().get("weights"), "machine": machine(),
              "sets": {}}
    for name in args.sets:
        result["sets"][name] = bench_set(lm, name, n, [1, 4, 8, 16], (16, 3))
    emit(result)


if __name__ == "__main__":
    main()
