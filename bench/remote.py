"""The same pipelines on the local engine, on ``promptkit serve`` and on llama.cpp's server.

Two pipelines, each run unchanged on three backends:

* RAG: SQuAD v1.1 dev questions (a seeded sample); BM25 (stemmed English) retrieves the top
  ``--k`` paragraphs for each from every dev paragraph of the articles those questions come
  from; the prompt holds the paragraphs, the question and ``Answer:``; greedy answers up to 24
  tokens, cut at a newline. Token F1 and exact match against the human answers.
* Classifier: SST-2 test sentences, labels ``negative``/``positive`` scored after
  ``Sentiment:`` (contextual calibration on, the default). Accuracy.

Backends: the local engine (``LM()``, its default weights); ``promptkit serve`` started
in-process on another ``LM()`` (``BackgroundServer(create_app(lm))``), reached through
``backend="openai"``; and llama-cpp-python's OpenAI server on the embedded model's own GGUF,
started by this script on loopback (skipped, with the reason, when ``llama-cpp-python[server]``
is not installed). For the served backends the chat template is applied on this side (the
tokenizer of the embedded model) and text goes to ``/v1/completions``, so every backend sees the
same prompt. Each figure has its 95 % bootstrap interval; seconds are wall time for the whole
batch, after one untimed warm-up generation per backend (the 1-minute load average at the start and
end is reported beside them, as the machine may be shared); ``cached_tokens`` are the prompt tokens the backend reports served from its prefix cache
(``usage.prompt_tokens_details.cached_tokens`` over HTTP; llama-cpp-python reports none).

    python bench/remote.py            # 40 questions, 200 sentences
    python bench/remote.py --quick    # 8 questions, 32 sentences: a couple of minutes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts bench/ on sys.path)
from _common import emit, log, machine, stage

from promptkit import LM
from promptkit.backends.remote.llamacpp_server import LlamaCppServer, unavailable_reason
from promptkit.models import DEFAULT_LLM, gguf_source
from promptkit.lm import _shared
from promptkit.metrics import bootstrap_ci, exact_match, token_f1
from promptkit.pipeline import Pipeline
from promptkit.server import BackgroundServer, create_app
from promptkit.stages import BuildPrompt, Classify, Generate

RAG_INSTRUCTION = "Answer the question with a short span copied from the context."
CLASSIFY_INSTRUCTION = "Is the sentiment of this movie review negative or positive?"
LABELS = ["negative", "positive"]


# -- data ------------------------------------------------------------------------------------------
def squad_questions(n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``n`` sampled dev questions and, as the corpus, every dev paragraph of their articles."""
    from evaldata import load_squad, load_squad_dev

    questions = load_squad(n=n, seed=seed)
    titles = {q["title"] for q in questions}
    corpus = [{"id": f"p{i}", "text": p["context"], "title": p["title"]}
              for i, p in enumerate(load_squad_dev()) if p["title"] in titles]
    return questions, corpus


def sst2_items(n: int) -> list[dict[str, str]]:
    """The first ``n`` SST-2 test sentences (official file order)."""
    from evaldata import load_sst2

    return load_sst2()[1][:n]


# -- pipelines -------------------------------------------------------------------------------------
def rag_pipeline(corpus_path: Path, k: int, backend: str) -> Pipeline:
    from retrievers.stages import BM25Stage

    return Pipeline(BM25Stage(corpus=str(corpus_path), k=k),
                    BuildPrompt(instruction=RAG_INSTRUCTION, answer_prefix="Answer:"),
                    Generate(max_tokens=24, stop=["\n"], backend=backend))


def classifier(backend: str) -> Pipeline:
    return Pipeline(BuildPrompt(instruction=CLASSIFY_INSTRUCTION, input_format="Review: {text}",
                                answer_prefix="Sentiment:"),
                    Classify(labels=LABELS, backend=backend))


@contextmanager
def serving(lm: LM, backend: str) -> Iterator[None]:
    """Make the stages' shared LM for (the embedded model, ``backend``) this one while the block runs."""
    key = (DEFAULT_LLM, backend, "{}")
    _shared[key] = lm
    try:
        yield
    finally:
        _shared.pop(key, None)


def interval(scores: list[float]) -> dict[str, Any]:
    lo, hi = bootstrap_ci(scores)
    return {"mean": round(sum(scores) / len(scores), 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(scores)}


def cached(records: list[Any]) -> int:
    return sum(r.usage.cached_tokens for r in records if r.usage is not None)


def run_rag(lm: LM, backend: str, questions: list[dict[str, Any]], corpus_path: Path, k: int) -> dict[str, Any]:
    pipe = rag_pipeline(corpus_path, k, backend)
    pipe.stages[0].retriever()  # index before the clock starts
    with serving(lm, backend):
        t0 = time.perf_counter()
        records = pipe.run([{"question": q["question"]} for q in questions])
        seconds = time.perf_counter() - t0
    answers = [str(r.output).strip() for r in records]
    return {"f1": interval([token_f1(a, q["answers"]) for a, q in zip(answers, questions)]),
            "exact_match": interval([exact_match(a, q["answers"]) for a, q in zip(answers, questions)]),
            "seconds": round(seconds, 2), "prompt_tokens": sum(r.usage.prompt_tokens for r in records if r.usage),
            "cached_tokens": cached(records), "answers": answers}


def run_classifier(lm: LM, backend: str, items: list[dict[str, str]]) -> dict[str, Any]:
    pipe = classifier(backend)
    with serving(lm, backend):
        t0 = time.perf_counter()
        records = pipe.run([{"text": x["text"]} for x in items])
        seconds = time.perf_counter() - t0
    labels = [r.output for r in records]
    return {"accuracy": interval([float(p == x["label"]) for p, x in zip(labels, items)]),
            "seconds": round(seconds, 2), "cached_tokens": cached(records), "labels": labels}


def warm_up(lm: LM, corpus_path: Path) -> None:
    """One generation on a prompt as long as the RAG prompts (outside the clock): first-call costs
    such as preparing prefill weights or compiling kernels are not the pipeline's."""
    paragraphs = [json.loads(line)["text"] for line in corpus_path.read_text().splitlines()[-2:]]
    lm.generate("\n\n".join(paragraphs) + "\n\nWhat is this about?", max_tokens=2)


def run_system(name: str, lm: LM, backend: str, questions: list[dict[str, Any]], corpus_path: Path, k: int,
               items: list[dict[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with stage(f"{name}: warming up (one RAG-sized generation, not timed)"):
        warm_up(lm, corpus_path)
    with stage(f"{name}: RAG, {len(questions)} questions"):
        out["rag"] = run_rag(lm, backend, questions, corpus_path, k)
    with stage(f"{name}: classifier, {len(items)} sentences"):
        out["classify"] = run_classifier(lm, backend, items)
    stats = lm.stats()
    if backend == "openai":
        out["server"] = {k: stats.get(k) for k in ("server_kind", "server_version", "http_requests",
                                                    "cached_tokens_reported")}
    log(f"{name}: F1 {out['rag']['f1']['mean']:.3f} {out['rag']['f1']['ci95']} in {out['rag']['seconds']}s, "
        f"accuracy {out['classify']['accuracy']['mean']:.3f} {out['classify']['accuracy']['ci95']} in "
        f"{out['classify']['seconds']}s; cached tokens {out['rag']['cached_tokens']} + "
        f"{out['classify']['cached_tokens']}")
    return out


def agreement(systems: dict[str, Any], reference: str = "local") -> dict[str, Any]:
    """How often each backend gives the reference backend's answer (RAG) and label (classifier)."""
    ref = systems[reference]
    out = {}
    for name, res in systems.items():
        if name == reference or "rag" not in res:
            continue
        same_answer = [float(a == b) for a, b in zip(res["rag"]["answers"], ref["rag"]["answers"])]
        same_label = [float(a == b) for a, b in zip(res["classify"]["labels"], ref["classify"]["labels"])]
        out[name] = {"same_answer": interval(same_answer), "same_label": interval(same_label)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 questions and 32 sentences")
    ap.add_argument("--questions", type=int, help="SQuAD questions (default 40; 8 with --quick)")
    ap.add_argument("--sentences", type=int, help="SST-2 sentences (default 200; 32 with --quick)")
    ap.add_argument("--k", type=int, default=2, help="paragraphs retrieved per question")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="llama.cpp threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_questions = args.questions or (8 if args.quick else 40)
    n_items = args.sentences or (32 if args.quick else 200)

    load_at_start = round(os.getloadavg()[0], 2)  # timings on a shared machine depend on it
    result: dict[str, Any] = {"bench": "remote", "machine": machine(), "args": vars(args),
                              "data": {"rag": f"SQuAD v1.1 dev: {n_questions} questions (seed {args.seed}); BM25 top "
                                              f"{args.k} over every dev paragraph of their articles",
                                       "classify": f"SST-2 test: the first {n_items} sentences"}}
    with stage("data"):
        questions, corpus = squad_questions(n_questions, args.seed)
        items = sst2_items(n_items)
        tmp = tempfile.TemporaryDirectory()
        corpus_path = Path(tmp.name) / "squad_paragraphs.jsonl"
        corpus_path.write_text("".join(json.dumps(p) + "\n" for p in corpus))
        result["data"]["corpus_paragraphs"] = len(corpus)

    systems: dict[str, Any] = {}
    with stage("local engine: loading"):
        local = LM()
    result["weights"] = local.stats().get("weights")
    systems["local"] = run_system("local", local, "local", questions, corpus_path, args.k, items)

    with stage("promptkit serve: starting in-process on another LM()"):
        served = LM()
        server = BackgroundServer(create_app(served)).__enter__()
    try:
        remote = LM(DEFAULT_LLM, backend="openai", base_url=server.url + "/v1")
        systems["promptkit_serve"] = run_system("promptkit serve", remote, "openai", questions, corpus_path, args.k,
                                                items)
    finally:
        server.__exit__(None, None, None)

    why = unavailable_reason() or (None if gguf_source(DEFAULT_LLM) else "the embedded GGUF is not installed")
    if why:
        log(f"llama.cpp's server skipped: {why}")
        systems["llama_cpp"] = {"skipped": why}
    else:
        with stage("llama.cpp's server (llama-cpp-python): starting"):
            llama = LlamaCppServer(gguf_source(DEFAULT_LLM), alias=DEFAULT_LLM, n_ctx=2048, threads=args.threads)
            llama.__enter__()
        try:
            remote = LM(DEFAULT_LLM, backend="openai", base_url=llama.url + "/v1")
            systems["llama_cpp"] = run_system("llama.cpp", remote, "openai", questions, corpus_path, args.k, items)
            systems["llama_cpp"]["server_note"] = (f"llama-cpp-python, {args.threads} threads, n_ctx 2048, "
                                                   f"llama.cpp extra buffers {'on' if llama.extra_buffers else 'off'}")
        finally:
            llama.__exit__()

    result["agreement_with_local"] = agreement(systems)
    result["load_average_1min"] = {"start": load_at_start, "end": round(os.getloadavg()[0], 2)}
    for res in systems.values():  # per-item outputs served their purpose (agreement); keep the line short
        for task, key in (("rag", "answers"), ("classify", "labels")):
            if task in res:
                res[task]["examples"] = res[task].pop(key)[:3]
    result["systems"] = systems
    tmp.cleanup()
    emit(result)


if __name__ == "__main__":
    main()
