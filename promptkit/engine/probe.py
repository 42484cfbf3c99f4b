"""Probe forwards: a forward that measures something about attention instead of serving requests.

- :class:`AttentionProbe` (compressors): how much the tokens from ``query_from``
  on attend to each token, summed over heads, those queries and some layers;
- :class:`DeviationProbe` (blend reuse): how far the K/V a layer computes in
  context lie from those already in the pool, per packed row.

A probe runs only the layers it needs (:func:`first_layers` cuts the model's
layer list for the duration), through a backend of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .attention import AttentionBackend, BatchLayout, attend_lse_blocks


class AttentionProbe:
    """Plain causal attention over one sequence of ``n`` tokens that also records, in
    :attr:`received`, the attention each token receives from the rows ``query_from`` on
    (mean over heads and rows, summed over ``layers``)."""

    def __init__(self, n: int, query_from: int, layers: range, device: torch.device) -> None:
        self.query_from, self.layers = query_from, layers
        self.received = torch.zeros(n, device=device)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        h, t, _ = q.shape
        if layer in self.layers:
            rows = q[:, self.query_from :].float()  # [H, m, D]
            s = torch.matmul(rows, k.float().repeat_interleave(h // k.shape[0], 0).transpose(-1, -2)) * scale
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            cols = torch.arange(t, device=q.device)[None, :]
            pos = torch.arange(self.query_from, t, device=q.device)[:, None]
            hidden = (cols > pos) | (cols <= pos - window) if window is not None else cols > pos
            self.received += torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1).mean(dim=(0, 1))
        if window is None and softcap is None:
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                 enable_gqa=True)[0]
        else:
            out = attend_lse_blocks(q, k, v, scale, 0, window, softcap)[0]
        return out.to(q.dtype).transpose(0, 1)


class DeviationProbe(AttentionBackend):
    """The engine's attention for every layer before ``layer``; at ``layer``, the squared distance
    of each packed row's new K and V to those in its slot (:attr:`deviation`, [T]) and nothing
    else (the forward ends with that layer)."""

    def __init__(self, layout: BatchLayout, kv: torch.Tensor, layer: int) -> None:
        super().__init__(layout, kv)
        self.layer = layer
        self.deviation: torch.Tensor | None = None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        if layer != self.layer:
            return super().forward(layer, q, k, v, scale, window, softcap)
        slots = self.layout.write_slots
        old_k, old_v = self.kv[layer, 0][:, slots].float(), self.kv[layer, 1][:, slots].float()
        self.deviation = (k.float() - old_k).pow(2).sum((0, 2)) + (v.float() - old_v).pow(2).sum((0, 2))
        return torch.zeros_like(q).transpose(0, 1)  # read by nothing: the forward stops at this layer


def _layer_list(model: Any) -> tuple[Any, str]:
    """The module holding the decoder layers, and the attribute name (``layers``, or GPT-2's ``h``)."""
    for base_name, attr in (("model", "layers"), ("transformer", "h")):
        base = getattr(model, base_name, None)
        if base is not None and hasattr(base, attr):
            return base, attr
    raise ValueError(f"{type(model).__name__} has no decoder layer list a probe can cut")


@contextmanager
def first_layers(model: Any, n: int) -> Iterator[None]:
    """Run ``model`` with its first ``n`` decoder layers only, for the duration (restored after)."""
    base, attr = _layer_list(model)
    layers = getattr(base, attr)
    if n > len(layers):
        raise ValueError(f"layer {n - 1} is past the model's last layer ({len(layers) - 1})")
    setattr(base, attr, layers[:n])
    try:
        yield
    finally:
        setattr(base, attr, layers)
