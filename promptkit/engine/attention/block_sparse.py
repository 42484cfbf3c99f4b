"""Block-sparse attention kernels: compiled ``flex_attention`` and a plain-torch block gather.

Both take a per-head block selection ``keep`` [H, nq, nk] on block-aligned tensors: query
block i sits on key block ``i + off_b`` (its diagonal block, the only one that needs a
causal mask inside it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_COMPILED: dict[tuple, Callable] = {}


def _causal(b, h, q_idx, kv_idx):  # noqa: ANN001 - flex_attention mask_mod signature
    return q_idx >= kv_idx


def _to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, nq, nk] bool -> (counts [1, H, nq], indices [1, H, nq, nk]) with kept blocks first."""
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None].contiguous(), order[None].contiguous()


def _compiled_flex(key: tuple) -> Callable:
    """One compiled ``flex_attention`` per shape (dynamic=False: static shapes give the best kernels)."""
    fn = _COMPILED.get(key)
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        fn = _COMPILED[key] = torch.compile(flex_attention, dynamic=False)
    return fn


def flex_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      off_b: int, block_size: int, scale: float) -> torch.Tensor:
    """Block-sparse causal attention through compiled ``flex_attention``.

    ``q`` [1, H, nq*bs, D], ``k``/``v`` [1, Hkv, nk*bs, D]. Queries are padded in front to the
    key length so that the plain causal ``mask_mod`` holds; those rows select no block and
    cost nothing. Returns [1, H, nq*bs, D].
    """
    from torch.nn.attention.flex_attention import BlockMask

    h, nq, nk = keep.shape
    bs = block_size
    full = torch.zeros(h, nk, nk, dtype=torch.bool, device=keep.device)
    full[:, off_b : off_b + nq] = keep
    diag = torch.arange(nk, device=keep.device)
    partial = torch.zeros_like(full)
    partial[:, diag, diag] = full[:, diag, diag]  # diagonal blocks need the causal mask
    full[:, diag, diag] = False
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    lk = nk * bs
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs,
                                          mask_mod=_causal, seq_lengths=(lk, lk), compute_q_blocks=False)
    qp = F.pad(q, (0, 0, off_b * bs, 0))
    gqa = q.shape[1] != k.shape[1]
    fn = _compiled_flex((tuple(qp.shape), tuple(k.shape), q.dtype, str(q.device), bs, gqa))
    out = fn(qp, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out[:, :, off_b * bs :]


def gather_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                        off_b: int, block_size: int, scale: float, n_blocks: int | None = None) -> torch.Tensor:
    """Block-sparse causal attention by gathering each query block's key blocks (no compilation).

    One SDPA call per query block, all heads at once: heads keep different numbers of blocks,
    so the gathered keys are padded to the largest count and masked. ``n_blocks`` limits the
    work to the first query blocks (the rest, padding, stay zero).
    """
    _, h, lq, d = q.shape
    hkv, bs = k.shape[1], block_size
    nk = k.shape[2] // bs
    heads = torch.arange(h, device=q.device) // (h // hkv)  # GQA: the KV head of each query head
    kb = k[0].reshape(hkv, nk, bs, d)
    vb = v[0].reshape(hkv, nk, bs, d)
    out = torch.zeros_like(q)
    counts_all, order_all = _to_indices(keep)
    within = torch.arange(bs, device=q.device)
    for i in range(n_blocks if n_blocks is not None else keep.shape[1]):
        counts, order = counts_all[0, :, i], order_all[0, :, i]
        m = int(counts.max())
        idx = order[:, :m].long()  # [H, m]
        ks = kb[heads[:, None], idx].reshape(h, m * bs, d)
        vs = vb[heads[:, None], idx].reshape(h, m * bs, d)
        kpos = (idx[:, :, None] * bs + within).reshape(h, 1, m * bs)
        qpos = ((i + off_b) * bs + within).reshape(1, bs, 1)
        valid = (torch.arange(m, device=q.device)[None, :] < counts[:, None]).repeat_interleave(bs, 1)
        mask = (kpos <= qpos) & valid[:, None, :]
        qi = q[0, :, i * bs : (i + 1) * bs]
        out[0, :, i * bs : (i + 1) * bs] = F.scaled_dot_product_attention(qi, ks, vs, attn_mask=mask, scale=scale)
    return out
