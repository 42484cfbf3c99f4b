"""The run file: one evaluation or one optimizer search as a small JSON document.

``promptkit eval --results run.json``, every :class:`~promptkit.runs.Tracker`
and the MLflow artifact ``promptkit_run.json`` write the same format, and
``promptkit report`` draws it. A run holds either an ``eval`` (a metric with
its interval, tokens, seconds and every item's prediction) or a ``search`` (an
optimizer's candidates in the order they were tried, with their intervals,
the rung each reached in the race and its calls and tokens), optionally with
a ``heldout`` comparison of the zero-shot and the optimized pipeline.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..metrics import normalize_answer

FORMAT = "promptkit.run/1"


class RetrievedDocument(BaseModel):
    """A document a retrieval stage returned for an item, at its rank (1 = first)."""

    id: str
    rank: int
    score: float | None = None


class ItemResult(BaseModel):
    """One evaluated item: its inputs, gold and predicted output, score, and what the pipeline did for it."""

    index: int
    inputs: dict[str, Any]
    gold: Any = None
    prediction: Any = None
    score: float
    label_scores: dict[str, float] | None = None
    documents: list[RetrievedDocument] = Field(default_factory=list)
    answer_rank: int | None = None  # rank of the first retrieved document holding a gold answer; None: none does
    prompt_tokens: int | None = None
    prefilled_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_seconds: float | None = None
    trace_id: str | None = None  # the MLflow trace of this item, when one was logged


class Tokens(BaseModel):
    """Engine prompt-token counters over a run: asked for (what a cache-off engine prefills), computed, cached."""

    requested: int = 0
    prefilled: int = 0
    cached: int = 0


class EvalSection(BaseModel):
    """A pipeline's mean score on a dataset with its 95 % bootstrap interval, costs and per-item results."""

    name: str = "eval"
    metric: str
    score: float
    ci: tuple[float, float]
    n: int
    seconds: float
    dataset: str | None = None
    tokens: Tokens | None = None
    items: list[ItemResult] = Field(default_factory=list)


class CandidateRow(BaseModel):
    """One candidate of a search: what it was, how it scored on validation, how far it got, what it cost."""

    order: int  # position in the order candidates were tried (the baseline is 0)
    name: str
    score: float
    ci: tuple[float, float]
    n: int  # validation examples it was scored on
    rung: int | None = None  # 1-based rung of the race it reached (None: not raced)
    raced_out: bool = False  # dropped before the whole validation set
    winner: bool = False
    baseline: bool = False
    instruction: str | None = None
    demonstrations: list[dict[str, Any]] = Field(default_factory=list)
    scorer: dict[str, Any] = Field(default_factory=dict)  # settings of the final LM stage (calibrate, chat, ...)
    settings: dict[str, Any] = Field(default_factory=dict)  # everything else the optimizer recorded
    lm_calls: int | None = None
    tokens: Tokens | None = None
    seconds: float = 0.0


class SearchSection(BaseModel):
    """An optimizer's search: its settings, the data sizes, every candidate, the winner and the totals."""

    optimizer: str
    settings: dict[str, Any] = Field(default_factory=dict)
    metric: str
    seed: int = 0
    train_size: int
    val_size: int
    rungs: list[int] | None = None  # cumulative examples of the race's rungs
    baseline_score: float | None = None
    baseline_ci: tuple[float, float] | None = None
    best_score: float
    best_ci: tuple[float, float] | None = None
    best_name: str
    lm_calls: int = 0
    metric_calls: int = 0
    tokens: Tokens = Field(default_factory=Tokens)
    naive_tokens: int | None = None  # predicted: every prompt token of every call
    seconds: float = 0.0
    budget_exhausted: bool = False
    candidates: list[CandidateRow] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


class HeldOut(BaseModel):
    """The zero-shot and the optimized pipeline on held-out data, and the paired interval of their difference."""

    zero_shot: EvalSection
    optimized: EvalSection
    difference: float
    difference_ci: tuple[float, float]


class ModelInfo(BaseModel):
    """The model a pipeline calls and how: backend, weight format, engine settings."""

    model: str
    backend: str
    weights: str | None = None
    device: str | None = None
    chat: bool | None = None
    engine: dict[str, Any] = Field(default_factory=dict)


class MlflowRef(BaseModel):
    """Where a run was logged in MLflow."""

    tracking_uri: str
    experiment_id: str
    run_id: str


class RunFile(BaseModel):
    """One evaluation or one search, as ``promptkit report`` reads it."""

    format: Literal["promptkit.run/1"] = FORMAT
    kind: Literal["eval", "search"]
    title: str
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    pipeline: dict[str, Any] = Field(default_factory=dict)  # the recipe of the pipeline evaluated or searched from
    best_pipeline: dict[str, Any] | None = None  # the recipe of the search's winner
    models: list[ModelInfo] = Field(default_factory=list)
    eval: EvalSection | None = None
    search: SearchSection | None = None
    heldout: HeldOut | None = None
    mlflow: MlflowRef | None = None

    def save(self, path: str | Path) -> Path:
        """Write the run as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunFile:
        """Read a run file, or a JSONL of per-item results (``promptkit eval --results x.jsonl``)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return from_result_lines(text, title=path.stem)
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a promptkit run file (no \"format\": \"{FORMAT}\")")
        return cls.model_validate(data)


def from_result_lines(text: str, title: str = "eval") -> RunFile:
    """A run from per-item result lines (``{"inputs", "gold", "prediction", "score"}`` each)."""
    from ..metrics import bootstrap_ci, mean

    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError("the results file has no lines")
    items = [ItemResult(index=i, **{k: r.get(k) for k in ("inputs", "gold", "prediction", "score")})
             for i, r in enumerate(rows)]
    scores = [it.score for it in items]
    section = EvalSection(metric="score", score=mean(scores), ci=bootstrap_ci(scores), n=len(items), seconds=0.0,
                          items=items)
    return RunFile(kind="eval", title=title, eval=section)


def answer_rank(documents: list[Any], gold: Any) -> int | None:
    """1-based rank of the first document whose text holds a gold answer (SQuAD-normalized), or None."""
    golds = [normalize_answer(g) for g in (gold if isinstance(gold, (list, tuple)) else [gold]) if g is not None]
    golds = [g for g in golds if g]
    for rank, doc in enumerate(documents, 1):
        text = normalize_answer(getattr(doc, "text", ""))
        if any(g in text for g in golds):
            return rank
    return None
