"""The report page: run files in and out, one self-contained HTML file, its plots rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from promptkit.runs import RunFile, load_run
from promptkit.runs.report import is_classification
from promptkit.runs.schema import (CandidateRow, EvalSection, HeldOut, ItemResult, RetrievedDocument, SearchSection,
                                   Tokens, answer_rank)
from promptkit.types import Document

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LABELS = ["positive", "negative", "neutral"]


def needs_plotly() -> None:
    pytest.importorskip("plotly", reason="the report needs plotly: pip install -e '.[report]'")


def needs_chromium() -> str:
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (scripts/setup.sh installs it: apt-get install -y chromium)")
    return CHROMIUM


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``url`` offline, its console on stderr."""
    cmd = [needs_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def render_in_browser(page: Path, tmp: Path, name: str = "report") -> Path:
    """Open the page in headless Chromium: every plot it holds renders, the console stays silent; the
    screenshot is kept (its path printed)."""
    url = page.resolve().as_uri()
    dom = chromium(url, tmp / "chromium-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, "\n".join(console)
    expected = int(re.search(r"data-figures=\"(\d+)\"", dom.stdout).group(1))
    assert expected >= 1
    assert dom.stdout.count('class="plot-container plotly"') == expected  # plotly drew every figure
    assert dom.stdout.count('class="main-svg"') >= expected
    shot = tmp / f"{name}.png"
    shown = chromium(url, tmp / "chromium-shot", f"--screenshot={shot}", "--window-size=1280,2000",
                     "--hide-scrollbars")
    assert shown.returncode == 0 and shot.stat().st_size > 20_000, shown.stderr[-2000:]
    print(f"report screenshot: {shot}")
    return shot


# -- a run of each kind, without a model -------------------------------------------------------------------
def classification_items(n: int, accuracy_every: int, seed: int = 0) -> list[ItemResult]:
    items = []
    for i in range(n):
        gold = LABELS[(i + seed) % 3]
        right = i % accuracy_every != 0
        pred = gold if right else LABELS[(i + seed + 1) % 3]
        items.append(ItemResult(index=i, inputs={"text": f"review number {i}"}, gold=gold, prediction=pred,
                                score=float(right), label_scores={lab: -1.0 - (lab != pred) for lab in LABELS}))
    return items


def eval_of(items: list[ItemResult], name: str) -> EvalSection:
    score = sum(it.score for it in items) / len(items)
    return EvalSection(name=name, metric="accuracy", score=score, ci=(max(0, score - 0.2), min(1, score + 0.2)),
                       n=len(items), seconds=1.5, items=items)


def search_run() -> RunFile:
    cands = [CandidateRow(order=0, name="baseline", score=0.5, ci=(0.3, 0.7), n=24, rung=3, baseline=True,
                          instruction="Classify the sentiment.", lm_calls=24, tokens=Tokens(requested=900,
                          prefilled=300, cached=600), seconds=2.0),
             CandidateRow(order=1, name="i0-set0", score=0.25, ci=(0.0, 0.5), n=6, rung=1, raced_out=True,
                          instruction="Classify the sentiment.",
                          demonstrations=[{"text": "great", "label": "positive"}],
                          scorer={"calibrate": True}, lm_calls=6, tokens=Tokens(requested=400, prefilled=90,
                          cached=310), seconds=0.6),
             CandidateRow(order=2, name="i1-knn", score=0.55, ci=(0.35, 0.75), n=12, rung=2, raced_out=True,
                          instruction="Is the review positive, negative or neutral?", settings={"knn": 4},
                          lm_calls=12, seconds=1.1),
             CandidateRow(order=3, name="i1-set0", score=0.71, ci=(0.5, 0.88), n=24, rung=3, winner=True,
                          instruction="Is the review positive, negative or neutral?",
                          demonstrations=[{"text": "great", "label": "positive"},
                                          {"text": "awful", "label": "negative"}],
                          scorer={"calibrate": False}, lm_calls=24, tokens=Tokens(requested=1000, prefilled=200,
                          cached=800), seconds=2.2)]
    search = SearchSection(optimizer="JointSearch", metric="accuracy", train_size=60, val_size=24, rungs=[6, 12, 24],
                           baseline_score=0.5, baseline_ci=(0.3, 0.7), best_score=0.71, best_ci=(0.5, 0.88),
                           best_name="i1-set0", lm_calls=66, metric_calls=66,
                           tokens=Tokens(requested=2300, prefilled=590, cached=1710), seconds=6.0, candidates=cands)
    zero, best = classification_items(30, 2), classification_items(30, 4)
    held = HeldOut(zero_shot=eval_of(zero, "zero-shot"), optimized=eval_of(best, "optimized"), difference=0.25,
                   difference_ci=(0.08, 0.42))
    return RunFile(kind="search", title="JointSearch on reviews: accuracy",
                   pipeline={"stages": [{"stage": "prompt"}, {"stage": "classify"}]}, search=search, heldout=held)


def rag_run() -> RunFile:
    items = []
    for i in range(12):
        rank = [1, 1, 2, None][i % 4]
        docs = [RetrievedDocument(id=f"doc{j}", rank=j, score=10.0 - j) for j in (1, 2, 3)]
        items.append(ItemResult(index=i, inputs={"question": f"question {i}?"}, gold=[f"answer {i}"],
                                prediction=f"answer {i}" if rank == 1 else "no idea", score=1.0 if rank == 1 else 0.2,
                                documents=docs, answer_rank=rank, prompt_tokens=120, prefilled_tokens=40,
                                cached_tokens=80, completion_tokens=6, first_token_seconds=0.05))
    section = EvalSection(metric="f1", score=0.6, ci=(0.4, 0.8), n=12, seconds=3.0, dataset="qa.jsonl",
                         tokens=Tokens(requested=1440, prefilled=480, cached=960), items=items)
    return RunFile(kind="eval", title="rag-qa: f1 on qa.jsonl", eval=section)


# -- tests ----------------------------------------------------------------------------------------------
def test_run_file_round_trips_and_results_lines_load(tmp_path):
    run = search_run()
    assert RunFile.load(run.save(tmp_path / "run.json")) == run
    assert load_run(tmp_path / "run.json") == run
    (tmp_path / "artifacts").mkdir()
    run.save(tmp_path / "artifacts" / "promptkit_run.json")
    assert load_run(tmp_path / "artifacts").search.best_name == "i1-set0"
    lines = tmp_path / "results.jsonl"  # what `promptkit eval --results results.jsonl` writes
    lines.write_text("\n".join(json.dumps({"inputs": {"text": "t"}, "gold": g, "prediction": p, "score": float(g == p)})
                               for g, p in [("a", "a"), ("b", "a"), ("a", "a"), ("b", "b")]))
    from_lines = load_run(lines)
    assert from_lines.kind == "eval" and from_lines.eval.n == 4 and from_lines.eval.score == 0.75
    (tmp_path / "other.json").write_text('{"metric": "accuracy"}')
    with pytest.raises(ValueError, match="not a promptkit run file"):
        load_run(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="not a run file"):
        load_run(tmp_path / "missing")


def test_answer_rank_and_label_detection():
    docs = [Document(id="a", text="Tea comes from Camellia sinensis."), Document(id="b", text="Fresnel, 1822.")]
    assert answer_rank(docs, ["augustin-jean fresnel", "Fresnel"]) == 2
    assert answer_rank(docs, "camellia sinensis") == 1 and answer_rank(docs, "Everest") is None
    assert is_classification(search_run().heldout.optimized.items)
    assert not is_classification(rag_run().eval.items)  # free-text answers, lists of gold answers


def test_report_is_one_offline_file_with_every_section(tmp_path):
    needs_plotly()
    from promptkit.runs import write_report

    page = write_report(search_run(), tmp_path / "search.html").read_text(encoding="utf-8")
    assert "<script src=" not in page and "cdn" not in page.lower().split("</script>")[-1]  # plotly.js inlined
    for heading in ("Candidates on validation, in race order", "Zero-shot against the winner on held-out data",
                    "Per-label accuracy and confusions", "Where the tokens went", "Items that flipped", "Candidates"):
        assert heading in page, heading
    assert 'data-figures="4"' in page
    rag = write_report(rag_run(), tmp_path / "rag.html").read_text(encoding="utf-8")
    assert "Per-question score beside retrieval rank" in rag and "Per-label" not in rag
    assert 'data-figures="2"' in rag  # retrieval and tokens
    no_heldout = search_run().model_copy(update={"heldout": None})
    assert "No held-out result yet" in write_report(no_heldout, tmp_path / "x.html").read_text(encoding="utf-8")


def test_report_renders_in_headless_chromium(tmp_path):
    needs_plotly()
    needs_chromium()
    from promptkit.runs import write_report

    render_in_browser(write_report(search_run(), tmp_path / "search.html"), tmp_path, "search")
    render_in_browser(write_report(rag_run(), tmp_path / "rag.html"), tmp_path, "rag")


def test_report_command_writes_the_page(tmp_path):
    needs_plotly()
    from typer.testing import CliRunner

    from promptkit.cli import app

    search_run().save(tmp_path / "run.json")
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run.json"), "-o", str(tmp_path / "out" / "r.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "r.html").stat().st_size > 1_000_000  # plotly.js inside
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 1 and "not a run file" in " ".join(missing.output.split())


def test_chromium_sees_console_errors(tmp_path):
    needs_chromium()
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    out = chromium(page.as_uri(), tmp_path / "profile", "--dump-dom")
    assert "Uncaught ReferenceError" in out.stderr  # so the silence checked above means something
    assert os.path.exists(tmp_path / "profile")
