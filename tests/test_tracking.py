"""Trackers without a server: run files from evaluate() and `promptkit eval --results run.json`, a local
MLflow store by path, what a failure to log does, and the install hint when mlflow is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from promptkit.evaluate import evaluate
from promptkit.pipeline import Pipeline, Record, Stage
from promptkit.runs import RunFile, Tracker, load_run
from promptkit.stages import BuildPrompt, Classify
from promptkit.types import Example

REVIEWS = [("A delight from start to finish.", "positive"), ("Dull and far too long.", "negative"),
           ("The best film I saw this year.", "positive"), ("I walked out halfway through.", "negative")]


class Shout(Stage):
    stage_name = "shout"

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            r.output = str(r.inputs["question"]).upper()
        return records


def classifier() -> Pipeline:
    return Pipeline(BuildPrompt(instruction="Is the review positive or negative?", input_format="Review: {text}",
                                output_format="Sentiment: {label}", answer_prefix="Sentiment:"),
                    Classify(labels=["positive", "negative"]), name="reviews")


def reviews() -> list[Example]:
    return [Example(text=t, label=lab, output_key="label") for t, lab in REVIEWS]


def test_trace_steps_know_when_their_stage_ran():
    rec = Pipeline(Shout(), Shout())("hi")
    first, second = rec.trace
    assert first.started <= first.finished <= second.started + 1e-3 and second.started <= second.finished
    assert first.finished - first.started == pytest.approx(first.seconds, abs=1e-5)  # one record in the batch


def test_evaluate_with_a_tracker_writes_a_run_file(real_lm, tmp_path):
    tracker = Tracker(results=tmp_path / "run.json")
    result = evaluate(classifier(), reviews(), "accuracy", output_key="label", tracker=tracker)
    run = RunFile.load(tmp_path / "run.json")
    assert run == tracker.run and run.kind == "eval" and run.search is None
    section = run.eval
    assert (section.metric, section.n, section.score, section.ci) == ("accuracy", 4, result.score, result.ci)
    assert section.tokens.requested >= section.tokens.prefilled > 0
    assert [it.prediction for it in section.items] == [r.prediction for r in result.results]
    assert all(set(it.label_scores) == {"positive", "negative"} and it.prompt_tokens for it in section.items)
    assert run.models[0].weights == "float32" and run.models[0].engine["prefix_cache"] is True
    assert [s["stage"] for s in run.pipeline["stages"]] == ["prompt", "classify"]
    assert tracker.seconds > 0


def test_eval_command_writes_a_run_file_for_a_json_results_name(real_lm, tmp_path):
    from typer.testing import CliRunner

    from promptkit.cli import app

    recipe = tmp_path / "reviews.yaml"
    classifier().save(recipe)
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in REVIEWS))
    args = ["eval", str(recipe), str(data), "--metric", "accuracy", "--output-key", "label", "--json"]
    res = CliRunner().invoke(app, [*args, "--results", str(tmp_path / "run.json")])
    assert res.exit_code == 0, res.output
    assert load_run(tmp_path / "run.json").eval.n == 4
    res = CliRunner().invoke(app, [*args, "--results", str(tmp_path / "items.jsonl")])  # unchanged: JSONL lines
    assert res.exit_code == 0 and len((tmp_path / "items.jsonl").read_text().splitlines()) == 4
    assert load_run(tmp_path / "items.jsonl").eval.n == 4


def test_local_mlflow_store_by_path(real_lm, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install -e '.[mlflow]'")
    from promptkit.runs import MlflowTracker

    store = tmp_path / "runs"
    tracker = MlflowTracker(store, experiment="local", max_traces=2)
    evaluate(classifier(), reviews(), "accuracy", output_key="label", tracker=tracker)
    assert tracker.error is None and (store / "mlflow.db").is_file()
    assert (store / "mlartifacts").is_dir()  # artifacts beside the database, as `mlflow server` keeps them
    ref = tracker.run.mlflow
    assert ref.tracking_uri == f"sqlite:///{store.resolve() / 'mlflow.db'}"
    run = mlflow.MlflowClient(ref.tracking_uri).get_run(ref.run_id)
    assert run.data.metrics["accuracy"] == tracker.run.eval.score and run.data.params["pipeline"] == "reviews"
    traced = [it for it in tracker.run.eval.items if it.trace_id]
    assert len(traced) == 2 and all(it.score == 0 for it in traced[: sum(it.score == 0 for it in traced)])
    assert load_run(store).mlflow.run_id == ref.run_id  # the folder alone finds the latest run
    assert load_run(f"sqlite:///{store / 'mlflow.db'}", ref.run_id).eval.n == 4


def test_a_failure_to_log_warns_and_keeps_the_run(real_lm):
    class Down(Tracker):
        def publish_eval(self, run, pipeline, records):
            raise ConnectionError("tracking server unreachable")

    tracker = Down()
    with pytest.warns(RuntimeWarning, match="could not log the run .*unreachable"):
        result = evaluate(classifier(), reviews()[:2], "accuracy", output_key="label", tracker=tracker)
    assert isinstance(tracker.error, ConnectionError) and tracker.run.eval.score == result.score
    with pytest.raises(ValueError, match="run compile"):
        tracker.log_heldout(result, result)


def test_mlflow_option_without_mlflow_says_how_to_install(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from promptkit.cli import app
    from promptkit.runs.mlflow_tracker import tracking_uri

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    res = CliRunner().invoke(app, ["eval", "recipe.yaml", "data.jsonl", "--mlflow"])
    assert res.exit_code == 1
    assert "pip install 'promptkit[mlflow]'" in " ".join(res.output.split())
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking_uri(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(None) == "http://tracking:5000"


def test_without_plotly_the_report_says_how_to_install(monkeypatch):
    from promptkit.runs import write_report
    from test_report import search_run

    monkeypatch.setitem(sys.modules, "plotly", None)
    with pytest.raises(ImportError, match=r"pip install 'promptkit\[report\]'"):
        write_report(search_run(), Path("unused.html"))
    code = ("import sys; sys.modules['mlflow'] = sys.modules['plotly'] = None; "
            "import promptkit.runs, promptkit.cli, optimizers")  # the core imports without either
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
