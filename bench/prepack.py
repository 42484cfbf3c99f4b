"""P2: packed prefill (Prepacking) against a padded transformers batch, plus the cache budget under load.

32 prompts of real text with lengths uniform in 16..1024 tokens, prefill only
(each produces its first token's logits). Ours packs them end to end into
forwards of at most ``max_batch_tokens`` with block-diagonal attention; the
baseline pads them to the longest and runs one transformers forward
(``logits_to_keep=1``). Both on the same weights, in this process, the prefix
cache off so only packing is measured; peak memory of each is measured in a
fresh process. Then a stream of distinct prompts runs
with a small KV budget to show memory stays within it.

    python bench/prepack.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common  # noqa: F401
import torch
from _common import RssPeak, emit, log, machine, peak_rss_mb, real_token_runs, stage

from promptkit import LM


@torch.inference_mode()
def hf_padded_prefill(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]


def measure_memory(method: str, n: int, hi: int) -> None:
    """In a fresh process: peak resident memory added by one prefill of the workload."""
    lm = LM(backend="local", prefix_cache=False) if method == "packed" else LM(backend="hf")
    seqs = real_token_runs(lm, n, 16, hi)
    from promptkit.backends.base import SamplingParams
    from promptkit.engine.engine import Request

    with RssPeak() as m:
        if method == "packed":
            lm.backend.engine.run([Request(tokens=list(s), params=SamplingParams(max_tokens=1)) for s in seqs])
        else:
            hf_padded_prefill(lm.backend.model, seqs, lm.backend.tokenizer.pad_token_id or 0)
    print(json.dumps({"peak_mb": round(m.mb)}))


def _memory_in_subprocesses(n: int, hi: int) -> dict[str, int]:
    """Peak memory of packed and padded prefill, each in its own fresh process (run side by side)."""
    procs = {m: subprocess.Popen([sys.executable, __file__, "--measure", m, "--n", str(n), "--hi", str(hi)],
                                 stdout=subprocess.PIPE, text=True) for m in ("packed", "padded")}
    out = {}
    for m, p in procs.items():
        stdout, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"the {m} memory measurement failed (exit {p.returncode})")
        out[m] = json.loads(stdout.strip().splitlines()[-1])["peak_mb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts of 16..384 tokens (under a minute)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--measure", choices=["packed", "padded"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hi", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n, hi = (8, 384) if args.quick else (32, 1024)
    if args.measure:
        return measure_memory(args.measure, args.n or n, args.hi or hi)
    repeats = args.repeats or (1 if args.quick else 3)

    with stage("loading the engine and the transformers reference"):
        ours = LM(backend="local", prefix_cache=False)
        hf = LM(backend="hf")
        seqs = real_token_runs(ours, n, 16, hi)
    res: dict = {"bench": "prepack", "prompts": n, "tokens": sum(map(len, seqs)),
                 "padded_tokens": n * max(map(len, seqs)), **machine()}
    log(f"{n} prompts, {res['tokens']} tokens ({res['padded_tokens']} padded)")
    from promptkit.backends.base import SamplingParams
    from promptkit.engine.engine import Request

    def ours_run():
        reqs = ours.backend.engine.run([Request(tokens=list(s), params=SamplingParams(max_tokens=1)) for s in seqs])
        return [r.generated[0] for r in reqs]

    pad = hf.backend.tokenizer.pad_token_id or 0

    def hf_run():
        return hf_padded_prefill(hf.backend.model, seqs, pad).argmax(-1).tolist()

    with stage("warm-up of both"):
        ours.backend.engine.run([Request(tokens=list(seqs[0]), params=SamplingParams(max_tokens=1))])
        hf_padded_prefill(hf.backend.model, seqs[:2], pad)
    t_ours, t_hf = [], []
    with stage(f"packed vs padded prefill, best of {repeats}"):
        for _ in range(repeats):
            t0 = time.perf_counter()
            first_ours = ours_run()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            first_hf = hf_run()
            t_hf.append(time.perf_counter() - t0)
    res["seconds_packed"], res["seconds_padded"] = min(t_ours), min(t_hf)
    log(f"packed {res['seconds_packed']:.2f}s, padded {res['seconds_padded']:.2f}s")
    res["first_tokens_match"] = sum(a == b for a, b in zip(first_ours, first_hf)) / n
    with stage("peak memory of each, in fresh processes"):
        mem = _memory_in_subprocesses(n, hi)
    res["peak_mem_mb_packed"], res["peak_mem_mb_padded"] = mem["packed"], mem["padded"]
    res["speedup_vs_padded"] = round(res["seconds_padded"] / res["seconds_packed"], 2)

    # The KV budget holds under a stream of distinct prompts (bench/memory.py loads it harder).
    budget = 32 * 2**20
    cached = LM(backend="local", max_kv_bytes=budget)
    stream = real_token_runs(cached, 4 if args.quick else 12, 200, 700, seed=1)
    with stage(f"{len(stream)} distinct prompts under a {budget >> 20} MB KV budget"), RssPeak() as m_cache:
        for s in stream:
            cached.backend.engine.run([Request(tokens=s, params=SamplingParams(max_tokens=4))])
            cached.backend.engine.check_integrity()
    res["cache_budget_mb"] = budget / 2**20
    res["cache_peak_mb"] = round(cached.stats()["kv_high_water_bytes"] / 2**20, 2)
    res["cache_evictions"] = cached.stats()["evictions"]
    res["cache_run_rss_growth_mb"] = round(m_cache.mb)
    res["peak_rss_mb"] = round(peak_rss_mb())
    emit(res)


if __name__ == "__main__":
    main()
