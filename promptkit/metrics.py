"""Answer metrics: exact match and token F1 (SQuAD normalization), accuracy; bootstrap confidence intervals."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Metric = Callable[[Any, Any], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze whitespace (SQuAD's normalization)."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(gold: Any) -> list[str]:
    return [str(g) for g in gold] if isinstance(gold, (list, tuple)) else [str(gold)]


def exact_match(prediction: Any, gold: Any) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in _golds(gold)))


def token_f1(prediction: Any, gold: Any) -> float:
    """Best token-overlap F1 between the prediction and any gold answer."""
    best = 0.0
    p_toks = normalize_answer(prediction).split()
    for g in _golds(gold):
        g_toks = normalize_answer(g).split()
        if not p_toks or not g_toks:
            best = max(best, float(p_toks == g_toks))
            continue
        common = sum((Counter(p_toks) & Counter(g_toks)).values())
        if common:
            prec, rec = common / len(p_toks), common / len(g_toks)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def accuracy(prediction: Any, gold: Any) -> float:
    """1.0 if the prediction equals the gold label (case- and space-insensitive)."""
    return float(any(str(prediction).strip().lower() == g.strip().lower() for g in _golds(gold)))


def contains_answer(prediction: Any, gold: Any) -> float:
    """1.0 if any normalized gold answer occurs in the normalized prediction."""
    p = normalize_answer(prediction)
    return float(any(normalize_answer(g) and normalize_answer(g) in p for g in _golds(gold)))


METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "em": exact_match,
    "f1": token_f1,
    "accuracy": accuracy,
    "contains": contains_answer,
}


def get_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a function")
    return METRICS[metric]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def bootstrap_ci(scores: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of per-example ``scores``.

    ``resamples`` resamplings of the examples with replacement (seeded, so the
    same scores always give the same interval), drawn in blocks as one index
    matrix each; the interval is the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of their means.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    n = x.size
    block = max(1, (1 << 22) // n)  # ~32 MB of indices at a time
    means = np.concatenate([x[rng.integers(0, n, size=(min(block, resamples - i), n))].mean(axis=1)
                            for i in range(0, resamples, block)])
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of ``mean(a) - mean(b)`` for two systems scored on the same examples.

    Resampling the per-example differences keeps each example's pair together,
    so what both systems get right or wrong alike cancels: the interval is
    narrower than the two separate intervals suggest.
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired scores must cover the same examples: {x.size} vs {y.size}")
    return bootstrap_ci(x - y, confidence, resamples, seed)


def format_ci(score: float, ci: tuple[float, float]) -> str:
    """``0.625 [0.580, 0.670]``: a score with its 95 % interval."""
    return f"{score:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
