"""The engine on a CUDA GPU, checked in one command.

    python bench/gpu_check.py              # on a machine with CUDA: every check below, one JSON line
    python bench/gpu_check.py --self-test  # the same checks at tiny sizes on the CPU (the test suite runs this)

On CUDA it checks, and reports as one JSON line:

* the fused attention kernel that returns the log-sum-exp (flash) against the matmul reference,
  in bfloat16 and float32;
* greedy output of the engine against transformers ``generate`` on the GPU for every supported
  family (tiny random models; float32 must be equal token for token, bfloat16 is reported as a share);
* seeded sampling on the device: the same seed gives the same tokens, whatever the batch;
* P1 (``bench/shared_prefix.py``: 64 few-shot prompts, ~1,070 shared tokens) and P3
  (``bench/sparse_prefill.py`` at 4k and 8k tokens, the model's context) on the embedded model, run as subprocesses
  with ``--device cuda``, their JSON results included.

Without CUDA it says so and exits 0 (``{"cuda": false, ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, stage

from promptkit.backends.base import SamplingParams
from promptkit.engine import attention
from promptkit.engine.attention import cuda_flash
from promptkit.engine.engine import Engine, Request
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import FAMILIES as TINY  # noqa: E402  (the tests' tiny model of each family)
from tiny import make_tiny as tiny_model  # noqa: E402

VOCAB = 512


def attention_check(device: torch.device) -> dict:
    """The fused kernel path against the matmul reference, per dtype (True: used and equal)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        if device.type == "cuda":
            cuda_flash._checked.pop((device, dtype), None)
            out[str(dtype).split(".")[-1]] = cuda_flash.usable(torch.empty(1, device=device, dtype=dtype), None)
        else:  # the CPU's fused kernel, the same comparison
            g = torch.Generator().manual_seed(0)
            q, k, v = torch.randn(4, 5, 64, generator=g), torch.randn(2, 12, 64, generator=g), torch.randn(2, 12, 64, generator=g)
            q, k, v = (x.to(dtype) for x in (q, k, v))
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            out[str(dtype).split(".")[-1]] = all(
                torch.allclose(a, b, atol=tol, rtol=tol)
                for c in (None, 7) for a, b in zip(attention.attend_lse(q, k, v, 0.125, c),
                                                  attention.attend_lse_blocks(q, k, v, 0.125, c)))
    return out


@torch.inference_mode()
def family_check(family: str, device: torch.device, dtype: torch.dtype, n_prompts: int, new: int) -> float:
    """Share of prompts whose greedy output from the engine equals transformers' on ``device``."""
    ref = tiny_model(family, VOCAB).to(device, dtype)
    ref.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    head = torch.randint(1, VOCAB, (20,), generator=g).tolist()
    ps = [head + torch.randint(1, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (n_prompts,), generator=g)]
    want = [ref.generate(torch.tensor([p], device=device), max_new_tokens=new, do_sample=False,
                         attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device))[0, len(p):].tolist()
            for p in ps]
    eng = Engine(tiny_model(family, VOCAB).to(device, dtype), eos_ids=set(), max_batch_tokens=32)
    got = [r.generated for r in eng.run([Request(tokens=p, params=SamplingParams(max_tokens=new)) for p in ps])]
    again = [r.generated for r in eng.run([Request(tokens=p, params=SamplingParams(max_tokens=new)) for p in ps])]
    eng.close()
    return sum(a == w and b == w for a, b, w in zip(got, again, want)) / len(ps)


def sampling_check(device: torch.device) -> bool:
    """Seeded sampling on the device: the same seed gives the same tokens alone and in a batch."""
    eng = Engine(tiny_model("llama", VOCAB).to(device), eos_ids=set())
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = eng.run([Request(tokens=[1, 2, 3], params=params)])[0].generated
    batch = eng.run([Request(tokens=[4, 5, 6, 7], params=params), Request(tokens=[1, 2, 3], params=params)])
    eng.close()
    return alone == batch[1].generated


def bench(script: str, args: list[str], timeout: int) -> dict:
    """Run another bench script with ``--device cuda``; its last stdout line is its JSON result."""
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), script), *args, "--device", "cuda"]
    log(" ".join(cmd[1:]))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--self-test", action="store_true", help="the checks at tiny sizes on the CPU")
    ap.add_argument("--quick", action="store_true", help="skip P1 and P3 (the kernel, family and sampling checks)")
    args = ap.parse_args()
    if not args.self_test and not torch.cuda.is_available():
        log("no CUDA device here: nothing to check (run with --self-test for the CPU version)")
        emit({"bench": "gpu_check", "cuda": False, "torch": torch.__version__,
              "would_check": ["attention kernels", "families", "sampling", "P1", "P3"]})
        return
    device = torch.device("cpu" if args.self_test else "cuda")
    res: dict = {"bench": "gpu_check", "cuda": device.type == "cuda", "device": str(device),
                 "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    with stage("attention kernels against the matmul reference"):
        res["attention_kernels_ok"] = attention_check(device)
    n_prompts, new = (3, 6) if args.self_test else (8, 16)
    res["families_float32"], res["families_bfloat16"] = {}, {}
    for family in sorted(TINY):
        with stage(f"{family}: engine vs transformers greedy"):
            res["families_float32"][family] = family_check(family, device, torch.float32, n_prompts, new)
            if device.type == "cuda":
                res["families_bfloat16"][family] = family_check(family, device, torch.bfloat16, n_prompts, new)
    with stage("seeded sampling on the device"):
        res["sampling_batch_invariant"] = sampling_check(device)
    if device.type == "cuda" and not args.quick:
        res["p1"] = bench("shared_prefix.py", [], 900)
        res["p3"] = bench("sparse_prefill.py", ["--lengths", "4096", "8192", "--depths", "3"], 1200)
    res["ok"] = (all(res["attention_kernels_ok"].values()) and all(v == 1.0 for v in res["families_float32"].values())
                 and res["sampling_batch_invariant"])
    emit(res)


if __name__ == "__main__":
    main()
