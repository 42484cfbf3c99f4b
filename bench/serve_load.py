"""Load on `promptkit serve` over loopback: requests/s and p50/p99 latency, prefix cache on vs off.

Clients send chat requests that share a system prompt (as a served RAG or QA
app would) and differ in a real Wikipedia cloze question with its paragraph
(bench/evaldata.py ``load_qa``). A fixed number of concurrent clients each
send their share of requests; the server's queue is smaller than the number
of clients, so some requests are answered 429 (counted, never retried).
Every request is accounted for: ok + rejected_429 + lost == requests.

    python bench/serve_load.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, log, machine, peak_rss_mb, stage  # noqa: E402
from evaldata import load_qa  # noqa: E402

from promptkit import LM  # noqa: E402
from promptkit.server import BackgroundServer, create_app  # noqa: E402

SYSTEM = ("You are a careful reading assistant. You answer questions about short encyclopedia paragraphs. "
          "Read the paragraph, find the single fact the question asks for, and reply with that fact alone: "
          "a year, a name or a number, with no explanation, no full sentence and no punctuation. "
          "If the paragraph does not contain the answer, reply with the word unknown.")


def run_load(lm: LM, items: list[dict], clients: int, max_queue: int, max_tokens: int) -> dict:
    """Serve ``lm`` and fire ``len(items)`` requests from ``clients`` threads; latency of answered ones."""
    lat_ms: list[float] = []
    statuses: list[int] = []

    def one(c: httpx.Client, item: dict) -> None:
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Paragraph: {item['context']}\nQuestion: {item['question']}"}]
        t0 = time.perf_counter()
        try:
            r = c.post("/v1/chat/completions", json={"model": lm.model, "messages": msgs, "max_tokens": max_tokens})
            status = r.status_code if r.status_code != 200 or "content" in r.json()["choices"][0]["message"] else -1
        except httpx.HTTPError:
            status = -1  # lost: no answer at all
        if status == 200:
            lat_ms.append((time.perf_counter() - t0) * 1000)
        statuses.append(status)
        if len(statuses) % max(1, len(items) // 4) == 0:
            log(f"  {len(statuses)}/{len(items)} answered ({statuses.count(200)} ok, {statuses.count(429)} x 429)")

    def client(share: list[dict]) -> None:
        with httpx.Client(base_url=srv.url, timeout=600) as c:
            for item in share:
                one(c, item)

    with BackgroundServer(create_app(lm, max_queue=max_queue)) as srv:
        with httpx.Client(base_url=srv.url, timeout=600) as warm:
            one(warm, items[0])  # warm-up, not counted
        lat_ms.clear(), statuses.clear()
        before = lm.stats()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, [items[i::clients] for i in range(clients)]))
        wall = time.perf_counter() - t0
        after = lm.stats()
    ok = statuses.count(200)
    requested = after.get("tokens_requested", 0) - before.get("tokens_requested", 0)
    cached = after.get("tokens_cached", 0) - before.get("tokens_cached", 0)
    return {"requests": len(items), "ok": ok, "rejected_429": statuses.count(429),
            "lost": len(items) - ok - statuses.count(429), "rps": round(ok / wall, 3),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 1) if lat_ms else None,
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 1) if lat_ms else None,
            "seconds": round(wall, 2), "cached_fraction": round(cached / requested, 3) if requested else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (12 requests per setting, 4 clients)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--max-queue", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=8)
    a = ap.parse_args()
    n = a.requests or (12 if a.quick else 200)
    clients = a.clients or (4 if a.quick else 16)
    max_queue = a.max_queue or max(1, clients - 1)
    items = load_qa(n=n, seed=0)
    while len(items) < n:
        items += items[: n - len(items)]

    with stage(f"cache on: {n} requests from {clients} clients, queue bound {max_queue}"):
        on = run_load(LM(), items, clients, max_queue, a.max_tokens)
    with stage(f"cache off: {n} requests from {clients} clients, queue bound {max_queue}"):
        off = run_load(LM(prefix_cache=False), items, clients, max_queue, a.max_tokens)
    emit({"requests": on["requests"] + off["requests"], "ok": on["ok"] + off["ok"],
          "rejected_429": on["rejected_429"] + off["rejected_429"], "lost": on["lost"] + off["lost"],
          "rps": on["rps"], "p50_ms": on["p50_ms"], "p99_ms": on["p99_ms"],
          "cache_on": on, "cache_off": off,
          "rps_speedup_cache_on_vs_off": round(on["rps"] / off["rps"], 3) if off["rps"] else None,
          "clients": clients, "max_queue": max_queue, "max_tokens": a.max_tokens, "peak_rss_mb": round(peak_rss_mb()),
          **machine()})


if __name__ == "__main__":
    main()
