"""Where a single-stream decode step's time goes, per weight format (torch.profiler).

After a short chat prompt, the engine decodes ``--tokens`` tokens one at a time
(one request). A step is timed without the profiler and split into:

- matmuls: every linear layer and the output projection run alone on one
  token, back to back (the weights stream from memory as in a step);
- the attention kernel: PyTorch's fused attention ops, timed by
  ``torch.profiler`` over the same steps;
- the rest: other ops (norms, rotary embedding, activations, residual adds,
  KV writes, the attention code around the kernel, sampling) and host time
  (Python, dispatch between ops).

The profiler also counts the aten ops a step issues (top-level ones: inside
the model's attention function, matmuls, and the others). Formats with
bfloat16 activations decode one request through a compiled graph (see
``promptkit/engine/compiled.py``); the script waits until it is compiled, and
the ops it counts are then the ones the graph's C++ wrapper calls.

    python bench/decode_profile.py                 # every format, 64 tokens
    python bench/decode_profile.py --quick         # float32 and int8, 16 tokens
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, machine, stage

from promptkit import LM
from promptkit.backends.base import SamplingParams
from promptkit.engine.threads import on_fresh_thread
from promptkit.engine.weights import FORMATS

PROFILED_STEPS = 16  # the profiler's event tree grows with every op; 16 steps show the pattern
PROMPT = "Write a short paragraph about the history of the bicycle."


def decode_steps(lm: LM, tokens: int) -> tuple[int, float]:
    """Decode ``tokens`` tokens of one request after its prefill: (tokens decoded, seconds)."""
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0)
    stream = lm.backend.generate_stream(lm.render(PROMPT), params)
    next(stream)  # prefill and the first token
    done, t0 = 0, time.perf_counter()
    for ev in stream:
        done += len(ev.token_ids)
    return done, time.perf_counter() - t0


MATMULS = {"aten::linear", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::mm",
           "aten::addmm", "aten::matmul"}


@contextmanager
def attention_labelled(model):
    """Run the model's attention function (the engine's, looked up by name at every call) under a profiler label."""
    from transformers import AttentionInterface

    name = model.config._attn_implementation
    inner = AttentionInterface._global_mapping[name]

    def labelled(*args, **kwargs):
        with torch.profiler.record_function("attention"):
            return inner(*args, **kwargs)

    AttentionInterface._global_mapping[name] = labelled
    try:
        yield
    finally:
        AttentionInterface._global_mapping[name] = inner


def top_level_ops(prof) -> list[tuple[object, str]]:
    """Each aten op not called by another aten op, with its bucket: attention (under the label), matmul, other."""
    out = []
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        if parent is None:
            out.append((e, "matmul" if e.name in MATMULS else "other"))
        elif parent.name == "attention":
            out.append((e, "attention"))
    return out


def matmul_ms(model: torch.nn.Module, repeats: int = 5) -> float:
    """One decode step's matmuls alone: every linear (and the output projection) on one token, best of ``repeats``."""
    from promptkit.engine.weights import Int4Linear, Int8Linear, Int8RowLinear

    dtype = next(model.parameters()).dtype
    halves = {id(h) for m in model.modules() if isinstance(m, Int8Linear) for h in (m.high, m.low)}
    mods = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear, Int8RowLinear, Int4Linear))
            and id(m) not in halves]
    xs = [torch.randn(1, m.in_features, dtype=dtype) for m in mods]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m, x in zip(mods, xs):
                m(x)
            best = min(best, time.perf_counter() - t0)
    return best * 1000


def profile(lm: LM, tokens: int) -> dict:
    # Before the engine's loop thread starts, on a thread that ends: two live OpenMP teams would slow both
    # measurements (see promptkit/engine/threads.py).
    mm_ms = on_fresh_thread(matmul_ms, lm.backend.model)
    graph = lm.backend.engine.runner.compiled  # bfloat16 activations: single-stream decode as one compiled graph
    if graph is not None and not graph.wait(1800):
        raise RuntimeError(f"the decode graph did not compile: {graph.status}")
    decode_steps(lm, 4)  # warm-up
    n, secs = decode_steps(lm, tokens)
    every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)  # the engine steps on its own
    with attention_labelled(lm.backend.model), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=every_thread) as prof:
        pn, _ = decode_steps(lm, min(tokens, PROFILED_STEPS))
    ops = top_level_ops(prof)
    count = {k: sum(kind == k for _, kind in ops) for k in ("matmul", "attention", "other")}
    kernel = sum(e.cpu_time_total for e, _ in ops if "flash_attention" in e.name or "scaled_dot_product" in e.name)
    step_ms, attn_ms = secs * 1000 / n, kernel / 1000 / pn
    return {"compiled_graph": graph is not None, "tokens_per_s": round(n / secs, 2), "ms_per_step": round(step_ms, 2),
            "ms_matmul": round(mm_ms, 2), "ms_attention_kernel": round(attn_ms, 2),
            "ms_rest": round(step_ms - mm_ms - attn_ms, 2),
            "aten_ops_per_step": round(len(ops) / pn), "ops_per_step": {k: round(v / pn) for k, v in count.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="float32 and int8, 16 tokens")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--formats", default=None, help="comma-separated subset of " + ",".join(FORMATS))
    args = ap.parse_args()
    tokens = args.tokens or (16 if args.quick else 64)
    formats = args.formats.split(",") if args.formats else (["float32", "int8"] if args.quick else list(FORMATS))
    res: dict = {"bench": "decode_profile", "tokens": tokens, "threads": torch.get_num_threads(), **machine()}
    for fmt in formats:
        with stage(f"{fmt}: load"):
            lm = LM(backend="local", weights=fmt)
        with stage(f"{fmt}: {tokens} decode steps, timed then profiled"):
            res[fmt] = profile(lm, tokens)
        log(f"{fmt}: {res[fmt]}")
        del lm
    emit(res)


if __name__ == "__main__":
    main()
