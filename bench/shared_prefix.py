"""P1: many prompts sharing a long prefix (instruction + few-shot exemplars), each with its own question.

Baselines, in the same process on the same model weights: transformers
``generate`` one prompt at a time, and transformers batched ``generate`` with
padding. Reports speed-ups, whether greedy outputs are identical, and tokens
prefilled over the number of distinct prompt tokens.

    python bench/shared_prefix.py            # 64 prompts
    python bench/shared_prefix.py --quick    # 8 prompts
"""

from __future__ import annotations

import argparse
import os
import time

import _common  # noqa: F401  (puts bench/ on sys.path)
from _common import emit, machine, peak_rss_mb

from promptkit import LM, Example, Prompt, PromptTemplate


def build_prompts(n: int, min_prefix_tokens: int, lm: LM) -> list[Prompt]:
    """Few-shot QA prompts: one instruction and exemplar block (>= min_prefix_tokens), n own questions."""
    from datasets import load_qa

    pool = iter(load_qa())
    template = PromptTemplate(input_format="Context: {context}\nQuestion: {question}", output_format="Answer: {answer}")
    instruction = "Answer each question with a short phrase."
    shots: list[Example] = []
    while lm.count_tokens(instruction + "\n\n" + (template.exemplar_block(shots) or "")) < min_prefix_tokens:
        ex = next(pool)
        shots.append(Example(context=ex["context"][:600], question=ex["question"], answer=ex["answers"][0]))
    block = template.exemplar_block(shots)
    return [Prompt.from_parts(instruction=instruction, exemplars=block, question=f"Question: {next(pool)['question']}",
                              answer_prefix="Answer:") for _ in range(n)]


def unique_tokens(seqs: list[list[int]]) -> int:
    """Nodes of the trie of all sequences: tokens a perfect prefix cache computes once each."""
    seen: set[tuple[int, ...]] = set()
    for s in seqs:
        for i in range(1, len(s) + 1):
            seen.add(tuple(s[:i]))
    return len(seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts instead of 64")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    args = ap.parse_args()
    n = args.prompts or (8 if args.quick else 64)

    ours = LM(backend="local")
    hf = LM(backend="hf", batch_size=n)
    prompts = build_prompts(n, args.prefix_tokens, ours)
    texts = [ours.render(p) for p in prompts]
    ids = [ours.backend.encode(t) for t in texts]
    res: dict = {"bench": "shared_prefix", "prompts": n, "new_tokens": args.new_tokens,
                 "prompt_tokens_mean": round(sum(map(len, ids)) / n, 1),
                 "shared_prefix_tokens": len(os.path.commonprefix(ids)), **machine()}

    t0 = time.perf_counter()
    got = ours.generate(prompts, max_tokens=args.new_tokens)
    res["seconds_ours"] = time.perf_counter() - t0
    st = ours.stats()

    t0 = time.perf_counter()
    seq = [hf.generate(p, max_tokens=args.new_tokens)[0] for p in prompts]
    res["seconds_hf_sequential"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    padded = hf.generate(prompts, max_tokens=args.new_tokens)
    res["seconds_hf_padded"] = time.perf_counter() - t0

    res["outputs_match_hf_sequential"] = sum(a.token_ids == b.token_ids for a, b in zip(got, seq)) / n
    res["outputs_match_hf_padded"] = sum(a.token_ids == b.token_ids for a, b in zip(got, padded)) / n
    res["tokens_prefilled"] = st["tokens_prefilled"]
    res["unique_prompt_tokens"] = unique_tokens(ids)
    res["peak_rss_mb"] = round(peak_rss_mb())
    res["speedup_vs_hf_sequential"] = round(res["seconds_hf_sequential"] / res["seconds_ours"], 2)
    res["speedup_vs_hf_padded"] = round(res["seconds_hf_padded"] / res["seconds_ours"], 2)
    res["prefilled_over_unique"] = round(res["tokens_prefilled"] / res["unique_prompt_tokens"], 4)
    emit(res)


if __name__ == "__main__":
    main()
