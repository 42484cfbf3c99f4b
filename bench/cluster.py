"""Scale-out on a local Ray cluster: prefix-affinity placement against round-robin, equality with a
local run, a worker killed mid-run, and server replicas behind a prefix-aware router.

On this machine, a Ray cluster of ``--workers`` engine actors of one torch thread each:

* search: the JointSearch of bench/optimizers.py on one label set (TREC by default), its candidate
  evaluations on the workers with prefix affinity and with round-robin placement of the same tasks,
  and in this process (the local run whose scores every other run must equal, item for item);
* rag: BM25 over SQuAD v1.1 dev paragraphs, a system prompt, and generation, on the first
  questions of the dev file (several per paragraph, as users ask about the same documents);
* each also with one worker killed (SIGKILL) halfway: items lost and tasks retried;
* serve: the serve_load workload (its system prompt and requests, each paragraph asked
  ``--repeats`` times by concurrent clients) against 2 engine replicas behind Ray Serve, with the
  prefix-aware router and with random routing: prompt tokens served from cache, p50/p99 latency.
  ``--serve-kv`` bounds each replica's KV memory (``auto``: the workload's prompts need 1.5x one
  replica's; ``default``: the engine's 2 GiB, which holds them all);
* model: per-task costs and the cost of moving a task, measured, projected to 8 and 64 workers
  (a model, not a measurement: two cores cannot show scaling).

Data: ``$PROMPTKIT_DATA`` (TREC, SQuAD); load_qa (serve) ships with the gensim wheel.

    python bench/cluster.py [--quick] [--set trec] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_DATA = os.path.join(_HERE, "..", "..", "shared", "data")
os.environ.setdefault("PROMPTKIT_WEIGHTS", "float32")  # exact: results equal however batches are cut
os.environ.setdefault("PROMPTKIT_COMPILE_DECODE", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.path.isdir(_DATA):
    os.environ.setdefault("PROMPTKIT_DATA", os.path.abspath(_DATA))

# This folder holds optimizers.py, which would shadow the optimizers package: import the package first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
from optimizers import JointSearch  # noqa: E402

sys.path.insert(0, _HERE)
import numpy as np  # noqa: E402
from _common import emit, log, machine, stage  # noqa: E402

from promptkit import get_lm  # noqa: E402
from promptkit.distributed import RayExecutor  # noqa: E402
from promptkit.distributed.projection import fit_costs, project  # noqa: E402
from promptkit.evaluate import evaluate  # noqa: E402
from promptkit.pipeline import Pipeline  # noqa: E402
from promptkit.stages import BuildPrompt, Generate  # noqa: E402
from promptkit.types import Example  # noqa: E402

RAG_SYSTEM = ("You answer questions about encyclopedia articles. Use only the context you are given. "
              "Reply with the shortest span of the context that answers the question: a name, a number, "
              "a date or a short phrase, with no explanation.")
RAG_INSTRUCTION = "Answer the question with a short span copied from the context."
PROJECT_TO = (8, 64)


# -- faults ----------------------------------------------------------------------------------------
class KillHalfway:
    """Kills one worker (SIGKILL) once half of ``total`` items, over all of an executor's runs, are done
    and it is running a task."""

    def __init__(self, ex: RayExecutor, total: int, victim: int = 1) -> None:
        self.ex, self.total, self.victim = ex, total, victim
        self.runs_before = len(ex.reports)
        self.killed: int | None = None

    def __call__(self, snap) -> None:
        done = sum(r.done for r in self.ex.reports[self.runs_before:-1]) + snap.done
        if self.killed is None and done >= self.total / 2 and snap.pids[self.victim] and snap.in_flight[self.victim]:
            self.killed = snap.pids[self.victim]
            os.kill(self.killed, signal.SIGKILL)
            log(f"  killed worker {self.victim} (pid {self.killed}) at {done}/{self.total} items")


def fault_totals(reports) -> dict:
    return {"lost": sum(r.lost for r in reports), "retries": sum(r.retries for r in reports),
            "moved": sum(r.moved for r in reports), "restarts": sum(r.restarts for r in reports),
            "items": sum(r.items for r in reports)}


# -- the search ----------------------------------------------------------------------------------
def load_search(args):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_optimizers", os.path.join(_HERE, "optimizers.py"))
    bo = importlib.util.module_from_spec(spec)
    sys.modules["bench_optimizers"] = bo
    spec.loader.exec_module(bo)
    train, val, _, labels = bo.load(args.set, args.n_train, args.n_val, 0, args.seed)
    base = bo.zero_shot(args.set, labels, bo.DEFAULT_LLM, "local", None)
    search = bo.optimizers(args.quick, args.seed, len(val))["joint_search"]
    return train, val, base, search


def compile_with(search: JointSearch, executor, base, train, val):
    opt = search.model_copy(update={"executor": executor})
    return opt.compile(base, train, "accuracy", valset=val)


def candidates_of(report) -> list:
    return [(c.name, c.indices, c.scores) for c in report.candidates]


def run_search(args, ex: RayExecutor) -> tuple[dict, list]:
    train, val, base, search = load_search(args)
    log(f"search: JointSearch on {args.set}, {len(train)} train / {len(val)} validation")
    from promptkit.embed import get_embedder

    get_lm(), get_embedder().encode(["warm"])  # the driver's models, loaded before the clocks
    with stage("search: local (this process, one thread)"):
        _, local = compile_with(search, None, base, train, val)
    ex.warm(base.stages)
    runs, out = {}, {}
    for placement in ("affinity", "round_robin"):
        ex.placement = placement
        ex.clear_caches()
        first, first_items = len(ex.reports), len(ex.item_log)
        with stage(f"search: {placement} on {ex.workers} workers"):
            _, rep = compile_with(search, ex, base, train, val)
        runs[placement] = (rep, ex.reports[first:], ex.item_log[first_items:])
    ex.placement = "affinity"
    ex.clear_caches()
    expected = sum(r.items for r in runs["affinity"][1])
    killer = KillHalfway(ex, expected)
    ex.on_progress = killer
    first = len(ex.reports)
    with stage("search: affinity with a worker killed halfway"):
        _, faulty = compile_with(search, ex, base, train, val)
    ex.on_progress = None
    fault = fault_totals(ex.reports[first:])
    aff, rr = runs["affinity"], runs["round_robin"]
    want = candidates_of(local)
    out = {
        "set": args.set, "n_train": len(train), "n_val": len(val), "candidates": len(local.candidates),
        "best": local.best.get("name"), "best_score": round(local.best_score, 4),
        "items": sum(r.items for r in aff[1]), "lm_calls": local.lm_calls,
        "prefilled_tokens_affinity": sum(r.tokens_prefilled for r in aff[1]),
        "prefilled_tokens_round_robin": sum(r.tokens_prefilled for r in rr[1]),
        "prefilled_tokens_local": local.tokens_prefilled, "prompt_tokens_requested": local.tokens_requested,
        "seconds_affinity": round(aff[0].seconds, 2), "seconds_round_robin": round(rr[0].seconds, 2),
        "seconds_local": round(local.seconds, 2),
        "items_per_second_affinity": _rate(aff[1], aff[0].seconds),
        "items_per_second_round_robin": _rate(rr[1], rr[0].seconds),
        "items_per_second_local": round(sum(r.items for r in aff[1]) / local.seconds, 3),
        "equal_to_local": candidates_of(aff[0]) == want and candidates_of(rr[0]) == want,
        "equal_to_local_after_fault": candidates_of(faulty) == want,
        "killed_pid": killer.killed, **fault,
        "prefixes_on_one_worker": _on_one_worker(aff[1]),
    }
    out["prefill_ratio_affinity_vs_round_robin"] = round(out["prefilled_tokens_affinity"]
                                                         / max(1, out["prefilled_tokens_round_robin"]), 4)
    driver = aff[0].seconds - sum(r.seconds for r in aff[1])
    return out, [list(zip(aff[2], aff[1])), driver]


def _rate(reports, seconds: float) -> float:
    return round(sum(r.items for r in reports) / seconds, 3) if seconds else 0.0


def _on_one_worker(reports) -> float:
    """Share of unit heads (the prompt before its question) that ran on a single worker."""
    heads: dict[str, set[int]] = {}
    for r in reports:
        for k, ws in r.prefix_workers.items():
            heads.setdefault(k, set()).update(ws)
    return round(sum(len(v) == 1 for v in heads.values()) / max(1, len(heads)), 4)


# -- the RAG evaluation ----------------------------------------------------------------------------
def squad_set(n: int, workdir: Path) -> tuple[list[Example], Path]:
    """The first ``n`` dev questions in file order (paragraph by paragraph) and, as the corpus, every
    dev paragraph of their articles, written as JSONL."""
    from evaldata import load_squad_dev

    paras = load_squad_dev()
    examples: list[Example] = []
    titles: set[str] = set()
    for p in paras:
        for qa in p["qas"]:
            if len(examples) < n:
                examples.append(Example(question=qa["question"], answers=list(dict.fromkeys(qa["answers"])),
                                        output_key="answers"))
                titles.add(p["title"])
    corpus = workdir / "squad_corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, p in enumerate(paras):
            if p["title"] in titles:
                f.write(json.dumps({"id": f"p{i}", "text": p["context"], "title": p["title"]}) + "\n")
    return examples, corpus


def rag_pipeline(corpus: Path, k: int) -> Pipeline:
    from retrievers.stages import BM25Stage

    return Pipeline(BM25Stage(corpus=str(corpus), k=k),
                    BuildPrompt(system=RAG_SYSTEM, instruction=RAG_INSTRUCTION, answer_prefix="Answer:"),
                    Generate(max_tokens=16, stop=["\n"]))


def outputs_of(result) -> list:
    return [(r.prediction, r.score) for r in result.results]


def run_rag(args, ex: RayExecutor, workdir: Path) -> tuple[dict, list]:
    examples, corpus = squad_set(args.rag, workdir)
    pipe = rag_pipeline(corpus, args.k)
    pipe.stages[0].retriever()  # index before any clock starts
    log(f"rag: {len(examples)} SQuAD dev questions, BM25 top-{args.k} of {corpus.stat().st_size // 1024} KiB")
    with stage("rag: local (this process, one thread)"):
        local = evaluate(pipe, examples, "f1", output_key="answers")
    runs = {}
    for placement in ("affinity", "round_robin"):
        ex.placement = placement
        ex.clear_caches()
        with stage(f"rag: {placement} on {ex.workers} workers"):
            res = evaluate(pipe, examples, "f1", output_key="answers", executor=ex)
        runs[placement] = (res, ex.last_report, ex.item_log[-1])
    ex.placement = "affinity"
    ex.clear_caches()
    killer = KillHalfway(ex, len(examples))
    ex.on_progress = killer
    with stage("rag: affinity with a worker killed halfway"):
        faulty = evaluate(pipe, examples, "f1", output_key="answers", executor=ex)
    ex.on_progress = None
    aff, rr = runs["affinity"][1], runs["round_robin"][1]
    want = outputs_of(local)
    out = {
        "questions": len(examples), "k": args.k, "f1": round(local.score, 4),
        "items": aff.items, "prefilled_tokens_affinity": aff.tokens_prefilled,
        "prefilled_tokens_round_robin": rr.tokens_prefilled,
        "prompt_tokens_requested": aff.tokens_requested,
        "prefill_ratio_affinity_vs_round_robin": round(aff.tokens_prefilled / max(1, rr.tokens_prefilled), 4),
        "seconds_affinity": round(aff.seconds, 2), "seconds_round_robin": round(rr.seconds, 2),
        "seconds_local": round(local.seconds, 2),
        "items_per_second_affinity": round(aff.items_per_second, 3),
        "items_per_second_round_robin": round(rr.items_per_second, 3),
        "items_per_second_local": round(len(examples) / local.seconds, 3),
        "prepare_seconds": round(aff.prepare_seconds, 2),
        "equal_to_local": outputs_of(runs["affinity"][0]) == want and outputs_of(runs["round_robin"][0]) == want,
        "equal_to_local_after_fault": outputs_of(faulty) == want,
        "killed_pid": killer.killed, **fault_totals([ex.last_report]),
        "prefixes_on_one_worker": _on_one_worker([aff]),
    }
    driver = aff.prepare_seconds + aff.plan_seconds
    return out, [[(runs["affinity"][2], aff)], driver]


# -- serving ---------------------------------------------------------------------------------------
def serve_requests(distinct: int, repeats: int, seed: int) -> list[dict]:
    """serve_load's items, each paragraph asked ``repeats`` times, in a seeded random order."""
    from evaldata import load_qa

    items = load_qa(n=distinct, seed=seed)
    reqs = [it for it in items for _ in range(repeats)]
    random.Random(seed).shuffle(reqs)
    return reqs


def chat_body(item: dict, max_tokens: int) -> dict:
    from serve_load import SYSTEM

    return {"model": "smollm2-135m-instruct", "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Paragraph: {item['context']}\nQuestion: {item['question']}"}]}


def fire(url: str, reqs: list[dict], clients: int, max_tokens: int) -> dict:
    import httpx

    rows: list[tuple[int, float, int, int]] = []

    def client(share: list[dict]) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            for item in share:
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/chat/completions", json=chat_body(item, max_tokens))
                    usage = r.json().get("usage", {}) if r.status_code == 200 else {}
                    status = r.status_code
                except httpx.HTTPError:
                    usage, status = {}, -1
                rows.append((status, (time.perf_counter() - t0) * 1000, usage.get("prompt_tokens", 0),
                             (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [reqs[i::clients] for i in range(clients)]))
    wall = time.perf_counter() - t0
    ok = [r for r in rows if r[0] == 200]
    lat = [r[1] for r in ok]
    prompt, cached = sum(r[2] for r in ok), sum(r[3] for r in ok)
    return {"requests": len(reqs), "ok": len(ok), "lost": len(reqs) - len(rows) + sum(r[0] == -1 for r in rows),
            "rejected": sum(r[0] not in (200, -1) for r in rows), "cache_hit_rate": round(cached / max(1, prompt), 4),
            "prompt_tokens": prompt, "cached_tokens": cached, "rps": round(len(ok) / wall, 3),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None, "seconds": round(wall, 2)}


def kv_bound(reqs: list[dict], max_tokens: int, clients: int, share: float) -> tuple[int, int]:
    """Bytes of KV per replica for which the workload's distinct prompts need ``1/share`` of one replica's
    memory (with room for the requests in flight), and the distinct prompts' tokens."""
    lm = get_lm()
    distinct = {json.dumps(chat_body(r, max_tokens)["messages"]): r for r in reqs}
    tokens = sum(lm.count_tokens(lm.render(_prompt(json.loads(m)))) for m in distinct)
    per_token = lm.backend.engine.pool.bytes_per_token
    longest = max(lm.count_tokens(lm.render(_prompt(json.loads(m)))) for m in distinct)
    in_flight = clients * (longest + max_tokens)
    return int((tokens * share + in_flight) * per_token), tokens


def _prompt(messages: list[dict]):
    from promptkit.types import Prompt

    return Prompt.from_parts(system=messages[0]["content"], question=messages[1]["content"])


def run_serve(args) -> dict:
    from ray import serve

    from promptkit.distributed.serve import build_app

    reqs = serve_requests(args.distinct, args.repeats, args.seed)
    lm_options: dict = {}
    working = None
    if args.serve_kv == "auto":
        kv, working = kv_bound(reqs, args.max_tokens, args.clients, 1 / 1.5)
        lm_options["max_kv_bytes"] = kv
    log(f"serve: {len(reqs)} requests ({args.distinct} paragraphs x {args.repeats}) from {args.clients} clients, "
        f"2 replicas" + (f", {lm_options['max_kv_bytes'] / 2**20:.0f} MiB of KV each (the distinct prompts: "
                         f"{working:,} tokens)" if working else ""))
    out: dict = {"requests": len(reqs), "distinct_paragraphs": args.distinct, "repeats": args.repeats,
                 "clients": args.clients, "replicas": 2, "kv_bytes_per_replica": lm_options.get("max_kv_bytes"),
                 "distinct_prompt_tokens": working}
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    try:
        for router in ("prefix", "random"):
            name = f"promptkit-{router}"
            serve.run(build_app(replicas=2, router=router, max_queue=256, lm_options=lm_options), name=name,
                      route_prefix="/")
            warm = [{"context": "Warm-up.", "question": "Ready?"}]
            fire(url, warm * 2, 2, 2)
            with stage(f"serve: {router} router"):
                res = fire(url, reqs, args.clients, args.max_tokens)
            log(f"  {router}: cache hit rate {res['cache_hit_rate']:.3f}, p50 {res['p50_ms']} ms, "
                f"p99 {res['p99_ms']} ms, {res['ok']}/{res['requests']} ok")
            out[router] = res
            serve.delete(name)
    finally:
        serve.shutdown()
    p, r = out["prefix"], out["random"]
    out.update(cache_hit_rate_prefix_router=p["cache_hit_rate"], cache_hit_rate_random=r["cache_hit_rate"],
               hit_rate_ratio=round(p["cache_hit_rate"] / max(1e-9, r["cache_hit_rate"]), 3),
               p50_ms=p["p50_ms"], p99_ms=p["p99_ms"], p50_ms_random=r["p50_ms"], p99_ms_random=r["p99_ms"])
    return out


# -- the model -------------------------------------------------------------------------------------
def projection(name: str, runs, driver_seconds: float, measured: int) -> dict:
    costs = fit_costs([rep for _, rep in runs])
    rows = project(runs, driver_seconds, [measured, *PROJECT_TO], costs)
    table = {f"{p.placement}_{p.workers}": {"seconds": p.seconds, "items_per_second": p.items_per_second,
                                            "prefilled_tokens": p.prefilled_tokens} for p in rows}
    return {"model": True, "costs": costs.model_dump(), "driver_seconds": round(driver_seconds, 3), **table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    ap.add_argument("--set", default="trec", help="label set of the search (bbc, mr, snips, trec)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, help="train pool of the search (24 quick, 200 full)")
    ap.add_argument("--n-val", type=int, help="validation set of the search (16 quick, 48 full)")
    ap.add_argument("--rag", type=int, help="SQuAD questions (40 quick, 200 full)")
    ap.add_argument("--k", type=int, default=2, help="paragraphs retrieved per question")
    ap.add_argument("--distinct", type=int, help="serve: distinct paragraphs (8 quick, 80 full)")
    ap.add_argument("--repeats", type=int, default=3, help="serve: requests per paragraph")
    ap.add_argument("--clients", type=int, help="serve: concurrent clients (4 quick, 8 full)")
    ap.add_argument("--max-tokens", type=int, default=8, help="serve: tokens generated per request")
    ap.add_argument("--serve-kv", choices=["auto", "default"], default="auto")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: search, rag, serve")
    args = ap.parse_args()
    q = args.quick
    args.n_train = args.n_train or (24 if q else 200)
    args.n_val = args.n_val or (16 if q else 48)
    args.rag = args.rag or (40 if q else 200)
    args.distinct = args.distinct or (8 if q else 80)
    args.clients = args.clients or (4 if q else 8)
    skip = set(filter(None, args.skip.split(",")))

    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    result: dict = {"benchmark": "cluster", "quick": q, "workers": args.workers, "threads_per_worker": 1}
    models: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ex = RayExecutor(workers=args.workers, threads=1, keep_items=True)
        ex.start()
        try:
            if "search" not in skip:
                result["search"], (runs, driver) = run_search(args, ex)
                models["search"] = projection("search", runs, driver, args.workers)
            if "rag" not in skip:
                result["rag"], (runs, driver) = run_rag(args, ex, Path(tmp))
                models["rag"] = projection("rag", runs, driver, args.workers)
        finally:
            ex.close()
    if "serve" not in skip:
        result["serve"] = run_serve(args)
    result["projection"] = models
    result["machine"] = machine()
    ray.shutdown()
    emit(result)


if __name__ == "__main__":
    main()
