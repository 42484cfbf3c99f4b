"""Instruction search: LM-proposed instructions (APE/OPRO) and a ClaPS-style pruned token search."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydantic import Field

from promptkit.pipeline import Pipeline
from promptkit.types import Example, Prompt

from .base import Optimizer, prompt_stage, with_prompt
from .schedule import CandidateScore, PrefixScheduler, split_pipeline

META_INSTRUCTION = (
    "Write one short instruction that tells a reader how to turn each input below into its output. "
    "Reply with the instruction only."
)


def clean_instruction(text: str) -> str:
    """First line of a proposal, without list markers, quotes or an 'Instruction:' label."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "").strip()
    for prefix in ("Instruction:", "instruction:", "- ", "* ", "1. "):
        if line.startswith(prefix):
            line = line[len(prefix):].strip()
    return line.strip("\"'` ")


class InstructionSearch(Optimizer):
    """OPRO-style loop: the LM proposes instructions from examples and past (instruction, score)
    pairs, shown worst to best; each round's proposals are scored together (they share no prefix
    beyond the system turn, but each is prefilled once for all validation inputs)."""

    rounds: int = Field(default=2, ge=1)
    proposals_per_round: int = Field(default=4, ge=1)
    examples_shown: int = Field(default=4, ge=1)
    history_shown: int = Field(default=5, ge=0)
    temperature: float = Field(default=0.9, ge=0.0)
    max_tokens: int = Field(default=40, ge=1)

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        _, stage = prompt_stage(pipeline)
        history: list[tuple[str, float]] = [(stage.instruction or "", self._tried[0].score)]
        seen = {stage.instruction or ""}
        for rnd in range(self.rounds):
            meta = meta_prompt(train, history, self._rng, self.examples_shown, self.history_shown)
            props = [p for p in propose_instructions(self._scheduler, meta, self.proposals_per_round,
                                                     self.seed * 1000 + rnd * 100, self.max_tokens, self.temperature)
                     if p not in seen]
            seen.update(props)
            if not props:
                continue
            cands = [(f"r{rnd}p{i}", with_prompt(pipeline, instruction=p), {"instruction": p})
                     for i, p in enumerate(props)]
            for pipe, res in self.evaluate_pipes(cands):
                history.append((res.settings["instruction"], res.score))
                yield pipe, res
            if self._exhausted:
                return


def meta_prompt(train: list[Example], history: list[tuple[str, float]], rng: random.Random, examples_shown: int,
                history_shown: int) -> Prompt:
    """OPRO's meta-prompt: a few training examples, then past instructions with their scores, worst to best."""
    shown = rng.sample(train, min(examples_shown, len(train)))
    demos = "\n".join(f"Input: {' | '.join(str(v) for v in ex.inputs.values())}\nOutput: {ex.output}"
                      for ex in shown)
    past = sorted((h for h in history if h[0]), key=lambda h: h[1])[-history_shown:] if history_shown else []
    scored = "\n".join(f"Instruction: {i}\nScore: {round(100 * s)}" for i, s in past)
    body = demos + ("\n\nPrevious instructions, worst to best:\n" + scored if scored else "")
    return Prompt.from_parts(instruction=META_INSTRUCTION, question=body, answer_prefix="Instruction:")


def propose_instructions(sched: PrefixScheduler, meta: Prompt, n: int, seed: int, max_tokens: int,
                         temperature: float) -> list[str]:
    """Up to ``n`` distinct instructions sampled from the LM for ``meta`` (one call each, charged to the budget)."""
    # One call per proposal: a shared seed would make a batch's samples identical.
    gens = [sched.generate(meta, max_tokens=max_tokens, temperature=temperature, stop=["\n"], seed=seed + i)
            for i in range(n)]
    return [p for p in dict.fromkeys(clean_instruction(g.text) for g in gens) if p]


def word_tokens(tokenizer: Any, min_chars: int = 3) -> tuple[np.ndarray, list[str]]:
    """Vocabulary ids whose text is one space-led alphabetic word (the searchable prompt tokens)."""
    ids, words = [], []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        w = text.strip()
        if text.startswith(" ") and len(w) >= min_chars and w.isascii() and w.isalpha():
            ids.append(tid)
            words.append(w)
    return np.array(ids), words


class ClaPS(Optimizer):
    """Clustering and pruning for black-box prompt search (ClaPS), over a few appended prompt tokens.

    1. Cluster the LM's input-embedding vectors of word tokens with k-means (faiss).
    2. Influence: append ``samples_per_cluster`` tokens of each cluster to the
       instruction, score them; a cluster's influence is its best score.
    3. Keep the ``keep_clusters`` most influential clusters, then greedily add up
       to ``num_tokens`` tokens, each chosen among ``per_step`` sampled from them.
    """

    n_clusters: int = Field(default=16, ge=2)
    samples_per_cluster: int = Field(default=1, ge=1)
    keep_clusters: int = Field(default=3, ge=1)
    num_tokens: int = Field(default=2, ge=1)
    per_step: int = Field(default=4, ge=1)

    def search(self, pipeline: Pipeline, train: list[Example]) -> Iterator[tuple[Pipeline, CandidateScore]]:
        _, stage = prompt_stage(pipeline)
        base = stage.instruction or ""
        words, labels = self._clusters(split_pipeline(pipeline)[1].lm())
        nprng = np.random.default_rng(self.seed)
        members = [np.flatnonzero(labels == c) for c in range(self.n_clusters)]
        members = [m for m in members if len(m)]

        def cands(suffixes: list[str], tag: str) -> list[tuple[str, Pipeline, dict[str, Any]]]:
            return [(f"{tag}{i}", with_prompt(pipeline, instruction=(base + " " + s).strip()),
                     {"instruction": (base + " " + s).strip()}) for i, s in enumerate(suffixes)]

        probes = [(c, str(words[j])) for c, m in enumerate(members)
                  for j in nprng.choice(m, min(self.samples_per_cluster, len(m)), replace=False)]
        influence = np.full(len(members), -np.inf)
        for (c, _), (pipe, res) in zip(probes, self.evaluate_pipes(cands([w for _, w in probes], "probe"))):
            influence[c] = max(influence[c], res.score + 0.1 * res.soft)
            yield pipe, res
        if self._exhausted:
            return
        kept = [members[c] for c in np.argsort(-influence)[: self.keep_clusters]]
        space = np.concatenate(kept)
        self._info.update({"clusters_kept": len(kept), "tokens_kept": int(len(space)), "tokens_total": len(words)})
        best = max(self._tried[1:], key=lambda r: r.key, default=self._tried[0])
        suffix = best.settings.get("instruction", base)[len(base):].strip()
        for step in range(self.num_tokens - (1 if suffix else 0)):
            picks = [str(words[j]) for j in nprng.choice(space, min(self.per_step, len(space)), replace=False)]
            results = list(self.evaluate_pipes(cands([(suffix + " " + w).strip() for w in picks], f"s{step}_")))
            yield from results
            top = max(results, key=lambda r: r[1].key)[1]
            if top.key <= best.key or self._exhausted:
                return
            best, suffix = top, top.settings["instruction"][len(base):].strip()

    def _clusters(self, lm: Any) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        tok = lm.backend.tokenizer
        ids, words = word_tokens(tok)
        emb = lm.backend.model.get_input_embeddings().weight.detach().float().cpu().numpy()[ids]
        emb = np.ascontiguousarray(emb / np.linalg.norm(emb, axis=1, keepdims=True), dtype=np.float32)
        km = faiss.Kmeans(emb.shape[1], self.n_clusters, niter=10, seed=self.seed, verbose=False)
        km.train(emb)
        _, assign = km.index.search(emb, 1)
        return np.array(words), assign[:, 0]
