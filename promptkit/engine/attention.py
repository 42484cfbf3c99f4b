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

import torch
import torch.nn.functional as F

ATTN_NAME = "promptkit"
_MAX_SCORE_ELEMENTS = 1 << 25  # bound the score matrix of one block (~128 MB in float32)
SHORT_SEGMENT = 64  # segments up to this long (with a cached past) share one padded product


@dataclass
class SegmentLayout:
    """One request's slice of the packed sequence."""

    start: int  # first row in the packed sequence
    length: int  # new tokens in this forward
    own_kv: torch.Tensor  # [layers, 2, kv_heads, capacity, head_dim]
    own_past: int  # tokens already in own_kv before this forward
    has_prefix: bool  # whether cached prefix nodes precede own_kv
    sparse_prefix: list[torch.Tensor] | None = None  # set: run sparse attention over these nodes' KV + own


@dataclass
class BatchLayout:
    """Everything the attention function needs to know about the current forward."""

    segments: list[SegmentLayout]
    # cached nodes' KV (consecutive on a path) -> packed rows of every query that sees them whole
    prefix_groups: list[tuple[list[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    sparse: Callable | None = None  # (q, k, v, scale, layer) -> out, for long prefills
    probe: torch.Tensor | None = None  # [T] accumulates attention paid to each key by rows >= probe_from
    probe_from: int = 0
    probe_layers: range = range(0)  # layers whose attention is accumulated


_state = threading.local()


def set_layout(layout: BatchLayout | None) -> None:
    _state.layout = layout


def current_layout() -> BatchLayout:
    layout = getattr(_state, "layout", None)
    if layout is None:
        raise RuntimeError("promptkit attention called outside an engine forward")
    return layout


# CPU flash attention that also returns the log-sum-exp (what merging partial results needs).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [H, m, D] over ``k``, ``v`` [Hkv, n, D] with its log-sum-exp.

    With ``causal_offset`` c, query i sees keys j <= c + i. Returns out [H, m, D]
    (float32) and lse [H, m]. On CPU a fused kernel never materializes the scores.
    """
    if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype == k.dtype:
        return _attend_lse_fused(q, k, v, scale, causal_offset)
    return attend_lse_blocks(q, k, v, scale, causal_offset)


def _attend_lse_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    h, m, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    g = h // hkv
    if causal_offset is None:  # the query heads of one KV head become rows of one product
        o, lse = _FLASH_CPU(q.reshape(1, hkv, g * m, d), k[None], v[None], scale=scale)[:2]
    else:
        rows = torch.arange(m, device=q.device)[:, None] + causal_offset
        bias = torch.zeros(m, n, dtype=q.dtype, device=q.device)
        bias.masked_fill_(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
        o, lse = _FLASH_CPU(q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None],
                            attn_mask=bias[None, None], scale=scale)[:2]
    return o.reshape(h, m, d).float(), lse.reshape(h, m).float()


def attend_lse_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend_lse` with plain matmuls over bounded blocks of queries (any device)."""
    h, m, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    g = h // hkv
    qg = q.reshape(hkv, g, m, d)
    out = torch.empty(hkv, g, m, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(hkv, g, m, dtype=torch.float32, device=q.device)
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, h * n))
    kt, vf = k.float().transpose(-1, -2), v.float()
    for a in range(0, m, step):
        b = min(m, a + step)
        s = torch.matmul(qg[:, :, a:b].float(), kt.unsqueeze(1)) * scale  # [hkv, g, b-a, n]
        if causal_offset is not None:
            rows = torch.arange(a, b, device=q.device)[:, None] + causal_offset
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
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


def _short_attention(q: torch.Tensor, segs: list[SegmentLayout], layer: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Short segments (decode steps, questions after a cached prefix) over their own KV,
    batched by padding into one product. Returns out [H, rows, D] and lse [H, rows], rows in
    segment order."""
    pad = torch.nn.utils.rnn.pad_sequence
    dev = q.device
    qs = pad([q[:, s.start : s.start + s.length].transpose(0, 1) for s in segs], batch_first=True)  # [B, M, H, D]
    ks = pad([s.own_kv[layer, 0, :, : s.own_past + s.length].transpose(0, 1) for s in segs], batch_first=True)
    vs = pad([s.own_kv[layer, 1, :, : s.own_past + s.length].transpose(0, 1) for s in segs], batch_first=True)
    b, m, h, d = qs.shape
    n, hkv = ks.shape[1], ks.shape[2]
    g = h // hkv
    qb = qs.permute(0, 2, 1, 3).reshape(b, hkv, g * m, d)  # the g query heads of a KV head as rows
    past = torch.tensor([s.own_past for s in segs], device=dev)
    allowed = torch.arange(n, device=dev)[None, None, :] <= (past[:, None] + torch.arange(m, device=dev)[None, :])[..., None]
    if _FLASH_CPU is not None and dev.type == "cpu" and qs.dtype == ks.dtype:
        bias = torch.zeros(b, 1, g * m, n, dtype=qs.dtype, device=dev)
        bias.masked_fill_(~allowed.repeat(1, g, 1)[:, None], float("-inf"))
        o, l = _FLASH_CPU(qb, ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=bias, scale=scale)[:2]
        out, lse = o.float().view(b, hkv, g, m, d), l.float().view(b, hkv, g, m)
    else:
        sc = torch.matmul(qb.float(), ks.permute(0, 2, 3, 1).float()) * scale  # [B, Hkv, g*M, N]
        sc = sc.view(b, hkv, g, m, n).masked_fill(~allowed[:, None, None], float("-inf"))
        lse = torch.logsumexp(sc, dim=-1)  # [B, Hkv, g, M]
        out = torch.matmul(torch.exp(sc - lse[..., None]), vs.transpose(1, 2).float().unsqueeze(2))  # [B, Hkv, g, M, D]
    valid = torch.arange(m, device=dev)[None, :] < torch.tensor([s.length for s in segs], device=dev)[:, None]
    out = out.reshape(b, h, m, d).permute(0, 2, 1, 3)[valid]  # [rows, H, D]
    lse = lse.reshape(b, h, m).permute(0, 2, 1)[valid]  # [rows, H]
    return out.transpose(0, 1), lse.transpose(0, 1)


def engine_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, H, T, D], key/value [1, Hkv, T, D] (RoPE applied)."""
    layout = current_layout()
    if layout.probe is not None:
        return _probe_attention(layout, module.layer_idx, query, key, value, scaling)
    layer = module.layer_idx
    q, k_new, v_new = query[0], key[0], value[0]
    h, t, d = q.shape
    scale = scaling if scaling is not None else d**-0.5
    out = torch.zeros(h, t, d, dtype=torch.float32, device=q.device)
    lse = torch.full((h, t), float("-inf"), dtype=torch.float32, device=q.device)

    short: list[SegmentLayout] = []
    for seg in layout.segments:
        s, e, p = seg.start, seg.start + seg.length, seg.own_past
        kv = seg.own_kv[layer]
        kv[0, :, p : p + seg.length] = k_new[:, s:e]
        kv[1, :, p : p + seg.length] = v_new[:, s:e]
        if seg.length <= SHORT_SEGMENT and (p > 0 or seg.has_prefix) and seg.sparse_prefix is None:
            short.append(seg)
            continue
        k_own, v_own = kv[0, :, : p + seg.length], kv[1, :, : p + seg.length]
        if seg.sparse_prefix is not None and layout.sparse is not None:
            # A long prefill (or a chunk of one): block-sparse attention over all its keys at once.
            k_all = torch.cat([n[layer, 0] for n in seg.sparse_prefix] + [k_own], dim=1)
            v_all = torch.cat([n[layer, 1] for n in seg.sparse_prefix] + [v_own], dim=1)
            out[:, s:e] = layout.sparse(q[None, :, s:e], k_all[None], v_all[None], scale, layer)[0].float()
            lse[:, s:e] = 0.0  # final: prefix groups never include these rows
            continue
        if not seg.has_prefix and p == 0:
            # A fresh prompt: plain causal attention, nothing to merge.
            o = F.scaled_dot_product_attention(q[None, :, s:e], k_own[None], v_own[None], is_causal=True,
                                               scale=scale, enable_gqa=True)[0]
            out[:, s:e] = o.float()
            lse[:, s:e] = 0.0
            continue
        o, l = attend_lse(q[:, s:e], k_own, v_own, scale, causal_offset=p)
        out[:, s:e], lse[:, s:e] = o, l

    if short:
        rows = torch.cat([torch.arange(seg.start, seg.start + seg.length) for seg in short]).to(q.device)
        out[:, rows], lse[:, rows] = _short_attention(q, short, layer, scale)

    for kvs, rows in layout.prefix_groups:
        k = kvs[0][layer, 0] if len(kvs) == 1 else torch.cat([kv[layer, 0] for kv in kvs], dim=1)
        v = kvs[0][layer, 1] if len(kvs) == 1 else torch.cat([kv[layer, 1] for kv in kvs], dim=1)
        o, l = attend_lse(q[:, rows], k, v, scale, causal_offset=None)
        _merge(out, lse, rows, o, l)

    return out.to(query.dtype).transpose(0, 1).unsqueeze(0), None


def _probe_attention(layout: BatchLayout, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scaling: float | None) -> tuple[torch.Tensor, None]:
    """Plain causal attention over one sequence that also records how much the rows from
    ``probe_from`` on attend to every key (mean over heads and rows)."""
    h, t, d = query.shape[1:]
    scale = scaling if scaling is not None else d**-0.5
    if layer in layout.probe_layers:
        rows = query[0, :, layout.probe_from :].float()  # [H, m, D]
        k = key[0].float().repeat_interleave(h // key.shape[1], 0)
        s = torch.matmul(rows, k.transpose(-1, -2)) * scale
        causal = torch.arange(t, device=query.device)[None, :] > torch.arange(layout.probe_from, t, device=query.device)[:, None]
        layout.probe += torch.softmax(s.masked_fill(causal, float("-inf")), dim=-1).mean(dim=(0, 1))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2), None


def register() -> None:
    """Make ``attn_implementation="promptkit"`` available to transformers models."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, engine_attention)
