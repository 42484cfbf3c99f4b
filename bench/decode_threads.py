"""Single-stream decode with and without a second OpenMP team in the process.

PyTorch gives every thread that runs parallel CPU ops an OpenMP team of its
own. With more OpenMP threads than CPUs, libgomp lets idle team members sleep
between parallel regions instead of spinning, and a decode step (hundreds of
short regions) waits for them to wake each time. The engine therefore does
its torch work on its loop thread and runs loading and side passes on
threads that end (``promptkit/engine/threads.py``).

This bench decodes ``--tokens`` tokens after a short chat prompt:

- ``alone``: the engine's loop thread holds the only team (the default);
- ``second_team``: the caller's thread has run one parallel op first (a
  matrix product), so its team stays alive beside the engine's, as it would
  if the model had been loaded, or texts embedded, on the caller's thread.

It alternates the two ``--rounds`` times and reports the best and the median
tokens/s of each, and their ratio.

    python bench/decode_threads.py             # int4 and bfloat16, 64 tokens, 5 rounds
    python bench/decode_threads.py --quick     # int4, 32 tokens, 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, machine, stage

from promptkit import LM
from promptkit.backends.base import SamplingParams
from promptkit.engine.engine import IDLE_EXIT_SECONDS

PROMPT = "Write a short paragraph about the history of the bicycle."


def decode_rate(lm: LM, tokens: int) -> float:
    """Tokens/s of one request's decode after its prefill."""
    stream = lm.backend.generate_stream(lm.render(PROMPT), SamplingParams(max_tokens=tokens + 1, temperature=0.0))
    next(stream)
    done, t0 = 0, time.perf_counter()
    for ev in stream:
        done += len(ev.token_ids)
    return done / (time.perf_counter() - t0)


def with_second_team(lm: LM, tokens: int) -> float:
    """:func:`decode_rate` while a helper thread that has run one parallel op stays alive (its team with it)."""
    ready, done = threading.Event(), threading.Event()

    def hold() -> None:
        a = torch.randn(512, 512)
        a @ a  # a parallel op: this thread now owns an OpenMP team
        ready.set()
        done.wait()

    helper = threading.Thread(target=hold, daemon=True)
    helper.start()
    ready.wait()
    try:
        return decode_rate(lm, tokens)
    finally:
        done.set()
        helper.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="int4 only, 32 tokens, 3 rounds")
    ap.add_argument("--formats", default=None, help="comma-separated weight formats (default int4,bfloat16)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    formats = (args.formats or ("int4" if args.quick else "int4,bfloat16")).split(",")
    tokens = args.tokens or (32 if args.quick else 64)
    rounds = args.rounds or (3 if args.quick else 5)
    res: dict = {"bench": "decode_threads", "tokens": tokens, "rounds": rounds, "threads": torch.get_num_threads(),
                 **machine()}
    for fmt in formats:
        lm = LM(weights=fmt)
        decode_rate(lm, 8)  # warm-up
        runs: dict[str, list[float]] = {"alone": [], "second_team": []}
        with stage(f"{fmt}: {rounds} rounds of {tokens} tokens, alone and beside a second team"):
            for _ in range(rounds):
                runs["alone"].append(decode_rate(lm, tokens))
                runs["second_team"].append(with_second_team(lm, tokens))
        res[fmt] = {k: {"best_tokens_per_s": round(max(v), 1), "median_tokens_per_s": round(statistics.median(v), 1)}
                    for k, v in runs.items()}
        res[fmt]["alone_vs_second_team_median"] = round(statistics.median(runs["alone"])
                                                        / statistics.median(runs["second_team"]), 2)
        log(f"{fmt}: {res[fmt]}")
        lm.backend.engine.close()  # its loop thread (and team) ends before the next format
        time.sleep(min(1.0, IDLE_EXIT_SECONDS))
    emit(res)


if __name__ == "__main__":
    main()
