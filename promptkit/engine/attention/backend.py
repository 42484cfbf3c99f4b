"""The attention backend: planned once per forward from its batch layout, then called per layer.

:meth:`AttentionBackend.forward` writes the layer's new keys and values to their
pool slots and computes every segment's attention over the keys the layout
gives it, choosing the path from the layout (planned in the constructor):

- a sliding window or softcapped scores: each segment over its context with an
  explicit mask (the matmul kernel);
- one token of one request (single-stream decode): its long runs of keys read
  in place, the rest gathered into one block;
- otherwise, per segment: scattered queries among reused KV (masked by
  position), a long prefill through the sparse kernel, a fresh prompt through
  causal SDPA, or a causal offset over its cached past; short segments
  (decode steps, questions after a cached prefix) batched into one padded
  product; then each prefix group shared by several segments attended to once
  and merged into their rows by log-sum-exp.

Each kernel (CPU flash, CUDA flash, the matmul reference, block-sparse) lives
in a file of its own; :func:`attend_lse` picks one for the device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ..kv_pool import split_runs
from . import cpu_flash, cuda_flash
from .layout import PAD_KEYS, BatchLayout, SegmentLayout, ShortPlan, gather_kv, one_step_keys, plan_short
from .matmul import attend_lse_blocks, attend_padded
from .merge import merge_lse

SparseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [H, m, D] over ``k``, ``v`` [Hkv, n, D] with its log-sum-exp (float32).

    With ``causal_offset`` c, query i sees keys j <= c + i; with a tensor [m], keys j <= c[i]. On
    CPU and CUDA a fused kernel never materializes the scores; elsewhere bounded matmuls do.
    """
    if cpu_flash.usable(q, k):
        return cpu_flash.attend_lse(q, k, v, scale, causal_offset)
    if cuda_flash.usable(q, causal_offset):
        return cuda_flash.attend_lse(q, k, v, scale, causal_offset)  # type: ignore[arg-type]
    return attend_lse_blocks(q, k, v, scale, causal_offset)


class AttentionBackend:
    """Attention of one forward over the engine's KV pool (see the module docstring)."""

    def __init__(self, layout: BatchLayout, kv: torch.Tensor, sparse: SparseFn | None = None) -> None:
        self.layout, self.kv, self.sparse = layout, kv, sparse
        device = kv.device
        self.one_step = one_step_keys(layout, device)
        short = [s for s in layout.segments if s.short]
        batched = len(short) > 1 and sum(s.past + s.length for s in short) <= PAD_KEYS
        self.short_plan: ShortPlan | None = plan_short(short, device, kv.dtype) if batched else None
        self.singles = [] if batched else short

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """q [H, T, D], k and v [Hkv, T, D] (RoPE applied) of the packed rows: out [T, H, D]."""
        k_pool, v_pool = self.kv[layer, 0], self.kv[layer, 1]
        k_pool.index_copy_(1, self.layout.write_slots, k.to(k_pool.dtype))
        v_pool.index_copy_(1, self.layout.write_slots, v.to(v_pool.dtype))
        if window is not None and all(seg.context <= window for seg in self.layout.segments):
            window = None  # every key is inside every window: plain causal attention
        if window is not None or softcap is not None:
            out = self._windowed(q, k_pool, v_pool, scale, window, softcap)
        elif self.one_step is not None and q.dtype == k_pool.dtype:
            return self._one_step(q, k_pool, v_pool, scale).to(q.dtype)
        else:
            out = self._packed(layer, q, k_pool, v_pool, scale)
        return out.to(q.dtype).transpose(0, 1)

    # -- paths -----------------------------------------------------------------------------
    def _packed(self, layer: int, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                scale: float) -> torch.Tensor:
        h, t, d = q.shape
        out = torch.empty(h, t, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(h, t, dtype=torch.float32, device=q.device) if self.layout.prefix_groups else None
        for seg in self.layout.segments:
            if not seg.short:
                self._segment(layer, q, seg, k_pool, v_pool, scale, out, lse)
        if self.short_plan is not None:
            o, l_ = _short_batch(q, self.short_plan, k_pool, v_pool, scale)
            out.index_copy_(1, self.short_plan.rows, o)
            if lse is not None:
                lse.index_copy_(1, self.short_plan.rows, l_)
        for seg in self.singles:
            o, l_ = _segment_runs(q, seg, k_pool, v_pool, scale)
            out[:, seg.start : seg.start + seg.length] = o
            if lse is not None:
                lse[:, seg.start : seg.start + seg.length] = l_
        for runs, rows in self.layout.prefix_groups:  # each shared prefix once, merged into its rows
            part = attend_lse(q[:, rows], gather_kv(k_pool, runs), gather_kv(v_pool, runs), scale, None)
            out[:, rows], lse[:, rows] = merge_lse([(out[:, rows], lse[:, rows]), part])  # type: ignore[index]
        return out

    def _segment(self, layer: int, q: torch.Tensor, seg: SegmentLayout, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, scale: float, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        """One segment that is not short: its rows of ``out`` (and of ``lse`` where prefix groups follow)."""
        s, e = seg.start, seg.start + seg.length
        if seg.positions is not None:  # scattered queries over all their keys, masked by position
            k, v = gather_kv(k_pool, seg.keys), gather_kv(v_pool, seg.keys)
            out[:, s:e] = attend_lse(q[:, s:e], k, v, scale, seg.positions)[0]
        elif seg.sparse and self.sparse is not None:  # a long prefill: block-sparse over all its keys
            k, v = gather_kv(k_pool, seg.prefix + seg.own), gather_kv(v_pool, seg.prefix + seg.own)
            out[:, s:e] = self.sparse(q[None, :, s:e], k[None], v[None], scale, layer)[0].float()
        else:
            k, v = gather_kv(k_pool, seg.keys), gather_kv(v_pool, seg.keys)
            if seg.past == 0 and seg.shared_len == 0:  # a fresh prompt, nothing to merge
                out[:, s:e] = F.scaled_dot_product_attention(q[None, :, s:e], k[None], v[None], is_causal=True,
                                                             scale=scale, enable_gqa=True)[0].float()
                return
            o, l_ = attend_lse(q[:, s:e], k, v, scale, seg.past)
            out[:, s:e] = o
            if lse is not None:
                lse[:, s:e] = l_
            return
        if lse is not None:  # scattered or sparse: no prefix group joins these rows
            lse[:, s:e] = 0.0

    def _one_step(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float) -> torch.Tensor:
        """One query token over all its keys: one fused call for one block of keys, else a call per
        block (long runs are never copied) merged by log-sum-exp. Returns [1, H, D]."""
        runs, rest = self.one_step  # type: ignore[misc]
        blocks = [(k_pool[:, a : a + n], v_pool[:, a : a + n]) for a, n in runs]
        if rest is not None:
            blocks.append((k_pool.index_select(1, rest), v_pool.index_select(1, rest)))
        h, _, d = q.shape
        if len(blocks) == 1:
            k, v = blocks[0]
            hkv = k.shape[0]
            out = F.scaled_dot_product_attention(q.reshape(1, hkv, h // hkv, d), k[None], v[None], scale=scale)
            return out.reshape(1, h, d)
        return merge_lse([attend_lse(q, k, v, scale, None) for k, v in blocks])[0].reshape(1, h, d)

    def _windowed(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float,
                  window: int | None, softcap: float | None) -> torch.Tensor:
        """Each segment over its context with an explicit mask (only the keys inside the window are read)."""
        h, t, d = q.shape
        out = torch.empty(h, t, d, dtype=torch.float32, device=q.device)
        for seg in self.layout.segments:
            first = seg.prefix_len + seg.own_past if seg.positions is None else int(seg.positions[0])
            rows = seg.prefix_len + seg.own_past if seg.positions is None else seg.positions
            lo = 0 if window is None else max(0, first - window + 1)  # keys no row of the segment sees
            runs = split_runs(seg.prefix + seg.own, lo)[1]
            k, v = gather_kv(k_pool, runs), gather_kv(v_pool, runs)
            out[:, seg.start : seg.start + seg.length] = attend_lse_blocks(
                q[:, seg.start : seg.start + seg.length], k, v, scale, rows - lo, window, softcap)[0]
        return out


def _short_batch(q: torch.Tensor, plan: ShortPlan, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Short segments over their keys, copied into one padded product: out [H, rows, D] and lse
    [H, rows], rows in segment order."""
    h, d = q.shape[0], q.shape[2]
    b, m = plan.query_idx.shape
    hkv = k_pool.shape[0]
    qb = q[:, plan.query_idx].view(hkv, h // hkv, b, m, d).permute(2, 0, 1, 3, 4).reshape(b, hkv, -1, d)
    ks = k_pool[:, plan.key_idx].transpose(0, 1)  # [B, Hkv, N, D]
    vs = v_pool[:, plan.key_idx].transpose(0, 1)
    kernel = cpu_flash.attend_padded if cpu_flash.usable(q, ks) else attend_padded
    out, lse = kernel(qb, ks, vs, plan.bias, scale)
    out = out.reshape(b, h, m, d).permute(0, 2, 1, 3)[plan.valid]  # [rows, H, D]
    lse = lse.reshape(b, h, m).permute(0, 2, 1)[plan.valid]  # [rows, H]
    return out.transpose(0, 1), lse.transpose(0, 1)


def _segment_runs(q: torch.Tensor, seg: SegmentLayout, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One short segment over its keys read in place, a run at a time, merged by log-sum-exp: the
    keys before its new tokens are seen whole; the new tokens' own keys causally."""
    qs = q[:, seg.start : seg.start + seg.length]
    before, new = split_runs(seg.keys, seg.past) if seg.length > 1 else (seg.keys, [])
    parts = [attend_lse(qs, k_pool[:, a : a + n], v_pool[:, a : a + n], scale, None) for a, n in before]
    if new:
        parts.append(attend_lse(qs, gather_kv(k_pool, new), gather_kv(v_pool, new), scale, causal_offset=0))
    return merge_lse(parts)


# -- transformers' attention interface -----------------------------------------------------
ATTN_NAME = "promptkit"
_active = threading.local()  # the backend of the forward this thread runs (each engine forwards on one thread)


@contextmanager
def active(backend: Any) -> Iterator[None]:
    """Route transformers' attention calls on this thread to ``backend`` for the duration."""
    _active.backend = backend
    try:
        yield
    finally:
        _active.backend = None


def hf_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 sliding_window: int | None = None, softcap: float | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention function over the active backend: query [1, H, T, D], key/value
    [1, Hkv, T, D] (RoPE applied) -> [1, T, H, D]."""
    backend = getattr(_active, "backend", None)
    if backend is None:
        raise RuntimeError("promptkit attention called outside an engine forward")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = backend.forward(module.layer_idx, query[0], key[0], value[0], scale, sliding_window, softcap)
    return out[None], None


def register() -> None:
    """Make ``attn_implementation="promptkit"`` available to transformers models."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, hf_attention)
