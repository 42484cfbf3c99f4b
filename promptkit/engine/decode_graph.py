"""A llama-style decode step as a pure function of its weights: what the compiled decode traces.

:func:`describe` turns a bound lean forward into a *spec* (a JSON-able
description: head counts, epsilons, how each projection multiplies, and the
shape and dtype of every weight tensor) and the flat list of those tensors.
:class:`DecodeStep` computes one token's logits from the spec, the tensors and
the KV pool, through the same layer definition as the lean forward
(:mod:`.llama`). The weights are arguments, never constants, so a graph
compiled from a spec serves every model of that shape and format, and a
process that has no model at all (the background build) can trace it from
empty tensors of the spec's shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention.merge import merge_lse
from .llama import ARITY, LayerWeights, Projection, embedding, kernel_product, layer, lookup, projection, rms_norm

Spec = dict[str, Any]
RUNS = 4  # runs of cached keys a step attends to: a cached prefix of a few radix nodes and the request's own slots
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def describe(lean: Any) -> tuple[Spec, list[torch.Tensor]] | None:
    """The spec of ``lean``'s decode step and its weight tensors; None if a module has no graph form."""
    parts: list[Projection | torch.Tensor] = [embedding(lean.base.embed_tokens)]
    for w in lean.layers:  # in the order split() reads them
        parts += [w.ln1, w.qkv, w.o, w.ln2, w.gate_up, w.down]
    parts += [lean.base.norm.weight, projection(lean.model.lm_head)]
    projections = [p for p in parts if isinstance(p, Projection)]
    if any(p.kind not in ARITY for p in projections):
        return None
    weights = [t.detach() for p in parts for t in (p.tensors if isinstance(p, Projection) else [p])]
    spec = {"heads": lean.heads, "kv_heads": lean.kv_heads, "layers": len(lean.layers),
            "eps": [w.eps for w in lean.layers], "norm_eps": lean.base.norm.variance_epsilon,
            "scaling": [w.scaling for w in lean.layers], "kinds": [p.kind for p in projections],
            "weights": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in weights]}
    return spec, weights


def empty_weights(spec: Spec) -> list[torch.Tensor]:
    """Zero tensors of the spec's weight shapes and dtypes (enough to trace and compile the step)."""
    return [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in spec["weights"]]


def split(spec: Spec, weights: list[torch.Tensor]) -> tuple[Projection, list[LayerWeights], torch.Tensor, Projection]:
    """The flat weights as (embedding, layers, final norm weight, output projection)."""
    kinds, flat = iter(spec["kinds"]), iter(weights)

    def product() -> Projection:
        kind = next(kinds)
        return Projection(kind, [next(flat) for _ in range(ARITY[kind])])

    embed = product()
    layers = [LayerWeights(next(flat), product(), product(), next(flat), product(), product(), spec["eps"][i],
                           spec["scaling"][i]) for i in range(spec["layers"])]
    return embed, layers, next(flat), product()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[torch.Tensor], unused: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q [Hkv, g, D] (the query heads of each KV head) over the cached K/V ``spans`` (each
    [2, Hkv, n, D]; those ``unused`` left out) and the new key and value k, v [Hkv, D]: [1, H, D]."""
    parts = []
    for span, off in zip(spans, unused):
        o, lse = _FLASH(q[None], span[0][None], span[1][None], scale=scale)[:2]  # [1, Hkv, g, D], [1, Hkv, g]
        parts.append((o[0].float(), lse[0].float().masked_fill(off, float("-inf"))))
    own = (q.float() * k.float()[:, None]).sum(-1) * scale  # [Hkv, g]: each query head with its new key
    parts.append((v.float()[:, None].expand_as(parts[0][0]), own))
    return merge_lse(parts)[0].to(q.dtype).reshape(1, -1, q.shape[-1])


class DecodeStep(nn.Module):
    """The decode step over a fixed spec: the module that ``torch.export`` traces."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, runs: torch.Tensor,
                weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [1, V] of the token ``ids`` [1] and its keys and values [L, 2, Hkv, D].

        ``cos``, ``sin`` [1, 1, D]: the lean forward's rotation at the token's position. ``kv``: the
        whole pool [L, 2, Hkv, slots, D]; ``runs`` [RUNS, 3]: the runs of slots ``(start, length, used)``
        holding the keys before the token (a run not used has ``used`` 0 and is attended to by no
        query). The new key and value are returned, not written.
        """
        embed, layers, norm, head = split(self.spec, weights)
        hq, hkv = self.spec["heads"], self.spec["kv_heads"]
        spans = []
        for start, length in runs[:, :2].tolist():
            torch._check(start >= 0)
            torch._check(length >= 1)
            torch._check(start + length <= kv.shape[3])
            spans.append(kv.narrow(3, start, length))
        unused = runs[:, 2] == 0  # [RUNS]
        h = lookup(embed.kind, embed.tensors, ids)  # [1, hidden]
        new = []
        for i, w in enumerate(layers):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int = i, w: LayerWeights = w):
                new.append(torch.stack((k[0], v[0])))
                return _attend(q[0].view(hkv, hq // hkv, -1), k[0], v[0], [s[i] for s in spans], unused, w.scaling)

            h = layer(h, cos, sin, w, hq, hkv, attend)
        logits = kernel_product(head.kind, head.tensors, rms_norm(h, norm, self.spec["norm_eps"]))
        return logits, torch.stack(new)
