"""Answer metrics: exact match and token F1 (SQuAD normalization), accuracy."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

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
