"""Joint search over instruction × demonstrations (as MIPRO and EASE do), raced.

Instructions and demonstrations interact: the instruction that wins zero-shot
is not always the one that wins with examples in the prompt, so they are
searched together. Every combination is a candidate and all of them are
raced (:mod:`optimizers.racing`). The instruction comes first in the prompt
and the fixed demonstrations next, so candidates sharing an instruction run
back to back and its tokens are prefilled once for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import Field

from promptkit.pipeline import Pipeline
from promptkit.types import Example

from promptkit.stages import Classify

from .base import (Candidate, Optimizer, as_demos, prompt_stage, replace_stage, sample_demos, with_prompt,
                   with_scorer)
from .instructions import meta_prompt, propose_instructions
from .racing import Racing
from .schedule import CandidateScore, split_pipeline
from .stages import KNNExemplars


class JointSearch(Optimizer):
    """Instructions × demonstration options, raced.

    Instructions: the pipeline's own and up to ``num_instructions`` proposed by
    the LM from training examples (OPRO's meta-prompt). Demonstrations: the
    pipeline's own, ``num_sets`` label-balanced fixed sets of ``k`` training
    examples, and, with ``knn``, the ``k`` training examples nearest each input
    (sentence embeddings) — often worth more than any instruction to a small
    model. Scorers: every prompt is tried with each variant of the final LM
    stage in ``scorers`` (settings of that stage); by default a classifier with
    and without contextual calibration, and, for a chat model, each also on the
    raw prompt without the chat template (demonstrations read as a document to
    continue rather than a message, which small chat models often handle
    better).
    """

    k: int = Field(default=4, ge=1)
    num_instructions: int = Field(default=2, ge=0)
    num_sets: int = Field(default=2, ge=0)
    knn: bool = True
    scorers: list[dict[str, Any]] | None = None
    examples_shown: int = Field(default=4, ge=1)
    temperature: float = Field(default=0.9, ge=0.0)
    max_tokens: int = Field(default=40, ge=1)
    racing: Racing | None = Field(default_factory=Racing)

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        _, stage = prompt_stage(pipeline)
        instructions = [stage.instruction or ""]
        if self.num_instructions:
            meta = meta_prompt(train, [(instructions[0], self._tried[0].score)], self._rng, self.examples_shown, 1)
            proposed = propose_instructions(self._scheduler, meta, self.num_instructions, self.seed * 1000,
                                            self.max_tokens, self.temperature)
            instructions += [p for p in proposed if p not in instructions]
        sets = [as_demos(sample_demos(train, self.k, self._rng)) for _ in range(self.num_sets)]
        knn = self._knn_stage(pipeline, train) if self.knn else None  # one stage: the pool is embedded once
        cands: list[Candidate] = []
        for i, instruction in enumerate(instructions):
            base = with_prompt(pipeline, instruction=instruction) if i else pipeline
            for name, pipe, settings in self._demo_options(base, sets, knn):
                for scorer in self._scorers(pipeline):
                    cands.append((f"i{i}-{name}" + "".join(f"-{k}{int(v)}" for k, v in scorer.items()),
                                  with_scorer(pipe, scorer), {"instruction": instruction, **settings, **scorer}))
        seen, unique = [pipeline.config()], []  # the pipeline as given is the baseline
        for cand in cands:  # a small trainset can draw the same demonstration set twice: score it once
            config = cand[1].config()
            if config not in seen:
                seen.append(config)
                unique.append(cand)
        cands = unique
        self._info.update(instructions=instructions, candidates=len(cands))
        yield from self.evaluate_pipes(cands)

    def _knn_stage(self, pipeline: Pipeline, train: list[Example]) -> KNNExemplars:
        key = getattr(split_pipeline(pipeline)[1], "input_key", None)
        keys = list(train[0].inputs)
        return KNNExemplars(pool=as_demos(train), k=self.k, input_key=key if key in keys else keys[0],
                            output_key=train[0].output_key)

    def _demo_options(self, pipeline: Pipeline, sets: list[list[dict]], knn: KNNExemplars | None) -> list[Candidate]:
        opts: list[Candidate] = [("given", pipeline, {})]
        for s, demos in enumerate(sets):
            opts.append((f"set{s}", with_prompt(pipeline, exemplars=demos), {"exemplars": demos}))
        if knn is not None:
            opts.append(("knn", replace_stage(pipeline, prompt_stage(pipeline)[0], knn, insert=True), {"knn": self.k}))
        return opts

    def _scorers(self, pipeline: Pipeline) -> list[dict[str, Any]]:
        if self.scorers is not None:
            return self.scorers or [{}]
        stage = split_pipeline(pipeline)[1]
        variants: list[dict[str, Any]] = [{"calibrate": True}, {"calibrate": False}] if isinstance(stage, Classify) else [{}]
        if stage.chat is not False and stage.lm().chat:
            variants += [{**v, "chat": False} for v in variants]
        return variants
