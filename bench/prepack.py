"""P2: packed prefill (Prepacking) against a padded transformers batch, plus the cache budget under load.

32 prompts of real text with lengths uniform in 16..1024 tokens, prefill only
(each produces its first token's logits). Ours packs them end to end into
forwards of at most ``max_batch_tokens`` with block-diagonal attention; the
baseline pads them to the longest and runs one transformers forward
(``logits_to_keep=1``). Both on the same weights, in this process, the prefix
cache off so only packing is measured; peak memory of each is measured in a
fresh process. Then a stream of distinct prompts runs
with a small cache budget to show the cache stays within it.

    python bench/prepack.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time

import _common  # noqa: F401
import psutil
import torch
from _common import emit, machine, peak_rss_mb

from promptkit import LM


class RssPeak:
    """Peak resident memory above the level at entry, sampled every few milliseconds."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.mb = (self.peak - self.base) / 2**20


def real_token_runs(lm: LM, n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    from datasets import load_wikipedia_articles

    text = "\n\n".join(a["text"] for a in load_wikipedia_articles())
    ids = lm.backend.encode_continuation(text[: 4_000_000])
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start : start + length])
    return out


@torch.inference_mode()
def hf_padded_prefill(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]


def measure_memory(method: str, n: int, hi: int) -> None:
    """In a fresh process: peak resident memory added by one prefill of the workload."""
    lm = LM(backend="local", max_cache_bytes=0) if method == "packed" else LM(backend="hf")
    seqs = real_token_runs(lm, n, 16, hi)
    from promptkit.backends.base import SamplingParams
    from promptkit.engine.engine import Request

    with RssPeak() as m:
        if method == "packed":
            lm.backend.engine.run([Request(tokens=list(s), params=SamplingParams(max_tokens=1)) for s in seqs])
        else:
            hf_padded_prefill(lm.backend.model, seqs, lm.backend.tokenizer.pad_token_id or 0)
    print(json.dumps({"peak_mb": round(m.mb)}))


def _memory_in_subprocess(method: str, n: int, hi: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--measure", method, "--n", str(n), "--hi", str(hi)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts of 16..512 tokens")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--measure", choices=["packed", "padded"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hi", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n, hi = (8, 512) if args.quick else (32, 1024)
    if args.measure:
        return measure_memory(args.measure, args.n or n, args.hi or hi)
    repeats = args.repeats or (1 if args.quick else 3)

    ours = LM(backend="local", max_cache_bytes=0)
    hf = LM(backend="hf")
    seqs = real_token_runs(ours, n, 16, hi)
    res: dict = {"bench": "prepack", "prompts": n, "tokens": sum(map(len, seqs)),
                 "padded_tokens": n * max(map(len, seqs)), **machine()}
    from promptkit.backends.base import SamplingParams
    from promptkit.engine.engine import Request

    def ours_run():
        reqs = ours.backend.engine.run([Request(tokens=list(s), params=SamplingParams(max_tokens=1)) for s in seqs])
        return [r.generated[0] for r in reqs]

    pad = hf.backend.tokenizer.pad_token_id or 0

    def hf_run():
        return hf_padded_prefill(hf.backend.model, seqs, pad).argmax(-1).tolist()

    ours_run(), hf_run()  # warm-up
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        first_ours = ours_run()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first_hf = hf_run()
        t_hf.append(time.perf_counter() - t0)
    res["seconds_packed"], res["seconds_padded"] = min(t_ours), min(t_hf)
    res["first_tokens_match"] = sum(a == b for a, b in zip(first_ours, first_hf)) / n
    res["peak_mem_mb_packed"] = _memory_in_subprocess("packed", n, hi)
    res["peak_mem_mb_padded"] = _memory_in_subprocess("padded", n, hi)
    res["speedup_vs_padded"] = round(res["seconds_padded"] / res["seconds_packed"], 2)

    # The cache budget holds under a stream of distinct prompts.
    budget = 32 * 2**20
    cached = LM(backend="local", max_cache_bytes=budget)
    peak_cache = 0
    with RssPeak() as m_cache:
        for s in real_token_runs(cached, 4 if args.quick else 12, 200, 700, seed=1):
            cached.backend.engine.run([Request(tokens=s, params=SamplingParams(max_tokens=4))])
            st = cached.stats()
            peak_cache = max(peak_cache, st["cache_bytes"])
            cached.backend.engine.cache.check_integrity()
    res["cache_budget_mb"] = budget / 2**20
    res["cache_peak_mb"] = round(peak_cache / 2**20, 2)
    res["cache_evictions"] = cached.stats()["evictions"]
    res["cache_run_rss_growth_mb"] = round(m_cache.mb)
    res["peak_rss_mb"] = round(peak_rss_mb())
    emit(res)


if __name__ == "__main__":
    main()
