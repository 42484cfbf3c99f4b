"""Evaluations and searches on a real local Ray cluster (``ray.init(num_cpus=2)``, two engine actors of one
thread, the embedded model): results equal a local run item for item, each prefix runs on one worker
and goes back to it, an interrupted run resumes from its checkpoint, and a worker killed mid-run loses
nothing (its tasks are retried, Ray restarts it)."""

from __future__ import annotations

import os
import signal

import pytest

ray = pytest.importorskip("ray")

from optimizers import JointSearch  # noqa: E402
from promptkit.distributed import RayExecutor  # noqa: E402
from promptkit.distributed.executor import Job  # noqa: E402
from promptkit.evaluate import evaluate  # noqa: E402
from promptkit.pipeline import Pipeline, Record  # noqa: E402
from promptkit.stages import BuildPrompt, Classify  # noqa: E402
from promptkit.types import Example  # noqa: E402

pytestmark = pytest.mark.slow

REVIEWS = [("A moving, beautifully acted film.", "positive"), ("Dull, slow and far too long.", "negative"),
           ("I laughed the whole way through.", "positive"), ("The plot makes no sense at all.", "negative"),
           ("A triumph of quiet storytelling.", "positive"), ("Wooden acting and a lazy script.", "negative"),
           ("Warm, funny and wise.", "positive"), ("I walked out after an hour.", "negative"),
           ("The best thing I have seen this year.", "positive"), ("Forgettable in every way.", "negative"),
           ("Sharp dialogue and a great cast.", "positive"), ("A mess from start to finish.", "negative")]


def examples(n: int = len(REVIEWS)) -> list[Example]:
    return [Example(text=t, label=lab, output_key="label") for t, lab in REVIEWS[:n]]


def classifier(instruction: str = "Is the sentiment of this movie review positive or negative?") -> Pipeline:
    return Pipeline(BuildPrompt(instruction=instruction, input_format="Review: {text}",
                                output_format="Sentiment: {label}", answer_prefix="Sentiment:"),
                    Classify(labels=["positive", "negative"], calibrate=False))


@pytest.fixture(scope="module")
def executor():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ex = RayExecutor(workers=2, threads=1, task_items=3)
    ex.start()
    yield ex
    ex.close()
    ray.shutdown()


def outputs(result) -> list:
    return [(r.prediction, r.score) for r in result.results]


def test_sharded_evaluation_equals_the_local_one(executor, real_lm):
    pipe = classifier()
    local = evaluate(pipe, examples(), "accuracy", output_key="label")
    sharded = evaluate(pipe, examples(), "accuracy", output_key="label", executor=executor)
    assert outputs(sharded) == outputs(local)
    report = executor.last_report
    assert report.done == report.items == len(REVIEWS) and report.lost == 0
    assert all(w.items for w in report.per_worker)  # both workers took part
    assert report.tokens_prefilled > 0


def prefix_jobs(n_prefixes: int = 4, per_prefix: int = 3) -> list[Job]:
    """Jobs whose records share a long prefix each (an instruction and demonstrations), as candidates do."""
    jobs = []
    for j in range(n_prefixes):
        demos = [{"text": t, "label": lab} for t, lab in REVIEWS[j : j + 4]]
        pipe = Pipeline(BuildPrompt(instruction=f"Task {j}: label the sentiment of the review.", exemplars=demos,
                                    input_format="Review: {text}", output_format="Sentiment: {label}",
                                    answer_prefix="Sentiment:"))
        records = pipe.process([Record(inputs={"text": t}) for t, _ in REVIEWS[-per_prefix:]])
        jobs.append(Job(Pipeline(Classify(labels=["positive", "negative"], calibrate=False)), records))
    return jobs


def test_each_prefix_is_prefilled_on_one_worker_and_goes_back_to_it(executor):
    executor.placement = "affinity"
    executor.clear_caches()
    executor.run_jobs(prefix_jobs())
    first = executor.last_report
    assert len(first.prefix_workers) == 4
    assert all(len(ws) == 1 for ws in first.prefix_workers.values())
    assert {w for ws in first.prefix_workers.values() for w in ws} == {0, 1}
    executor.run_jobs(prefix_jobs())  # a second round (a racing rung): each prefix is already held
    again = executor.last_report
    assert again.prefix_workers == first.prefix_workers
    assert again.tokens_prefilled < first.tokens_prefilled / 2


def test_round_robin_is_the_same_work_blind_to_prefixes(executor):
    executor.placement = "round_robin"
    try:
        executor.clear_caches()
        out = executor.run_jobs(prefix_jobs())
        assert executor.last_report.placement == "round_robin" and executor.last_report.done == 12
    finally:
        executor.placement = "affinity"
    executor.clear_caches()
    assert [[r.output for r in job] for job in executor.run_jobs(prefix_jobs())] == [[r.output for r in job]
                                                                                     for job in out]


def test_a_search_on_ray_scores_as_the_local_one(executor, real_lm):
    train, val = examples()[:8], examples()[8:]
    search = dict(k=2, num_instructions=0, num_sets=1, knn=False, scorers=[{}], racing=None, seed=0)
    _, local = JointSearch(**search).compile(classifier(), train, "accuracy", valset=val)
    _, remote = JointSearch(**search, executor=executor).compile(classifier(), train, "accuracy", valset=val)
    assert [(c.name, c.scores) for c in remote.candidates] == [(c.name, c.scores) for c in local.candidates]
    assert remote.best == local.best and remote.lm_calls == local.lm_calls
    assert remote.tokens_prefilled > 0  # the workers' engines are counted


def test_an_interrupted_run_resumes_from_its_checkpoint(executor, tmp_path):
    path = tmp_path / "run.jsonl"
    executor.checkpoint = path

    def interrupt(snap):
        if snap.done >= 3:
            raise KeyboardInterrupt

    try:
        executor.on_progress = interrupt
        with pytest.raises(KeyboardInterrupt):
            evaluate(classifier(), examples(), "accuracy", output_key="label", executor=executor)
        executor.on_progress = None
        kept = len(path.read_text().splitlines()) - 1  # the header, then one line per finished item
        assert 3 <= kept < len(REVIEWS)
        resumed = evaluate(classifier(), examples(), "accuracy", output_key="label", executor=executor)
        assert executor.last_report.resumed == kept and executor.last_report.done == len(REVIEWS) - kept
        assert outputs(resumed) == outputs(evaluate(classifier(), examples(), "accuracy", output_key="label"))
        with pytest.raises(ValueError, match="another pipeline"):
            evaluate(classifier("Another instruction."), examples(), "accuracy", output_key="label",
                     executor=executor)
    finally:
        executor.checkpoint, executor.on_progress = None, None


def test_a_killed_worker_loses_nothing(executor, real_lm):
    killed: list[int] = []

    def kill_busy_worker(snap):
        if not killed and snap.in_flight[1] and snap.pids[1]:
            killed.append(snap.pids[1])
            os.kill(snap.pids[1], signal.SIGKILL)

    pipe = classifier()
    executor.clear_caches()
    executor.on_progress = kill_busy_worker
    try:
        result = evaluate(pipe, examples(), "accuracy", output_key="label", executor=executor)
    finally:
        executor.on_progress = None
    report = executor.last_report
    assert killed and report.lost == 0 and report.done == len(REVIEWS)
    assert report.retries >= 1
    assert outputs(result) == outputs(evaluate(pipe, examples(), "accuracy", output_key="label"))
    assert executor.wait_for_workers(timeout=120) == 2  # Ray restarted it, with an empty cache
    assert executor.pids[1] not in (None, killed[0])
    again = evaluate(pipe, examples(), "accuracy", output_key="label", executor=executor)
    assert outputs(again) == outputs(result) and all(w.items for w in executor.last_report.per_worker)
