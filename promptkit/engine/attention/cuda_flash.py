"""PyTorch's CUDA flash attention with its log-sum-exp, checked once per device and dtype
against the matmul reference before it is used."""

from __future__ import annotations

import torch

from .matmul import attend_lse_blocks
from .merge import merge_lse

FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_checked: dict[tuple[torch.device, torch.dtype], bool] = {}


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, m, D] x [Hkv, n, D] with its lse; causal means a top-left-aligned square (n == m).
    Without causality the g query heads of a KV head become rows of one product."""
    h, m, d = q.shape
    hkv = k.shape[0]
    g = h // hkv
    if causal:
        q4, k4, v4 = q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None]
    else:
        q4, k4, v4 = q.reshape(1, hkv, g * m, d), k[None], v[None]
    o, lse = FLASH(q4, k4, v4, is_causal=causal, scale=scale)[:2]
    return o.reshape(h, m, d).float(), lse.reshape(h, m).float()


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """With a causal offset c, keys before c are seen by every query (one unmasked call) and keys
    c .. c+m form a causal square (one causal call), merged by lse."""
    if causal_offset is None:
        return _flash(q, k, v, scale, causal=False)
    c, m = causal_offset, q.shape[1]
    square = _flash(q, k[:, c : c + m], v[:, c : c + m], scale, causal=True)
    if c == 0:
        return square
    return merge_lse([square, _flash(q, k[:, :c], v[:, :c], scale, causal=False)])


def usable(q: torch.Tensor, causal_offset: object) -> bool:
    """Whether the kernel runs here, for this offset (a per-row offset takes the reference)."""
    if q.device.type != "cuda" or torch.is_tensor(causal_offset):
        return False
    key = (q.device, q.dtype)
    if key not in _checked:
        _checked[key] = _self_check(q.device, q.dtype)
    return _checked[key]


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernel exists, takes these inputs and agrees with the matmul reference."""
    if FLASH is None:
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(4, 5, 64, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(2, 12, 64, device=device, dtype=dtype, generator=g) for _ in range(2))
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for c in (None, 7):
            got, want = attend_lse(q, k, v, 0.125, c), attend_lse_blocks(q, k, v, 0.125, c)
            if not all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(got, want)):
                return False
        return True
    except RuntimeError:
        return False
