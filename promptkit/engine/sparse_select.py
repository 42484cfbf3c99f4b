"""Sparse prefill's block selection: which key blocks each head's query blocks attend to.

FlexPrefill's estimate from the last block of queries (see :mod:`promptkit.engine.sparse`):
query-aware blocks up to a share of the pooled attention mass where the pooled estimate
agrees with the true attention of that block, else vertical and slash lines; sink, local
window and diagonal blocks always kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sparse import Pattern, SparseConfig

# ---------------------------------------------------------------------------------------------
# Pattern estimation (all in block coordinates; queries padded in front so that the query
# blocks line up with the key blocks: query block i covers key positions of block i + off_b)


def causal_blocks(nq: int, nk: int, off_b: int, device: torch.device) -> torch.Tensor:
    """[nq, nk] bool: key blocks visible to each query block (diagonal included)."""
    return torch.arange(nk, device=device)[None, :] <= (torch.arange(nq, device=device) + off_b)[:, None]


def _always_kept(cfg: SparseConfig, nq: int, nk: int, off_b: int, device: torch.device) -> torch.Tensor:
    """[nq, nk] bool: sink, local window and diagonal blocks."""
    j = torch.arange(nk, device=device)[None, :]
    diag = (torch.arange(nq, device=device) + off_b)[:, None]
    return ((j < cfg.sink_blocks) | (j >= diag - cfg.local_blocks)) & (j <= diag)


def _budget(n: torch.Tensor, cfg: SparseConfig, unit: int) -> torch.Tensor:
    """Clamp counts ``n`` (of items of ``unit`` tokens) to the configured token budget."""
    n = n.clamp(min=math.ceil(cfg.min_budget / unit))
    if cfg.max_budget is not None:
        n = n.clamp(max=max(1, cfg.max_budget // unit))
    return n


def _top_mass(probs: torch.Tensor, gamma: float, cfg: SparseConfig, unit: int) -> torch.Tensor:
    """Bool mask of the fewest entries (last dim) whose mass reaches ``gamma``, within the budget."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    if gamma >= 1.0:  # everything that has mass (rounding must not drop the tail)
        n = (sorted_p > 0).sum(-1, keepdim=True)
    else:  # the fewest entries whose mass reaches gamma
        n = (cum < gamma * cum[..., -1:]).sum(-1, keepdim=True) + 1
    n = _budget(n, cfg, unit)
    rank_keep = torch.arange(probs.shape[-1], device=probs.device) < n
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, rank_keep & (sorted_p > 0))


def _pool(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Mean over blocks of ``bs`` rows: [H, L, D] -> [H, L // bs, D]."""
    return x.reshape(x.shape[0], -1, bs, x.shape[-1]).mean(2)


def _sqrt_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square-root Jensen-Shannon divergence between rows of ``p`` and ``q`` (natural log)."""
    m = 0.5 * (p + q)
    kl = lambda a: (a * (torch.log(a.clamp_min(1e-12)) - torch.log(m.clamp_min(1e-12)))).sum(-1)  # noqa: E731
    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0).sqrt()


def select_blocks(q: torch.Tensor, k: torch.Tensor, cfg: SparseConfig, scale: float,
                  off_b: int, q_end: int) -> tuple[torch.Tensor, list[Pattern]]:
    """Per-head key-block selection.

    ``q`` [H, Lq, D] and ``k`` [Hkv, Lk, D] (GQA: query head i reads KV head ``i // (H // Hkv)``),
    lengths multiples of the block size; query block i sits on key block ``i + off_b``;
    ``q_end`` is one past the last real (unpadded) query row. Returns [H, nq, nk] bool and
    each head's pattern.
    """
    bs = cfg.block_size
    h, lq, d = q.shape
    hkv, lk = k.shape[0], k.shape[1]
    nq, nk = lq // bs, lk // bs
    dev = q.device
    causal = causal_blocks(nq, nk, off_b, dev)
    keep = _always_kept(cfg, nq, nk, off_b, dev).expand(h, nq, nk).clone()
    if cfg.pattern == "a_shape":
        return keep, ["a_shape"] * h
    if cfg.gamma >= 1.0:  # all the mass: every causal block (no estimate can drop an underflowed one)
        return causal.expand(h, nq, nk).clone(), ["dense"] * h

    # True attention of the last real block of queries, over every key position.
    q_last = q[:, max(0, q_end - bs) : q_end].float() * scale  # [H, b, D]
    b = q_last.shape[1]
    q0 = off_b * bs + q_end - b  # absolute key position of the first of these queries
    kf = k.float()
    logits = torch.einsum("gqd,gkd->gqk", q_last.reshape(hkv, -1, d), kf).reshape(h, b, lk)
    future = torch.arange(q0, lk, device=dev)[None, :] > torch.arange(q0, q0 + b, device=dev)[:, None]
    logits[:, :, q0:].masked_fill_(future, float("-inf"))
    attn = torch.softmax(logits, -1)  # [H, b, Lk]
    a_true = attn.mean(1).reshape(h, nk, bs).sum(-1)  # [H, nk] pooled over key blocks

    # Block-pooled estimate for the same query block.
    k_pool = _pool(kf, bs).repeat_interleave(h // hkv, 0)  # [H, nk, D]
    last_blk = (q0 + b - 1) // bs
    vis = torch.arange(nk, device=dev) <= last_blk
    est = torch.einsum("hd,hkd->hk", q_last.mean(1), k_pool)
    a_est = torch.softmax(est.masked_fill(~vis, float("-inf")), -1)
    query_aware = _sqrt_js(a_true, a_est) < cfg.tau  # [H]

    aware = query_aware.tolist()
    qa_sel = vs_sel = torch.zeros_like(keep)
    if any(aware):
        q_pool = _pool(q.float(), bs)  # [H, nq, D]
        s = torch.einsum("hqd,hkd->hqk", q_pool, k_pool) * scale
        probs = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        qa_sel = _top_mass(probs, cfg.gamma, cfg, bs)
    if not all(aware):
        vs_sel = _vertical_slash(attn, q0, keep[0, last_blk - off_b], cfg, nq, nk, off_b)
    keep |= torch.where(query_aware[:, None, None], qa_sel, vs_sel)
    patterns: list[Pattern] = ["query_aware" if a else "vertical_slash" for a in aware]
    return _widen_to_min_budget(keep & causal, causal, off_b, cfg), patterns


_TOP_LINES = 1024  # lines ranked per round before falling back to a full sort


def _vertical_slash(attn: torch.Tensor, q0: int, kept_last: torch.Tensor, cfg: SparseConfig,
                    nq: int, nk: int, off_b: int) -> torch.Tensor:
    """Block mask [H, nq, nk] of the columns and diagonals carrying ``gamma`` of ``attn`` [H, b, Lk].

    ``attn`` holds the attention of the queries at positions ``q0 .. q0 + b - 1``. The same mass
    shows up in both views (a column also spreads over b diagonals), so lines are picked
    greedily in a few rounds, each on the mass not yet covered: the blocks always kept
    (``kept_last`` [nk], for the last query block) cover their share first.
    """
    h, b, lk = attn.shape
    bs, dev = cfg.block_size, attn.device
    # The residual lives in a zero-padded buffer whose rows, read with one extra element of
    # stride per row, line up the diagonals: diag[h, r, u] is the entry at distance lk - 1 - u.
    pad = lk - 1 - q0
    width = pad + lk + b
    buf = attn.new_zeros(h, b, width)
    residual = buf[:, :, pad : pad + lk]
    base = kept_last.repeat_interleave(bs)  # [Lk] columns always computed
    residual.copy_(attn.masked_fill(base, 0.0))
    diag = buf.as_strided((h, b, lk), (b * width, width + 1, 1), buf.storage_offset())
    need0 = cfg.gamma * b - attn[..., base].sum((1, 2))  # [H]
    lines = torch.zeros(h, 2 * lk, dtype=torch.bool, device=dev)  # [columns | diagonals]
    max_lines = cfg.max_budget if cfg.max_budget is not None else 2 * lk
    need = need0
    for frac in (0.5, 0.8, 1.0):  # rounds of greedy picking on the exact residual, all heads at once
        room = max_lines - lines.sum(-1)
        goal = need - (1.0 - frac) * need0
        if not bool(((goal > 1e-6) & (room > 0)).any()):
            continue
        lines_mass = torch.cat([residual.sum(1), diag.sum(1).flip(-1)], -1)
        mass, order = lines_mass.topk(min(2 * lk, _TOP_LINES), -1)  # usually enough; else sort all
        if mass.shape[-1] < 2 * lk and bool(((mass.sum(-1) < goal) & (room > mass.shape[-1])).any()):
            mass, order = lines_mass.sort(-1, descending=True)
        n = (mass.cumsum(-1) < goal[:, None]).sum(-1) + 1
        n = torch.where(goal > 1e-6, torch.minimum(n, room), torch.zeros_like(n))
        take = (torch.arange(mass.shape[-1], device=dev)[None, :] < n[:, None]) & (mass > 0)
        lines |= torch.zeros_like(lines).scatter(-1, order, take)
        diag.masked_fill_(lines[:, None, lk:].flip(-1), 0.0)  # rows of diag do not overlap: in place is safe
        residual.masked_fill_(lines[:, None, :lk], 0.0)
        need = residual.sum((1, 2)) - (1.0 - cfg.gamma) * b  # mass still to cover

    cols, slashes = lines[:, :lk], lines[:, lk:]
    mask = cols.reshape(h, nk, bs).any(-1)[:, None, :].expand(h, nq, nk)  # a column: its block, every row
    # A diagonal at distance t = a*bs + r meets, in query block i, the key blocks at block
    # distance a and (when r > 0) a + 1 from the diagonal block.
    t = slashes.reshape(h, -1, bs)  # [H, nk, bs]: t // bs, t % bs
    near = t.any(-1)
    far = torch.zeros_like(near)
    far[:, 1:] = t[:, :-1, 1:].any(-1)
    by_offset = near | far  # [H, nk] over block distances
    delta = (torch.arange(nq, device=dev)[:, None] + off_b) - torch.arange(nk, device=dev)[None, :]
    return mask | (by_offset[:, delta.clamp(min=0)] & (delta >= 0))


def _widen_to_min_budget(keep: torch.Tensor, causal: torch.Tensor, off_b: int, cfg: SparseConfig) -> torch.Tensor:
    """Rows keeping fewer than ``min_budget`` tokens widen their local window until they do."""
    need = math.ceil(cfg.min_budget / cfg.block_size)
    if need == 0:
        return keep
    nq, nk = keep.shape[1:]
    diag = (torch.arange(nq, device=keep.device) + off_b)[:, None]
    j = torch.arange(nk, device=keep.device)[None, :]
    for w in range(need):
        short = keep.sum(-1, keepdim=True) < need  # [H, nq, 1]
        if not bool(short.any()):
            break
        keep = keep | (short & (j == diag - w) & causal)
    return keep


# ---------------------------------------------------------------------------------------------
# Entry point
