"""Pipeline DSL: stages that edit records, composed with ``>>`` or ``Pipeline(...)``.

A :class:`Record` carries one input through the pipeline: its fields, the
documents retrieved for it, the exemplars chosen for it, the segmented prompt,
and the output. Stages are batch-first (``process(list[Record])``) so a
generation stage sends the whole batch to the engine at once, and every stage
is a pydantic model so recipes can build and validate it by name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .types import Document, Example, Generation, Prompt, Usage


class InputError(ValueError):
    """A pipeline input that is not usable: not a mapping of inputs, or without an input a stage needs."""


class MissingInputError(InputError, KeyError):
    """A record without the input a stage reads (also a KeyError, which such lookups raised before)."""

    def __str__(self) -> str:
        # KeyError would print the message quoted, as if it were the missing key itself.
        return str(self.args[0]) if self.args else ""


class TraceStep(BaseModel):
    """What one stage changed on one record."""

    stage: str
    seconds: float
    changed: dict[str, Any] = Field(default_factory=dict)
    started: float | None = None  # wall clock (epoch seconds) when the stage began the record's batch
    finished: float | None = None  # ... and when it finished it


class Record(BaseModel):
    """One input travelling through a pipeline."""

    inputs: dict[str, Any]
    documents: list[Document] = Field(default_factory=list)
    exemplars: list[Example] = Field(default_factory=list)
    prompt: Prompt | None = None
    output: Any = None
    reasoning: str | None = None  # free-text reasoning written before a structured output
    generation: Generation | None = None
    label_scores: dict[str, float] | None = None
    usage: Usage | None = None  # tokens of the last model call: cached, reused, recomputed, prefilled
    trace: list[TraceStep] = Field(default_factory=list)

    @classmethod
    def of(cls, x: Record | Example | Mapping[str, Any] | str, key: str = "question") -> Record:
        """Wrap a string (as ``{key: x}``), a mapping or an Example's inputs in a Record."""
        if isinstance(x, Record):
            return x
        if isinstance(x, Example):
            return cls(inputs=x.inputs)
        if isinstance(x, str):
            return cls(inputs={key: x})
        if not isinstance(x, Mapping):
            raise InputError(f"a pipeline input must be a string, a mapping of inputs, an Example or a Record; "
                             f"got {type(x).__name__} {x!r:.80}")
        return cls(inputs=dict(x))


_TRACED = ("documents", "exemplars", "prompt", "output", "label_scores", "usage")


def _snapshot(r: Record) -> dict[str, Any]:
    return {k: getattr(r, k) for k in _TRACED}


class Stage(BaseModel):
    """Base class of pipeline stages.

    Subclasses declare their settings as pydantic fields and implement
    :meth:`process`. Register them with :func:`promptkit.registry.register_stage`
    to make them available to recipes.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    stage_name: ClassVar[str] = "stage"

    def process(self, records: list[Record]) -> list[Record]:
        """Transform a batch of records (may edit them in place and return them)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Settings that rebuild this stage via the registry (``{'stage': name, ...}``)."""
        return {"stage": self.stage_name, **self.model_dump(mode="json", exclude_defaults=True)}

    def __call__(self, x: Any) -> Any:
        return Pipeline(self)(x)

    def __rshift__(self, other: Stage) -> Pipeline:
        return Pipeline(self, other)


class Pipeline(Stage):
    """An ordered composition of stages, itself a stage."""

    stage_name: ClassVar[str] = "pipeline"
    stages: list[Stage] = Field(default_factory=list)
    name: str = "pipeline"
    input_key: str = "question"

    def __init__(self, *stages: Stage, **kw: Any) -> None:
        flat: list[Stage] = list(kw.pop("stages", []))
        for s in stages:
            flat.extend(s.stages if isinstance(s, Pipeline) else [s])
        super().__init__(stages=flat, **kw)

    def __rshift__(self, other: Stage) -> Pipeline:
        return Pipeline(*self.stages, other, name=self.name, input_key=self.input_key)

    def process(self, records: list[Record]) -> list[Record]:
        for stage in self.stages:
            before = [_snapshot(r) for r in records]
            started, t0 = time.time(), time.perf_counter()
            records = stage.process(records)
            elapsed = time.perf_counter() - t0
            seconds = elapsed / max(1, len(records))
            for r, b in zip(records, before):
                changed = {k: v for k, v in _snapshot(r).items() if v != b[k]}
                r.trace.append(TraceStep(stage=stage.stage_name, seconds=seconds, changed=changed, started=started,
                                         finished=started + elapsed))
        return records

    def run(self, inputs: Iterable[Any]) -> list[Record]:
        """Run a batch of inputs (strings, mappings, Examples or Records)."""
        return self.process([Record.of(x, self.input_key) for x in inputs])

    def __call__(self, x: Any) -> Record | list[Record]:
        """Run one input (returns a Record) or a list of inputs (returns a list)."""
        if isinstance(x, (list, tuple)):
            return self.run(x)
        return self.run([x])[0]

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "input_key": self.input_key, "stages": [s.config() for s in self.stages]}

    def save(self, path: str | Path) -> None:
        """Write the pipeline as a recipe file (YAML or JSON by extension)."""
        path = Path(path)
        data = self.config()
        data["stages"] = [_relative_to(stage, path.parent) for stage in data["stages"]]
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Pipeline:
        """Rebuild a pipeline saved with :meth:`save` (any recipe file works)."""
        from .recipes import load_recipe

        return load_recipe(path)


def _relative_to(settings: dict[str, Any], recipe_dir: Path) -> dict[str, Any]:
    """A stage's settings with each relative path that exists here (a corpus, an index) rewritten
    from the working directory to the recipe's, as ``./`` or ``../``, which is how a recipe file
    names paths beside it; so the saved recipe runs from any directory."""
    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        if not isinstance(v, str) or not v or "\n" in v or len(v) > 1024 or Path(v).is_absolute() \
                or not Path(v).exists():
            return v
        rel = os.path.relpath(Path(v).resolve(), recipe_dir.resolve())
        return rel if rel.startswith("../") else f"./{rel}"

    return {k: fix(v) for k, v in settings.items()}
