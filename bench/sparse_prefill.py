"""P3: sparse prefill with the real SmolLM2 — needle in a haystack, KL, attention and TTFT speed.

The haystack is real text (Wikipedia articles from ``evaldata.load_wikipedia_articles``); a
needle sentence with a random seven-digit "special magic number" (the format of RULER's
single-needle task) is inserted at several depths and the model is asked for it. Dense (SDPA)
and sparse prefill run on the same prompts in the same process:

* needle accuracy (the greedy answer contains the number), sparse vs dense;
* KL(dense || sparse) of the next-token distribution after the prompt;
* attention-only time on the model's real q/k/v of a few layers (sparse kernel, pattern
  estimation included, vs dense causal SDPA) and end-to-end time to first token;
* the sparsity reached.

    python bench/sparse_prefill.py --quick                     # 4k tokens, one depth (a smoke test)
    python bench/sparse_prefill.py                             # 2k, 4k and 8k tokens, five depths
    python bench/sparse_prefill.py --lengths 8192 --depths 2   # one length alone, two depths
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _common import emit, hf_step, log, machine, stage  # noqa: E402

from promptkit.engine.sparse import SparseConfig, dense_attention, register_hf_attention, sparse_attention  # noqa: E402

SPARSE_NAME = "promptkit_sparse"


def haystack_text(path: str | None) -> str:
    """Long real text: Wikipedia articles from the shared dataset loaders (or a text file)."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from evaldata import load_wikipedia_articles  # bench/evaldata.py

    parts = []
    for a in load_wikipedia_articles():
        if isinstance(a, str):
            parts.append(a)
        elif isinstance(a, dict):
            parts.append(a.get("text") or a.get("body") or "")
        else:
            parts.append(getattr(a, "text", None) or str(a[-1]))
    return "\n\n".join(p for p in parts if len(p) > 200)


def magic_number(rng: random.Random) -> str:
    """A random seven-digit number: the needle's value."""
    return str(rng.randrange(1_000_000, 10_000_000))


def build_prompt(tok, words: list[int], n_tokens: int, depth: float, secret: str) -> torch.Tensor:
    """Chat prompt of about ``n_tokens``: haystack with the needle at ``depth``, then the question."""
    needle = tok.encode(f" The special magic number is: {secret}. ", add_special_tokens=False)
    question = "What is the special magic number mentioned in the text above?"
    frame = tok.apply_chat_template([{"role": "user", "content": "\n\n" + question}], tokenize=False,
                                    add_generation_prompt=True)
    budget = n_tokens - len(needle) - len(tok.encode(frame)) - 4
    hay = words[:budget]
    cut = int(len(hay) * depth)
    text = tok.decode(hay[:cut] + needle + hay[cut:])
    msgs = [{"role": "user", "content": "Read the text.\n\n" + text + "\n\n" + question}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tok(prompt + "The special magic number mentioned in the text is", return_tensors="pt",
               add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def prefill_and_answer(model, ids: torch.Tensor, new_tokens: int = 12) -> tuple[float, torch.Tensor, list[int]]:
    """Time to first token, the next-token log-probabilities and a short greedy answer."""
    ids = ids.to(model.device)
    _sync(model.device)
    t0 = time.perf_counter()
    out, cache = hf_step(model, ids, logits_to_keep=1)
    logp = torch.log_softmax(out.logits[0, -1].float(), -1)
    nxt, answer = int(logp.argmax()), []  # reading the token waits for the device
    ttft = time.perf_counter() - t0
    for _ in range(new_tokens):
        answer.append(nxt)
        out, cache = hf_step(model, torch.tensor([[nxt]], device=model.device), cache)
        nxt = int(out.logits[0, -1].argmax())
    return ttft, logp, answer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_qkv(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """The real (RoPE-applied) q, k, v of some layers for this prompt."""
    from transformers import AttentionInterface

    grabbed: dict[int, tuple] = {}

    def grab(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if module.layer_idx in layers:
            grabbed[module.layer_idx] = (query.clone(), key.clone(), value.clone(), scaling)
        return dense_attention(query, key, value, scaling).transpose(1, 2).contiguous(), None

    AttentionInterface.register("bench_grab", grab)
    model.set_attn_implementation("bench_grab")
    with torch.inference_mode():
        model(input_ids=ids.to(model.device), use_cache=False, logits_to_keep=1)
    return grabbed


def timed(fn, repeat: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4k tokens, one depth (a smoke test of the script)")
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens (default 2048 4096 8192)")
    ap.add_argument("--depths", type=int, help="needle depths per length, evenly spread (default 5)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--text-file", help="haystack text instead of the Wikipedia articles")
    ap.add_argument("--gamma", type=float, default=SparseConfig().gamma)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--block-size", type=int, default=64)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptkit.models import resolve_llm

    lengths = args.lengths or ([4096] if args.quick else [2048, 4096, 8192])
    n_depths = args.depths or (1 if args.quick else 5)
    depths = [round((i + 0.5) / n_depths, 2) for i in range(n_depths)]  # 5: 0.1, 0.3, 0.5, 0.7, 0.9
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = SparseConfig(gamma=args.gamma, tau=args.tau, block_size=args.block_size, min_length=1024)
    path = resolve_llm()
    tok = AutoTokenizer.from_pretrained(path)
    log("loading SmolLM2 and the haystack")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    stats = register_hf_attention(cfg, SPARSE_NAME)
    words = tok.encode(haystack_text(args.text_file), add_special_tokens=False)
    rng = random.Random(0)

    result: dict = {"context_tokens": lengths[-1]}
    per_length, hits = {}, {"sparse": 0, "dense": 0}
    kls, n_trials = [], 0
    for n in lengths:
        row = {"ttft_dense_s": [], "ttft_sparse_s": [], "kl": [], "sparsity": []}
        # Warm up the compiled kernel for this shape (compile time is reported, not timed).
        model.set_attn_implementation(SPARSE_NAME)
        with stage(f"{n} tokens: first sparse call (kernel compile)", row, "first_call_s"):
            prefill_and_answer(model, build_prompt(tok, words, n, 0.5, "warmup"), new_tokens=0)
        row["first_call_s"] = round(row["first_call_s"], 1)
        for depth in depths:
            secret = magic_number(rng)
            offset = rng.randrange(0, max(1, len(words) - 2 * n))
            ids = build_prompt(tok, words[offset:], n, depth, secret)
            model.set_attn_implementation("sdpa")
            t_d, lp_d, ans_d = prefill_and_answer(model, ids)
            model.set_attn_implementation(SPARSE_NAME)
            stats.reset()
            t_s, lp_s, ans_s = prefill_and_answer(model, ids)
            kl = float((lp_d.exp() * (lp_d - lp_s)).sum())
            hit_d, hit_s = secret in tok.decode(ans_d), secret in tok.decode(ans_s)
            hits["dense"] += hit_d
            hits["sparse"] += hit_s
            n_trials += 1
            kls.append(kl)
            row["ttft_dense_s"].append(round(t_d, 2))
            row["ttft_sparse_s"].append(round(t_s, 2))
            row["kl"].append(round(kl, 4))
            row["sparsity"].append(round(stats.mean_sparsity(), 3))
            log(f"{n} tokens depth {depth}: dense {tok.decode(ans_d)!r} ({hit_d}), sparse {tok.decode(ans_s)!r} "
                f"({hit_s}), kl {kl:.4f}, sparsity {stats.mean_sparsity():.3f}, ttft {t_d:.1f}s / {t_s:.1f}s")
        row["layer_sparsity"] = {k: round(v, 3) for k, v in stats.layer_sparsity().items()}
        row["ttft_speedup"] = round(sum(row["ttft_dense_s"]) / sum(row["ttft_sparse_s"]), 2)
        per_length[n] = row

    # Attention only, on the real q/k/v of a few layers at the longest length.
    n = lengths[-1]
    layers = [2, model.config.num_hidden_layers // 2, model.config.num_hidden_layers - 2]
    log(f"attention only, layers {layers} at {n} tokens: dense SDPA vs sparse (selection included)")
    qkv = capture_qkv(model, build_prompt(tok, words, n, 0.5, magic_number(rng)), layers)
    t_dense = t_sparse = 0.0
    sp = []
    with torch.inference_mode():
        for q, k, v, scale in qkv.values():
            sparse_attention(q, k, v, cfg, scale)  # warm
            t_dense += timed(lambda: dense_attention(q, k, v, scale), 5, q.device)
            t_sparse += timed(lambda: sparse_attention(q, k, v, cfg, scale), 5, q.device)
            sp.append(sparse_attention(q, k, v, cfg, scale)[1].sparsity)

    last = per_length[n]
    result.update({
        "attention_speedup": round(t_dense / t_sparse, 2),
        "ttft_speedup": last["ttft_speedup"],
        "sparsity": round(sum(last["sparsity"]) / len(last["sparsity"]), 3),
        "needle_accuracy_sparse": round(hits["sparse"] / n_trials, 3),
        "needle_accuracy_dense": round(hits["dense"] / n_trials, 3),
        "kl_mean": round(sum(kls) / len(kls), 4),
        "attention_dense_s": round(t_dense, 3), "attention_sparse_s": round(t_sparse, 3),
        "attention_sparsity": round(sum(sp) / len(sp), 3),
        "config": cfg.model_dump(exclude={"enabled", "backend", "bucket"}),
        "per_length": per_length, "quick": args.quick, **machine(),
    })
    emit(result)


if __name__ == "__main__":
    main()
