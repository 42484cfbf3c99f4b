"""How often each weight format's greedy output equals float32's, with a 95 % interval.

The prompts are ``bench/shared_prefix.py``'s P1 prompts (a shared few-shot
prefix of SQuAD paragraphs, then each prompt's own SQuAD question); each
format answers all of them in one batch, greedy, ``--new-tokens`` tokens, and
its text is compared with float32's. Reported per format: the share of
identical outputs with its bootstrap interval, and the paired difference to
bfloat16 (the format whose only change is rounding) with its interval. With
64 prompts one output is 1.6 points, so a small difference between formats
is noise; ``--prompts 512`` narrows the intervals.

    python bench/format_agreement.py                 # 256 prompts, every format
    python bench/format_agreement.py --quick         # 32 prompts
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, machine, stage
from shared_prefix import build_prompts

from promptkit import LM
from promptkit.engine.weights import FORMATS, cpu_features
from promptkit.metrics import bootstrap_ci, paired_bootstrap_ci


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 prompts")
    ap.add_argument("--prompts", type=int, default=None, help="number of P1 prompts (256)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--formats", default=",".join(f for f in FORMATS if f != "float32"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.prompts or (32 if args.quick else 256)
    res: dict = {"bench": "format_agreement", "cpu": cpu_features().describe(), **machine(), "prompts": n,
                 "new_tokens": args.new_tokens}
    with stage("float32: the reference outputs"):
        ref = LM(weights="float32", compile_decode=False)
        prompts = [ref.render(p) for p in build_prompts(n, 1000, ref)]
        want = [g.text for g in ref.generate(prompts, max_tokens=args.new_tokens, chat=False)]
        ref.backend.engine.close()
    equal: dict[str, list[bool]] = {}
    for fmt in args.formats.split(","):
        with stage(f"{fmt}: the same prompts"):
            lm = LM(weights=fmt, compile_decode=False)  # batched: the decode graph plays no part
            t0 = time.perf_counter()
            got = [g.text for g in lm.generate(prompts, max_tokens=args.new_tokens, chat=False)]
            seconds = time.perf_counter() - t0
            lm.backend.engine.close()
        equal[fmt] = [a == b for a, b in zip(got, want)]
        share = sum(equal[fmt]) / n
        lo, hi = bootstrap_ci(equal[fmt])
        res[fmt] = {"equal_to_float32": round(share, 3), "ci95": [round(lo, 3), round(hi, 3)],
                    "seconds": round(seconds, 1), "weights": lm.backend.weights.linears}
        log(f"{fmt}: {sum(equal[fmt])}/{n} equal to float32 ({share:.1%}, 95 % [{lo:.1%}, {hi:.1%}])")
    if "bfloat16" in equal:
        for fmt, eq in equal.items():
            if fmt != "bfloat16":
                lo, hi = paired_bootstrap_ci(eq, equal["bfloat16"])
                res[fmt]["minus_bfloat16"] = [round((sum(eq) - sum(equal["bfloat16"])) / n, 3),
                                              [round(lo, 3), round(hi, 3)]]
    emit(res)


if __name__ == "__main__":
    main()
