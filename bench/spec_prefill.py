"""Prefill only the tokens that matter: selective prefill (GemFilter, SpecPrefill) against full prefill.

Two sets, on the real models, each prompt in every mode in the same run:

* SQuAD v1.1 dev long-context QA: each question with its BM25 top-10 paragraphs (of all 2,067
  dev paragraphs; ~2,500 tokens), answered greedily; token F1 against the human answers;
* the 8k-token needle prompts of ``bench/sparse_prefill.py`` (a seven-digit number hidden in
  Wikipedia text at several depths); the needle is found when the answer holds the number.

Modes: ``full`` (every token, the reference), ``filter`` (the target's first ``--layer`` layers
choose ``--keep`` of the tokens; GemFilter), ``spec`` (a draft model chooses; SpecPrefill:
SmolLM2 drafting for Gemma 3 270M, their tokenizers bridged by characters), and beside them the
two others that attack the same cost: ``compress`` (``compressors``' attention-guided
compression of the context to the same share of tokens) and ``sparse`` (the engine's
block-sparse prefill). Every mode keeps the question and the last 64 tokens dense.

Time to first token is the wall time of a call that generates one token (selection included)
with the prefix cache emptied before it; its ratio to ``full`` is reported with a paired 95 %
interval, and F1 with its difference to ``full`` and that difference's paired interval.

    python bench/spec_prefill.py --quick                 # 3 questions, one 4k needle prompt, SmolLM2
    python bench/spec_prefill.py                         # 40 questions, 8k needles at 5 depths, both models
    python bench/spec_prefill.py --models smollm2 --n 100
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

import _common  # noqa: F401  (puts bench/ on sys.path)
from _common import emit, log, machine, stage, track

from promptkit import LM, Prompt, SelectivePrefill
from promptkit.metrics import bootstrap_ci, paired_bootstrap_ci, token_f1

TAIL = 64
DRAFT = "smollm2-135m-instruct"


def squad_prompts(n: int, k: int, seed: int) -> list[dict]:
    """``n`` SQuAD dev questions, each with its BM25 top-``k`` dev paragraphs as context."""
    from evaldata import load_squad_dev

    from promptkit.types import Document
    from retrievers.bm25 import BM25

    paras = load_squad_dev()
    bm25 = BM25().index([Document(id=str(i), text=p["context"]) for i, p in enumerate(paras)])
    rng = random.Random(seed)
    qas = rng.sample([(qa["question"], qa["answers"]) for p in paras for qa in p["qas"]], n)
    items = []
    for question, answers in qas:
        context = "\n\n".join(d.text for d in bm25.search(question, k=k))
        items.append({"context": context, "question": question, "answers": answers})
    return items


def needle_prompts(lm: LM, tokens: int, depths: int, seed: int) -> list[dict]:
    """Needle-in-a-haystack items of about ``tokens`` tokens (in ``lm``'s tokenizer), the needle at
    ``depths`` depths."""
    from sparse_prefill import haystack_text, magic_number

    rng = random.Random(seed)
    ids = lm.backend.encode_continuation(haystack_text(None)[: tokens * 8])
    hay = lm.backend.decode(ids[: tokens - 150])  # room for the needle, the question and the template
    items = []
    for d in range(depths):
        secret = magic_number(rng)
        cut = hay.rfind(". ", 0, int(len(hay) * (d + 0.5) / depths)) + 2
        text = f"{hay[:cut]}The special magic number is: {secret}. {hay[cut:]}"
        items.append({"context": text, "question": "What is the special magic number mentioned in the text above?",
                      "answers": [secret]})
    return items


def prompt_of(item: dict, chat: bool) -> Prompt:
    return Prompt.from_parts(instruction="Answer the question from the context with a short span.",
                             context=item["context"], question=item["question"],
                             answer_prefix=None if chat else "Answer:")


def run_mode(lm: LM, item: dict, mode: str, args: argparse.Namespace) -> tuple[float, str]:
    """(seconds to the first token, the greedy answer) of one prompt in ``mode``."""
    prompt, options = prompt_of(item, lm.chat), {}
    if mode in ("filter", "spec"):
        options["prefill"] = SelectivePrefill(mode=mode, keep=args.keep, layer=args.layer, tail=TAIL,
                                              draft=DRAFT if mode == "spec" else None)
    timings = []
    for tokens in (1, args.answer_tokens):
        lm.backend.clear_cache()
        t0 = time.perf_counter()
        if mode == "compress":
            prompt = compressed(lm, prompt_of(item, lm.chat), args.keep)
        gen = lm.generate(prompt, max_tokens=tokens, **options)[0]
        timings.append(time.perf_counter() - t0)
    return timings[0], gen.text


def compressed(lm: LM, prompt: Prompt, rate: float) -> Prompt:
    from compressors import AttentionCompressor

    return AttentionCompressor(model=lm.model).compress(prompt, rate=rate).prompt


def measure(lm: LM, items: list[dict], modes: list[str], args: argparse.Namespace, name: str) -> dict:
    ttft: dict[str, list[float]] = {m: [] for m in modes}
    f1: dict[str, list[float]] = {m: [] for m in modes}
    for item in track(items, f"{name}: {len(items)} prompts x {len(modes)} modes"):
        for mode in modes:
            secs, text = run_mode(lm, item, mode, args)
            ttft[mode].append(secs)
            f1[mode].append(token_f1(text, item["answers"]) if name != "needle" else
                            float(any(a in text for a in item["answers"])))
    return summarize(ttft, f1)


def summarize(ttft: dict[str, list[float]], f1: dict[str, list[float]]) -> dict:
    full_t, full_f = np.array(ttft["full"]), f1["full"]
    out = {}
    for mode in ttft:
        t = np.array(ttft[mode])
        row = {"ttft_s": round(float(t.mean()), 3), "f1": round(float(np.mean(f1[mode])), 4),
               "f1_ci": [round(x, 4) for x in bootstrap_ci(f1[mode])]}
        if mode != "full":
            rng = np.random.default_rng(0)
            idx = rng.integers(0, len(t), (2000, len(t)))
            speed = full_t[idx].mean(1) / t[idx].mean(1)
            row.update(ttft_speedup=round(float(full_t.mean() / t.mean()), 2),
                       ttft_speedup_ci=[round(float(np.percentile(speed, q)), 2) for q in (2.5, 97.5)],
                       f1_minus_full=round(float(np.mean(f1[mode]) - np.mean(full_f)), 4),
                       f1_minus_full_ci=[round(x, 4) for x in paired_bootstrap_ci(f1[mode], full_f)])
        out[mode] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 questions, one 4k needle prompt, SmolLM2 only")
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--n", type=int, default=40, help="SQuAD questions")
    ap.add_argument("--k", type=int, default=10, help="BM25 paragraphs per question")
    ap.add_argument("--needle-tokens", type=int, default=8000)
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.25, help="share of the scored tokens kept")
    ap.add_argument("--layer", type=int, default=None, help="filter: scoring layer (default: a third)")
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.models, args.n, args.needle_tokens, args.depths = "smollm2-135m-instruct", 3, 4000, 1
    result: dict = {"bench": "spec_prefill", "machine": machine(), "args": vars(args), "models": {}}
    with stage("SQuAD prompts (BM25 top-k)"):
        squad = squad_prompts(args.n, args.k, args.seed)
    for name in args.models.split(","):
        lm = LM(name)
        modes = ["full", "filter", "compress", "sparse"] + (["spec"] if name != DRAFT else [])
        per_set = {}
        with stage(f"{name}: SQuAD long-context QA"):
            per_set["squad"] = measure_with_sparse(name, lm, squad, modes, args, "squad")
        with stage(f"{name}: needles"):
            needles = needle_prompts(lm, args.needle_tokens, args.depths, args.seed)
            per_set["needle"] = measure_with_sparse(name, lm, needles, modes, args, "needle")
        result["models"][name] = {"modes": per_set["squad"], "needle": per_set["needle"],
                                  "tokens_mean": round(float(np.mean([lm.count_tokens(prompt_of(i, lm.chat))
                                                                      for i in squad])), 1)}
        log(f"{name}: " + ", ".join(f"{m} {r.get('ttft_speedup', 1.0)}x F1 {r['f1']}"
                                   for m, r in per_set["squad"].items()))
    first = next(iter(result["models"].values()))
    result["modes"] = first["modes"]
    emit(result)


def measure_with_sparse(name: str, lm: LM, items: list[dict], modes: list[str], args: argparse.Namespace,
                        label: str) -> dict:
    """:func:`measure`, the ``sparse`` mode on an engine with sparse prefill on (the same weights)."""
    dense_modes = [m for m in modes if m != "sparse"]
    out = measure(lm, items, dense_modes, args, label)
    if "sparse" in modes:
        out["sparse"] = measure_pair(lm, LM(name, sparse=True), items, args, label)
    return out


def measure_pair(dense: LM, sparse: LM, items: list[dict], args: argparse.Namespace, label: str) -> dict:
    """Sparse prefill against full prefill, alternating prompt by prompt (two engines, one model)."""
    ttft = {"full": [], "sparse": []}
    f1 = {"full": [], "sparse": []}
    for item in track(items, f"{label}: sparse prefill"):
        for mode, lm in (("full", dense), ("sparse", sparse)):
            secs, text = run_mode(lm, item, "full", args)
            ttft[mode].append(secs)
            f1[mode].append(token_f1(text, item["answers"]) if label != "needle" else
                            float(any(a in text for a in item["answers"])))
    return summarize(ttft, f1)["sparse"]


if __name__ == "__main__":
    main()
