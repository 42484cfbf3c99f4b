"""The engine: requests in, tokens out, every distinct prefix prefilled once.

One ``step()`` admits waiting requests (after prefilling the prefixes they
share), packs the next tokens of running requests into one sequence (decode
tokens plus prefill chunks, up to ``max_batch_tokens``), runs the model once,
then samples, scores and retires requests. Whoever calls ``run``/``stream``
drives the steps, so concurrent callers share batches without a server thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..backends.base import SamplingParams
from ..structured import accept_tokens, process_logits
from .attention import ATTN_NAME, BatchLayout, SegmentLayout, register, set_layout
from .prepack import first_fit_decreasing, packed_positions
from .radix_cache import CacheBudgetError, Node, RadixCache
from .sampler import sample
from .scheduler import longest_prefix_first, prefix_job_steps, shared_prefixes

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation, scoring or prefix-prefill job and its progress."""

    tokens: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    kind: str = "generate"  # "generate" | "score" | "prefix"
    score_from: int = 0  # score: first token whose log-probability is wanted
    stop_check: Callable[[list[int]], bool] | None = None
    processor: Any = None  # a promptkit.structured.LogitsProcessor: grammar mask, penalties, logit bias
    id: int = field(default_factory=lambda: next(_ids))
    prompt_len: int = 0
    last_node: Node | None = None
    cached_len: int = 0  # tokens covered by the locked tree path
    matched_len: int = 0  # prompt tokens served from the cache at admission
    own_kv: torch.Tensor | None = None
    own_len: int = 0  # tokens whose KV sits in own_kv
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # (token id, logprob) per step
    finished: bool = False
    finish_reason: str = ""
    error: Exception | None = None
    aborted: bool = False
    events: queue.SimpleQueue | None = None
    generator: torch.Generator | None = None
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.tokens)

    @property
    def computed(self) -> int:
        return self.cached_len + self.own_len

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prompt_len


class Engine:
    """Continuous-batching engine over a transformers causal LM with a radix prefix cache."""

    def __init__(self, model: Any, eos_ids: set[int], max_cache_bytes: int = 2 << 30,
                 max_batch_tokens: int = 2048, max_running: int = 64, share_min_tokens: int = 16,
                 sparse: Callable | None = None, sparse_min_length: int = 1 << 62) -> None:
        register()
        model.set_attn_implementation(ATTN_NAME)
        self.model = model
        self.eos_ids = eos_ids
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.bytes_per_token = self.num_layers * 2 * self.kv_heads * self.head_dim * p.element_size()
        self.cache = RadixCache(max_cache_bytes, self.bytes_per_token)
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.share_min_tokens = share_min_tokens
        self.sparse, self.sparse_min_length = sparse, sparse_min_length
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.steps = 0
        self._queue_lock = threading.Lock()
        self._step_lock = threading.RLock()

    # -- public API ----------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not req.tokens:
            raise ValueError("empty request: no tokens")
        if self.cache.enabled and req.prompt_len * self.bytes_per_token > self.cache.max_bytes:
            raise CacheBudgetError(
                f"a {req.prompt_len}-token request needs {req.prompt_len * self.bytes_per_token:,} bytes of KV, "
                f"more than the cache budget of {self.cache.max_bytes:,} bytes; raise max_cache_bytes "
                "or turn the cache off with max_cache_bytes=0")
        if req.params.temperature > 0:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(req.params.seed if req.params.seed is not None else
                                      torch.seed() % (1 << 63))
        with self._queue_lock:
            self.waiting.append(req)
        return req

    def run(self, reqs: list[Request]) -> list[Request]:
        """Submit ``reqs`` and drive the engine until all of them are finished."""
        for r in reqs:
            self.submit(r)
        for r in reqs:
            self._drive_until(r)
        return reqs

    def stream(self, req: Request) -> Iterator[int]:
        """Submit ``req`` and yield its tokens as they come; closing the iterator aborts it."""
        self.submit(req)
        sent = 0
        try:
            while True:
                if not req.finished:
                    with self._step_lock:
                        if not req.finished:
                            self.step()
                while sent < len(req.generated):
                    sent += 1
                    yield req.generated[sent - 1]
                if req.finished:
                    return
        finally:
            if not req.finished:
                req.aborted = True
                with self._step_lock:
                    self._retire(req, "abort")

    def stats(self) -> dict[str, Any]:
        s = self.cache.stats
        return {"tokens_requested": s.tokens_requested, "tokens_cached": s.tokens_cached,
                "tokens_prefilled": s.tokens_prefilled, "evictions": s.evictions,
                "evicted_tokens": s.evicted_tokens, "steps": self.steps, "running": len(self.running),
                "waiting": len(self.waiting), **{f"cache_{k}": v for k, v in self.cache.size_info().items()}}

    @torch.inference_mode()
    def attention_to(self, tokens: list[int], query_from: int, num_layers: int, first_layer: int = 0) -> torch.Tensor:
        """Attention each token receives from the tokens at ``query_from`` onward, averaged over
        heads, those queries and layers ``first_layer .. num_layers - 1`` (only the first
        ``num_layers`` layers are run)."""
        if not 0 < query_from < len(tokens):
            raise ValueError("query_from must split the tokens into a non-empty context and query")
        base = self.model.model
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.arange(len(tokens), device=self.device)[None]
        layout = BatchLayout([], probe=torch.zeros(len(tokens), device=self.device), probe_from=query_from,
                             probe_layers=range(first_layer, num_layers))
        with self._step_lock:
            set_layout(layout)
            try:
                hidden = base.embed_tokens(ids)
                rope = base.rotary_emb(hidden, pos)
                for layer in base.layers[:num_layers]:
                    hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            finally:
                set_layout(None)
        return layout.probe / max(1, num_layers - first_layer)

    # -- the step --------------------------------------------------------------
    def _drive_until(self, req: Request) -> None:
        while not req.finished:
            with self._step_lock:
                if not req.finished:
                    self.step()
        if req.error is not None:
            raise req.error

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, pack, forward, sample: one iteration of continuous batching."""
        with self._step_lock:
            self._admit()
            batch = self._plan()
            if not batch:
                return
            try:
                self._forward(batch)
            except Exception as e:  # fail the batch's requests, not every waiter forever
                for r, _ in batch:
                    r.error = e
                    self._retire(r, "error")
                raise
            self.steps += 1

    def _admit(self) -> None:
        with self._queue_lock:
            room = self.max_running - len(self.running)
            new, self.waiting = self.waiting[:room], self.waiting[room:]
        if not new:
            return
        if self.cache.enabled:
            self._prefill_shared_prefixes(new)
        limits = [r.score_from - 1 if r.kind == "score" else r.prompt_len - 1 for r in new]
        matches = [self.cache.match_prefix(r.tokens, lim) for r, lim in zip(new, limits)]
        for i in longest_prefix_first([m[1] for m in matches]):
            r, (node, n) = new[i], matches[i]
            if r.aborted:
                self._retire(r, "abort")
                continue
            self.cache.lock(node)
            r.last_node, r.cached_len, r.matched_len = node, n, n
            if r.kind != "prefix":
                self.cache.stats.tokens_requested += r.prompt_len
                self.cache.stats.tokens_cached += n
            extra = min(r.params.max_tokens, 64) if r.kind == "generate" else 0
            r.own_kv = self._kv_buffer(r.prompt_len - n + extra)
            self.running.append(r)

    def _kv_buffer(self, tokens: int) -> torch.Tensor:
        return torch.empty(self.num_layers, 2, self.kv_heads, tokens, self.head_dim, dtype=self.dtype,
                           device=self.device)

    def _reserve(self, r: Request, n: int) -> None:
        """Grow the private KV buffer (doubling) so ``n`` more tokens fit."""
        cap = r.own_kv.shape[3]  # type: ignore[union-attr]
        if r.own_len + n > cap:
            bigger = self._kv_buffer(max(r.own_len + n, 2 * cap))
            bigger[:, :, :, : r.own_len] = r.own_kv[:, :, :, : r.own_len]  # type: ignore[index]
            r.own_kv = bigger

    def _prefill_shared_prefixes(self, new: list[Request]) -> None:
        prompts = [r.tokens[: r.score_from] if r.kind == "score" else r.tokens for r in new]
        jobs = [p for p in shared_prefixes(prompts, self.share_min_tokens)
                if self.cache.match_prefix(list(p))[1] < len(p)]
        for group in prefix_job_steps(jobs):
            reqs = [Request(tokens=list(p), kind="prefix") for p in group]
            for r in reqs:
                node, n = self.cache.match_prefix(r.tokens)
                self.cache.lock(node)
                r.last_node, r.cached_len = node, n
                r.own_kv = self._kv_buffer(r.prompt_len - n)
            while any(not r.finished for r in reqs):
                self._forward(self._plan(reqs))

    def _plan(self, pool: list[Request] | None = None) -> list[tuple[Request, int]]:
        """One decode token per decoding request, then the first first-fit-decreasing bin of
        prefill work in the remaining token budget (a prompt longer than the budget is chunked)."""
        pool = self.running if pool is None else pool
        live = [r for r in pool if not r.finished]
        batch = [(r, 1) for r in live if not r.in_prefill]
        room = self.max_batch_tokens - len(batch)
        prefilling = [r for r in live if r.in_prefill]
        if prefilling and room > 0:
            need = [r.prompt_len - r.computed for r in prefilling]
            for i in first_fit_decreasing(need, room)[0]:
                batch.append((prefilling[i], min(need[i], room)))
        return batch

    def _forward(self, batch: list[tuple[Request, int]]) -> None:
        ids, starts, segs, groups = [], [], [], {}
        offset = 0
        for r, n in batch:
            self._reserve(r, n)
            ids.extend(r.tokens[r.computed : r.computed + n])
            starts.append(r.computed)
            path = r.last_node.path() if r.cached_len else []  # type: ignore[union-attr]
            seg = SegmentLayout(offset, n, r.own_kv, r.own_len, r.cached_len > 0)  # type: ignore[arg-type]
            if self._sparse_for(r, n):
                seg.sparse_prefix = [node.kv for node in path]
            else:
                for node in path:
                    groups.setdefault(id(node), (node.kv, []))[1].append(torch.arange(offset, offset + n))
            segs.append(seg)
            offset += n
        # Nodes seen by exactly the same rows are attended to as one (fewer, larger products).
        merged: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for kv, rows in groups.values():
            key = tuple((int(r[0]), len(r)) for r in rows)
            merged.setdefault(key, ([], rows))[0].append(kv)
        layout = BatchLayout(segs, [(kvs, torch.cat(rows).to(self.device)) for kvs, rows in merged.values()],
                             self.sparse)
        input_ids = torch.tensor([ids], device=self.device)
        positions = packed_positions(starts, [n for _, n in batch], self.device)[None]
        set_layout(layout)
        try:
            hidden = self.model.model(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state[0]
        finally:
            set_layout(None)
        # One lm_head call for every row whose logits are needed (scored tokens, next-token rows).
        rows, spans, offset = [], [], 0
        for r, n in batch:
            lo, hi = self._logit_rows(r, n)
            spans.append((len(rows), len(rows) + hi - lo))
            rows.extend(range(offset + lo, offset + hi))
            offset += n
        logits = self.model.lm_head(hidden[torch.tensor(rows, device=self.device)]).float() if rows else None
        for (r, n), (a, b) in zip(batch, spans):
            if r.in_prefill:
                self.cache.stats.tokens_prefilled += n
            self._after_forward(r, n, logits[a:b] if logits is not None else None)

    def _sparse_for(self, r: Request, n: int) -> bool:
        """Sparse attention pays only for a long prefill chunk over a long context."""
        return self.sparse is not None and n >= 128 and r.computed + n >= self.sparse_min_length

    def _logit_rows(self, r: Request, n: int) -> tuple[int, int]:
        """Rows (relative to the request's segment) whose logits this forward must produce."""
        first, end = r.computed, r.computed + n
        if r.kind == "score":
            lo, hi = max(first, r.score_from - 1), min(end, r.prompt_len - 1)
            return (lo - first, hi - first) if hi > lo else (0, 0)
        if r.kind == "generate" and end == len(r.tokens):
            return n - 1, n
        return 0, 0

    def _after_forward(self, r: Request, n: int, logits: torch.Tensor | None) -> None:
        first = r.computed
        r.own_len += n
        if r.kind == "score":
            if logits is not None and len(logits):
                lo = max(first, r.score_from - 1)
                target = torch.tensor(r.tokens[lo + 1 : lo + 1 + len(logits)], device=logits.device)
                logp = torch.log_softmax(logits, -1)
                r.logprobs.extend(logp.gather(-1, target[:, None])[:, 0].tolist())
                if r.params.top_logprobs:
                    vals, ids = logp.topk(r.params.top_logprobs)
                    r.top_logprobs.extend(list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist()))
        if r.in_prefill:
            return
        if r.kind == "prefix":
            self._cache_prompt(r, r.prompt_len)
            return self._retire(r, "stop")
        if r.kind == "score":
            self._cache_prompt(r, r.score_from)
            return self._retire(r, "stop")
        if len(r.generated) == 0:
            self._cache_prompt(r, r.prompt_len)
        assert logits is not None
        row = logits[-1]
        if r.processor is not None:  # the logprobs below stay those of the raw logits
            row = row[None].clone()
            process_logits(row, [r.processor], [r.generated])
            row = row[0]
        tok = sample(row, r.params.temperature, r.params.top_p, r.generator)
        if r.params.logprobs or r.params.top_logprobs:
            logp = torch.log_softmax(logits[-1], -1)
            r.logprobs.append(float(logp[tok]))
            if r.params.top_logprobs:
                vals, ids = logp.topk(r.params.top_logprobs)
                r.top_logprobs.append(list(zip(ids.tolist(), vals.tolist())))
        if tok in self.eos_ids:
            return self._retire(r, "stop")
        r.tokens.append(tok)
        r.generated.append(tok)
        if r.processor is not None:
            accept_tokens([r.processor], [tok])
            if r.processor.finished:  # the grammar is complete: only EOS could follow
                return self._retire(r, "stop")
        if r.stop_check is not None and r.stop_check(r.generated):
            return self._retire(r, "stop")
        if len(r.generated) >= r.params.max_tokens or r.aborted:
            self._retire(r, "abort" if r.aborted else "length")

    def _cache_prompt(self, r: Request, upto: int) -> None:
        """Copy the prompt's KV into the tree so later requests share it.

        The request keeps its own copy: its private tokens stay in one buffer,
        which decode attends to in a single batched product.
        """
        if self.cache.enabled and upto > r.cached_len:
            self.cache.insert(r.tokens[:upto], r.own_kv[:, :, :, : upto - r.cached_len], r.cached_len)  # type: ignore[index]

    def _retire(self, r: Request, reason: str) -> None:
        if r.finished:
            return
        if r.kind == "generate" and self.cache.enabled and r.own_kv is not None and r.computed > r.cached_len:
            self.cache.insert(r.tokens[: r.computed], r.own_kv[:, :, :, : r.own_len], r.cached_len)
        if r.last_node is not None:
            self.cache.unlock(r.last_node)
        r.own_kv, r.last_node = None, None
        r.finished, r.finish_reason = True, reason
        r.seconds = time.perf_counter() - r.started
        if r in self.running:
            self.running.remove(r)
        r.done.set()
