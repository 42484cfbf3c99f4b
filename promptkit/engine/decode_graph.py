"""A llama-style decode step as a pure function of its weights: what the compiled decode traces.

:func:`describe` turns a bound lean forward into a *spec* (a JSON-able
description: head counts, epsilons, how each projection multiplies, and the
shape and dtype of every weight tensor) and the flat list of those tensors.
:func:`decode_step` computes one token's logits from the spec, the tensors and
the KV pool. The weights are arguments, never constants, so a graph compiled
from a spec serves every model of that shape and format, and a process that
has no model at all (the background build) can trace it from empty tensors of
the spec's shapes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .weights import GROUP, Int4Linear, Int8Embedding, Int8Linear, Int8RowLinear

Spec = dict[str, Any]
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
RUNS = 4  # runs of cached keys a step attends to: a cached prefix of a few radix nodes and the request's own slots
# How many tensors each kind of product takes, in the order :func:`_product` reads them.
_ARITY = {"int4": 2, "int8": 4, "int8_rows": 2, "dense": 1, "dense_bias": 2}


def _kernel(module: nn.Module) -> tuple[str, list[torch.Tensor]] | None:
    """A projection's product for a decode step as ``(kind, tensors)``; None if the graph has no form for it."""
    bias = getattr(module, "bias", None)
    if isinstance(module, Int4Linear) and bias is None:
        return "int4", [module.packed, module.scale_zero]
    if isinstance(module, Int8Linear) and bias is None:
        return "int8", [module.high.packed, module.high.scale_zero, module.low.packed, module.low.scale_zero]
    if isinstance(module, Int8RowLinear) and bias is None:
        return "int8_rows", [module.qweight, module.scales]
    if type(module) is nn.Linear:
        return ("dense", [module.weight]) if bias is None else ("dense_bias", [module.weight, bias])
    return None


def _embedding(module: nn.Module) -> tuple[str, list[torch.Tensor]] | None:
    if isinstance(module, Int8Embedding):
        return "int8_rows", [module.qweight, module.scales]
    if type(module) is nn.Embedding:
        return "dense", [module.weight]
    return None


def describe(lean: Any) -> tuple[Spec, list[torch.Tensor]] | None:
    """The spec of ``lean``'s decode step and its weight tensors; None if a module has no graph form."""
    kinds, weights = [], []

    def take(found: tuple[str, list[torch.Tensor]] | None) -> bool:
        if found is None:
            return False
        kinds.append(found[0])
        weights.extend(t.detach() for t in found[1])
        return True

    if not take(_embedding(lean.base.embed_tokens)):
        return None
    for lay in lean.layers:  # in the order split() reads them
        weights.append(lay.ln1.detach())
        if not (take(_kernel(lay.qkv)) and take(_kernel(lay.o))):
            return None
        weights.append(lay.ln2.detach())
        if not (take(_kernel(lay.gate_up)) and take(_kernel(lay.down))):
            return None
    weights.append(lean.base.norm.weight.detach())
    if not take(_kernel(lean.model.lm_head)):
        return None
    spec = {"heads": lean.heads, "kv_heads": lean.kv_heads, "layers": len(lean.layers),
            "eps": [lay.eps for lay in lean.layers], "norm_eps": lean.base.norm.variance_epsilon,
            "scaling": [lay.attn.scaling for lay in lean.layers], "kinds": kinds,
            "weights": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in weights]}
    return spec, weights


def empty_weights(spec: Spec) -> list[torch.Tensor]:
    """Zero tensors of the spec's weight shapes and dtypes (enough to trace and compile the step)."""
    return [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in spec["weights"]]


def _product(kind: str, ts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` (+ bias) for a projection of ``kind`` held in ``ts``; x is 2-D with few rows."""
    mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    if kind == "int4":
        return mm4(x, ts[0], GROUP, ts[1])
    if kind == "int8":  # the high and low nibbles of the 8-bit codes, each an int4 product
        return mm4(x, ts[0], GROUP, ts[1]) + mm4(x, ts[2], GROUP, ts[3])
    if kind == "int8_rows":
        return torch.ops.aten._weight_int8pack_mm(x, ts[0], ts[1])
    return F.linear(x, ts[0], ts[1] if kind == "dense_bias" else None)


def _lookup(kind: str, ts: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    if kind == "int8_rows":
        return ts[0][ids].to(ts[1].dtype) * ts[1][ids].unsqueeze(-1)
    return F.embedding(ids, ts[0])


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm``: normalized in float32, scaled in the input dtype."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def split(spec: Spec, weights: list[torch.Tensor]) -> tuple[Any, list[tuple], torch.Tensor, Any]:
    """The flat weights as (embedding, [per layer: ln1, qkv, o, ln2, gate_up, down], final norm, head),
    each product a ``(kind, tensors)`` pair."""
    kinds, at = iter(spec["kinds"]), 0

    def product() -> tuple[str, list[torch.Tensor]]:
        nonlocal at
        kind = next(kinds)
        ts = weights[at : at + _ARITY[kind]]
        at += _ARITY[kind]
        return kind, ts

    def tensor() -> torch.Tensor:
        nonlocal at
        at += 1
        return weights[at - 1]

    embed = product()
    layers = [(tensor(), product(), product(), tensor(), product(), product()) for _ in range(spec["layers"])]
    return embed, layers, tensor(), product()


def decode_step(spec: Spec, weights: list[torch.Tensor], ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: torch.Tensor, runs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [1, V] of the token ``ids`` [1] and its keys and values [L, 2, Hkv, D].

    ``cos``, ``sin`` [1, 1, D]: the lean forward's rotation at the token's position. ``kv``: the
    whole pool [L, 2, Hkv, slots, D]; ``runs`` [RUNS, 3]: the runs of slots ``(start, length, used)``
    holding the keys before the token (a run not used has ``used`` 0 and is attended to by no
    query). The new key and value are returned, not written.
    """
    embed, layers, norm, head = split(spec, weights)
    hq, hkv = spec["heads"], spec["kv_heads"]
    spans = []
    for start, length in runs[:, :2].tolist():
        torch._check(start >= 0)
        torch._check(length >= 1)
        torch._check(start + length <= kv.shape[3])
        spans.append(kv.narrow(3, start, length))
    unused = runs[:, 2] == 0  # [RUNS]
    h = _lookup(*embed, ids)  # [1, hidden]
    dim = h.shape[-1]
    new = []
    for i, (ln1, qkv_mm, o_mm, ln2, gate_up_mm, down_mm) in enumerate(layers):
        x = F.rms_norm(h, (dim,), ln1, spec["eps"][i])
        qkv = _product(*qkv_mm, x).view(1, hq + 2 * hkv, 2, -1)  # [1, heads, 2 halves, D / 2]
        qk, v = qkv[:, : hq + hkv], qkv[0, hq + hkv :].flatten(1)
        qk = (qk.flatten(2) * cos + qk.flip(2).flatten(2) * sin)[0]
        q, k = qk[:hq].view(hkv, hq // hkv, -1), qk[hq:]
        out = _attend(q, k, v, [span[i] for span in spans], unused, spec["scaling"][i])
        new.append(torch.stack((k, v)))
        h = h + _product(*o_mm, out.reshape(1, -1))
        x = F.rms_norm(h, (dim,), ln2, spec["eps"][i])
        gate, up = _product(*gate_up_mm, x).chunk(2, dim=-1)
        h = h + _product(*down_mm, F.silu(gate) * up)
    return _product(*head, _rms_norm(h, norm, spec["norm_eps"])), torch.stack(new)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[torch.Tensor], unused: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q [Hkv, g, D] (the query heads of each KV head) over the cached K/V ``spans`` (each
    [2, Hkv, n, D]; those ``unused`` left out) and the new key and value k, v [Hkv, D]: [Hkv, g, D].
    Each part's softmax is merged by its log-sum-exp."""
    outs, lses = [], []
    for span in spans:
        o, lse = _FLASH(q[None], span[0][None], span[1][None], scale=scale)[:2]  # [1, Hkv, g, D], [1, Hkv, g]
        outs.append(o[0].float())
        lses.append(lse[0].float())
    lse = torch.stack(lses).masked_fill(unused[:, None, None], float("-inf"))  # [RUNS, Hkv, g]
    s = (q.float() * k.float()[:, None]).sum(-1) * scale  # [Hkv, g]: each query head with its new key
    top = torch.maximum(lse.amax(0), s)
    w, w_new = torch.exp(lse - top), torch.exp(s - top)
    out = (torch.stack(outs) * w[..., None]).sum(0) + v.float()[:, None] * w_new[..., None]
    return (out / (w.sum(0) + w_new)[..., None]).to(q.dtype)


class DecodeStep(nn.Module):
    """:func:`decode_step` over a fixed spec, as the module that ``torch.export`` traces."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, runs: torch.Tensor,
                weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_step(self.spec, weights, ids, cos, sin, kv, runs)
