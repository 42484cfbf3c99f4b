"""Reflective instruction search (GEPA / OPRO line) under a hard metric-call budget.

The LM reads what the current candidate got wrong — input, expected output,
its output — and writes a revised instruction. Candidates are kept on a
Pareto front over the validation items (a candidate stays a possible parent
while it is best on some item), so an instruction that fixes one kind of
input is not lost to one that is better on average. The budget is counted in
metric calls (examples scored), never exceeded, and estimated before the
first LM call.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from promptkit.pipeline import Pipeline, Record
from promptkit.stages import Classify
from promptkit.types import Example, Prompt

from .base import Optimizer, prompt_stage, with_prompt
from .errors import OptimizerError
from .instructions import clean_instruction
from .schedule import CandidateScore, estimate_cost, split_pipeline

REFLECT_INSTRUCTION = (
    "You improve the instruction given to a model. Read the current instruction and the examples the model "
    "got wrong with it, then write one better instruction that would get them right. Reply with the "
    "instruction only."
)


def pareto_parents(scores: np.ndarray) -> np.ndarray:
    """Sampling weights of candidates (rows) from per-item scores (columns), GEPA's Pareto rule.

    A candidate's weight is the number of items on which it reaches the best
    score; candidates dominated by another (no better anywhere, worse somewhere)
    get weight 0, so duplicates of a better candidate are not drawn.
    """
    best = scores.max(axis=0)
    weight = (scores == best).sum(axis=1).astype(float)
    for i in range(len(scores)):
        others = np.delete(scores, i, axis=0)
        if len(others) and np.any(np.all(others >= scores[i], axis=1) & np.any(others > scores[i], axis=1)):
            weight[i] = 0.0
    return weight


class ReflectiveSearch(Optimizer):
    """Evolve the instruction by reflecting on failures; at most ``max_metric_calls`` examples scored.

    Each step: draw a parent from the Pareto front (weighted by the validation
    items it leads), score it on a ``minibatch`` of training examples, show the
    LM up to ``failures_shown`` of its failures and ask for a revised
    instruction, score the child on the same minibatch; a child that does
    better there is scored on the whole validation set and joins the pool. A
    step starts only if it fits the budget including that validation, so the
    metric calls never exceed ``max_metric_calls``. The cost estimate is
    printed (stderr, when ``verbose``) and kept in ``report.extra["estimate"]``.
    """

    max_metric_calls: int = Field(default=600, ge=1)
    minibatch: int = Field(default=8, ge=1)
    failures_shown: int = Field(default=4, ge=1)
    temperature: float = Field(default=0.7, ge=0.0)
    max_tokens: int = Field(default=48, ge=1)
    verbose: bool = True

    def step_cost(self, n_val: int) -> int:
        """Metric calls one step may spend: parent and child on a minibatch, the child on the validation set."""
        return 2 * self.minibatch + n_val

    def before_search(self, pipeline: Pipeline, train: list[Example], val: list[Example]) -> None:
        if self.max_metric_calls < len(val):
            raise OptimizerError(f"max_metric_calls={self.max_metric_calls} cannot pay for scoring the "
                                 f"{len(val)} validation examples once")
        # Rejected children cost only the two minibatches: the most steps (and proposals) is when all are.
        most_steps = (self.max_metric_calls - len(val)) // (2 * self.minibatch)
        sched = self._scheduler
        meta_tokens = 0
        if sched.tokenizes:
            meta_tokens = len(sched.lm.backend.encode(sched.lm.render(self._reflection_prompt(
                pipeline, [], []), chat=None))) + self.failures_shown * 60
        est = estimate_cost(sched, pipeline, self.max_metric_calls, most_steps, 1 + most_steps, meta_tokens)
        self._info["estimate"] = est.model_dump()
        if self.verbose:
            print(f"ReflectiveSearch (seed {self.seed}), budget {self.max_metric_calls} metric calls: "
                  f"{est.describe()}", file=sys.stderr)

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        sched = self._scheduler
        n_val = len(sched.examples)
        pool: list[tuple[Pipeline, CandidateScore]] = [(pipeline, self._tried[0])]
        seen = {prompt_stage(pipeline)[1].instruction or ""}
        history: list[dict[str, Any]] = self._info.setdefault("steps", [])
        step = 0
        while sched.metric_calls + self.step_cost(n_val) <= self.max_metric_calls:
            weights = pareto_parents(np.array([res.scores for _, res in pool]))
            parent_pipe, parent = pool[self._rng.choices(range(len(pool)), weights=list(weights))[0]]
            batch = self._rng.sample(train, min(self.minibatch, len(train)))
            records, before = sched.trace(f"{parent.name}@mb{step}", parent_pipe, batch)
            failures = [(ex, rec) for ex, rec, s in zip(batch, records, before.scores) if s < 1.0]
            entry: dict[str, Any] = {"step": step, "parent": parent.name, "parent_minibatch": before.score}
            history.append(entry)
            step += 1
            if not failures:  # nothing to reflect on; the minibatch calls are spent
                continue
            shown = self._rng.sample(failures, min(self.failures_shown, len(failures)))
            meta = self._reflection_prompt(parent_pipe, [ex for ex, _ in shown], [rec for _, rec in shown])
            gen = sched.generate(meta, max_tokens=self.max_tokens, temperature=self.temperature, stop=["\n"],
                                 seed=self.seed * 10007 + step)
            instruction = clean_instruction(gen.text)
            entry["proposal"] = instruction
            if not instruction or instruction in seen:
                continue
            seen.add(instruction)
            child_pipe = with_prompt(parent_pipe, instruction=instruction)
            _, after = sched.trace(f"s{step}", child_pipe, batch, {"instruction": instruction})
            entry["child_minibatch"] = after.score
            if after.score <= before.score:
                continue
            res = self.evaluate([(f"s{step}", child_pipe, {"instruction": instruction, "parent": parent.name})])[0]
            entry["child_validation"] = res.score
            pool.append((child_pipe, res))
            yield child_pipe, res
        self._info["pool"] = len(pool)

    def _reflection_prompt(self, pipeline: Pipeline, examples: Sequence[Example], records: Sequence[Record]) -> Prompt:
        _, stage = prompt_stage(pipeline)
        lm_stage = split_pipeline(pipeline)[1]
        lines = [f"Current instruction: {stage.instruction or '(none)'}"]
        if isinstance(lm_stage, Classify):
            lines.append("Possible outputs: " + ", ".join(lm_stage.labels))
        lines.append("Examples it got wrong:")
        for ex, rec in zip(examples, records):
            text = " | ".join(str(v) for v in ex.inputs.values())
            lines.append(f"Input: {text[:400]}\nExpected: {ex.output}\nGot: {rec.output}")
        return Prompt.from_parts(instruction=REFLECT_INSTRUCTION, question="\n".join(lines),
                                 answer_prefix="Better instruction:")
