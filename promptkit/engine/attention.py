"""Attention over a packed batch whose requests share cached prefixes.

The model runs on one packed sequence: the new tokens of every request laid
end to end (block-diagonal causal attention, computed block by block, never
over padding). Each request's keys are the KV of its cached prefix, a path of
radix-tree nodes shared with other requests, followed by its own KV buffer.
Queries of all requests that share a node attend to it in one matrix product
(as in Hydragen / cascade attention); the partial results are merged with
their log-sum-exp, so a shared prefix is read once per step however many
requests use it.

This module plugs into transformers through ``AttentionInterface`` under the
name ``"promptkit"``; the layout of the current forward is set per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .kv_pool import Run, merge_runs, run_slots, split_runs

ATTN_NAME = "promptkit"
_MAX_SCORE_ELEMENTS = 1 << 25  # bound the score matrix of one block (~128 MB in float32)
SHORT_SEGMENT = 64  # segments up to this long (with a cached past) share one padded product
PAD_KEYS = 4096  # ... while their keys together are this few (copying more every layer costs more than it saves)
IN_PLACE_RUN = 1024  # a decode token reads a run of this many keys in place (a copy every layer costs more than a merge)


@dataclass
class SegmentLayout:
    """One request's slice of the packed sequence.

    Its keys are positions ``0 .. context``: a cached prefix (``prefix`` runs, positions
    ``0 .. prefix_len``) then its own tokens (``own`` runs, the new ones last). The first
    ``shared_len`` positions come from prefix groups other segments of the batch share; the
    segment attends to the rest, ``keys``, by itself (``past`` of them precede its new tokens).
    """

    start: int  # first row in the packed sequence
    length: int  # new tokens in this forward
    own: list[Run]  # pool runs of the request's own tokens, these new ones included
    own_past: int  # own tokens whose KV was computed before this forward
    prefix: list[Run] = field(default_factory=list)
    prefix_len: int = 0
    shared_len: int = 0
    keys: list[Run] = field(default_factory=list)  # runs of positions shared_len .. context
    sparse: bool = False  # attend to prefix + own at once through the sparse kernel (a long prefill)
    # Scattered queries (recomputing tokens among reused KV): the position of each new token; the
    # segment attends to prefix + own (which ends at its last position), key j seen by a query at p
    # when j <= p. ``own_past`` is then 0 and the new tokens' slots are anywhere in ``own``.
    positions: torch.Tensor | None = None

    @property
    def past(self) -> int:
        """Keys in ``keys`` before the first new token (the causal offset)."""
        return self.prefix_len - self.shared_len + self.own_past

    @property
    def context(self) -> int:
        """Keys the last new token sees (its position + 1)."""
        if self.positions is not None:
            return self.prefix_len + sum(n for _, n in self.own)
        return self.prefix_len + self.own_past + self.length


@dataclass
class ShortPlan:
    """Short segments (decode steps, questions after a cached prefix) whose keys are few enough
    to be copied into one padded product; built once per forward, used by every layer."""

    rows: torch.Tensor  # [R] packed rows, segment order
    key_idx: torch.Tensor  # [B, N] pool slot of each key (padded with slot 0)
    query_idx: torch.Tensor  # [B, M] packed row of each query (padded with row 0)
    bias: torch.Tensor  # [B, 1, M, N] 0 where a query sees a key, -inf elsewhere
    valid: torch.Tensor  # [B, M] real (not padding) queries


@dataclass
class BatchLayout:
    """Everything the attention function needs to know about the current forward."""

    segments: list[SegmentLayout]
    # runs of cached prefix KV (consecutive on a path) -> packed rows of every query that sees them whole
    prefix_groups: list[tuple[list[Run], torch.Tensor]] = field(default_factory=list)
    pool: Any = None  # the engine's KVPool: ``pool.kv[layer, 0 | 1]`` is [kv_heads, slots, head_dim]
    write_slots: torch.Tensor | None = None  # [T] pool slot of each packed row's new key and value
    sparse: Callable | None = None  # (q, k, v, scale, layer) -> out, for long prefills
    probe: torch.Tensor | None = None  # [T] accumulates attention paid to each key by rows >= probe_from
    probe_from: int = 0
    probe_layers: range = range(0)  # layers whose attention is accumulated
    deviation_layer: int = -1  # at this layer, measure how far new K/V are from the slots' and stop
    deviation: torch.Tensor | None = None  # [T] squared distance of each row's new K and V to the old
    _short: tuple[ShortPlan | None, list[SegmentLayout]] | None = None
    _one_step: tuple[bool, Any] = (False, None)

    def one_step_keys(self, device: torch.device) -> tuple[list[Run], torch.Tensor | None] | None:
        """For a forward of one new token of one request (single-stream decode), its keys: the runs
        of at least :data:`IN_PLACE_RUN` slots (read in place) and the slot indices of the others
        (gathered into one block), or None for any other forward. Built on first use."""
        if not self._one_step[0]:
            keys = None
            if len(self.segments) == 1 and not self.prefix_groups and self.probe is None:
                seg = self.segments[0]
                if seg.length == 1 and seg.positions is None and not seg.sparse and seg.shared_len == 0:
                    runs = merge_runs(seg.keys)
                    whole = [r for r in runs if r[1] >= IN_PLACE_RUN or len(runs) == 1]
                    rest = [r for r in runs if r not in whole]
                    keys = (whole, run_slots(rest, device) if rest else None)
            self._one_step = (True, keys)
        return self._one_step[1]

    def short_plan(self, device: torch.device, dtype: torch.dtype) -> tuple[ShortPlan | None, list[SegmentLayout]]:
        """Short segments: the padded plan of those batched together, and those attended one by one
        (a lone segment, or keys too many to copy every layer). Built on first use."""
        if self._short is None:
            short = [s for s in self.segments if is_short(s)]
            if len(short) > 1 and sum(s.past + s.length for s in short) <= PAD_KEYS:
                self._short = (_plan_short(short, device, dtype), [])
            else:
                self._short = (None, short)
        return self._short


def is_short(seg: SegmentLayout) -> bool:
    return seg.length <= SHORT_SEGMENT and seg.past > 0 and not seg.sparse and seg.positions is None


def _plan_short(segs: list[SegmentLayout], device: torch.device, dtype: torch.dtype) -> ShortPlan:
    lengths = [s.length for s in segs]
    n_keys = [s.past + s.length for s in segs]
    m, n = max(lengths), max(n_keys)
    rows = torch.cat([torch.arange(s.start, s.start + s.length) for s in segs])
    query_idx = torch.zeros(len(segs), m, dtype=torch.long)
    key_idx = torch.zeros(len(segs), n, dtype=torch.long)
    for i, s in enumerate(segs):
        query_idx[i, : s.length] = torch.arange(s.start, s.start + s.length)
        key_idx[i, : n_keys[i]] = torch.cat([torch.arange(a, a + k) for a, k in s.keys])
    past = torch.tensor([s.past for s in segs])
    allowed = torch.arange(n)[None, None, :] <= (past[:, None] + torch.arange(m)[None, :])[..., None]
    bias = torch.zeros(len(segs), 1, m, n, dtype=dtype).masked_fill_(~allowed[:, None], float("-inf"))
    valid = torch.arange(m)[None, :] < torch.tensor(lengths)[:, None]
    return ShortPlan(rows.to(device), key_idx.to(device), query_idx.to(device), bias.to(device), valid.to(device))


def gather_kv(pool_kv: torch.Tensor, runs: list[Run]) -> torch.Tensor:
    """``pool_kv`` [kv_heads, slots, head_dim] at ``runs``: a view for one run, else a copy."""
    runs = merge_runs(runs)
    if len(runs) == 1:
        return pool_kv[:, runs[0][0] : runs[0][0] + runs[0][1]]
    return torch.cat([pool_kv[:, s : s + n] for s, n in runs], dim=1)


_state = threading.local()


def set_layout(layout: BatchLayout | None) -> None:
    _state.layout = layout


def current_layout() -> BatchLayout:
    layout = getattr(_state, "layout", None)
    if layout is None:
        raise RuntimeError("promptkit attention called outside an engine forward")
    return layout


# Fused kernels that also return the log-sum-exp (what merging partial results needs).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_cuda_kernel_ok: dict[tuple[torch.device, torch.dtype], bool] = {}


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [H, m, D] over ``k``, ``v`` [Hkv, n, D] with its log-sum-exp.

    With ``causal_offset`` c, query i sees keys j <= c + i; with a tensor [m], keys j <= c[i].
    Returns out [H, m, D] (float32) and lse [H, m]. On CPU and CUDA a fused kernel never
    materializes the scores; elsewhere (or if the CUDA kernel fails its first check) bounded
    matmuls do.
    """
    if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype == k.dtype:
        return _attend_lse_fused(q, k, v, scale, causal_offset)
    if q.device.type == "cuda" and not torch.is_tensor(causal_offset) and _cuda_kernel_usable(q.device, q.dtype):
        return _attend_lse_cuda(q, k, v, scale, causal_offset)
    return attend_lse_blocks(q, k, v, scale, causal_offset)


def _flash_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA flash attention [H, m, D] x [Hkv, n, D] with its lse; causal means a top-left-aligned
    square (n == m). Without causality the g query heads of a KV head become rows of one product."""
    h, m, d = q.shape
    hkv = k.shape[0]
    g = h // hkv
    if causal:
        q4, k4, v4 = q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None]
    else:
        q4, k4, v4 = q.reshape(1, hkv, g * m, d), k[None], v[None]
    o, lse = _FLASH_CUDA(q4, k4, v4, is_causal=causal, scale=scale)[:2]
    return o.reshape(h, m, d).float(), lse.reshape(h, m).float()


def _attend_lse_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     causal_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend_lse` on CUDA: with a causal offset c, keys before c are seen by every query
    (one unmasked call) and keys c .. c+m form a causal square (one causal call), merged by lse."""
    if causal_offset is None:
        return _flash_cuda(q, k, v, scale, causal=False)
    c, m = causal_offset, q.shape[1]
    out, lse = _flash_cuda(q, k[:, c : c + m], v[:, c : c + m], scale, causal=True)
    if c > 0:
        o, l = _flash_cuda(q, k[:, :c], v[:, :c], scale, causal=False)
        new = torch.logaddexp(lse, l)
        out = out * torch.exp(lse - new)[..., None] + o * torch.exp(l - new)[..., None]
        lse = new
    return out, lse


def _cuda_kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Check the CUDA kernel path once per device and dtype against the matmul reference;
    a kernel that is missing, refuses the inputs or disagrees is not used."""
    key = (device, dtype)
    if key not in _cuda_kernel_ok:
        ok = _FLASH_CUDA is not None
        if ok:
            try:
                g = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(4, 5, 64, device=device, dtype=dtype, generator=g)
                k, v = (torch.randn(2, 12, 64, device=device, dtype=dtype, generator=g) for _ in range(2))
                for c in (None, 7):
                    got, want = _attend_lse_cuda(q, k, v, 0.125, c), attend_lse_blocks(q, k, v, 0.125, c)
                    tol = 1e-4 if dtype == torch.float32 else 2e-2
                    ok = ok and all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(got, want))
            except RuntimeError:
                ok = False
        _cuda_kernel_ok[key] = ok
    return _cuda_kernel_ok[key]


def _last_keys(a: int, b: int, causal_offset: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[b - a, 1]: the last key each query row a..b may see."""
    if torch.is_tensor(causal_offset):
        return causal_offset[a:b, None]
    return torch.arange(a, b, device=device)[:, None] + causal_offset


def _attend_lse_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal_offset: int | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    h, m, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    g = h // hkv
    if causal_offset is None:  # the query heads of one KV head become rows of one product
        o, lse = _FLASH_CPU(q.reshape(1, hkv, g * m, d), k[None], v[None], scale=scale)[:2]
    else:
        rows = _last_keys(0, m, causal_offset, q.device)
        bias = torch.zeros(m, n, dtype=q.dtype, device=q.device)
        bias.masked_fill_(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
        o, lse = _FLASH_CPU(q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None],
                            attn_mask=bias[None, None], scale=scale)[:2]
    return o.reshape(h, m, d).float(), lse.reshape(h, m).float()


def attend_lse_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal_offset: int | torch.Tensor | None, window: int | None = None,
                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend_lse` with plain matmuls over bounded blocks of queries (any device).

    ``window`` (with ``causal_offset``): query i also sees only keys j > c + i - window (a
    sliding window of that many keys). ``softcap``: scores become ``tanh(s / cap) * cap``.
    """
    h, m, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    g = h // hkv
    qg = q.reshape(hkv, g, m, d)
    out = torch.empty(hkv, g, m, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(hkv, g, m, dtype=torch.float32, device=q.device)
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, h * n))
    kt, vf = k.float().transpose(-1, -2), v.float()
    cols = torch.arange(n, device=q.device)[None, :]
    for a in range(0, m, step):
        b = min(m, a + step)
        s = torch.matmul(qg[:, :, a:b].float(), kt.unsqueeze(1)) * scale  # [hkv, g, b-a, n]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if causal_offset is not None:
            rows = _last_keys(a, b, causal_offset, q.device)
            hidden = cols > rows
            if window is not None:
                hidden |= cols <= rows - window
            s = s.masked_fill(hidden, float("-inf"))
        blk_lse = torch.logsumexp(s, dim=-1)
        out[:, :, a:b] = torch.matmul(torch.exp(s - blk_lse[..., None]), vf.unsqueeze(1))
        lse[:, :, a:b] = blk_lse
    return out.reshape(h, m, d), lse.reshape(h, m)


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """Fold a partial result (o, l) for ``rows`` into the running (out, lse)."""
    old_l = lse[:, rows]
    new_l = torch.logaddexp(old_l, l)
    out[:, rows] = out[:, rows] * torch.exp(old_l - new_l)[..., None] + o * torch.exp(l - new_l)[..., None]
    lse[:, rows] = new_l


def _short_batch(q: torch.Tensor, plan: ShortPlan, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Short segments over their keys, copied into one padded product. Returns out [H, rows, D]
    and lse [H, rows], rows in segment order."""
    h, d = q.shape[0], q.shape[2]
    b, m = plan.query_idx.shape
    hkv = k_pool.shape[0]
    g = h // hkv
    qb = q[:, plan.query_idx].view(hkv, g, b, m, d).permute(2, 0, 1, 3, 4).reshape(b, hkv, g * m, d)
    ks = k_pool[:, plan.key_idx].transpose(0, 1)  # [B, Hkv, N, D]
    vs = v_pool[:, plan.key_idx].transpose(0, 1)
    if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype == ks.dtype:
        bias = plan.bias.expand(b, g, m, -1).reshape(b, 1, g * m, -1) if g > 1 else plan.bias
        o, l = _FLASH_CPU(qb, ks, vs, attn_mask=bias, scale=scale)[:2]
        out, lse = o.float().view(b, hkv, g, m, d), l.float().view(b, hkv, g, m)
    else:
        sc = torch.matmul(qb.float(), ks.transpose(-1, -2).float()) * scale  # [B, Hkv, g*M, N]
        sc = sc.view(b, hkv, g, m, -1) + plan.bias[:, None].float()
        lse = torch.logsumexp(sc, dim=-1)  # [B, Hkv, g, M]
        out = torch.matmul(torch.exp(sc - lse[..., None]), vs.float().unsqueeze(2))  # [B, Hkv, g, M, D]
    out = out.reshape(b, h, m, d).permute(0, 2, 1, 3)[plan.valid]  # [rows, H, D]
    lse = lse.reshape(b, h, m).permute(0, 2, 1)[plan.valid]  # [rows, H]
    return out.transpose(0, 1), lse.transpose(0, 1)


def _segment_attention(q: torch.Tensor, seg: SegmentLayout, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment over its keys read in place, a run at a time, merged by log-sum-exp: the keys
    before its new tokens are seen whole; the new tokens' own keys causally."""
    qs = q[:, seg.start : seg.start + seg.length]
    before, new = split_runs(seg.keys, seg.past) if seg.length > 1 else (seg.keys, [])
    parts = [attend_lse(qs, k_pool[:, a : a + n], v_pool[:, a : a + n], scale, None) for a, n in before]
    if new:
        parts.append(attend_lse(qs, gather_kv(k_pool, new), gather_kv(v_pool, new), scale, causal_offset=0))
    return merge_lse(parts)


def merge_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One result (out [H, m, D], lse [H, m]) from partial ones over disjoint sets of keys."""
    out, lse = parts[0]
    for o, l in parts[1:]:
        new_l = torch.logaddexp(lse, l)
        out = out * torch.exp(lse - new_l)[..., None] + o * torch.exp(l - new_l)[..., None]
        lse = new_l
    return out, lse


def _one_step_attention(q: torch.Tensor, keys: tuple[list[Run], torch.Tensor | None], k_pool: torch.Tensor,
                        v_pool: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token [H, 1, D] over all its keys (a decode step). Keys in one block (a run, or
    the short runs gathered): one fused call, the query heads of a KV head as rows of one product.
    Several blocks (a long cached prefix apart from the request's own slots): a call each, merged
    by log-sum-exp, so long runs are never copied. Returns [1, 1, H, D]."""
    runs, rest = keys
    blocks = [(k_pool[:, a : a + n], v_pool[:, a : a + n]) for a, n in runs]
    if rest is not None:
        blocks.append((k_pool.index_select(1, rest), v_pool.index_select(1, rest)))
    h, _, d = q.shape
    if len(blocks) == 1:
        k, v = blocks[0]
        hkv = k.shape[0]
        out = F.scaled_dot_product_attention(q.reshape(1, hkv, h // hkv, d), k[None], v[None], scale=scale)
        return out.reshape(1, 1, h, d)
    out, _ = merge_lse([attend_lse(q, k, v, scale, None) for k, v in blocks])
    return out.to(q.dtype).reshape(1, 1, h, d)


def _windowed_attention(q: torch.Tensor, layout: BatchLayout, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """Each segment over its whole context with an explicit mask: for layers with a sliding
    window (only the keys inside it are read) or with softcapped scores. Returns [H, T, D]."""
    h, t, d = q.shape
    out = torch.empty(h, t, d, dtype=torch.float32, device=q.device)
    for seg in layout.segments:
        first = seg.prefix_len + seg.own_past  # position of the segment's first new token
        rows = first if seg.positions is None else seg.positions
        if seg.positions is not None:
            first = int(seg.positions[0])
        lo = 0 if window is None else max(0, first - window + 1)  # keys no row of the segment sees are skipped
        runs = split_runs(seg.prefix + seg.own, lo)[1]
        k, v = gather_kv(k_pool, runs), gather_kv(v_pool, runs)
        o, _ = attend_lse_blocks(q[:, seg.start : seg.start + seg.length], k, v, scale, rows - lo, window, softcap)
        out[:, seg.start : seg.start + seg.length] = o
    return out


def engine_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, softcap: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, H, T, D], key/value [1, Hkv, T, D] (RoPE applied).

    New keys and values go to their pool slots first; then every segment attends to its own
    tokens, and every group of rows sharing cached prefix runs attends to those once.
    """
    layout = current_layout()
    if layout.probe is not None:
        return _probe_attention(layout, module.layer_idx, query, key, value, scaling, sliding_window, softcap)
    layer = module.layer_idx
    q = query[0]
    h, t, d = q.shape
    scale = scaling if scaling is not None else d**-0.5
    k_pool, v_pool = layout.pool.kv[layer, 0], layout.pool.kv[layer, 1]
    if layer == layout.deviation_layer:  # how far the stored K/V of these rows are from the new ones
        dk = (key[0].float() - k_pool[:, layout.write_slots].float()).pow(2).sum((0, 2))
        layout.deviation = dk + (value[0].float() - v_pool[:, layout.write_slots].float()).pow(2).sum((0, 2))
        raise StopForward
    k_pool.index_copy_(1, layout.write_slots, key[0].to(k_pool.dtype))
    v_pool.index_copy_(1, layout.write_slots, value[0].to(v_pool.dtype))

    if sliding_window is not None and all(seg.context <= sliding_window for seg in layout.segments):
        sliding_window = None  # every key is inside every window: plain causal attention
    if sliding_window is not None or softcap is not None:
        out = _windowed_attention(q, layout, k_pool, v_pool, scale, sliding_window, softcap)
        return out.to(query.dtype).transpose(0, 1).unsqueeze(0), None
    keys = layout.one_step_keys(q.device) if q.dtype == k_pool.dtype else None
    if keys is not None:
        return _one_step_attention(q, keys, k_pool, v_pool, scale), None

    out = torch.empty(h, t, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(h, t, dtype=torch.float32, device=q.device) if layout.prefix_groups else None
    for seg in layout.segments:
        s, e = seg.start, seg.start + seg.length
        if seg.positions is not None:  # scattered queries over all their keys, masked by position
            k, v = gather_kv(k_pool, seg.keys), gather_kv(v_pool, seg.keys)
            out[:, s:e] = attend_lse(q[:, s:e], k, v, scale, causal_offset=seg.positions)[0]
            if lse is not None:
                lse[:, s:e] = 0.0  # final: prefix groups never include these rows
            continue
        if is_short(seg):
            continue
        if seg.sparse and layout.sparse is not None:
            # A long prefill (or a chunk of one): block-sparse attention over all its keys at once.
            k_all, v_all = gather_kv(k_pool, seg.prefix + seg.own), gather_kv(v_pool, seg.prefix + seg.own)
            out[:, s:e] = layout.sparse(q[None, :, s:e], k_all[None], v_all[None], scale, layer)[0].float()
            if lse is not None:
                lse[:, s:e] = 0.0  # final: prefix groups never include these rows
            continue
        k, v = gather_kv(k_pool, seg.keys), gather_kv(v_pool, seg.keys)
        if seg.past == 0 and seg.shared_len == 0:
            # A fresh prompt, nothing to merge: plain causal attention.
            out[:, s:e] = F.scaled_dot_product_attention(q[None, :, s:e], k[None], v[None], is_causal=True,
                                                         scale=scale, enable_gqa=True)[0].float()
            continue
        o, l = attend_lse(q[:, s:e], k, v, scale, causal_offset=seg.past)
        out[:, s:e] = o
        if lse is not None:
            lse[:, s:e] = l

    plan, singles = layout.short_plan(q.device, q.dtype)
    if plan is not None:
        o, l = _short_batch(q, plan, k_pool, v_pool, scale)
        if len(plan.rows) == t:
            out = o
        else:
            out.index_copy_(1, plan.rows, o)
        if lse is not None:
            lse.index_copy_(1, plan.rows, l)
    for seg in singles:
        o, l = _segment_attention(q, seg, k_pool, v_pool, scale)
        if seg.length == t:
            out = o
        else:
            out[:, seg.start : seg.start + seg.length] = o
        if lse is not None:
            lse[:, seg.start : seg.start + seg.length] = l

    for runs, rows in layout.prefix_groups:
        o, l = attend_lse(q[:, rows], gather_kv(k_pool, runs), gather_kv(v_pool, runs), scale, causal_offset=None)
        _merge(out, lse, rows, o, l)  # type: ignore[arg-type]

    return out.to(query.dtype).transpose(0, 1).unsqueeze(0), None


class StopForward(Exception):
    """Raised by the probe's attention at the first layer it does not need (ends the forward early)."""


def _probe_attention(layout: BatchLayout, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scaling: float | None, window: int | None, softcap: float | None) -> tuple[torch.Tensor, None]:
    """Plain causal attention over one sequence that also records how much the rows from
    ``probe_from`` on attend to every key (mean over heads and rows)."""
    if layer >= layout.probe_layers.stop:
        raise StopForward
    q, k, v = query[0], key[0], value[0]
    h, t, d = q.shape
    scale = scaling if scaling is not None else d**-0.5
    if layer in layout.probe_layers:
        rows = q[:, layout.probe_from :].float()  # [H, m, D]
        s = torch.matmul(rows, k.float().repeat_interleave(h // k.shape[0], 0).transpose(-1, -2)) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        cols, pos = torch.arange(t, device=q.device)[None, :], torch.arange(layout.probe_from, t, device=q.device)[:, None]
        hidden = (cols > pos) | (cols <= pos - window) if window is not None else cols > pos
        layout.probe += torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1).mean(dim=(0, 1))
    if window is None and softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)[0]
    else:
        out = attend_lse_blocks(q, k, v, scale, 0, window, softcap)[0]
    return out.to(query.dtype).transpose(0, 1).unsqueeze(0), None


def register() -> None:
    """Make ``attn_implementation="promptkit"`` available to transformers models."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, engine_attention)
