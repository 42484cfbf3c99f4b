"""One forward of the model over a planned batch, and the logits it must produce.

The batch's new tokens go end to end into one sequence (position ids restart
at each request's cached length; a request recomputing tokens among reused
KV brings its own scattered positions). Attention (``attention.py``) reads and
writes the KV pool through the layout built here. Logits come from the
model's own head (``logits_to_keep`` picks the rows), so whatever the model
does after its last layer (final softcapping, logit scales) is applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .attention import ATTN_NAME, AttentionBackend, BatchLayout, SegmentLayout, active, register
from .compiled import CompiledDecode
from .compiled import usable as compiled_usable
from .kv_pool import KVPool, merge_runs, run_slots, split_runs
from .lean import LeanForward
from .lean import supports as lean_supports
from .probe import AttentionProbe, DeviationProbe, first_layers
from .request import Kind, Request
from .sparse import SparseConfig, SparseStats, sparse_attention
from .weights import model_bytes

SPARSE_MIN_CHUNK = 128  # a prefill chunk shorter than this gains nothing from sparse attention


class ModelRunner:
    """Runs a transformers causal LM whose attention goes through the engine's KV pool."""

    def __init__(self, model: Any, pool: KVPool, sparse: SparseConfig | None = None, lean: bool = True,
                 compile_decode: str = "auto") -> None:
        register()
        self.model, self.pool = model, pool
        self.lean = LeanForward(model) if lean and lean_supports(model) else None
        self.compiled = CompiledDecode(self.lean, pool, compile_decode) \
            if compile_decode != "off" and compiled_usable(self.lean, pool) else None
        self.device = pool.kv.device
        fused = [p.module for w in self.lean.layers for p in (w.qkv, w.gate_up)] if self.lean else []
        self.weight_bytes = model_bytes(model, *fused)  # the model and the lean forward's joined projections
        self.sparse_config = sparse if sparse is not None and sparse.enabled else None
        self.sparse_stats = SparseStats() if self.sparse_config is not None else None

    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layer: int) -> torch.Tensor:
        out, info = sparse_attention(q, k, v, self.sparse_config, scale=scale)
        self.sparse_stats.record(layer, info)  # type: ignore[union-attr]
        return out

    def _use_sparse(self, r: Request, n: int) -> bool:
        """Sparse attention pays only for a long prefill chunk over a long context."""
        cfg = self.sparse_config
        return cfg is not None and n >= SPARSE_MIN_CHUNK and r.computed + n >= cfg.min_length

    @torch.inference_mode()
    def forward(self, batch: list[tuple[Request, int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Run ``batch`` (request, new tokens); return the logits rows it needs ([R, V], float32) and
        each request's ``(first, end)`` slice of them (the rows of :func:`logit_rows`)."""
        if self.compiled is not None and len(batch) == 1:
            logits = self._compiled_step(*batch[0])
            if logits is not None:
                return logits, [(0, 1)]
        layout, input_ids, positions = self._layout(batch)
        rows, spans = [], []
        offset = 0
        for r, n in batch:
            lo, hi = logit_rows(r, n)
            spans.append((len(rows), len(rows) + hi - lo))
            rows.extend(range(offset + lo, offset + hi))
            offset += n
        keep = torch.tensor(rows or [0], device=self.device)  # an empty tensor would mean "every row"
        sparse = self._sparse if self.sparse_config is not None else None
        logits = self._run(input_ids, positions, keep, AttentionBackend(layout, self.pool.kv, sparse))
        return logits[0].float(), spans

    def _compiled_step(self, r: Request, n: int) -> torch.Tensor | None:
        """The next-token logits [1, V] of a lone request decoding one token, from the compiled graph;
        None when the step is anything else or the graph cannot take it."""
        if n != 1 or r.kv.todo is not None or r.kind != Kind.GENERATE or r.computed + 1 != len(r.tokens):
            return None
        if self.lean.window is not None and r.computed >= self.lean.window:
            return None  # the graph attends to every key; a sliding window needs the eager forward
        path = r.kv.node.path() if r.kv.node is not None and r.kv.cached_len else []
        own, _ = split_runs(r.kv.runs, r.kv.own_len + 1)
        past, last = split_runs(merge_runs([p.run for p in path] + own), r.computed)
        return self.compiled.step(r.tokens[r.computed], r.position(r.computed), past, last[0][0])  # type: ignore[union-attr]

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, backend: Any,
             layers: int | None = None) -> torch.Tensor | None:
        """The model over ``input_ids`` [1, T] with its attention through ``backend``: the logits of the
        rows in ``keep``, or (``layers``) only the first layers run and nothing returned."""
        if self.lean is not None:
            return self.lean(input_ids, positions, keep, backend, layers)
        with active(backend), _attention_of(self.model, ATTN_NAME), \
                (first_layers(self.model, layers) if layers is not None else contextlib.nullcontext()):
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=keep)
        return None if layers is not None else out.logits

    @torch.inference_mode()
    def kv_deviation(self, batch: list[tuple[Request, int]], layer: int) -> torch.Tensor:
        """Run ``batch`` up to ``layer`` (the layers before it write their K/V as usual); return,
        per packed row, the squared distance between the K/V that ``layer`` computes and those
        already in the row's slot."""
        layout, input_ids, positions = self._layout(batch)
        probe = DeviationProbe(layout, self.pool.kv, layer)
        self._run(input_ids, positions, torch.tensor([0], device=self.device), probe, layers=layer + 1)
        if probe.deviation is None:
            raise ValueError(f"layer {layer} is past the model's last layer")
        return probe.deviation

    def _layout(self, batch: list[tuple[Request, int]]) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
        """The attention layout of ``batch``, its token ids [1, T] and position ids [1, T]."""
        ids, starts, segs, writes = [], [], [], []
        paths = [r.kv.node.path() if r.kv.node is not None and r.kv.cached_len else [] for r, _ in batch]
        sparse = [self._use_sparse(r, n) for r, n in batch]
        # A cached node is attended to once for all the segments that share it (cascade); a node
        # only one segment uses is part of that segment's own keys, read in the same product.
        users: dict[int, int] = {}
        for path, sp, (r, _) in zip(paths, sparse, batch):
            for node in path if not sp and r.kv.todo is None else ():
                users[id(node)] = users.get(id(node), 0) + 1
        groups: dict[int, tuple[Any, list[torch.Tensor]]] = {}
        offset = 0
        for (r, n), path, sp in zip(batch, paths, sparse):
            if r.kv.todo is not None:  # recomputing scattered positions among reused KV
                seg, write = self._scattered(r, n, offset, path)
                ids.extend(r.tokens[p] for p in r.todo_positions(n))  # type: ignore[union-attr]
                starts.append(0)
                segs.append(seg)
                writes.append(write)
                offset += n
                continue
            own, _ = split_runs(r.kv.runs, r.kv.own_len + n)
            writes.append(split_runs(own, r.kv.own_len)[1])
            shared = [] if sp else [node for node in path if users[id(node)] > 1]
            for node in shared:
                groups.setdefault(id(node), (node.run, []))[1].append(torch.arange(offset, offset + n))
            segs.append(SegmentLayout(offset, n, own, r.kv.own_len, prefix=merge_runs([p.run for p in path]),
                                      prefix_len=r.kv.cached_len, shared_len=sum(len(p.tokens) for p in shared),
                                      keys=merge_runs([p.run for p in path[len(shared):]] + own), sparse=sp))
            ids.extend(r.tokens[r.computed : r.computed + n])
            starts.append(r.computed)
            offset += n
        layout = BatchLayout(segs, self._prefix_groups(groups),
                             write_slots=run_slots([w for ws in writes for w in ws], self.device))
        positions = torch.cat([torch.arange(s, s + n, device=self.device) for s, (_, n) in zip(starts, batch)])
        for seg, (r, n) in zip(segs, batch):
            if seg.positions is not None:  # scattered among reused KV
                positions[seg.start : seg.start + seg.length] = seg.positions
            elif r.positions is not None:  # selective prefill: tokens keep their places in the longer prompt
                positions[seg.start : seg.start + n] = torch.tensor([r.position(i) for i in range(r.computed, r.computed + n)])
        return layout, torch.tensor([ids], device=self.device), positions[None]

    def _scattered(self, r: Request, n: int, offset: int, path: list) -> tuple[SegmentLayout, list]:
        """The segment of a request computing ``n`` of its scattered positions among reused KV (it
        attends to its whole context alone), and the pool runs its new K/V go to (a slot each)."""
        pos = r.todo_positions(n)
        own, _ = split_runs(r.kv.runs, pos[-1] + 1 - r.kv.cached_len)  # type: ignore[index]
        slots = run_slots(own)[torch.tensor(pos) - r.kv.cached_len].tolist()
        prefix = merge_runs([p.run for p in path])
        seg = SegmentLayout(offset, n, own, 0, prefix=prefix, prefix_len=r.kv.cached_len, keys=merge_runs(prefix + own),
                            positions=torch.tensor(pos, device=self.device))
        return seg, merge_runs([(s, 1) for s in slots])

    @staticmethod
    def _prefix_groups(groups: dict[int, tuple[Any, list[torch.Tensor]]]) -> list[tuple[list, torch.Tensor]]:
        """Nodes seen by exactly the same rows are attended to as one (fewer, larger products)."""
        merged: dict[tuple, tuple[list, list[torch.Tensor]]] = {}
        for run, rows in groups.values():
            key = tuple((int(r[0]), len(r)) for r in rows)
            merged.setdefault(key, ([], rows))[0].append(run)
        return [(merge_runs(runs), torch.cat(rows)) for runs, rows in merged.values()]

    @torch.inference_mode()
    def attention_to(self, tokens: list[int], query_from: int, num_layers: int, first_layer: int = 0) -> torch.Tensor:
        """Attention each token receives from the tokens at ``query_from`` onward, averaged over
        heads, those queries and layers ``first_layer .. num_layers - 1`` (the layers after
        those are not run)."""
        if not 0 < query_from < len(tokens):
            raise ValueError("query_from must split the tokens into a non-empty context and query")
        n = len(tokens)
        probe = AttentionProbe(n, query_from, range(first_layer, num_layers), self.device)
        self._run(torch.tensor([tokens], device=self.device), torch.arange(n, device=self.device)[None],
                  torch.tensor([0], device=self.device), probe, layers=num_layers)
        return probe.received / max(1, num_layers - first_layer)


@contextlib.contextmanager
def _attention_of(model: Any, name: str) -> Iterator[None]:
    """``model``'s transformers modules call the attention registered as ``name`` for the duration;
    the model is left as the caller gave it."""
    before = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


def logit_rows(r: Request, n: int) -> tuple[int, int]:
    """Rows (relative to the request's segment) whose logits a forward of ``n`` tokens must produce:
    scored tokens, or the last token when the request samples next."""
    pos = r.todo_positions(n)  # scattered: the wanted positions are the last ones, which are consecutive
    end = r.computed + n if pos is None else pos[-1] + 1
    first = end - n
    if r.kind == Kind.SCORE:
        lo, hi = max(first, r.score_from - 1), min(end, r.prompt_len - 1)
        assert pos is None or hi <= lo or pos[lo - first] == lo, "scored positions must be computed together"
        return (lo - first, hi - first) if hi > lo else (0, 0)
    return (n - 1, n) if r.kind == Kind.GENERATE and end == len(r.tokens) else (0, 0)
