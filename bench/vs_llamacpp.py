"""promptkit in every weight format against llama.cpp: same CPU, same GGUF, same threads, one run.

llama.cpp runs through llama-cpp-python on the GGUF file that promptkit's
embedded SmolLM2-135M-Instruct is converted from (Q4_1, output Q8_0); both get
the same token ids. Measured:

- single-stream decode tokens/s: one chat prompt, up to ``--decode-tokens``
  new tokens (prefill and the first token not counted); plain transformers
  ``generate`` (float32) is a baseline line;
- prefill tokens/s of a ~1k-token prompt, cold (nothing cached);
- P1 end to end: the few-shot prompts of ``bench/shared_prefix.py`` (a shared
  ~1,070-token prefix), 8 new tokens each: promptkit in one batch,
  llama.cpp one prompt at a time with its own prefix reuse;
- the share of P1's greedy outputs (text) identical to promptkit float32's;
- for the formats whose single-stream decode runs as a compiled graph
  (bfloat16 activations): the same decode through the eager forward, and the
  share of the first 16 P1 prompts' greedy outputs (16 tokens, one request at
  a time) identical between the two paths and to float32's. The graph is
  loaded from the cache, or built in the background when the model loads; the
  script waits for it and reports how long it waited.

Each contender has the process's OpenMP threads to itself: promptkit's
engines are closed after their turn, transformers runs on a thread that ends,
and llama.cpp comes last, on the main thread (a second live OpenMP team slows
everyone's decode; see ``bench/decode_threads.py``).

    python bench/vs_llamacpp.py            # 128 decode tokens, 1k prefill, 64 prompts
    python bench/vs_llamacpp.py --quick    # 32 tokens, 256-token prefill, 8 prompts

llama-cpp-python is in the ``bench`` extra; build it for this CPU with
``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python``. Without it the
llama.cpp column is skipped (and the JSON says so). On a CPU that lists AMX,
llama.cpp's repacked (AMX) buffers can kill the process: with SIGILL where the
kernel does not grant AMX tile data, and with a segfault in decode on some
hosts that do. So where AMX is listed, a child process first decodes a few
tokens with the default model params; if it dies, the model loads with
``use_extra_bufts=False`` (AVX512 kernels kept), and the output says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from contextlib import contextmanager

import _common  # noqa: F401  (puts bench/ on sys.path)
import torch
from _common import emit, log, machine, stage, track
from shared_prefix import build_prompts

from promptkit import LM
from promptkit.backends.base import SamplingParams
from promptkit.models import DEFAULT_LLM, gguf_source
from promptkit.engine.threads import on_fresh_thread
from promptkit.engine.weights import FORMATS, cpu_features
from promptkit.metrics import bootstrap_ci

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python'
SINGLE_TOKENS = 16  # new tokens of each single-stream output compared across formats and decode paths
DECODE_PROMPT = "Write a long story about a dragon who learns to read. Describe every day of its journey."


# -- llama.cpp ------------------------------------------------------------------------------------
@contextmanager
def _model_params(**overrides):
    """llama-cpp-python builds its model params from llama.cpp's defaults; set fields it has no argument for."""
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params

    def patched():
        p = default()
        for k, v in overrides.items():
            setattr(p, k, v)
        return p

    lc.llama_model_default_params = patched
    try:
        yield
    finally:
        lc.llama_model_default_params = default


def _extra_buffers_work(threads: int) -> bool:
    """Whether llama.cpp decodes with its default (repacked, AMX) buffers, tried in a child process."""
    code = (f"import llama_cpp; llm = llama_cpp.Llama(model_path={str(gguf_source(DEFAULT_LLM))!r}, "
            f"n_threads={threads}, n_ctx=256, verbose=False); llm('Hello, my name is', max_tokens=4)")
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def load_llama_cpp(threads: int, n_ctx: int):
    """(Llama, note): the embedded model's GGUF in llama.cpp, or (None, why not)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None, f"llama-cpp-python is not installed; install it with: {INSTALL}"
    import llama_cpp

    feats = cpu_features()
    if not feats.amx_listed:
        safe, why = False, "default model params (this CPU does not list AMX)"
    elif not feats.amx_usable:
        safe, why = True, "AMX listed but not enabled by the kernel: loaded with use_extra_bufts=False (AVX512 kernels)"
    elif not _extra_buffers_work(threads):
        safe, why = True, ("AMX usable, but a decode with llama.cpp's repacked (AMX) buffers crashed a child "
                           "process: loaded with use_extra_bufts=False (AVX512 kernels)")
    else:
        safe, why = False, "default model params (AMX usable)"
    overrides = {"use_extra_bufts": False} if safe else {}
    with _model_params(**overrides):
        llm = llama_cpp.Llama(model_path=str(gguf_source(DEFAULT_LLM)), n_threads=threads, n_threads_batch=threads,
                              n_ctx=n_ctx, n_batch=512, verbose=False)
    return llm, f"llama-cpp-python {llama_cpp.__version__}, {threads} threads; {why}"


def llama_decode(llm, ids: list[int], n: int) -> tuple[int, float]:
    """Tokens decoded after the first, and their seconds."""
    llm.reset()
    chunks = llm.create_completion(prompt=ids, max_tokens=n, temperature=0.0, stream=True)
    next(chunks)
    done, t0 = 0, time.perf_counter()
    for _ in chunks:
        done += 1
    return done, time.perf_counter() - t0


def llama_generate(llm, ids: list[int], n: int) -> str:
    """Greedy text; the prompt's longest prefix shared with the previous call is reused (llama-cpp-python's own)."""
    return llm.create_completion(prompt=ids, max_tokens=n, temperature=0.0)["choices"][0]["text"]


def llama_prefill(llm, ids: list[int]) -> float:
    llm.reset()  # nothing reused
    t0 = time.perf_counter()
    llm.create_completion(prompt=ids, max_tokens=1, temperature=0.0)
    return time.perf_counter() - t0


# -- promptkit ------------------------------------------------------------------------------------
def ours_decode(lm: LM, text: str, n: int) -> tuple[int, float]:
    stream = lm.backend.generate_stream(text, SamplingParams(max_tokens=n))
    next(stream)  # prefill and the first token
    done, t0 = 0, time.perf_counter()
    for ev in stream:
        done += len(ev.token_ids)
    return done, time.perf_counter() - t0


def wait_for_graph(lm: LM) -> float | None:
    """Seconds until the engine's compiled decode graph is ready (None: this format has none)."""
    graph = lm.backend.engine.runner.compiled
    if graph is None:
        return None
    t0 = time.perf_counter()
    if not graph.wait(1800):
        raise RuntimeError(f"the decode graph did not compile: {graph.status}")
    return time.perf_counter() - t0


@contextmanager
def eager_decode(lm: LM):
    """Decode through the eager forward for a while (the same engine, its graph set aside)."""
    runner = lm.backend.engine.runner
    graph, runner.compiled = runner.compiled, None
    try:
        yield
    finally:
        runner.compiled = graph


def one_at_a_time(lm: LM, prompts: list[str], n: int) -> list[str]:
    """Greedy outputs of ``prompts``, one request at a time (single-stream decode)."""
    return [lm.generate(p, max_tokens=n, chat=False)[0].text for p in prompts]


def ours_prefill(lm: LM, text: str) -> float:
    lm.backend.clear_cache()
    t0 = time.perf_counter()
    lm.generate(text, max_tokens=1, chat=False)
    return time.perf_counter() - t0


def hf_decode(lm: LM, text: str, n: int) -> tuple[int, float]:
    """transformers ``generate``: (tokens after the first, seconds) from a 1-token and an n-token call."""
    t0 = time.perf_counter()
    lm.backend.generate([text], SamplingParams(max_tokens=1))
    t1 = time.perf_counter()
    gen = lm.backend.generate([text], SamplingParams(max_tokens=n))[0]
    return len(gen.token_ids) - 1, (time.perf_counter() - t1) - (t1 - t0)


def prefill_text(lm: LM, tokens: int) -> str:
    from evaldata import load_wikipedia_articles

    body = " ".join(a["text"] for a in load_wikipedia_articles()[:20])
    return lm.backend.decode(lm.backend.encode(body)[:tokens])


def rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 decode tokens, 256-token prefill, 8 P1 prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--prefill-tokens", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    q = args.quick
    n_dec = args.decode_tokens or (32 if q else 128)
    n_pre = args.prefill_tokens or (256 if q else 1000)
    n_p1 = args.prompts or (8 if q else 64)
    formats = args.formats.split(",")
    torch.set_num_threads(args.threads)

    res: dict = {"bench": "vs_llamacpp", "cpu": cpu_features().describe(), **machine()}
    with stage("loading float32 and building the prompts"):
        ref = LM(weights="float32")
        p1 = [ref.render(p) for p in build_prompts(n_p1, 512 if q else 1000, ref)]
        p1_ids = [ref.backend.encode(t) for t in p1]
        decode_text = ref.render(DECODE_PROMPT)
        pre_text = prefill_text(ref, n_pre)
    res.update(decode_new_tokens=n_dec, prefill_prompt_tokens=len(ref.backend.encode(pre_text)), p1_prompts=n_p1,
               p1_prompt_tokens_mean=round(sum(map(len, p1_ids)) / n_p1, 1))
    decode, prefill, p1_secs, agree, memory, tokens_decoded = {}, {}, {}, {}, {}, {}
    graph: dict[str, dict] = {}
    held: dict[str, int] = {}  # the model and the lean forward's joined projections
    single: dict[str, list[str]] = {}  # single-stream greedy outputs of the first P1 prompts
    n_single = min(n_p1, 16)
    outputs: dict[str, list[str]] = {}

    for fmt in formats:
        lm = ref if fmt == "float32" else LM(weights=fmt)
        memory[fmt] = round(lm.backend.weights.bytes / 2**20)
        held[fmt] = round(lm.backend.engine.stats()["weight_bytes"] / 2**20)
        with stage(f"promptkit {fmt}: waiting for its decode graph"):
            waited = wait_for_graph(lm)
        with stage(f"promptkit {fmt}: decode, prefill, P1"):
            ours_decode(lm, decode_text, 4)  # warm-up
            steps = lm.backend.engine.stats()["compiled_decode_steps"]
            n, secs = ours_decode(lm, decode_text, n_dec)
            decode[fmt], tokens_decoded[fmt] = rate(n, secs), n
            if waited is not None:
                graph[fmt] = {"compile_wait_s": round(waited, 1),
                              "steps_in_graph": lm.backend.engine.stats()["compiled_decode_steps"] - steps}
                with eager_decode(lm):
                    ours_decode(lm, decode_text, 4)
                    n, secs = ours_decode(lm, decode_text, n_dec)
                    decode[f"{fmt} eager"], tokens_decoded[f"{fmt} eager"] = rate(n, secs), n
                    single[f"{fmt} eager"] = one_at_a_time(lm, p1[:n_single], SINGLE_TOKENS)
            single[fmt] = one_at_a_time(lm, p1[:n_single], SINGLE_TOKENS)
            prefill[fmt] = rate(res["prefill_prompt_tokens"], min(ours_prefill(lm, pre_text) for _ in range(2)))
            lm.backend.clear_cache()
            t0 = time.perf_counter()
            outputs[fmt] = [g.text for g in lm.generate(p1, max_tokens=8, chat=False)]
            p1_secs[fmt] = round(time.perf_counter() - t0, 2)
        log(f"{fmt}: decode {decode[fmt]} tok/s, prefill {prefill[fmt]} tok/s, P1 {p1_secs[fmt]} s")
        lm.backend.engine.close()  # its loop thread ends: the next contender has the CPUs' OpenMP threads alone
        if lm is not ref:
            del lm

    with stage("transformers generate (float32), single stream"):
        def hf_run() -> tuple[int, float]:
            hf = LM(backend="hf", weights="float32")
            hf_decode(hf, decode_text, 4)
            return hf_decode(hf, decode_text, n_dec + 1)

        n, secs = on_fresh_thread(hf_run)
        decode["transformers_generate_float32"], tokens_decoded["transformers_generate_float32"] = rate(n, secs), n

    llm, note = load_llama_cpp(args.threads, 4096)  # on the main thread, whose OpenMP team is now the only one
    res["llama_cpp"] = note
    if llm is None:
        log(f"skipping llama.cpp: {note}")
    else:
        with stage("llama.cpp: decode, prefill, P1 one prompt at a time"):
            ids = ref.backend.encode(decode_text)
            llama_decode(llm, ids, 4)
            n, secs = llama_decode(llm, ids, n_dec)
            decode["llama.cpp"], tokens_decoded["llama.cpp"] = rate(n, secs), n
            pre_ids = ref.backend.encode(pre_text)
            prefill["llama.cpp"] = rate(len(pre_ids), min(llama_prefill(llm, pre_ids) for _ in range(2)))
            llm.reset()
            t0 = time.perf_counter()
            outputs["llama.cpp"] = [llama_generate(llm, i, 8) for i in track(p1_ids, "llama.cpp P1")]
            p1_secs["llama.cpp"] = round(time.perf_counter() - t0, 2)
        memory["llama.cpp"] = round(gguf_source(DEFAULT_LLM).stat().st_size / 2**20)

    if "float32" in outputs:
        want = outputs["float32"]
        agree = {k: round(sum(a == b for a, b in zip(v, want)) / n_p1, 3) for k, v in outputs.items() if k != "float32"}
        res["p1_outputs_equal_to_float32_ci95"] = {
            k: [round(x, 3) for x in bootstrap_ci([a == b for a, b in zip(v, want)])]
            for k, v in outputs.items() if k != "float32"}
    if "float32" in single:
        want = single["float32"]
        res["single_stream_outputs_equal_to_float32"] = {
            k: round(sum(a == b for a, b in zip(v, want)) / n_single, 3) for k, v in single.items() if k != "float32"}
    res["compiled_vs_eager_single_stream_outputs_equal"] = {
        f: round(sum(a == b for a, b in zip(single[f], single[f"{f} eager"])) / n_single, 3)
        for f in formats if f"{f} eager" in single}
    res.update(decode_tokens_per_s=decode, decode_tokens=tokens_decoded, prefill_tokens_per_s=prefill,
               p1_seconds=p1_secs, p1_outputs_equal_to_float32=agree, memory_mb=memory, weights_held_mb=held, decode_graph=graph,
               single_stream_prompts=n_single, single_stream_new_tokens=SINGLE_TOKENS)
    if "llama.cpp" in decode:
        res["decode_vs_llama_cpp"] = {f: round(v / decode["llama.cpp"], 2) for f, v in decode.items()
                                      if f != "llama.cpp"}
        res["prefill_vs_llama_cpp"] = {f: round(prefill[f] / prefill["llama.cpp"], 2) for f in formats}
        res["p1_speedup_vs_llama_cpp"] = {f: round(p1_secs["llama.cpp"] / p1_secs[f], 2) for f in formats}
    emit(res)


if __name__ == "__main__":
    main()
