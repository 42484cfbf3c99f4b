"""P5: prompt compression against the llmlingua package, on question answering over several documents.

Questions are SQuAD v1.1 dev's (human-written, with human answers; bench/evaldata.py
``load_squad`` reads ``$PROMPTKIT_DATA/squad/dev-v1.1.json``). Each comes with four
Wikipedia paragraphs (its own and three from other articles, in random order). At
rates 0.5 and 0.33 every method compresses the context; the embedded LM then
answers from the compressed prompt. Reported per method: the rate actually reached (model tokens of the
context after / before), answer token F1 and exact match (SQuAD normalisation), and compression
seconds; each rate's best method on each side is the one with the higher F1.

llmlingua 0.2.2 (``pip install llmlingua==0.2.2``) runs with the same local
SmolLM2 as its compressor model, in both its modes: LLMLingua (plain) and
LongLLMLingua (question-aware). ``--quick`` (under a minute) runs 3 questions at
rate 0.33: our question-aware, extractive and attention methods against
LongLLMLingua (plain LLMLingua answered none of the questions at either rate in
a full run); its accuracies are a smoke test, not a result. Two adaptations, in this script only: its
token counting (tiktoken's ``encoding_for_model``, which downloads a file)
uses the model's own tokenizer, and its key/value cache handling, written for
tuple caches, gets a thin adapter to transformers' ``DynamicCache``.

    python bench/compression.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time

import _common  # noqa: F401
from _common import emit, log, machine, stage, track

from promptkit import Prompt, get_lm
from promptkit.models import resolve_llm
from promptkit.metrics import bootstrap_ci, exact_match, mean, token_f1

INSTRUCTION = "Read the context and answer the question with a few words from it."
ANSWER_TOKENS = 16


def build_items(n: int, seed: int = 0) -> list[dict]:
    from evaldata import load_squad

    qa = load_squad()
    rng = random.Random(seed)
    picked = rng.sample(range(len(qa)), n)
    items = []
    for i in picked:
        others = [j for j in rng.sample(range(len(qa)), 12) if qa[j]["title"] != qa[i]["title"]]
        docs = list(dict.fromkeys([qa[i]["context"]] + [qa[j]["context"] for j in others]))[:4]
        rng.shuffle(docs)
        items.append({"question": qa[i]["question"], "answers": qa[i]["answers"], "docs": docs})
    return items


def make_prompt(context: str, question: str) -> Prompt:
    return Prompt.from_parts(instruction=INSTRUCTION, context=context, question=f"Question: {question}",
                             answer_prefix="Answer:")


def context_of(docs: list[str]) -> str:
    return "Context:\n" + "\n".join(f"[{k + 1}] {d}" for k, d in enumerate(docs))


def answer_scores(lm, prompts: list[Prompt], items: list[dict]) -> dict:
    """Exact match and token F1 of the answers to ``prompts``, each with its 95 % bootstrap interval."""
    gens = lm.generate(prompts, max_tokens=ANSWER_TOKENS, stop=["\n"])
    preds = [g.text.strip() for g in gens]
    em = [exact_match(p, it["answers"]) for p, it in zip(preds, items)]
    f1 = [token_f1(p, it["answers"]) for p, it in zip(preds, items)]
    return {"em": mean(em), "em_ci": _r(bootstrap_ci(em)), "f1": round(mean(f1), 4), "f1_ci": _r(bootstrap_ci(f1))}


def _r(ci: tuple[float, float]) -> list[float]:
    return [round(ci[0], 4), round(ci[1], 4)]


class _TokenizerAsTiktoken:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, **_):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids, **_):
        return self.tok.decode(ids)


class _TupleCacheModel:
    """Lets llmlingua's tuple-cache code drive a transformers 5 model."""

    def __init__(self, model):
        self.m, self.config, self.device = model, model.config, model.device

    def __call__(self, *args, past_key_values=None, **kw):
        from transformers.cache_utils import Cache, DynamicCache

        if past_key_values is not None and not isinstance(past_key_values, Cache):
            past_key_values = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        out = self.m(*args, past_key_values=past_key_values, **kw)
        if getattr(out, "past_key_values", None) is not None:
            out.past_key_values = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out

    def __getattr__(self, name):
        return getattr(self.m, name)


def llmlingua_compressor():
    import tiktoken
    from transformers import AutoTokenizer

    path = resolve_llm()
    tiktoken.encoding_for_model = lambda name: _TokenizerAsTiktoken(AutoTokenizer.from_pretrained(path))
    from llmlingua import PromptCompressor

    pc = PromptCompressor(model_name=path, device_map="cpu")
    pc.model = _TupleCacheModel(pc.model)
    return pc


def run_llmlingua(pc, item: dict, rate: float, long: bool) -> str:
    kw = dict(rank_method="longllmlingua", condition_in_question="after_condition", condition_compare=True,
              dynamic_context_compression_ratio=0.3, context_budget="+100") if long else {}
    docs = [f"[{k + 1}] {d}" for k, d in enumerate(item["docs"])]
    out = pc.compress_prompt(docs, instruction="", question=item["question"] if long else "", rate=rate, **kw)
    text = out["compressed_prompt"]
    if long and text.rstrip().endswith(item["question"].strip()):
        text = text.rstrip()[: -len(item["question"].strip())]
    return "Context:\n" + text.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="3 questions at rate 0.33; question/extractive/attention vs LongLLMLingua (under a minute)")
    ap.add_argument("--n", type=int, default=None)
    args = ap.parse_args()
    n = args.n or (3 if args.quick else 60)
    theirs_modes = (True,) if args.quick else (False, True)
    rates = (0.33,) if args.quick else (0.5, 0.33)

    from compressors import COMPRESSORS

    if importlib.util.find_spec("llmlingua") is None:  # the baseline: say so before any work
        sys.exit("bench/compression.py compares against llmlingua, which is not installed: "
                 "pip install -e '.[bench]' (llmlingua==0.2.2)")
    lm = get_lm()
    count = lambda text: len(lm.backend.encode_continuation(text))
    items = build_items(n)
    full = [make_prompt(context_of(it["docs"]), it["question"]) for it in items]
    with stage(f"answering {n} questions from the uncompressed context"):
        uncompressed = answer_scores(lm, full, items)
    log(f"uncompressed: {uncompressed}")
    with stage("loading llmlingua's PromptCompressor on the same SmolLM2"):
        pc = llmlingua_compressor()
    quick_methods = ("question", "extractive", "attention")
    ours = {name: cls() for name, cls in COMPRESSORS.items() if not args.quick or name in quick_methods}
    results, per_method = [], {}
    for rate in rates:
        row: dict = {"rate": rate}
        for name, comp in ours.items():
            t0 = time.perf_counter()
            outs = [comp.compress(p, rate=rate, question=it["question"])
                    for p, it in track(list(zip(full, items)), f"{name} at rate {rate}")]
            secs = time.perf_counter() - t0
            reached = sum(o.tokens_after for o in outs) / sum(o.tokens_before for o in outs)
            per_method[f"{name}@{rate}"] = {**answer_scores(lm, [o.prompt for o in outs], items),
                                            "rate_reached": round(reached, 4), "seconds": round(secs, 2)}
            log(f"{name}@{rate}: {per_method[f'{name}@{rate}']}")
        for long in theirs_modes:
            name = "longllmlingua" if long else "llmlingua"
            t0 = time.perf_counter()
            ctxs = [run_llmlingua(pc, it, rate, long) for it in track(items, f"{name} at rate {rate}")]
            secs = time.perf_counter() - t0
            before = sum(count(context_of(it["docs"])) for it in items)
            per_method[f"{name}@{rate}"] = {
                **answer_scores(lm, [make_prompt(c, it["question"]) for c, it in zip(ctxs, items)], items),
                "rate_reached": round(sum(map(count, ctxs)) / before, 4), "seconds": round(secs, 2)}
            log(f"{name}@{rate}: {per_method[f'{name}@{rate}']}")
        mine = {k: v for k, v in per_method.items() if k.endswith(f"@{rate}") and "lingua" not in k}
        theirs = {k: v for k, v in per_method.items() if k.endswith(f"@{rate}") and "lingua" in k}
        # Token F1 ranks (a 135M model answers in sentences, so exact match is near 0 on SQuAD), then EM.
        best_ours = max(mine, key=lambda k: (mine[k]["f1"], mine[k]["em"]))
        best_theirs = max(theirs, key=lambda k: (theirs[k]["f1"], theirs[k]["em"]))
        row.update({
            "method_ours": best_ours.split("@")[0], "method_llmlingua": best_theirs.split("@")[0],
            "rate_reached": mine[best_ours]["rate_reached"], "rate_reached_llmlingua": theirs[best_theirs]["rate_reached"],
            "f1_ours": mine[best_ours]["f1"], "f1_ours_ci": mine[best_ours]["f1_ci"],
            "f1_llmlingua": theirs[best_theirs]["f1"], "f1_llmlingua_ci": theirs[best_theirs]["f1_ci"],
            "f1_uncompressed": uncompressed["f1"], "f1_uncompressed_ci": uncompressed["f1_ci"],
            "accuracy_ours": mine[best_ours]["em"], "accuracy_llmlingua": theirs[best_theirs]["em"],
            "accuracy_uncompressed": uncompressed["em"],
            "seconds_ours": mine[best_ours]["seconds"], "seconds_llmlingua": theirs[best_theirs]["seconds"],
            "speedup_vs_llmlingua": round(theirs[best_theirs]["seconds"] / max(mine[best_ours]["seconds"], 1e-9), 2),
        })
        results.append(row)
    emit({"bench": "compression", "dataset": "SQuAD v1.1 dev ($PROMPTKIT_DATA/squad/dev-v1.1.json)",
          "questions": n, **machine(), "per_method": per_method, "results": results})


if __name__ == "__main__":
    main()
