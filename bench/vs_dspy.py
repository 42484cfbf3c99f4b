"""DSPy's optimizers on promptkit and on llama.cpp's server, and promptkit's own search: TREC, one table.

Task: TREC question classification, 6 coarse labels (``$PROMPTKIT_DATA/trec``), as a DSPy
``Predict`` program (``question -> label: Literal[...]``, DSPy's default ChatAdapter). A train
pool, a validation set the optimizers search on (150) and a held-out set (300), the same for
every run. Runs, each named ``<optimizer>@<backend>``:

1. ``bootstrap_random_search`` (``BootstrapFewShotWithRandomSearch``, DSPy's documented settings)
   and ``mipro_v2_light`` (``MIPROv2(auto="light")``) on ``llamacpp_server``: llama-cpp-python's
   OpenAI server on the same GGUF (``--n_threads 2``), reached through DSPy's LM as a local DSPy
   user does today (declared so that ``max_tokens`` reaches it: see :func:`llamacpp_lm`). The
   server answers one request at a time (it has no parallel slots) and reuses only the prefix a
   request shares with the one before.
2. The same two on ``promptkit_serve``: ``promptkit serve`` (in-process), through ``PromptkitLM(base_url=...)``.
3. The same two on ``promptkit_dspy``: ``PromptkitLM`` in this process.
4. promptkit's own ``joint_search`` and ``reflective_search`` (given the metric calls of DSPy's
   MIPROv2 run as its budget) on ``promptkit_pipeline``: a promptkit pipeline (instruction and
   ``Question: / Type:`` prompt, ``Classify`` over the label words), as ``bench/optimizers.py`` builds it.
5. ``zero_shot`` on each backend.

Per run: wall seconds of the compile and of the held-out evaluation, LM calls, prompt tokens
prefilled (promptkit: the engine's counter; llama.cpp: the tokens its log says it evaluated),
and held-out accuracy with its 95 % bootstrap interval. DSPy's response cache is off and each
run starts with a cold prefix cache. Goals: DSPy's optimizers compile >= 3x faster on promptkit
than on llama.cpp's server at held-out accuracy whose intervals overlap; promptkit's own search
reaches held-out accuracy >= DSPy's best at <= 1/5 of that run's compile time. A missed goal is
reported with by how much and where the time went.

    PROMPTKIT_DATA=/work/shared/data python bench/vs_dspy.py [--quick] [--threads 8] [--max-tokens 128]
                                                            [--skip-llamacpp] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price list from the network
# This script's folder holds optimizers.py, which shadows the optimizers package: import the package first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from optimizers import JointSearch, Racing, ReflectiveSearch  # noqa: E402

sys.path.insert(0, _HERE)
from _common import emit, log, machine, stage  # noqa: E402

from promptkit import LM, get_lm  # noqa: E402
from promptkit.models import DEFAULT_LLM, gguf_source  # noqa: E402
from promptkit.evaluate import evaluate  # noqa: E402
from promptkit.metrics import bootstrap_ci  # noqa: E402
from promptkit.pipeline import Pipeline  # noqa: E402
from promptkit.stages import BuildPrompt, Classify  # noqa: E402
from promptkit.types import Example  # noqa: E402

INSTRUCTION = "Classify what the question asks for."
DSPY_OPTIMIZERS = ("bootstrap_random_search", "mipro_v2_light")
BACKENDS = ("llamacpp_server", "promptkit_serve", "promptkit_dspy")
NATIVE = "promptkit_pipeline"
MANY_ERRORS = 10**6  # a parse failure scores 0 (DSPy's failure score); it never stops a run
_PROMPT_EVAL = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens")
_EVAL = re.compile(r"^\S*:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs", re.MULTILINE)  # decode, not "prompt eval"
_TOTAL = re.compile(r"total time =\s*([\d.]+) ms")


# -- data ------------------------------------------------------------------------------------------
@dataclass
class Split:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    labels: list[str]


def load_split(n_train: int, n_val: int, n_test: int, seed: int) -> Split:
    """Validation and the train pool from TREC's train split, held-out items from its test split."""
    from evaldata import load_trec

    train, test, labels, _ = load_trec(seed=seed)
    if len(train) < n_val + 2 or len(test) < n_test:
        raise SystemExit(f"TREC: {len(train)} train / {len(test)} test items; asked for {n_val} validation and "
                         f"{n_test} held-out")
    return Split(train[n_val:][: n_train or None], train[:n_val], test[:n_test], labels)


# -- counting ------------------------------------------------------------------------------------------
def counting_callback():
    """A DSPy callback that counts LM calls (every copy of the LM, every thread)."""
    from dspy.utils.callback import BaseCallback

    class Calls(BaseCallback):
        def __init__(self) -> None:
            self.n, self._lock = 0, threading.Lock()

        def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
            with self._lock:
                self.n += 1

    return Calls()


class CountedMetric:
    """Label accuracy as a DSPy metric, counting its calls (the examples scored)."""

    def __init__(self) -> None:
        self.calls, self._lock = 0, threading.Lock()

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> bool:
        with self._lock:
            self.calls += 1
        return example.label == getattr(prediction, "label", None)


# -- backends -----------------------------------------------------------------------------------------
class Backend:
    """Where a DSPy program's LM calls go, and what the model behind it prefilled."""

    name = ""
    lm: Any = None

    def reset(self) -> None:
        """Start the next run with a cold cache."""

    def counters(self) -> dict[str, float]:
        """Running totals: ``prefilled_tokens`` and whatever else says where the time went."""
        return {}

    def close(self) -> None:
        pass


class PromptkitInProcess(Backend):
    name = "promptkit_dspy"

    def __init__(self, pk: LM, max_tokens: int) -> None:
        from promptkit.dspy import PromptkitLM

        self.pk = pk
        self.lm = PromptkitLM(pk, max_tokens=max_tokens, cache=False)

    def reset(self) -> None:
        self.pk.backend.clear_cache()

    def counters(self) -> dict[str, float]:
        s, totals = self.pk.stats(), self.lm.engine.totals()
        return {"prefilled_tokens": s["tokens_prefilled"], "cached_tokens": s["tokens_cached"],
                "engine_steps": s["steps"], "fast_forwarded_tokens": s["fast_forwarded_tokens"],
                "generated_tokens": totals["completion_tokens"]}


class PromptkitServed(PromptkitInProcess):
    name = "promptkit_serve"

    def __init__(self, pk: LM, max_tokens: int, max_workers: int) -> None:
        from promptkit.dspy import PromptkitLM
        from promptkit.server import BackgroundServer, create_app

        self.pk = pk
        self.server = BackgroundServer(create_app(pk, max_workers=max_workers)).__enter__()
        self.lm = PromptkitLM(base_url=self.server.url + "/v1", max_tokens=max_tokens, cache=False)

    def close(self) -> None:
        self.server.__exit__(None, None, None)


class LlamaCppServed(Backend):
    """llama-cpp-python's OpenAI server on the embedded model's GGUF, in a subprocess."""

    name = "llamacpp_server"

    def __init__(self, max_tokens: int, threads: int, n_ctx: int) -> None:
        from promptkit.backends.remote.llamacpp_server import LlamaCppServer

        gguf = gguf_source(DEFAULT_LLM)
        if gguf is None:
            raise RuntimeError(f"no GGUF for {DEFAULT_LLM} on this machine")
        # logits_all off: generation needs the last position's logits only (the server's default computes all).
        self.server = LlamaCppServer(gguf, alias=DEFAULT_LLM, n_ctx=n_ctx, threads=threads, logits_all=False,
                                     extra_args=("--verbose", "true")).__enter__()  # verbose: its timings log
        self.lm = llamacpp_lm(self.server.url + "/v1", max_tokens)

    def counters(self) -> dict[str, float]:
        """From the server's log: prompt tokens evaluated, tokens generated and its busy seconds."""
        text = self.server.log_path.read_text(errors="replace")
        return {"prefilled_tokens": sum(int(n) for n in _PROMPT_EVAL.findall(text)),
                "generated_tokens": sum(int(n) for _, n in _EVAL.findall(text)),
                "server_busy_seconds": round(sum(float(ms) for ms in _TOTAL.findall(text)) / 1000, 2)}

    def close(self) -> None:
        self.server.__exit__(None, None, None)


def llamacpp_lm(base_url: str, max_tokens: int) -> Any:
    """DSPy's LM for llama-cpp-python's server, declared as an OpenAI-compatible provider.

    DSPy's documented route for a local server, ``dspy.LM("openai/<model>", api_base=...)``, sends
    the token limit as ``max_completion_tokens``, which this server ignores (every reply then runs
    to EOS). Declared with vLLM's dialect the limit travels as ``max_tokens``: the same limit every
    backend gets. Nothing is said about response schemas, so DSPy sends none, as on the openai route.
    """
    import dspy
    from dspy._vendor.lm15.access import AccessPolicy, EndpointSupport
    from dspy.lm15 import OpenAIChatCompat, ProviderDefinition, register_provider

    access = AccessPolicy(provider="llamacpp", supports=EndpointSupport(complete=True, stream=True, models=True),
                          auth_modes=("bearer",), base_url=base_url)
    register_provider(ProviderDefinition.chat(access, compat=OpenAIChatCompat.preset("vllm")), replace=True)
    return dspy.LM(f"llamacpp/{DEFAULT_LLM}", api_key="unused", model_type="chat", max_tokens=max_tokens,
                   temperature=0.0, cache=False)


def llamacpp_unavailable() -> str | None:
    """Why llama.cpp's server cannot run here, or None."""
    try:
        from promptkit.backends.remote.llamacpp_server import unavailable_reason
    except ImportError as e:
        return f"promptkit's llama.cpp server launcher is missing: {e}"
    return unavailable_reason()


# -- DSPy runs -----------------------------------------------------------------------------------------
def dspy_program(labels: list[str]) -> Any:
    import dspy

    signature = dspy.make_signature(
        {"question": (str, dspy.InputField()), "label": (Literal[tuple(labels)], dspy.OutputField())},
        INSTRUCTION, "TrecQuestion")
    return dspy.Predict(signature)


def dspy_examples(rows: list[dict]) -> list[Any]:
    import dspy

    return [dspy.Example(question=r["text"], label=r["label"]).with_inputs("question") for r in rows]


def bootstrap_random_search(program: Any, split: Split, metric: CountedMetric, args: argparse.Namespace) -> Any:
    import dspy

    demos, candidates = (2, 1) if args.quick else (4, 10)
    optimizer = dspy.BootstrapFewShotWithRandomSearch(
        metric=metric, max_bootstrapped_demos=demos, max_labeled_demos=demos, num_candidate_programs=candidates,
        num_threads=args.threads, max_errors=MANY_ERRORS)
    return optimizer.compile(program, trainset=dspy_examples(split.train), valset=dspy_examples(split.val))


def mipro_v2_light(program: Any, split: Split, metric: CountedMetric, args: argparse.Namespace) -> Any:
    import dspy

    train, val = dspy_examples(split.train), dspy_examples(split.val)
    if args.quick:  # a tiny search of the same shape: two candidates of each kind, two trials
        optimizer = dspy.MIPROv2(metric=metric, auto=None, num_candidates=2, num_threads=args.threads,
                                 max_errors=MANY_ERRORS, seed=args.seed, verbose=False)
        return optimizer.compile(program, trainset=train, valset=val, num_trials=2, minibatch=False,
                                 max_bootstrapped_demos=2, max_labeled_demos=2)
    optimizer = dspy.MIPROv2(metric=metric, auto="light", num_threads=args.threads, max_errors=MANY_ERRORS,
                             seed=args.seed, verbose=False)
    return optimizer.compile(program, trainset=train, valset=val)


def zero_shot(program: Any, split: Split, metric: CountedMetric, args: argparse.Namespace) -> Any:
    return program


def held_out(program: Any, split: Split, threads: int) -> tuple[list[float], int]:
    """Per-item scores of ``program`` on the held-out items, and how many replies did not parse (scored 0)."""
    import dspy

    result = dspy.Evaluate(devset=dspy_examples(split.test), metric=CountedMetric(), num_threads=threads,
                           display_progress=False, max_errors=MANY_ERRORS, provide_traceback=False)(program)
    unparsed = sum(getattr(pred, "label", None) is None for _, pred, _ in result.results)
    return [float(score) for _, _, score in result.results], unparsed


def run_dspy(optimizer: str, compile_fn: Callable, backend: Backend, split: Split, args: argparse.Namespace) -> dict:
    import dspy

    calls, metric = counting_callback(), CountedMetric()
    backend.reset()
    start = backend.counters()
    with dspy.context(lm=backend.lm, callbacks=[calls], max_errors=MANY_ERRORS):
        t0 = time.perf_counter()
        compiled = compile_fn(dspy_program(split.labels), split, metric, args)
        t1 = time.perf_counter()
        scores, unparsed = held_out(compiled, split, args.threads)
        t2 = time.perf_counter()
    return result_row(t1 - t0, t2 - t1, calls.n, delta(start, backend.counters()), scores,
                      held_out_unparsed=unparsed, metric_calls=metric.calls, demos=len(compiled.demos))


# -- promptkit's own search ----------------------------------------------------------------------------
def native_pipeline(labels: list[str]) -> Pipeline:
    return Pipeline(BuildPrompt(instruction=INSTRUCTION, input_format="Question: {text}",
                                output_format="Type: {label}", answer_prefix="Type:"),
                    Classify(labels=labels, calibrate=True), name="trec")


def native_examples(rows: list[dict]) -> list[Example]:
    return [Example(text=r["text"], label=r["label"], output_key="label") for r in rows]


def native_search(name: str, split: Split, args: argparse.Namespace, budget: int) -> Any:
    race = Racing(min_examples=min(20, max(4, len(split.val) // 4)))
    if name == "joint_search":
        if args.quick:
            return JointSearch(k=4, num_instructions=0, num_sets=1, scorers=[{"calibrate": False}], racing=race,
                               seed=args.seed)
        return JointSearch(k=5, num_instructions=1, num_sets=2, racing=race, seed=args.seed)
    minibatch = 4 if args.quick else 8
    return ReflectiveSearch(max_metric_calls=max(budget, len(split.val) + 2 * minibatch), minibatch=minibatch,
                            seed=args.seed, verbose=False)


def run_native(name: str, pk: LM, split: Split, args: argparse.Namespace, budget: int = 0) -> dict:
    pk.backend.clear_cache()
    before = pk.stats()
    base = native_pipeline(split.labels)
    t0 = time.perf_counter()
    if name == "zero_shot":
        best, calls, metric_calls = base, 0, 0
    else:
        best, report = native_search(name, split, args, budget).compile(
            base, native_examples(split.train), "accuracy", valset=native_examples(split.val))
        calls, metric_calls = report.lm_calls, report.metric_calls
    t1 = time.perf_counter()
    res = evaluate(best, native_examples(split.test), "accuracy", output_key="label")
    t2 = time.perf_counter()
    after = pk.stats()
    counters = {"prefilled_tokens": after["tokens_prefilled"] - before["tokens_prefilled"],
                "cached_tokens": after["tokens_cached"] - before["tokens_cached"],
                "engine_steps": after["steps"] - before["steps"]}
    return result_row(t1 - t0, t2 - t1, calls + len(split.test), counters, list(res.scores),
                      metric_calls=metric_calls)


# -- results ------------------------------------------------------------------------------------------
def delta(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    return {k: round(end[k] - start.get(k, 0), 2) for k in end}


def result_row(compile_s: float, eval_s: float, calls: int, counters: dict[str, float], scores: list[float],
               **extra: Any) -> dict:
    acc = sum(scores) / len(scores)
    lo, hi = bootstrap_ci(scores)
    return {"compile_seconds": round(compile_s, 2), "eval_seconds": round(eval_s, 2), "lm_calls": calls,
            "prefilled_tokens": int(counters.get("prefilled_tokens", 0)), "accuracy": round(acc, 4),
            "accuracy_ci": [round(lo, 4), round(hi, 4)],
            "seconds_per_lm_call": round((compile_s + eval_s) / max(1, calls), 3),
            **extra, "counters": counters}


def overlap(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def goals(runs: dict[str, dict]) -> tuple[float | None, float | None, dict]:
    """The two goals, each with whether it is met and, when not, by how much; and their two figures."""
    speed, speedup = speed_goal(runs)
    native, ratio = native_goal(runs)
    return speedup, ratio, {"dspy_3x_faster_on_promptkit": speed, "native_beats_dspy_at_a_fifth_of_its_time": native}


def speed_goal(runs: dict[str, dict]) -> tuple[dict, float | None]:
    """DSPy's compile seconds on llama.cpp's server over those on promptkit in-process, for the
    optimizers that completed on both; their held-out intervals must overlap."""
    pairs = {o: (runs.get(f"{o}@llamacpp_server", {}), runs.get(f"{o}@promptkit_dspy", {})) for o in DSPY_OPTIMIZERS}
    done = {o: (s, f) for o, (s, f) in pairs.items() if "accuracy" in s and "accuracy" in f}
    failed = {k: r["error"] for k, r in runs.items() if k.split("@")[0] in DSPY_OPTIMIZERS and "error" in r}
    if not done:
        return {"met": None, "why": "no DSPy optimizer completed on both llamacpp_server and promptkit_dspy",
                "failed": failed}, None
    speedup = round(sum(s["compile_seconds"] for s, _ in done.values())
                    / max(1e-9, sum(f["compile_seconds"] for _, f in done.values())), 2)
    overlaps = {o: overlap(s["accuracy_ci"], f["accuracy_ci"]) for o, (s, f) in done.items()}
    met = speedup >= 3 and all(overlaps.values()) and len(done) == len(DSPY_OPTIMIZERS)
    out = {"speedup": speedup, "met": met, "accuracy_intervals_overlap": overlaps,
           "per_optimizer": {o: round(s["compile_seconds"] / max(1e-9, f["compile_seconds"]), 2)
                             for o, (s, f) in done.items()}, "failed": failed}
    if not met:
        out["missed_by"] = {"speedup_short_of_3x": round(max(0.0, 3 - speedup), 2),
                            "intervals_apart": [o for o, ok in overlaps.items() if not ok],
                            "not_completed_on_both": [o for o in DSPY_OPTIMIZERS if o not in done],
                            "where_the_time_went": {o: {"llamacpp_server": where(s), "promptkit_dspy": where(f)}
                                                    for o, (s, f) in done.items()}}
    return out, speedup


def native_goal(runs: dict[str, dict]) -> tuple[dict, float | None]:
    """promptkit's best own search against DSPy's best run (held-out accuracy; ties: the faster)."""
    def best(keys: list[str]) -> str | None:
        ok = [k for k in keys if "accuracy" in runs[k]]
        return max(ok, key=lambda k: (runs[k]["accuracy"], -runs[k]["compile_seconds"])) if ok else None

    dspy_best = best([k for k in runs if k.split("@")[0] in DSPY_OPTIMIZERS])
    native = best([k for k in runs if k.endswith("@" + NATIVE) and not k.startswith("zero_shot")])
    if dspy_best is None or native is None:
        return {"met": None, "why": "a side has no completed run"}, None
    d, n = runs[dspy_best], runs[native]
    ratio = round(n["compile_seconds"] / max(1e-9, d["compile_seconds"]), 3)
    met = n["accuracy"] >= d["accuracy"] and ratio <= 0.2
    out = {"native": native, "dspy_best": dspy_best, "accuracy": [n["accuracy"], d["accuracy"]],
           "time_ratio": ratio, "met": met}
    if not met:
        out["missed_by"] = {"accuracy_points": round(max(0.0, 100 * (d["accuracy"] - n["accuracy"])), 1),
                            "time_ratio_over_one_fifth": round(ratio / 0.2, 2),
                            "where_the_time_went": {native: where(n), dspy_best: where(d)}}
    return out, ratio


def where(r: dict) -> dict:
    """Where a run's time went: its calls, seconds a call and the backend's counters."""
    return {"lm_calls": r["lm_calls"], "seconds_per_lm_call": r["seconds_per_lm_call"], **r["counters"]}


def table(runs: dict[str, dict]) -> None:
    """The runs as a table on stderr."""
    log(f"{'run':44} {'compile s':>10} {'eval s':>8} {'calls':>7} {'prefilled':>10} {'unparsed':>8}  "
        "held-out accuracy [95% CI]")
    for name, r in runs.items():
        if "error" in r:
            log(f"{name:44} failed after {r['seconds_before_failure']:.0f} s: {r['error'].splitlines()[0]}")
            continue
        lo, hi = r["accuracy_ci"]
        log(f"{name:44} {r['compile_seconds']:10.1f} {r['eval_seconds']:8.1f} {r['lm_calls']:7d} "
            f"{r['prefilled_tokens']:10d} {r.get('held_out_unparsed', 0):8d}  {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]")


# -- main -------------------------------------------------------------------------------------------------
def start_backends(pk: LM, args: argparse.Namespace, notes: list[str]) -> list[Backend]:
    backends: list[Backend] = []
    why = "--skip-llamacpp" if args.skip_llamacpp else llamacpp_unavailable()
    if why:
        notes.append(f"llamacpp_server not run: {why}")
        log(f"llama.cpp's server: not run ({why})")
    else:
        with stage("starting llama-cpp-python's server"):
            try:
                backends.append(LlamaCppServed(args.max_tokens, args.llama_threads, args.n_ctx))
            except Exception as e:  # it says why; the other backends still run
                notes.append(f"llamacpp_server did not start: {e}")
                log(f"llama.cpp's server did not start: {e}")
    backends.append(PromptkitServed(pk, args.max_tokens, max_workers=max(16, args.threads)))
    backends.append(PromptkitInProcess(pk, args.max_tokens))
    return backends


def run_all(pk: LM, split: Split, args: argparse.Namespace, notes: list[str]) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    backends = start_backends(pk, args, notes)
    try:
        for backend in backends:
            for name, fn in (("zero_shot", zero_shot), ("bootstrap_random_search", bootstrap_random_search),
                             ("mipro_v2_light", mipro_v2_light)):
                key = f"{name}@{backend.name}"
                with stage(key):
                    t0 = time.perf_counter()
                    try:
                        runs[key] = run_dspy(name, fn, backend, split, args)
                    except Exception as e:  # a run that crashes is a result too
                        runs[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                                     "seconds_before_failure": round(time.perf_counter() - t0, 1)}
                log(f"{key}: {runs[key]}")
    finally:
        for backend in backends:
            backend.close()
    budget = max([r.get("metric_calls", 0) for k, r in runs.items() if k.startswith("mipro_v2_light@")] or [0])
    for name in ("zero_shot", "joint_search", "reflective_search"):
        key = f"{name}@{NATIVE}"
        with stage(key):
            runs[key] = run_native(name, pk, split, args, budget)
        log(f"{key}: {runs[key]}")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test (a few minutes): 6 train / 4 validation / 6 held-out items, tiny searches; "
                         "its accuracies say nothing")
    ap.add_argument("--n-train", type=int, help="train pool (6 quick, 500 full)")
    ap.add_argument("--n-val", type=int, help="validation items (4 quick, 150 full)")
    ap.add_argument("--n-test", type=int, help="held-out items (6 quick, 300 full)")
    ap.add_argument("--threads", type=int, default=8, help="DSPy's num_threads, for every backend")
    ap.add_argument("--max-tokens", type=int, help="DSPy's max_tokens per call, every backend (32 quick, 128 full)")
    ap.add_argument("--llama-threads", type=int, default=2, help="llama.cpp's --n_threads")
    ap.add_argument("--n-ctx", type=int, default=8192, help="llama.cpp's context")
    ap.add_argument("--skip-llamacpp", action="store_true", help="do not start llama.cpp's server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="keep DSPy's own log (every reply it cannot parse)")
    args = ap.parse_args()
    sizes = (6, 4, 6) if args.quick else (500, 150, 300)
    args.n_train, args.n_val, args.n_test = (a or b for a, b in zip((args.n_train, args.n_val, args.n_test), sizes))
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    if args.quick:
        log("--quick: a smoke test of the script on small sizes; its accuracies and ratios are not results")

    import dspy

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)  # every call reaches the model
    if not args.verbose:  # DSPy logs every reply it cannot parse; the table counts them
        logging.getLogger("dspy").setLevel(logging.CRITICAL)
    split = load_split(args.n_train, args.n_val, args.n_test, args.seed)
    log(f"TREC: {len(split.train)} train pool / {len(split.val)} validation / {len(split.test)} held-out, "
        f"labels {split.labels}")
    pk = get_lm()  # load once, before the timings
    notes: list[str] = ["llama-cpp-python's server serializes requests (no parallel slots); DSPy's threads queue",
                        ("llamacpp_server is declared to DSPy with vLLM's dialect so that max_tokens reaches it "
                         "(the openai/ route sends max_completion_tokens, which it ignores)")]
    runs = run_all(pk, split, args, notes)
    table(runs)
    speedup, ratio, goal = goals(runs)
    log(f"speedup of DSPy's optimizers on promptkit over llama.cpp's server: {speedup}; "
        f"promptkit's search time / DSPy's best run's: {ratio}")
    emit({"benchmark": "vs_dspy", "quick": args.quick, "model": DEFAULT_LLM, "weights": pk.stats().get("weights"),
          "machine": machine(), "seed": args.seed, "threads": args.threads, "max_tokens": args.max_tokens,
          "sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
          "notes": notes, "runs": runs, "goals": goal,
          "speedup_promptkit_vs_llamacpp_server": speedup, "native_vs_dspy_time_ratio": ratio})


if __name__ == "__main__":
    main()
