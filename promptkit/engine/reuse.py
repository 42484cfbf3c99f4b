"""Assembling a prompt from its documents' stored KV (TurboRAG, CacheBlend, EPIC).

A request whose documents are marked (``Request.reuse``) is assembled right
after admission, before its prefill:

1. each document past the cached prefix is looked up in the chunk store by the
   hash of its tokens and lead-in; those missing are encoded alone after the
   lead-in (one batch of internal jobs) and stored;
2. their KV is copied into the request's own slots, the keys re-rotated from
   the positions they were encoded at to those they land at;
3. the positions to compute are chosen: every token outside a reused document
   (the text around the documents, the question), and per mode: ``sink``, the
   first tokens of each document; ``blend``, the share of document tokens whose
   K/V at ``select_layer`` deviate most from the stored ones once every token
   has run through the layers before it in context; ``none``, nothing more;
4. the request is left with ``todo``, those positions in order; the planner
   computes them like any prefill (chunked if long): scattered queries over the
   patched context, whose new K/V replace the stored ones in the request's slots.

The recomputed tokens' KV is exactly what a full prefill of the prompt gives
when the other document tokens hold their stored KV at every layer (``sink``,
``none``) or at the layers from ``select_layer`` on (``blend``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .chunk_store import Chunk, chunk_key
from .kv_pool import run_slots, split_runs
from .request import Kind, Request
from .rerotate import Rerotator, ReuseUnsupportedError, rerotator_for
from .runner import ModelRunner
from .scheduler import Scheduler


@dataclass(eq=False)
class _Plan:
    """One request's assembly: its documents past the cached prefix and their stored chunks."""

    r: Request
    lead: tuple[int, ...]
    spans: list[tuple[int, int]]
    keys: list[bytes]
    chunks: list[Chunk | None] = field(default_factory=list)
    compute: torch.Tensor | None = None  # [prompt_len - cached_len] bool: positions to compute
    reused: int = 0  # document tokens taken from the store
    probe_len: int = 0  # blend: positions run through the layers before select_layer


class Assembler:
    """Fills the chunk store and assembles requests from it (see the module docstring)."""

    def __init__(self, model: Any, scheduler: Scheduler, runner: ModelRunner, run_jobs: Callable[[list[Request]], None],
                 prefill_prefixes: Callable[[list[tuple[int, ...]]], None]) -> None:
        self.model, self.scheduler, self.runner = model, scheduler, runner
        self.run_jobs, self.prefill_prefixes = run_jobs, prefill_prefixes
        self.pool, self.cache, self.store = scheduler.pool, scheduler.cache, scheduler.store
        self.max_batch_tokens = scheduler.config.max_batch_tokens
        self._rerotator: Rerotator | ReuseUnsupportedError | None = None
        self.reused_tokens = self.recomputed_tokens = 0

    def rerotator(self) -> Rerotator:
        """The model's re-rotation, or :class:`ReuseUnsupportedError` saying why it has none."""
        if self._rerotator is None:
            try:
                self._rerotator = rerotator_for(self.model)
            except ReuseUnsupportedError as e:
                self._rerotator = e
        if isinstance(self._rerotator, ReuseUnsupportedError):
            raise self._rerotator
        return self._rerotator

    # -- the store ---------------------------------------------------------------------
    def store_chunks(self, lead_in: list[int], chunks: list[list[int]]) -> int:
        """Encode ``chunks`` alone after ``lead_in`` into the store (those not there yet);
        returns how many are stored now."""
        self.rerotator()
        chunks = [c for c in chunks if c]
        keys = [chunk_key(lead_in, c) for c in chunks]
        added = self._encode({k: (tuple(lead_in), tuple(c)) for k, c in zip(keys, chunks) if k not in self.store})
        for c in added.values():
            self.store.unpin(c)
        return sum(k in self.store for k in keys)

    def _encode(self, misses: dict[bytes, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[bytes, Chunk]:
        """Encode each chunk alone after its lead-in and store it (pinned); a chunk the pool has
        no room for is left out."""
        if not misses:
            return {}
        if self.cache.enabled:  # each lead-in once, into the prefix tree, ahead of its chunks
            self.prefill_prefixes(sorted({lead for lead, _ in misses.values() if lead}, key=len))
        started = []
        for key, (lead, toks) in misses.items():
            job = self.scheduler.start_job(list(lead + toks), match_limit=len(lead))
            if job is not None:
                started.append((key, lead, job))
        try:
            self.run_jobs([job for _, _, job in started])
        finally:
            added = {}
            for key, lead, job in started:
                if job.pending == 0:  # the chunk's slots go to the store, the lead-in's back to the pool
                    head, runs = split_runs(job.kv.runs, len(lead) - job.kv.cached_len)
                    self.pool.free(head)
                    job.kv.runs = []
                    added[key] = c = self.store.add(key, job.tokens[len(lead):], runs, base=len(lead),
                                                    lead=chunk_key(lead, []))
                    self.store.pin(c)
                    self.store.stats.stored_tokens += c.length
                self.scheduler.retire(job, keep=False)
        return added

    # -- assembly --------------------------------------------------------------------------
    def assemble(self, reqs: list[Request]) -> None:
        """Fill the own slots of newly admitted ``reqs`` from the store and set what each must
        compute (``todo``); a request with nothing to reuse is left to prefill as usual."""
        plans = [p for r in reqs if (p := self._plan(r)) is not None]
        if not plans:
            return
        pinned: list[Chunk] = []
        try:
            misses: dict[bytes, tuple[tuple[int, ...], tuple[int, ...]]] = {}
            first_miss: dict[bytes, _Plan] = {}
            for p in plans:
                for key, (s, e) in zip(p.keys, p.spans):
                    c = self.store.get(key)
                    if c is None and key not in misses:
                        misses[key], first_miss[key] = (p.lead, tuple(p.r.tokens[s:e])), p
                    elif c is not None:
                        self.store.pin(c)
                        pinned.append(c)
                    p.chunks.append(c)
            added = self._encode(misses)
            pinned.extend(added.values())
            for key, c in added.items():
                first_miss[key].r.counts.stored_tokens += c.length
            for p in plans:
                p.chunks = [c if c is not None else added.get(k) for c, k in zip(p.chunks, p.keys)]
                self._place(p)
            self._select(plans)
        finally:
            for c in pinned:
                self.store.unpin(c)

    def _plan(self, r: Request) -> _Plan | None:
        spec = r.reuse
        if spec is None or not spec.config.reuses or not spec.spans:
            return None
        keep_from = r.score_from - 1 if r.kind == Kind.SCORE else r.prompt_len - 1  # always computed
        spans = [(s, e) for s, e in spec.spans
                 if s >= r.kv.cached_len and e <= keep_from and e - s >= spec.config.min_chunk_tokens]
        if not spans:
            return None
        lead = spec.lead_in if spec.lead_in is not None else self.store.lead_in
        if lead is None:
            lead = tuple(r.tokens[: spec.spans[0][0]])
        return _Plan(r, tuple(lead), spans, [chunk_key(lead, r.tokens[s:e]) for s, e in spans])

    def _place(self, p: _Plan) -> None:
        """Copy the plan's stored chunks into its request's own slots, keys re-rotated."""
        r = p.r
        self.scheduler.rematch(r)  # its lead-in may have just been cached
        n0 = r.kv.cached_len
        p.compute = torch.ones(r.prompt_len - n0, dtype=torch.bool)
        kept = [((s, e), c) for (s, e), c in zip(p.spans, p.chunks) if c is not None and s >= n0]
        if not kept:
            return
        dev = self.pool.kv.device
        own = run_slots(r.kv.runs, dev)
        src = torch.cat([run_slots(c.runs, dev) for _, c in kept])
        dst = torch.cat([own[s - n0 : e - n0] for (s, e), _ in kept])
        delta = torch.cat([torch.full((e - s,), s - c.base, dtype=torch.long) for (s, e), c in kept])
        kv = self.pool.kv
        kv[:, 0][:, :, dst] = self.rerotator().rotate(kv[:, 0][:, :, src], delta)
        kv[:, 1][:, :, dst] = kv[:, 1][:, :, src]
        for (s, e), _ in kept:
            p.compute[s - n0 : e - n0] = False
        p.reused = int((~p.compute).sum())
        p.probe_len = kept[-1][0][1] - n0
        r.kv.exact_len = kept[0][0][0]

    def _select(self, plans: list[_Plan]) -> None:
        """Mark the document tokens each mode recomputes, and hand every request its ``todo``."""
        blend = [p for p in plans if p.reused and p.r.reuse.config.mode == "blend"]  # type: ignore[union-attr]
        for layer in sorted({p.r.reuse.config.select_layer for p in blend}):  # type: ignore[union-attr]
            group = [p for p in blend if p.r.reuse.config.select_layer == layer]  # type: ignore[union-attr]
            for p, dev in zip(group, self._deviations(group, layer)):
                candidates = (~p.compute[: p.probe_len]).nonzero()[:, 0]
                k = math.ceil(round(p.r.reuse.config.recompute_ratio * p.reused, 6))  # type: ignore[union-attr]
                if k:
                    top = dev[candidates].nan_to_num(nan=float("inf")).topk(min(k, len(candidates))).indices
                    p.compute[candidates[top]] = True
        for p in plans:
            r, cfg = p.r, p.r.reuse.config  # type: ignore[union-attr]
            if cfg.mode == "sink" and p.reused:
                n0 = r.kv.cached_len
                for (s, e), c in zip(p.spans, p.chunks):
                    if c is not None and s >= n0:
                        p.compute[s - n0 : min(e, s + cfg.sink_tokens) - n0] = True
            recomputed = p.reused - int((~p.compute).sum()) if p.reused else 0
            r.counts.recomputed_tokens, r.counts.reused_tokens = recomputed, p.reused - recomputed
            self.recomputed_tokens += recomputed
            self.reused_tokens += p.reused - recomputed
            r.kv.todo = (p.compute.nonzero()[:, 0] + r.kv.cached_len).tolist()

    def _deviations(self, plans: list[_Plan], layer: int) -> list[torch.Tensor]:
        """Run each plan's positions up to ``layer`` in context (the layers before it now hold the
        exact K/V of every position) and return their K/V deviation there, per plan."""
        done = [0] * len(plans)
        parts: list[list[torch.Tensor]] = [[] for _ in plans]
        try:
            while any(d < p.probe_len for d, p in zip(done, plans)):
                batch, room, members = [], self.max_batch_tokens, []
                for i, p in enumerate(plans):
                    n = min(p.probe_len - done[i], room)
                    if n > 0:
                        p.r.kv.own_len = done[i]  # the probe reads this chunk's earlier positions as own past
                        batch.append((p.r, n))
                        members.append(i)
                        room -= n
                dev = self.runner.kv_deviation(batch, layer).cpu()
                at = 0
                for i, (_, n) in zip(members, batch):
                    parts[i].append(dev[at : at + n])
                    done[i] += n
                    at += n
        finally:
            for p in plans:
                p.r.kv.own_len = 0
        return [torch.cat(x) for x in parts]
