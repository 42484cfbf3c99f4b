"""Pipeline records as MLflow traces: one trace per record, one span per stage.

A pipeline runs batch-first, so its stages cannot open a span per record as they go;
each :class:`~promptkit.pipeline.TraceStep` keeps when its stage ran on the record's batch
and what it changed, and these become spans with those times: retrieval with the
documents' ids and scores, compression with its rate, the prompt's segments, and the
model call with its token usage and time to first token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..pipeline import Pipeline, Record, Stage, TraceStep
from ..types import Document, Prompt, Usage
from .schema import ItemResult

PREVIEW_CHARS = 2000


@dataclass
class SpanInfo:
    """What one stage's span shows."""

    span_type: str
    inputs: Any
    outputs: Any
    attributes: dict[str, Any]


def log_record_traces(records: Sequence[Record], pipeline: Pipeline | None = None,
                      items: Sequence[ItemResult] | None = None, experiment_id: str | None = None,
                      limit: int | None = None) -> list[str | None]:
    """Log each record's trace to MLflow (inside the active run, if any); returns each record's trace id.

    With ``items`` (the records' scored results) each trace is tagged with its item, score and
    whether it failed, and with ``limit`` the failing records are logged first.
    """
    chosen = _choose(records, items, limit)
    ids: list[str | None] = [None] * len(records)
    for i in sorted(chosen):
        ids[i] = record_trace(records[i], pipeline, items[i] if items is not None else None, experiment_id)
    return ids


def _choose(records: Sequence[Record], items: Sequence[ItemResult] | None, limit: int | None) -> list[int]:
    order = list(range(len(records)))
    if items is not None:
        order.sort(key=lambda i: items[i].score >= 1.0)  # failures first (stable: dataset order within each)
    return order if limit is None else order[:limit]


def record_trace(record: Record, pipeline: Pipeline | None = None, item: ItemResult | None = None,
                 experiment_id: str | None = None) -> str:
    """Log one record's trace; returns its id."""
    import mlflow
    from mlflow.entities import SpanType

    steps = _own_steps(record, pipeline)
    stages = _stages_for(steps, pipeline)
    start, end = _bounds(steps)
    root = mlflow.start_span_no_context(
        name=pipeline.name if pipeline is not None else "pipeline", span_type=SpanType.CHAIN,
        inputs=record.inputs, experiment_id=experiment_id, start_time_ns=start, tags=_trace_tags(item),
        attributes=_item_attributes(item))
    prompt: Prompt | None = None
    for step, stage in zip(steps, stages):
        info = describe_step(step, stage, record, prompt)
        prompt = step.changed.get("prompt", prompt)
        span = mlflow.start_span_no_context(name=step.stage, span_type=info.span_type, parent_span=root,
                                            inputs=info.inputs, attributes=info.attributes,
                                            start_time_ns=_ns(step.started))
        span.end(outputs=info.outputs, end_time_ns=_ns(step.finished))
    root.end(outputs=_plain(record.output), end_time_ns=end)
    return root.trace_id


def _own_steps(record: Record, pipeline: Pipeline | None) -> list[TraceStep]:
    """The steps of the record's last pass through the pipeline."""
    return record.trace[-len(pipeline.stages):] if pipeline is not None and pipeline.stages else list(record.trace)


def _stages_for(steps: list[TraceStep], pipeline: Pipeline | None) -> list[Stage | None]:
    if pipeline is None or [s.stage_name for s in pipeline.stages] != [s.stage for s in steps]:
        return [None] * len(steps)
    return list(pipeline.stages)


def _bounds(steps: list[TraceStep]) -> tuple[int | None, int | None]:
    starts = [s.started for s in steps if s.started is not None]
    ends = [s.finished for s in steps if s.finished is not None]
    return (_ns(min(starts)) if starts else None), (_ns(max(ends)) if ends else None)


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1e9)


def _trace_tags(item: ItemResult | None) -> dict[str, str] | None:
    if item is None:
        return None
    return {"promptkit.item": str(item.index), "promptkit.score": f"{item.score:g}",
            "promptkit.failed": str(item.score < 1.0).lower(), "promptkit.gold": _short(item.gold, 250)}


def _item_attributes(item: ItemResult | None) -> dict[str, Any] | None:
    if item is None:
        return None
    return {"promptkit.item": item.index, "promptkit.score": item.score, "promptkit.gold": _plain(item.gold)}


# -- one span per stage -----------------------------------------------------------------------
def describe_step(step: TraceStep, stage: Stage | None, record: Record, prompt_before: Prompt | None) -> SpanInfo:
    """The span of one stage: its type, inputs, outputs and attributes, from what it changed."""
    changed = step.changed
    settings = _settings(stage)
    if "documents" in changed:
        return _retrieval(changed["documents"], record, stage, settings)
    if "exemplars" in changed:
        return _exemplars(changed["exemplars"], record, settings)
    if "usage" in changed or "label_scores" in changed or _is_lm(stage):
        return _model_call(step, record, changed.get("prompt", prompt_before), settings)
    if "prompt" in changed and prompt_before is not None and step.stage == "compress":
        return _compression(prompt_before, changed["prompt"], settings)
    if "prompt" in changed:
        return _prompt(changed["prompt"], record, settings)
    return SpanInfo("UNKNOWN", None, _plain(changed), settings)


def _retrieval(docs: list[Document], record: Record, stage: Stage | None, settings: dict[str, Any]) -> SpanInfo:
    from mlflow.entities import Document as MlflowDocument

    query_key = getattr(stage, "query_key", None)
    query = record.inputs.get(query_key) if query_key else None
    outputs = [MlflowDocument(page_content=d.text[:PREVIEW_CHARS], id=d.id,
                              metadata={"doc_uri": d.id, "rank": r, "score": d.score})
               for r, d in enumerate(docs, 1)]
    attributes = {**settings, "promptkit.document_ids": [d.id for d in docs],
                  "promptkit.document_scores": [d.score for d in docs]}
    return SpanInfo("RETRIEVER", {"query": query} if query is not None else record.inputs, outputs, attributes)


def _exemplars(exemplars: list[Any], record: Record, settings: dict[str, Any]) -> SpanInfo:
    from mlflow.entities import Document as MlflowDocument

    outputs = [MlflowDocument(page_content=json.dumps(ex.fields, ensure_ascii=False, default=str)[:PREVIEW_CHARS],
                              metadata={"rank": r}) for r, ex in enumerate(exemplars, 1)]
    return SpanInfo("RETRIEVER", record.inputs, outputs, {**settings, "promptkit.exemplars": len(exemplars)})


def _prompt(prompt: Prompt, record: Record, settings: dict[str, Any]) -> SpanInfo:
    segments = _segments(prompt)
    attributes = {**settings, "promptkit.segments": list(segments),
                  "promptkit.segment_chars": {k: len(v) for k, v in segments.items()}}
    return SpanInfo("PROMPT", record.inputs, segments, attributes)


def _compression(before: Prompt, after: Prompt, settings: dict[str, Any]) -> SpanInfo:
    kinds = ("exemplars", "context")
    chars_before = sum(len(before.get(k) or "") for k in kinds)
    chars_after = sum(len(after.get(k) or "") for k in kinds)
    attributes = {**settings, "promptkit.compression.chars_before": chars_before,
                  "promptkit.compression.chars_after": chars_after,
                  "promptkit.compression.rate": round(chars_after / chars_before, 4) if chars_before else 1.0}
    return SpanInfo("COMPRESSOR", _segments(before), _segments(after), attributes)


def _model_call(step: TraceStep, record: Record, prompt: Prompt | None, settings: dict[str, Any]) -> SpanInfo:
    usage: Usage | None = step.changed.get("usage") or record.usage
    attributes: dict[str, Any] = dict(settings)
    if usage is not None:
        attributes.update({f"promptkit.usage.{k}": v for k, v in usage.model_dump().items()})
        attributes["promptkit.time_to_first_token_s"] = usage.first_token_seconds
        attributes["mlflow.chat.tokenUsage"] = {"input_tokens": usage.prompt_tokens,
                                                "output_tokens": usage.completion_tokens,
                                                "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if record.generation is not None:
        attributes["promptkit.finish_reason"] = record.generation.finish_reason
    outputs: Any = _plain(step.changed.get("output", record.output))
    if record.label_scores is not None:
        outputs = {"label": outputs, "label_scores": record.label_scores}
    inputs = {"prompt": prompt.text()[: 4 * PREVIEW_CHARS]} if prompt is not None else record.inputs
    return SpanInfo("LLM", inputs, outputs, attributes)


def _is_lm(stage: Stage | None) -> bool:
    from ..stages import LMStage

    return isinstance(stage, LMStage)


def _segments(prompt: Prompt) -> dict[str, str]:
    return {s.kind.value: s.text[:PREVIEW_CHARS] for s in prompt.segments}


def _settings(stage: Stage | None) -> dict[str, Any]:
    """The stage's non-default settings as span attributes (long values shortened)."""
    if stage is None:
        return {}
    config = stage.config()
    return {f"promptkit.stage.{k}": _short(v, 500) if not isinstance(v, (int, float, bool)) else v
            for k, v in config.items() if k != "stage"}


def _short(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(_plain(value), ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plain(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    return json.loads(json.dumps(value, ensure_ascii=False, default=to_jsonable_python))
