"""Single-stream decode after a long cached context (a document asked one question after another).

A chat or RAG session sends the same long context again with a new question. The engine finds
the context cached and computes only the question, so the request's keys sit in two pool runs:
the cached context and the request's own slots. A decode step can then either

* ``gathered``: copy every key into one block, layer by layer, and make one attention call; or
* ``in place``: read the long run where it is, attend to each run separately and merge the two
  partial results by their log-sum-exp (what the engine does for runs of 1,024 keys or more).

For each context length, in the default weight format, this measures decode tokens/s:

* ``fresh``: the whole prompt computed by the request itself (its keys are one run);
* ``cached, in place`` and ``cached, gathered``: the context cached by an earlier question;
* llama.cpp on the same GGUF (if installed), decoding after the same prompt.

The two cached cases alternate over ``--rounds`` rounds in the same process, and medians are
reported, with their ratio. The attention of one layer is also timed alone (microseconds, best
of 5) on a pool of the model's shape: keys in one run, in place plus 50 own keys, and gathered.

    python bench/decode_context.py            # contexts of 512 to 4,096 tokens, 64 new tokens
    python bench/decode_context.py --quick    # 512 and 1,024 tokens, 16 new tokens
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, machine, stage
from vs_llamacpp import llama_decode, load_llama_cpp, ours_decode, prefill_text, rate

from promptkit import LM
from promptkit.engine import attention

QUESTIONS = ("\n\nQuestion: What is the text above about? Answer in a few sentences.\nAnswer:",
             "\n\nQuestion: Who are the people the text above names? List them.\nAnswer:")


def cached_decode(lm: LM, context: str, tokens: int, in_place: bool) -> float:
    """Decode tokens/s of the second question after the first one cached ``context``."""
    lm.backend.clear_cache()
    lm.generate(context + QUESTIONS[0], max_tokens=1, chat=False)
    saved = attention.layout.IN_PLACE_RUN
    attention.layout.IN_PLACE_RUN = saved if in_place else 1 << 62  # gathered: no run is read in place
    try:
        return rate(*ours_decode(lm, context + QUESTIONS[1], tokens))
    finally:
        attention.layout.IN_PLACE_RUN = saved


def fresh_decode(lm: LM, context: str, tokens: int) -> float:
    lm.backend.clear_cache()
    return rate(*ours_decode(lm, context + QUESTIONS[1], tokens))


def attention_of(keys: tuple) -> attention.AttentionBackend:
    """A backend whose single-stream step reads ``keys`` (runs in place, gathered slots)."""
    backend = attention.AttentionBackend(attention.BatchLayout([]), torch.empty(0))
    backend.one_step = keys
    return backend


def layer_attention_us(lm: LM, context: int, own: int = 50, repeats: int = 200) -> dict[str, float]:
    """One layer's decode attention over ``context`` + ``own`` keys, timed alone for each key layout."""
    pool = lm.backend.engine.pool.kv[0]  # [(k, v), kv heads, slots, head dim]
    heads = lm.backend.model.config.num_attention_heads
    q = torch.randn(heads, 1, pool.shape[-1], dtype=pool.dtype)
    start = pool.shape[2] - own  # the own keys far from the context, as after other requests
    layouts = {"one_run": ([(0, context + own)], None),
               "in_place": ([(0, context)], torch.arange(start, start + own)),
               "gathered": ([], torch.cat([torch.arange(context), torch.arange(start, start + own)]))}
    out = {}
    with torch.inference_mode():
        for name, keys in layouts.items():
            backend = attention_of(keys)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeats):
                    backend._one_step(q, pool[0], pool[1], 0.125)
                best = min(best, (time.perf_counter() - t0) / repeats)
            out[name] = round(best * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="contexts of 512 and 1,024 tokens, 16 new tokens, 1 round")
    ap.add_argument("--contexts", default="512,1024,2048,4096", help="context lengths in tokens")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two cached cases")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.tokens, args.rounds = "512,1024", 16, 1
    contexts = [int(c) for c in args.contexts.split(",")]
    res: dict = {"bench": "decode_context", "tokens": args.tokens, "rounds": args.rounds,
                 "threads": torch.get_num_threads(), **machine()}
    with stage("loading the model"):
        lm = LM(backend="local")
    res["weights"] = lm.backend.weights.format
    texts = {n: prefill_text(lm, n) for n in contexts}
    rows = {}
    for n, context in texts.items():
        with stage(f"{n}-token context"):
            ours_decode(lm, context + QUESTIONS[0], 4)  # warm-up
            fresh = fresh_decode(lm, context, args.tokens)
            in_place, gathered = [], []
            for _ in range(args.rounds):
                in_place.append(cached_decode(lm, context, args.tokens, in_place=True))
                gathered.append(cached_decode(lm, context, args.tokens, in_place=False))
            row = {"fresh": fresh, "cached_in_place": statistics.median(in_place),
                   "cached_gathered": statistics.median(gathered)}
            row["in_place_vs_gathered"] = round(row["cached_in_place"] / row["cached_gathered"], 2)
        rows[n] = row
        log(f"{n} tokens: {row}")
    lm.backend.engine.close()  # its loop thread ends: llama.cpp has the CPUs' OpenMP threads alone
    llm, note = load_llama_cpp(torch.get_num_threads(), n_ctx=max(contexts) + 512)
    res["llama_cpp"] = note
    if llm is not None:
        tok = lm.backend.tokenizer
        for n in contexts:
            ids = tok.encode(texts[n] + QUESTIONS[1])
            with stage(f"llama.cpp, {n}-token context"):
                rows[n]["llama_cpp"] = rate(*llama_decode(llm, ids, args.tokens))
                rows[n]["in_place_vs_llama_cpp"] = round(rows[n]["cached_in_place"] / rows[n]["llama_cpp"], 2)
            log(f"{n} tokens: llama.cpp {rows[n]['llama_cpp']} tokens/s")
    with stage("one layer's attention, timed alone"):  # last: the engine's thread has ended
        for n in contexts:
            rows[n]["layer_attention_us"] = layer_attention_us(lm, n)
            log(f"{n} tokens: one layer's attention {rows[n]['layer_attention_us']} µs")
    res["contexts"] = rows
    emit(res)


if __name__ == "__main__":
    main()
