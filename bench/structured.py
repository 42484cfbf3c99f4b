"""Structured extraction on real text: SQuAD v1.1 dev answers as {"answer", "evidence"}.

Each prompt gives a Wikipedia paragraph and a human question and asks for a JSON object
with the answer and the sentence that supports it. The same prompts run unconstrained
and constrained (``json_schema``) on the local engine, greedy, as one batch each.

Reports: the share of outputs that parse and validate; answer accuracy against the human
answers (SQuAD exact match and F1 after normalisation, over valid outputs and over all);
how often the evidence is a verbatim part of the paragraph; decode throughput (completion
tokens per second of the batch) with and without the constraint; the mask time per token
(fill_masks + apply_masks over the batch's states, replayed on the generated tokens);
and the tokens the grammar forced (a single allowed token), which an engine that
fast-forwards would emit without a forward pass.

    python bench/structured.py            # 200 prompts
    python bench/structured.py --quick    # 16 prompts

Data: SQuAD v1.1 dev (CC BY-SA 4.0), the official file ``$PROMPTKIT_DATA/squad/dev-v1.1.json``
(``export PROMPTKIT_DATA=../shared/data``), read with a small reader here.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import time
from collections import Counter

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, machine, stage
from pydantic import BaseModel, ValidationError

from promptkit import LM
from promptkit.structured import Constraint, allocate_bitmask, apply_masks, compile_constraint, fill_masks


class Extraction(BaseModel):
    answer: str
    evidence: str


def load_squad_dev(n: int, max_context_chars: int = 900) -> list[dict]:
    """The first ``n`` questions (one per paragraph) whose paragraph fits ``max_context_chars``."""
    from evaldata import SQUAD_FILE, data_file

    with open(data_file(SQUAD_FILE, "SQuAD v1.1 dev"), encoding="utf-8") as f:
        data = json.load(f)
    items = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            if len(para["context"]) > max_context_chars or not para["qas"]:
                continue
            qa = para["qas"][0]
            items.append({"context": para["context"], "question": qa["question"],
                          "answers": [a["text"] for a in qa["answers"]]})
            if len(items) == n:
                return items
    return items


def prompt_of(item: dict) -> str:
    return (f"Context: {item['context']}\n\nQuestion: {item['question']}\n\n"
            'Reply with a JSON object: {"answer": the short answer from the context, '
            '"evidence": the sentence of the context that contains it}.')


# SQuAD's official normalisation and scores
def _normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: list[str]) -> float:
    return float(any(_normalize(pred) == _normalize(g) for g in golds))


def f1(pred: str, golds: list[str]) -> float:
    def one(g: str) -> float:
        p, t = _normalize(pred).split(), _normalize(g).split()
        common = sum((Counter(p) & Counter(t)).values())
        if common == 0:
            return 0.0
        prec, rec = common / len(p), common / len(t)
        return 2 * prec * rec / (prec + rec)

    return max(one(g) for g in golds)


def parse(text: str) -> Extraction | None:
    try:
        return Extraction.model_validate_json(text)
    except ValidationError:
        return None


def mask_costs(lm: LM, gens: list, repeats: int = 3) -> tuple[float, int, int]:
    """Replay the constrained outputs through fresh grammar states, one batched mask per step as an
    engine computes it: mean seconds per token for fill_masks + apply_masks, tokens replayed, and
    how many of them were the only token the grammar allowed (fast-forward candidates)."""
    backend = lm.backend
    grammar = compile_constraint(Constraint(json_schema=Extraction.model_json_schema()), backend.tokenizer,
                                 backend.vocab_size, sorted(backend.eos_ids))
    seqs = [g.token_ids for g in gens]
    forced = 0
    for seq in seqs:  # forced tokens along each output
        state = grammar.new_state()
        for t in seq:
            ff = state.forced_tokens()
            forced += bool(ff) and ff[0] == t
            state.consume(t)
    best = float("inf")
    for _ in range(repeats):
        states = [grammar.new_state() for _ in seqs]
        logits = torch.zeros(len(seqs), backend.vocab_size)
        bitmask = allocate_bitmask(len(seqs), backend.vocab_size)
        spent, steps = 0.0, 0
        for step in range(max(map(len, seqs))):
            live = [i for i, s in enumerate(seqs) if step < len(s)]
            t0 = time.perf_counter()
            fill_masks([states[i] for i in live], bitmask)
            apply_masks(logits[: len(live)], bitmask)
            spent += time.perf_counter() - t0
            steps += len(live)
            for i in live:
                states[i].consume(seqs[i][step])
        best = min(best, spent / max(1, steps))
    return best, sum(map(len, seqs)), forced


def run(lm: LM, items: list[dict], constrained: bool, max_tokens: int) -> tuple[list, float]:
    prompts = [prompt_of(it) for it in items]
    kw = {"json_schema": Extraction} if constrained else {}
    t0 = time.perf_counter()
    gens = lm.generate(prompts, max_tokens=max_tokens, **kw)
    return gens, time.perf_counter() - t0


def score(gens: list, items: list[dict]) -> dict:
    parsed = [parse(g.text) for g in gens]
    valid = [(p, it) for p, it in zip(parsed, items) if p is not None]
    n = len(items)
    em = sum(exact_match(p.answer, it["answers"]) for p, it in valid)
    f = sum(f1(p.answer, it["answers"]) for p, it in valid)
    evidence = sum(p.evidence.strip() != "" and p.evidence.strip() in it["context"] for p, it in valid)
    return {"valid": len(valid) / n, "exact_match": em / n, "f1": f / n,
            "exact_match_of_valid": em / max(1, len(valid)), "f1_of_valid": f / max(1, len(valid)),
            "evidence_verbatim": evidence / n, "completion_tokens": sum(g.usage.completion_tokens for g in gens),
            "cut_by_max_tokens": sum(g.finish_reason == "length" for g in gens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 keeps a busy machine from thrashing)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (16 if args.quick else 200)
    result: dict = {"bench": "structured", "n": n, "machine": machine()}
    with stage(f"load {n} SQuAD v1.1 dev questions"):
        items = load_squad_dev(n)
    lm = LM()
    lm.generate(prompt_of(items[0]), max_tokens=2, json_schema=Extraction)  # load, compile, warm up
    with stage("unconstrained batch"):
        free, free_s = run(lm, items, False, args.max_tokens)
    with stage("constrained batch"):
        fixed, fixed_s = run(lm, items, True, args.max_tokens)
    result["unconstrained"] = {**score(free, items), "seconds": free_s}
    result["constrained"] = {**score(fixed, items), "seconds": fixed_s}
    for key, gens, secs in (("unconstrained", free, free_s), ("constrained", fixed, fixed_s)):
        result[key]["decode_tokens_per_s"] = result[key]["completion_tokens"] / secs
    result["constrained_throughput_ratio"] = (result["constrained"]["decode_tokens_per_s"]
                                              / result["unconstrained"]["decode_tokens_per_s"])
    with stage("mask cost replay"):
        per_token, tokens, forced = mask_costs(lm, fixed)
    result["mask_us_per_token"] = per_token * 1e6
    result["vocab_size"] = lm.backend.vocab_size
    result["forced_tokens"] = forced
    result["forced_share"] = forced / max(1, tokens)
    result["fast_forward_tokens_saved"] = 0  # the engine does not fast-forward yet
    result["fast_forward"] = "engine fast-forward pending: forced_tokens is what it would save"
    log(f"valid: free {result['unconstrained']['valid']:.2f}, constrained {result['constrained']['valid']:.2f}; "
        f"throughput ratio {result['constrained_throughput_ratio']:.2f}; mask {result['mask_us_per_token']:.0f} us/token")
    emit(result)


if __name__ == "__main__":
    main()
