"""Partial attention results over disjoint sets of keys, merged by their log-sum-exp."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One result from partial ones: each ``(out [..., D], lse [...])`` (float32) over its own keys.

    A part whose lse is -inf (no key seen) contributes nothing. Returns the merged out and lse.
    """
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])
    top = lses.amax(0)
    weights = torch.exp(lses - top)
    total = weights.sum(0)
    out = parts[0][0] * weights[0][..., None]
    for (o, _), w in zip(parts[1:], weights[1:]):
        out = out + o * w[..., None]
    return out / total[..., None], top + torch.log(total)
