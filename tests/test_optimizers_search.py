"""Racing, the reflective instruction search and the joint instruction × demonstrations search,
on real topic classification (BBC headlines) with the embedded SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest

from optimizers import JointSearch, OptimizerError, Racing, RandomFewShot, ReflectiveSearch
from optimizers.reflective import pareto_parents
from promptkit.pipeline import Pipeline
from promptkit.stages import BuildPrompt, Classify
from promptkit.types import Example
from test_optimizers import load_classification


@pytest.fixture(scope="module")
def headlines():
    """A train pool and 24 validation headlines of the BBC set, and the five topics."""
    train, _, labels, _ = load_classification()
    rows = [Example(text=r["text"].split("\n", 1)[0].strip(), label=r["label"], output_key="label") for r in train]
    return rows[:40], rows[40:64], labels


def classifier(labels: list[str], **classify) -> Pipeline:
    return Pipeline(BuildPrompt(instruction="Classify the topic of the news headline.", input_format="Headline: {text}",
                                output_format="Topic: {label}", answer_prefix="Topic:"),
                    Classify(labels=labels, **classify), name="topics")


# -- racing ------------------------------------------------------------------------------
def test_rungs_and_order_are_fixed():
    r = Racing(min_examples=30, growth=2.0)
    assert r.rungs(150) == [30, 60, 120, 150] and r.rungs(20) == [20]
    assert r.order(10, seed=3) == r.order(10, seed=3) != r.order(10, seed=4)
    assert sorted(r.order(10, seed=3)) == list(range(10))


def test_racing_drops_a_clear_loser_early(real_lm, headlines):
    train, val, labels = headlines
    pipe = classifier(labels)
    # Swapped label words: the model answers "sport" for business and so on, a candidate that is wrong by design.
    swapped = dict(zip(labels, labels[1:] + labels[:1]))
    loser = classifier(labels, verbalizers=swapped)
    close = Pipeline(BuildPrompt(instruction="What is the topic of this BBC news headline?",
                                 input_format="Headline: {text}", output_format="Topic: {label}",
                                 answer_prefix="Topic:"), Classify(labels=labels), name="topics")

    class Fixed(RandomFewShot):  # the two candidates above, raced (halving off: only the confidence rule drops)
        def search(self, pipeline, train):
            yield from self.evaluate_pipes([("loser", loser, {}), ("close", close, {})])

    _, report = Fixed(racing=Racing(min_examples=12, keep=1.0), seed=0).compile(pipe, train, "accuracy", val)
    scored = {c.name: c for c in report.candidates}
    assert scored["loser"].n == 12 and scored["loser"].score < 0.2  # dropped after the first rung
    assert scored["close"].n == len(val)  # raced to the end
    assert report.lm_calls == len(val) + 12 + len(val)  # baseline, the loser's first rung, the survivor
    assert report.best["name"] in ("baseline", "close")


# -- reflective search ---------------------------------------------------------------------
def test_reflective_search_respects_max_metric_calls(real_lm, headlines, capsys):
    train, val, labels = headlines
    val = val[:8]
    opt = ReflectiveSearch(max_metric_calls=50, minibatch=4, seed=0)
    best, report = opt.compile(classifier(labels), train, "accuracy", val)
    step = opt.step_cost(len(val))  # 2 minibatches + the validation set = 16
    assert report.metric_calls <= 50 and 50 - report.metric_calls < step  # stopped only when a step no longer fit
    steps = report.extra["steps"]
    assert report.metric_calls == len(val) + 2 * 4 * len(steps) - 4 * sum("child_minibatch" not in s for s in steps) \
        + len(val) * sum("child_validation" in s for s in steps)
    assert report.lm_calls == report.metric_calls + sum("proposal" in s for s in steps)
    est = report.extra["estimate"]
    assert est["metric_calls"] == 50 and est["proposals"] == (50 - 8) // 8
    assert 0 < est["shared_prefix_tokens"] and est["prefilled_tokens"] < est["prompt_tokens"]
    assert "budget 50 metric calls" in capsys.readouterr().err
    front = [c for c in report.candidates if c.n == len(val)]
    assert report.best_score == max(c.score for c in front)
    with pytest.raises(OptimizerError, match="cannot pay for scoring the 8 validation examples"):
        ReflectiveSearch(max_metric_calls=7).compile(classifier(labels), train, "accuracy", val)


def test_pareto_parents_keep_specialists_and_drop_dominated():
    scores = np.array([[1, 1, 0, 0],   # best on items 0, 1
                       [0, 0, 1, 0],   # a specialist: the only one right on item 2
                       [1, 0, 0, 0],   # dominated by the first
                       [1, 1, 0, 0]])  # a duplicate of the first: ties keep both
    assert pareto_parents(scores).tolist() == [3.0, 2.0, 0.0, 3.0]


# -- joint search and reproducibility --------------------------------------------------------
def test_joint_search_is_seeded_and_reports_its_cost(real_lm, headlines):
    train, val, labels = headlines
    scorers = [{"calibrate": True}, {"calibrate": False}]
    runs = [JointSearch(k=3, num_instructions=1, num_sets=0, scorers=scorers, racing=Racing(min_examples=8), seed=5)
            .compile(classifier(labels), train, "accuracy", val) for _ in range(2)]
    (p1, r1), (p2, r2) = runs
    assert p1.config() == p2.config()
    assert [(c.name, c.n, c.scores) for c in r1.candidates] == [(c.name, c.n, c.scores) for c in r2.candidates]
    names = {c.name for c in r1.candidates}
    assert {"i0-given-calibrate0", "i0-knn-calibrate0", "i0-knn-calibrate1"} <= names and len(r1.extra["instructions"]) <= 2
    assert r1.seed == 5 and r1.lm_calls > 0 and r1.seconds > 0 and r1.tokens_prefilled < r1.tokens_requested
    lo, hi = r1.best_ci
    assert lo <= r1.best_score <= hi
    assert "seed 5" in r1.summary() and "95 % CI" in r1.summary()
