"""MLflow tracking and tracing against a real tracking server on loopback (one per module), read back
through MLflow's client: an evaluation run from `promptkit eval --mlflow`, with one trace per item and one
span per stage, and an optimizer search as a parent run with a child run per candidate."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from shared_data import missing_data

mlflow = pytest.importorskip("mlflow", reason="MLflow tracking needs the mlflow extra: pip install -e '.[mlflow]'")

from optimizers import Racing, RandomFewShot  # noqa: E402
from promptkit.evaluate import evaluate  # noqa: E402
from promptkit.pipeline import Pipeline  # noqa: E402
from promptkit.runs import MlflowTracker, load_run  # noqa: E402
from promptkit.stages import BuildPrompt, Classify  # noqa: E402
from promptkit.types import Example  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "cookbook" / "rag_qa" / "docs"
QUESTIONS = [("Who invented the Fresnel lens?", ["Augustin-Jean Fresnel"]),
             ("How tall is Olympus Mons?", ["about 22 kilometres", "22 kilometres"]),
             ("What plant is tea made from?", ["Camellia sinensis"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on loopback with a SQLite store and local artifacts; its tracking URI."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
           "--default-artifact-root", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(uri, proc, tmp / "server.log")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def wait_until_up(uri: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not up after {timeout} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def sst2():
    """A train pool, 8 validation and 8 held-out SST-2 sentences, and the two labels."""
    import importlib.util

    os.environ.setdefault("PROMPTKIT_DATA", str(ROOT.parent / "shared" / "data"))
    spec = importlib.util.spec_from_file_location("promptkit_bench_datasets", ROOT / "bench" / "evaldata.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    try:
        train, test, labels, _ = data.load_classification(name="sst2")
    except FileNotFoundError as e:
        missing_data(e)
    ex = lambda r: Example(text=r["text"], label=r["label"], output_key="label")  # noqa: E731
    return [ex(r) for r in train[8:48]], [ex(r) for r in train[:8]], [ex(r) for r in test[:8]], labels


def sentiment(labels: list[str]) -> Pipeline:
    return Pipeline(BuildPrompt(instruction="Is the sentiment of this movie review positive or negative?",
                                input_format="Review: {text}", output_format="Sentiment: {label}",
                                answer_prefix="Sentiment:"), Classify(labels=labels), name="sst2")


def rag_recipe(path: Path) -> Path:
    """Retrieve (BM25), build the prompt, compress its context, generate: one span of each kind."""
    import yaml

    path.write_text(yaml.safe_dump({"name": "rag-qa", "input_key": "question", "stages": [
        {"stage": "bm25", "corpus": str(DOCS), "k": 2},
        {"stage": "prompt", "system": "You answer questions using only the given context.",
         "instruction": "Use the context to answer the question in a few words.",
         "input_format": "Question: {question}", "answer_prefix": "Answer:"},
        {"stage": "compress", "method": "extractive", "rate": 0.5},
        {"stage": "generate", "max_tokens": 10}]}))
    return path


def client(uri: str):
    return mlflow.MlflowClient(uri)


def test_eval_command_logs_a_run_with_a_trace_per_item(server, real_lm, tmp_path):
    pytest.importorskip("retrievers.stages", reason="the rag pipeline needs the retrievers package")
    pytest.importorskip("compressors.stages", reason="the rag pipeline needs the compressors package")
    from typer.testing import CliRunner

    from promptkit.cli import app

    recipe = rag_recipe(tmp_path / "rag.yaml")
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS))
    res = CliRunner().invoke(app, ["eval", str(recipe), str(data), "--metric", "f1", "--results",
                                   str(tmp_path / "run.json"), "--json", "--mlflow", server])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # MLflow printed nothing onto the JSON output
    run_file = load_run(tmp_path / "run.json")
    ref = run_file.mlflow
    assert ref is not None and ref.tracking_uri == server
    run = client(server).get_run(ref.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["model"] == real_lm.model and params["weights"] == "float32" and params["backend"] == "local"
    assert params["metric"] == "f1" and params["stages"] == "bm25 > prompt > compress > generate"
    assert "engine.max_kv_bytes" in params and "engine.prefix_cache" in params
    assert metrics["f1"] == pytest.approx(summary["score"])
    assert metrics["f1_ci_low"] <= metrics["f1"] <= metrics["f1_ci_high"]
    assert metrics["tokens_prefilled"] > 0 and metrics["tokens_requested"] >= metrics["tokens_prefilled"]
    assert "tokens_cached" in metrics and metrics["seconds"] > 0 and metrics["n"] == 3
    artifacts = {a.path for a in client(server).list_artifacts(ref.run_id)}
    assert {"rag.yaml", "results.json", "promptkit_run.json"} <= artifacts  # the recipe file itself

    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path="results.json",
                                                                dst_path=str(tmp_path / "dl"))).read_text())
    assert "question" in table["columns"] and "answer_rank" in table["columns"] and len(table["data"]) == 3

    traces = client(server).search_traces(locations=[ref.experiment_id], run_id=ref.run_id, flush=True)
    assert len(traces) == 3
    by_id = {t.info.trace_id: t for t in traces}
    for item in run_file.eval.items:
        spans = by_id[item.trace_id].data.spans
        root = next(s for s in spans if s.parent_id is None)
        assert root.name == "rag-qa" and root.inputs == {"question": item.inputs["question"]}
        stages = sorted((s for s in spans if s.parent_id == root.span_id), key=lambda s: s.start_time_ns)
        assert [s.name for s in stages] == ["bm25", "prompt", "compress", "generate"]  # one span per stage
        retrieval, prompt, compress, generate = stages
        assert retrieval.span_type == "RETRIEVER"
        assert retrieval.get_attribute("promptkit.document_ids") == [d.id for d in item.documents]
        assert len(retrieval.get_attribute("promptkit.document_scores")) == 2
        assert set(prompt.outputs) >= {"system", "instruction", "context", "question", "answer_prefix"}
        assert 0 < compress.get_attribute("promptkit.compression.rate") < 1
        assert generate.span_type == "LLM" and generate.outputs == item.prediction
        assert generate.get_attribute("promptkit.time_to_first_token_s") > 0
        assert generate.get_attribute("promptkit.usage.prompt_tokens") == item.prompt_tokens > 0
        assert root.start_time_ns <= retrieval.start_time_ns < generate.end_time_ns <= root.end_time_ns
        assert by_id[item.trace_id].info.tags["promptkit.item"] == str(item.index)


def test_search_logs_a_parent_run_with_a_child_per_candidate(server, real_lm, sst2, tmp_path):
    train, val, test, labels = sst2
    pipe = sentiment(labels)
    tracker = MlflowTracker(server, experiment="sst2-search")
    opt = RandomFewShot(k=2, num_candidates=2, racing=Racing(min_examples=4), seed=0)
    best, report = opt.compile(pipe, train, "accuracy", valset=val, tracker=tracker)
    assert tracker.error is None and tracker.seconds > 0
    tracker.log_heldout(evaluate(pipe, test, "accuracy"), evaluate(best, test, "accuracy"))

    c = client(server)
    parent = c.get_run(tracker.run_id)
    assert parent.data.tags["promptkit.kind"] == "search" and parent.data.tags["promptkit.best"] == report.best["name"]
    assert parent.data.params["optimizer"] == "RandomFewShot" and parent.data.params["val_size"] == "8"
    assert parent.data.params["weights"] == "float32" and json.loads(parent.data.params["rungs"]) == [4, 8]
    m = parent.data.metrics
    assert m["best_val_accuracy"] == pytest.approx(report.best_score) and m["lm_calls"] == report.lm_calls
    assert m["tokens_prefilled"] == report.tokens_prefilled
    assert {"heldout_zero_shot_accuracy", "heldout_optimized_accuracy", "heldout_difference",
            "heldout_difference_ci_low", "heldout_difference_ci_high"} <= set(m)

    children = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(report.candidates) == 3  # the baseline and two demonstration sets
    by_name = {r.data.params["candidate"]: r for r in children}
    for cand in report.candidates:
        run = by_name[cand.name]
        assert run.data.metrics["val_accuracy"] == pytest.approx(cand.score)
        assert run.data.metrics["val_accuracy_ci_low"] <= cand.score <= run.data.metrics["val_accuracy_ci_high"]
        assert run.data.metrics["val_examples"] == cand.n and run.data.metrics["lm_calls"] == cand.n
        assert run.data.metrics["tokens_prefilled"] >= 0 and run.data.metrics["tokens_requested"] > 0
        assert run.data.params["instruction"] == pipe.stages[0].instruction
        demos = json.loads(run.data.params["demonstrations"])
        assert demos == cand.settings.get("exemplars", [])
        assert run.data.tags["promptkit.winner"] == str(cand.name == report.best["name"]).lower()
    rungs = sorted(r.data.metrics["rung"] for r in children)
    assert rungs == [1, 2, 2]  # the race halves two candidates after 4 examples: one stops at rung 1
    assert sum(r.data.metrics["lm_calls"] for r in children) == report.lm_calls
    assert sum(r.data.metrics["winner"] for r in children) == 1

    # The report page reads the run back from the server and renders in a browser.
    run_file = load_run(server, tracker.run_id)
    assert run_file.heldout is not None and run_file.search.best_name == report.best["name"]
    assert load_run(server).search is not None  # the latest promptkit run there
    from typer.testing import CliRunner

    from promptkit.cli import app

    page = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", server, "--run-id", by_name["set0"].info.run_id, "-o", str(page)])
    assert res.exit_code == 0, res.output  # a candidate's run id stands for its search
    if pytest.importorskip("plotly") and page.exists():
        from test_report import CHROMIUM, render_in_browser

        if CHROMIUM:
            render_in_browser(page, tmp_path, "search-report")
