"""FormatSpread: how much accuracy moves under meaning-preserving changes of the prompt format."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import Field

from promptkit.pipeline import Pipeline
from promptkit.types import Example

from .base import Optimizer, with_prompt
from .schedule import CandidateScore

INPUT_NAMES = ["Input", "Text", "Sentence", "Review", "Question", "Passage"]
OUTPUT_NAMES = ["Output", "Answer", "Label", "Category", "Result"]
SEPARATORS = [": ", " - ", ":: ", " = ", ":\n"]
CASINGS = ["title", "upper", "lower"]
JOINERS = ["\n\n", "\n", "\n---\n", "\n\n\n"]


def _case(name: str, casing: str) -> str:
    return {"title": name.title(), "upper": name.upper(), "lower": name.lower()}[casing]


def format_settings(input_keys: list[str], output_key: str, in_name: str, out_name: str, sep: str,
                    casing: str, joiner: str) -> dict[str, Any]:
    """PromptTemplate settings for one format; several input fields get numbered names."""
    names = [in_name] if len(input_keys) == 1 else [f"{in_name} {i + 1}" for i in range(len(input_keys))]
    fields = "\n".join(f"{_case(n, casing)}{sep}{{{k}}}" for n, k in zip(names, input_keys))
    out = _case(out_name, casing)
    return {"input_format": fields, "output_format": f"{out}{sep}{{{output_key}}}",
            "answer_prefix": out + sep.rstrip(), "exemplar_separator": joiner}


class FormatSpread(Optimizer):
    """Sample ``num_formats`` plausible formats (field names, separators, casing, spacing between
    demonstrations), score each, and report the accuracy interval across them (``report.extra``:
    min, max, mean, spread). With ``keep_best`` the best format is returned, else the pipeline as given."""

    num_formats: int = Field(default=6, ge=1)
    keep_best: bool = True

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        keys, out_key = list(train[0].inputs), train[0].output_key
        space = [(i, o, s, c, j) for i in INPUT_NAMES for o in OUTPUT_NAMES for s in SEPARATORS
                 for c in CASINGS for j in JOINERS]
        picks = self._rng.sample(space, min(self.num_formats, len(space)))
        cands = []
        for n, p in enumerate(picks):
            settings = format_settings(keys, out_key, *p)
            cands.append((f"format{n}", with_prompt(pipeline, **settings), settings))
        for pipe, res in self.evaluate_pipes(cands):
            if self.keep_best:
                yield pipe, res

    def extra(self) -> dict[str, Any]:
        scores = [r.score for r in self._tried if r.name.startswith("format")]
        if not scores:
            return {}
        return {"min": min(scores), "max": max(scores), "mean": sum(scores) / len(scores),
                "spread": max(scores) - min(scores), "formats": len(scores)}
