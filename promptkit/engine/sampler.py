"""Batched next-token choice on the model's device: greedy, temperature, nucleus (top-p).

Sampling is Gumbel-max: ``argmax(logits / T + g)`` with Gumbel noise ``g``
drawn from a counter-based hash of (seed, step, token id). A request's draws
depend only on its seed and how many tokens it has generated, never on the
batch it shares, the device or the global RNG, and a whole batch is sampled
with a few tensor ops and no Python per request.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer on int64 tensors holding 32-bit values (products wrap; masks keep 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uniforms in (0, 1), a pure function of each row's (seed, step) and the token id."""
    dev = seeds.device
    row = _fmix32(_fmix32(_fmix32(seeds & _M32) ^ ((seeds >> 32) & _M32)) ^ (steps & _M32))  # [B]
    col = (torch.arange(vocab, device=dev, dtype=torch.int64) * 0x9E3779B9) & _M32  # [V]
    h = _fmix32(_fmix32(row[:, None] ^ col[None, :]) + row[:, None] & _M32)
    return ((h >> 8).float() + 0.5) / float(1 << 24)  # 24 bits: exact in float32, never 0 or 1


def sample(logits: torch.Tensor, temperature: list[float], top_p: list[float], seeds: list[int],
           steps: list[int]) -> torch.Tensor:
    """Token ids [B] for ``logits`` [B, V]; rows with ``temperature == 0`` are greedy.

    The settings are per row; which rows sample is decided on the host from them, so the
    device is never asked (no synchronisation before the caller reads the tokens).
    """
    greedy = logits.argmax(-1)
    hot = [i for i, t in enumerate(temperature) if t > 0]
    if not hot:
        return greedy
    dev = logits.device
    idx = torch.tensor(hot, device=dev)
    scaled = logits[idx].float() / torch.tensor([temperature[i] for i in hot], device=dev)[:, None]
    if any(top_p[i] < 1 for i in hot):
        p = torch.tensor([top_p[i] for i in hot], device=dev)
        probs, order = torch.sort(torch.softmax(scaled, -1), dim=-1, descending=True)
        outside = torch.cumsum(probs, -1) - probs >= p[:, None]  # beyond the smallest set reaching top_p
        scaled = scaled.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    noise = uniform_noise(torch.tensor([seeds[i] for i in hot], device=dev, dtype=torch.int64),
                          torch.tensor([steps[i] for i in hot], device=dev, dtype=torch.int64), logits.shape[-1])
    return greedy.index_copy(0, idx, (scaled - torch.log(-torch.log(noise))).argmax(-1))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probability of ``tokens`` [B] under ``logits`` [B, V], and the ``top`` likeliest
    (values, ids) per row when ``top > 0``."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    if top <= 0:
        return chosen, None, None
    vals, ids = logp.topk(top, dim=-1)
    return chosen, vals, ids
