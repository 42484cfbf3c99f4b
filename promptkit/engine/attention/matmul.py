"""The matmul reference kernel: attention in bounded blocks of queries, any device, any mask.

Scores are materialized (a block at a time), so it also serves what the fused
kernels do not: sliding windows, softcapped scores, and devices without them.
"""

from __future__ import annotations

import torch

MAX_SCORE_ELEMENTS = 1 << 25  # bound the score matrix of one block (~128 MB in float32)


def last_keys(a: int, b: int, causal_offset: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[b - a, 1]: the last key each query row a..b may see."""
    if torch.is_tensor(causal_offset):
        return causal_offset[a:b, None]
    return torch.arange(a, b, device=device)[:, None] + causal_offset


def attend_lse_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal_offset: int | torch.Tensor | None, window: int | None = None,
                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [H, m, D] over ``k``, ``v`` [Hkv, n, D]: out [H, m, D] and lse [H, m] (float32).

    With ``causal_offset`` c, query i sees keys j <= c + i (a tensor [m]: keys j <= c[i]).
    ``window`` (with an offset): query i also sees only keys j > c + i - window. ``softcap``:
    scores become ``tanh(s / cap) * cap``.
    """
    h, m, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    g = h // hkv
    qg = q.reshape(hkv, g, m, d)
    out = torch.empty(hkv, g, m, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(hkv, g, m, dtype=torch.float32, device=q.device)
    step = max(1, MAX_SCORE_ELEMENTS // max(1, h * n))
    kt, vf = k.float().transpose(-1, -2), v.float()
    cols = torch.arange(n, device=q.device)[None, :]
    for a in range(0, m, step):
        b = min(m, a + step)
        s = torch.matmul(qg[:, :, a:b].float(), kt.unsqueeze(1)) * scale  # [hkv, g, b-a, n]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if causal_offset is not None:
            rows = last_keys(a, b, causal_offset, q.device)
            hidden = cols > rows
            if window is not None:
                hidden |= cols <= rows - window
            s = s.masked_fill(hidden, float("-inf"))
        blk_lse = torch.logsumexp(s, dim=-1)
        out[:, :, a:b] = torch.matmul(torch.exp(s - blk_lse[..., None]), vf.unsqueeze(1))
        lse[:, :, a:b] = blk_lse
    return out.reshape(h, m, d), lse.reshape(h, m)


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch [B, Hkv, g*M, D] over [B, Hkv, N, D] with an additive ``bias`` [B, 1, M, N]:
    out [B, Hkv, g, M, D] and lse [B, Hkv, g, M]."""
    b, hkv, gm, d = q.shape
    m = bias.shape[2]
    s = torch.matmul(q.float(), k.transpose(-1, -2).float()) * scale  # [B, Hkv, g*M, N]
    s = s.view(b, hkv, gm // m, m, -1) + bias[:, None].float()
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float().unsqueeze(2)), lse
