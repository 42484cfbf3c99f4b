"""Selective prefill: prefill only the prompt tokens that matter, each at its own position.

Two ways to score the tokens, both by the attention the prompt's last tokens
(the question and the last window, always prefilled) pay to each earlier one:

- ``filter`` (GemFilter): the target model's own first layers, up to ``layer``;
- ``spec`` (SpecPrefill): a small draft model, all its layers. The draft may
  tokenize differently: its scores reach the target's tokens through the
  characters each token spells.

The target then prefills the kept tokens only (:attr:`Request.positions`). The
result is an approximation: such a request is never cached as an exact prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModeSettings(BaseModel):
    """Settings chosen by a ``mode``, which a bare string names: ``"spec"`` is ``{"mode": "spec"}``."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: object) -> object:
        return {"mode": data} if isinstance(data, str) else data


class SelectivePrefill(ModeSettings):
    """How a selective prefill chooses its tokens."""

    mode: Literal["filter", "spec"] = "filter"
    keep: float = Field(0.3, gt=0.0, le=1.0, description="share of the scored tokens prefilled")
    layer: int | None = Field(None, ge=1, description="filter: layers of the target that score the tokens "
                              "(default: a third of them)")
    draft: str | None = Field(None, description="spec: the draft model (an embedded name or a local directory)")
    tail: int = Field(64, ge=1, description="last tokens always prefilled (the question and the last window); "
                      "their queries score the others")
    sink: int = Field(4, ge=0, description="first tokens always prefilled (attention sinks)")
    min_tokens: int = Field(256, ge=1, description="shorter prompts are prefilled whole")

    @model_validator(mode="after")
    def _needs_draft(self) -> SelectivePrefill:
        if self.mode == "spec" and not self.draft:
            raise ValueError("prefill mode 'spec' needs a draft model: draft='smollm2-135m-instruct' (say)")
        return self


def kept_indices(scores: torch.Tensor, keep: float, tail: int, sink: int) -> list[int]:
    """Sorted indices of the tokens to prefill: the first ``sink`` and last ``tail`` tokens, and the
    ``keep`` share of the others with the highest ``scores`` [n]."""
    n = scores.shape[0]
    body = torch.arange(min(sink, n), max(min(sink, n), n - tail))
    k = math.ceil(keep * len(body))
    chosen = body[scores[body].topk(k).indices] if k and len(body) else body[:0]
    ends = [*range(min(sink, n)), *range(max(0, n - tail), n)]
    return sorted({*ends, *chosen.tolist()})


def tail_scores(engine: object, tokens: list[int], tail: int, layers: int, first_layer: int = 0) -> torch.Tensor:
    """The attention the last ``tail`` tokens pay to each token, averaged over layers ``first_layer ..
    layers - 1`` (the layers after those do not run): GemFilter's scores from the target's layer
    ``layers`` alone (``first_layer = layers - 1``), SpecPrefill's from every layer of a draft."""
    return engine.attention_to(tokens, max(1, len(tokens) - tail), layers, first_layer)  # type: ignore[attr-defined]


def carry_scores(scores: torch.Tensor, source: Sequence[tuple[int, int]], target: Sequence[tuple[int, int]]
                 ) -> torch.Tensor:
    """Scores of one tokenization's tokens (character spans ``source``) carried to another's
    (``target``): a target token gets the highest score among the source tokens it overlaps."""
    out = torch.zeros(len(target))
    j = 0
    for i, (a, b) in enumerate(target):
        while j < len(source) and source[j][1] <= a:
            j += 1
        k, best = j, 0.0
        while k < len(source) and source[k][0] < max(b, a + 1):
            best = max(best, float(scores[k]))
            k += 1
        out[i] = best
    return out
