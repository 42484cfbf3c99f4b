"""Labelled few-shot exemplars: a random set, random search over sets, per-query kNN/MMR."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from promptkit.pipeline import Pipeline
from promptkit.types import Example

from .base import Optimizer, as_demos, prompt_stage, replace_stage, sample_demos, with_prompt, with_scorer
from .schedule import CandidateScore
from .stages import KNNExemplars


class LabeledFewShot(Optimizer):
    """``k`` labelled training examples as fixed demonstrations (DSPy's LabeledFewShot), label-balanced."""

    k: int = Field(default=4, ge=1)
    balanced: bool = True

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        demos = sample_demos(train, self.k, self._rng, self.balanced)
        yield from self.evaluate_pipes([("labeled", with_prompt(pipeline, exemplars=as_demos(demos)),
                                         {"exemplars": as_demos(demos)})])


class RandomFewShot(Optimizer):
    """Random search: ``num_candidates`` random ordered demo sets, the best on the validation set wins."""

    k: int = Field(default=4, ge=1)
    num_candidates: int = Field(default=8, ge=1)
    balanced: bool = True

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        cands = []
        for c in range(self.num_candidates):
            demos = as_demos(sample_demos(train, self.k, self._rng, self.balanced))
            cands.append((f"set{c}", with_prompt(pipeline, exemplars=demos), {"exemplars": demos}))
        yield from self.evaluate_pipes(cands)


class KNNFewShot(Optimizer):
    """Per-query exemplars: the ``k`` training examples nearest to each input (``strategy="mmr"``: diverse).

    A calibrated classifier measures its label bias on one prompt of a batch,
    which does not hold for the next input's own exemplars; so when the
    pipeline calibrates, the same selection is also tried uncalibrated.
    """

    k: int = Field(default=4, ge=1)
    strategy: Literal["knn", "mmr"] = "knn"
    diversity: float = Field(default=0.3, ge=0.0, le=1.0)

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        i, _ = prompt_stage(pipeline)
        keys = list(train[0].inputs)
        # Embed the field the classifier reads, when it names one the examples have.
        key = getattr(pipeline.stages[-1], "input_key", None)
        stage = KNNExemplars(pool=as_demos(train), k=self.k, input_key=key if key in keys else keys[0], output_key=train[0].output_key,
                             strategy=self.strategy, diversity=self.diversity)
        cand = replace_stage(pipeline, i, stage, insert=True)
        settings = {"strategy": self.strategy, "k": self.k}
        cands = [(self.strategy, cand, settings)]
        if getattr(cand.stages[-1], "calibrate", False):
            cands.append((f"{self.strategy}-uncalibrated", with_scorer(cand, {"calibrate": False}), {**settings, "calibrate": False}))
        yield from self.evaluate_pipes(cands)
