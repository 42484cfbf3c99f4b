"""PyTorch's fused CPU flash attention, which also returns the log-sum-exp merging needs."""

from __future__ import annotations

import torch

from .matmul import last_keys

FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    return FLASH is not None and q.device.type == "cpu" and q.dtype == k.dtype


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`.matmul.attend_lse_blocks` (no window, no softcap); the scores are never materialized."""
    h, m, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    g = h // hkv
    if causal_offset is None:  # the query heads of one KV head become rows of one product
        o, lse = FLASH(q.reshape(1, hkv, g * m, d), k[None], v[None], scale=scale)[:2]
    else:
        rows = last_keys(0, m, causal_offset, q.device)
        bias = torch.zeros(m, n, dtype=q.dtype, device=q.device)
        bias.masked_fill_(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
        o, lse = FLASH(q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None],
                       attn_mask=bias[None, None], scale=scale)[:2]
    return o.reshape(h, m, d).float(), lse.reshape(h, m).float()


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`.matmul.attend_padded`."""
    b, hkv, gm, d = q.shape
    m = bias.shape[2]
    g = gm // m
    mask = bias.expand(b, g, m, -1).reshape(b, 1, gm, -1) if g > 1 else bias
    o, lse = FLASH(q, k, v, attn_mask=mask, scale=scale)[:2]
    return o.float().view(b, hkv, g, m, d), lse.float().view(b, hkv, g, m)
