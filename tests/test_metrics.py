"""Bootstrap confidence intervals: known cases, agreement with scipy, seeding, pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from promptkit.evaluate import evaluate
from promptkit.metrics import bootstrap_ci, format_ci, paired_bootstrap_ci
from promptkit.pipeline import Pipeline, Record, Stage
from promptkit.types import Example


def test_two_point_sample_has_the_exact_percentile_interval():
    # Resampling [0, 1] gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 1].
    assert bootstrap_ci([0.0, 1.0], resamples=4000) == (0.0, 1.0)
    # ... and the 40 % interval (30th to 70th percentile) is the middle point alone.
    assert bootstrap_ci([0.0, 1.0], confidence=0.4, resamples=4000) == (0.5, 0.5)


def test_constant_scores_give_a_point_interval():
    assert bootstrap_ci([1.0] * 50) == (1.0, 1.0)
    assert bootstrap_ci([0.25]) == (0.25, 0.25)


def test_accuracy_interval_matches_the_normal_approximation_and_scipy():
    scores = [1.0] * 240 + [0.0] * 160  # accuracy 0.6 on 400 examples
    low, high = bootstrap_ci(scores, resamples=4000)
    half = 1.959964 * math.sqrt(0.6 * 0.4 / 400)  # 0.048
    assert low == pytest.approx(0.6 - half, abs=0.006) and high == pytest.approx(0.6 + half, abs=0.006)
    ref = stats.bootstrap((np.array(scores),), np.mean, confidence_level=0.95, n_resamples=4000,
                          method="percentile", random_state=np.random.default_rng(1)).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.006) and high == pytest.approx(ref.high, abs=0.006)


def test_seeded_and_checked():
    scores = np.random.default_rng(0).random(137)
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)
    assert bootstrap_ci(scores, seed=3) != bootstrap_ci(scores, seed=4)
    with pytest.raises(ValueError, match="at least one score"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=95)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_ci([1.0, 0.0], [1.0])
    assert format_ci(0.625, (0.58, 0.67)) == "0.625 [0.580, 0.670]"


def test_pairing_narrows_the_difference_interval():
    rng = np.random.default_rng(0)
    easy = rng.random(300) < 0.6  # examples both systems find easy
    a = easy.astype(float)
    b = a.copy()
    b[np.flatnonzero(~easy)[:30]] = 1.0  # b also gets 30 of the hard ones: +0.1, and never worse
    low, high = paired_bootstrap_ci(b, a)
    assert 0.0 < low < 0.1 < high < 0.15  # the gain is certain when paired ...
    a_low, a_high = bootstrap_ci(a)
    b_low, b_high = bootstrap_ci(b)
    assert b_low < a_high  # ... though the two separate intervals overlap


class Echo(Stage):
    """Outputs the input unchanged (no model): evaluate's bookkeeping alone."""

    def process(self, records: list[Record]) -> list[Record]:
        for r in records:
            r.output = r.inputs["question"]
        return records


def test_evaluate_reports_the_interval_of_its_scores():
    data = [Example(question=str(i % 3), answer="0") for i in range(90)]  # a third right
    res = evaluate(Pipeline(Echo()), data, "exact_match")
    assert res.score == pytest.approx(1 / 3) and res.scores.count(1.0) == 30
    assert res.ci == bootstrap_ci(res.scores)
    assert res.ci[0] < 1 / 3 < res.ci[1] and res.ci[1] - res.ci[0] < 0.25
