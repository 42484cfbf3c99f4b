"""Memory under load: one KV budget bounds the prefix cache and every running request.

A stream of requests over real Wikipedia text, of mixed lengths (most short,
some long, a few longer than the whole budget), half of them asking about one
of a few shared documents, arrives from 16 concurrent clients at an engine
whose ``max_kv_bytes`` is 64 MB (about 1,450 tokens of SmolLM2's KV). Run with
the prefix cache on and off. Each request must complete or be refused with a
clear error; the KV high-water mark must stay within the budget; resident
memory must stay flat once warm; preemptions are counted.

    python bench/memory.py            # 200 requests per run
    python bench/memory.py --quick    # 40 requests per run, shorter prompts (a smoke test)
"""

from __future__ import annotations

import argparse
import random
from concurrent.futures import ThreadPoolExecutor

import _common  # noqa: F401  (puts bench/ on sys.path)
import psutil
from _common import RssPeak, emit, log, machine, real_token_runs, stage, track

from promptkit import LM
from promptkit.backends.base import SamplingParams
from promptkit.engine.engine import Request
from promptkit.engine.kv_pool import KVBudgetError


def build_stream(lm: LM, n: int, quick: bool, capacity: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt tokens, new tokens) for ``n`` requests: short, long, over-budget and shared-document ones."""
    rng = random.Random(seed)
    long_hi = 400 if quick else 1200
    docs = real_token_runs(lm, 4, 300, 500, seed=seed + 1)
    pieces = real_token_runs(lm, n, 40, long_hi, seed=seed)
    over = real_token_runs(lm, max(2, n // 20), capacity + 50, capacity + 400, seed=seed + 2)
    stream = []
    for i in range(n):
        r = rng.random()
        if i < len(over) * 10 and i % 10 == 9:
            prompt = over[i // 10]  # longer than the whole budget: must be refused, clearly
        elif r < 0.5:
            prompt = rng.choice(docs) + pieces[i][: rng.randint(10, 60)]  # a question about a shared document
        else:
            prompt = pieces[i]
        stream.append((prompt, rng.randint(4, 48)))
    return stream


def run(stream: list[tuple[list[int], int]], cache: bool, budget: int, clients: int) -> dict:
    lm = LM(max_kv_bytes=budget, prefix_cache=cache)
    engine = lm.backend.engine
    outcome: dict[str, int] = {"completed": 0, "refused": 0, "errors": 0}
    errors: list[str] = []
    proc = psutil.Process()
    warm_at = len(stream) // 4
    rss_after_warmup = 0.0

    def one(item: tuple[list[int], int]) -> str:
        prompt, new = item
        try:
            req = engine.run([Request(tokens=prompt, params=SamplingParams(max_tokens=new))])[0]
        except KVBudgetError:
            return "refused"
        except Exception as e:  # anything else is a failure of the engine: reported, never hidden
            errors.append(f"{type(e).__name__}: {e}")
            return "errors"
        return "completed" if req.finish_reason in ("stop", "length") else "errors"

    with RssPeak() as peak, ThreadPoolExecutor(clients) as pool:
        for i, result in enumerate(track(pool.map(one, stream), f"cache {'on' if cache else 'off'}",
                                         total=len(stream)), 1):
            outcome[result] += 1
            if i == warm_at:
                rss_after_warmup = proc.memory_info().rss / 2**20
    engine.check_integrity()
    s = lm.stats()
    engine.close()  # frees the model before the next run
    return {"cache": "on" if cache else "off", "max_kv_bytes": budget, "kv_high_water_bytes": s["kv_high_water_bytes"],
            "requests": len(stream), **outcome, "preemptions": s["preemptions"], "evictions": s["evictions"],
            "tokens_prefilled": s["tokens_prefilled"], "tokens_cached": s["tokens_cached"],
            "peak_rss_mb": round(peak.peak / 2**20), "rss_after_warmup_mb": round(rss_after_warmup),
            "rss_growth_after_warmup_mb": round(peak.peak / 2**20 - rss_after_warmup),
            "within_budget": s["kv_high_water_bytes"] <= budget, "error_messages": errors[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 requests per run, prompts up to ~900 tokens")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (200)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-kv-bytes", type=int, default=64 * 2**20)
    args = ap.parse_args()
    n = args.requests or (40 if args.quick else 200)

    with stage("loading the model and building the request stream"):
        probe = LM(max_kv_bytes=args.max_kv_bytes)
        capacity = args.max_kv_bytes // probe.backend.engine.bytes_per_token
        stream = build_stream(probe, n, args.quick, capacity)
        del probe
    log(f"{n} requests, KV budget {args.max_kv_bytes / 2**20:.0f} MB = {capacity} tokens, {args.clients} clients")
    runs = []
    for cache in (True, False):
        with stage(f"cache {'on' if cache else 'off'}"):
            runs.append(run(stream, cache, args.max_kv_bytes, args.clients))
        log(str(runs[-1]))
    emit({"bench": "memory", "clients": args.clients, **machine(), "runs": runs})


if __name__ == "__main__":
    main()
