"""Memory under load: one KV budget bounds the prefix cache and every running request.

A stream of requests over real Wikipedia text, of mixed lengths (most short,
some long, a few longer than the whole budget), half of them asking about one
of a few shared documents, arrives from 16 concurrent clients at an engine
whose ``max_kv_bytes`` is 64 MB (about 1,450 tokens of SmolLM2's KV). Run with
the prefix cache on and off. Each request must complete or be refused with a
clear error; the KV high-water mark must stay within the budget; resident
memory must stay flat once warm; preemptions are counted.

With ``--soak``, a server soak follows: 2,000 requests of every shape the server takes
(completions and chat, streamed or not, n, stops, logprobs, echo, response_format, tools)
from 8 clients against ``promptkit serve`` in-process, resident memory read after each
tenth of them; it must level off (the last five readings within 5 % of each other).
``--trace`` also snapshots Python's allocations (tracemalloc) after warm-up and at the end
and reports where they grew.

    python bench/memory.py            # 200 requests per run
    python bench/memory.py --quick    # 40 requests per run, shorter prompts (a smoke test)
    python bench/memory.py --soak     # and the 2,000-request server soak (200 with --quick)
"""

from __future__ import annotations

import argparse
import random
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import _common  # noqa: F401  (puts bench/ on sys.path)
import httpx
import psutil
from _common import RssPeak, emit, log, machine, real_token_runs, stage, track

from promptkit import LM
from promptkit.backends.base import SamplingParams
from promptkit.engine.engine import Request
from promptkit.engine.kv_pool import KVBudgetError
from promptkit.server import BackgroundServer, create_app

SOAK_CLIENTS = 8
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


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


def soak_body(i: int, model: str) -> tuple[str, dict]:
    """The ``i``-th soak request: a new prompt each time, in one of the shapes clients send."""
    rng = random.Random(i)
    topic = f"the number {i} and the colour {rng.choice(['red', 'green', 'blue', 'amber'])}"
    kind = i % 8
    if kind < 4:
        body = {"model": model, "prompt": f"A short note on {topic}:", "max_tokens": 6,
                "stream": kind == 1, "logprobs": 2 if kind == 2 else None, "stop": ["\n\n"] if kind == 3 else None}
        if kind == 2:
            body.update(n=2, temperature=0.8, seed=i)
        return "/v1/completions", {k: v for k, v in body.items() if v is not None}
    if kind == 4:
        return "/v1/completions", {"model": model, "prompt": f"Facts about {topic}.", "max_tokens": 1, "echo": True,
                                   "logprobs": 1}
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about {topic}."}], "max_tokens": 8}
    if kind == 5:
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == 6:
        body.update(response_format={"type": "json_object"}, max_tokens=12)
    else:
        body.update(tools=[WEATHER], tool_choice="required", max_tokens=20)
    return "/v1/chat/completions", body


def soak(n: int, max_kv_bytes: int, trace: bool) -> dict:
    """``n`` requests against a server in this process; resident memory after each tenth of them."""
    lm = LM(max_kv_bytes=max_kv_bytes)
    proc, every = psutil.Process(), max(1, n // 10)
    statuses: Counter[int] = Counter()
    rss_mb: list[float] = []
    growth: list[str] = []

    def one(i: int) -> int:
        path, body = soak_body(i, lm.model)
        with httpx.Client(base_url=srv.url, timeout=600) as c:
            if body.get("stream"):
                with c.stream("POST", path, json=body) as r:
                    r.read()
                    return r.status_code
            return c.post(path, json=body).status_code

    with BackgroundServer(create_app(lm, max_queue=64)) as srv, ThreadPoolExecutor(SOAK_CLIENTS) as pool:
        warm = None
        for i, status in enumerate(track(pool.map(one, range(n)), "soak", total=n), 1):
            statuses[status] += 1
            if i % every == 0:
                rss_mb.append(round(proc.memory_info().rss / 2**20, 1))
                if trace and i == 2 * every:  # after warm-up: the baseline allocations are compared to
                    tracemalloc.start(8)
                    warm = tracemalloc.take_snapshot()
        if warm is not None:
            diff = tracemalloc.take_snapshot().compare_to(warm, "traceback")
            growth = [f"{d.size_diff / 2**20:+.2f} MB in {d.count_diff:+d} blocks at "
                      + " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in d.traceback[:4])
                      for d in diff[:8]]
            tracemalloc.stop()
    lm.backend.engine.close()
    last = rss_mb[-5:]
    return {"requests": n, "every": every, "rss_mb": rss_mb, "statuses": dict(statuses),
            "levels_off": (max(last) - min(last)) / min(last) <= 0.05, **({"python_growth": growth} if trace else {})}


def engine_runs(args: argparse.Namespace) -> list[dict]:
    """The engine alone under the request stream, prefix cache on and off."""
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
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 requests per run, prompts up to ~900 tokens")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (200)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-kv-bytes", type=int, default=64 * 2**20)
    ap.add_argument("--soak", action="store_true", help="also soak a server with 2,000 requests (200 with --quick)")
    ap.add_argument("--soak-requests", type=int, default=None, help="requests in the soak")
    ap.add_argument("--only-soak", action="store_true", help="the soak alone, without the engine runs")
    ap.add_argument("--trace", action="store_true", help="report where Python allocations grew during the soak")
    args = ap.parse_args()
    result = {"bench": "memory", "clients": args.clients, **machine(),
              "runs": [] if args.only_soak else engine_runs(args)}
    if args.soak or args.only_soak:
        requests = args.soak_requests or (200 if args.quick else 2000)
        with stage(f"soak: {requests} requests from {SOAK_CLIENTS} clients against a server"):
            result["soak"] = soak(requests, args.max_kv_bytes, args.trace)
        log(str(result["soak"]))
    emit(result)


if __name__ == "__main__":
    main()
