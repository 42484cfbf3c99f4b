"""EASE-style search over ordered exemplar sets with a linear-UCB bandit on set embeddings.

Each candidate is an ordered set of demonstrations (order is part of the
candidate: permutations of one subset are distinct arms). An arm is embedded
from the text of its exemplar block (the sentence embedder, or the LM's mean
last hidden state), lifted with random ReLU features (a finite-width stand-in
for the neural tangent features of EASE's neural bandit), and a ridge
regression on observed validation scores ranks unexplored arms by upper
confidence: ``mean + beta * sqrt(x^T A^-1 x)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import Field

from promptkit.embed import get_embedder
from promptkit.pipeline import Pipeline
from promptkit.types import Example

from .base import Optimizer, as_demos, prompt_stage, sample_demos, with_prompt
from .schedule import CandidateScore


class LinUCB:
    """Ridge regression with an upper-confidence bonus (LinUCB)."""

    def __init__(self, dim: int, ridge: float = 1.0, beta: float = 1.0) -> None:
        self.A = ridge * np.eye(dim)
        self.b = np.zeros(dim)
        self.beta = beta

    def update(self, x: np.ndarray, reward: float) -> None:
        self.A += np.outer(x, x)
        self.b += reward * x

    def ucb(self, X: np.ndarray) -> np.ndarray:
        A_inv = np.linalg.inv(self.A)
        mean = X @ (A_inv @ self.b)
        width = np.sqrt(np.einsum("ij,jk,ik->i", X, A_inv, X))
        return mean + self.beta * width


def random_features(X: np.ndarray, width: int, seed: int) -> np.ndarray:
    """``[x, relu(W x) / sqrt(width)]``: the input plus random ReLU features (NTK-like, fixed)."""
    W = np.random.default_rng(seed).normal(size=(X.shape[1], width)) / np.sqrt(X.shape[1])
    return np.hstack([X, np.maximum(X @ W, 0.0) * np.sqrt(2.0 / width)])


class EASE(Optimizer):
    """Bandit search over ordered exemplar sets; one set then serves every query.

    ``pool_size`` arms are drawn (``num_subsets`` label-balanced subsets, each in
    several orders); ``n_init`` random arms are scored first, then ``rounds``
    rounds each score the ``per_round`` arms of highest upper confidence.
    """

    k: int = Field(default=4, ge=1)
    pool_size: int = Field(default=32, ge=2)
    orders_per_subset: int = Field(default=4, ge=1)
    n_init: int = Field(default=4, ge=1)
    rounds: int = Field(default=3, ge=0)
    per_round: int = Field(default=2, ge=1)
    beta: float = Field(default=0.5, ge=0.0)
    ridge: float = Field(default=1.0, gt=0.0)
    features: Literal["embedder", "lm"] = "embedder"
    feature_width: int = Field(default=64, ge=0)

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        arms = self._arms(train)
        _, stage = prompt_stage(pipeline)
        texts = [stage.exemplar_block(arm) or "" for arm in arms]
        X = self._embed(pipeline, texts)
        X = random_features(X, self.feature_width, self.seed) if self.feature_width else X
        bandit = LinUCB(X.shape[1], self.ridge, self.beta)
        seen: set[int] = set()
        history: list[dict[str, Any]] = self._info.setdefault("history", [])
        batch = self._rng.sample(range(len(arms)), min(self.n_init, len(arms)))
        for rnd in range(self.rounds + 1):
            cands = [(f"arm{j}", with_prompt(pipeline, exemplars=as_demos(arms[j])),
                      {"exemplars": as_demos(arms[j]), "arm": j}) for j in batch]
            for (pipe, res), j in zip(self.evaluate_pipes(cands), batch):
                seen.add(j)
                bandit.update(X[j], res.score + 0.1 * res.soft)  # soft score breaks ties on small sets
                history.append({"round": rnd, "arm": j, "score": res.score})
                yield pipe, res
            left = [j for j in range(len(arms)) if j not in seen]
            if not left or self._exhausted:
                return
            ucb = bandit.ucb(X[left])
            batch = [left[i] for i in np.argsort(-ucb, kind="stable")[: self.per_round]]

    def _arms(self, train: list[Example]) -> list[list[Example]]:
        """Distinct ordered sets: subsets, each in up to ``orders_per_subset`` orders."""
        arms: list[list[Example]] = []
        seen: set[tuple[str, ...]] = set()
        tries = 0
        while len(arms) < self.pool_size and tries < self.pool_size * 20:
            tries += 1
            subset = sample_demos(train, self.k, self._rng)
            for _ in range(self.orders_per_subset):
                order = self._rng.sample(subset, len(subset))
                key = tuple(ex.model_dump_json() for ex in order)
                if key not in seen and len(arms) < self.pool_size:
                    seen.add(key)
                    arms.append(order)
        return arms

    def _embed(self, pipeline: Pipeline, texts: list[str]) -> np.ndarray:
        if self.features == "embedder":
            return get_embedder().encode(texts).astype(np.float64)
        return lm_block_embeddings(pipeline.stages[-1].lm(), texts)  # type: ignore[attr-defined]


def lm_block_embeddings(lm: Any, texts: list[str]) -> np.ndarray:
    """Mean last hidden state of the LM over each text (unit length), as EASE embeds exemplar sets."""
    import contextlib

    import torch

    be = lm.backend
    model, tok = be.model, be.tokenizer
    engine = getattr(be, "engine", None)
    lock = engine.exclusive() if engine is not None else contextlib.nullcontext()
    out = []
    with lock, torch.inference_mode():
        # The engine routes attention through its own packed layout; plain SDPA for this side pass.
        current = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            for t in texts:
                ids = torch.tensor([tok(t)["input_ids"]], device=be.device)
                h = model.model(input_ids=ids).last_hidden_state[0].float().mean(0)
                out.append((h / h.norm()).cpu().numpy())
        finally:
            model.set_attn_implementation(current)
    return np.stack(out).astype(np.float64)
