"""P1: many prompts sharing a long prefix (instruction + few-shot exemplars), each with its own question.

Baselines, in the same process on the same model weights: transformers
``generate`` one prompt at a time, and transformers batched ``generate`` with
padding. Reports speed-ups, whether greedy outputs are identical, and tokens
prefilled over the number of distinct prompt tokens.

    python bench/shared_prefix.py            # 64 prompts
    python bench/shared_prefix.py --quick    # 8 prompts, a 512-token prefix
"""

from __future__ import annotations

import argparse
import os

import _common  # noqa: F401  (puts bench/ on sys.path)
from _common import emit, log, machine, peak_rss_mb, stage, track

from promptkit import LM, Example, Prompt, PromptTemplate


def build_prompts(n: int, min_prefix_tokens: int, lm: LM) -> list[Prompt]:
    """Few-shot QA prompts: one instruction and exemplar block (>= min_prefix_tokens), n own questions."""
    from evaldata import load_qa

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
    ap.add_argument("--quick", action="store_true", help="8 prompts and a 512-token prefix (under a minute)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=None, help="at least this many shared tokens (1000)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args()
    n = args.prompts or (8 if args.quick else 64)
    prefix_tokens = args.prefix_tokens or (512 if args.quick else 1000)

    with stage("loading the engine and the transformers reference"):
        ours = LM(backend="local", device=args.device)
        hf = LM(backend="hf", batch_size=n, device=args.device)
    with stage(f"building {n} few-shot prompts"):
        prompts = build_prompts(n, prefix_tokens, ours)
    texts = [ours.render(p) for p in prompts]
    ids = [ours.backend.encode(t) for t in texts]
    res: dict = {"bench": "shared_prefix", "prompts": n, "new_tokens": args.new_tokens,
                 "prompt_tokens_mean": round(sum(map(len, ids)) / n, 1),
                 "shared_prefix_tokens": len(os.path.commonprefix(ids)), **machine()}
    log(f"{n} prompts, {res['prompt_tokens_mean']} tokens each on average, {res['shared_prefix_tokens']} shared")

    with stage("ours: one batch through the engine", res, "seconds_ours"):
        got = ours.generate(prompts, max_tokens=args.new_tokens)
    st = ours.stats()
    with stage("baseline: transformers generate, one prompt at a time", res, "seconds_hf_sequential"):
        seq = [hf.generate(p, max_tokens=args.new_tokens)[0] for p in track(prompts, "hf sequential")]
    with stage("baseline: transformers generate, one padded batch", res, "seconds_hf_padded"):
        padded = hf.generate(prompts, max_tokens=args.new_tokens)

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
