"""The llama-style decoder layer as a function of its weights: the one definition the lean forward
runs eagerly and the compiled decode traces.

A projection is held as the direct call of its kernel (``kind`` and its
tensors: what a decode step multiplies with) and, where there is one, its
module (which de-quantizes for a dense GEMM on wide inputs: prefill). The
arithmetic equals transformers' ``LlamaDecoderLayer``; in float32 bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .weights import GROUP, Int4Linear, Int8Embedding, Int8Linear, Int8RowLinear

# How many tensors each kind of product takes, in the order :func:`kernel_product` reads them.
ARITY = {"int4": 2, "int8": 4, "int8_rows": 2, "dense": 1, "dense_bias": 2}


@dataclass
class Projection:
    """``x @ W.T (+ b)`` as its kernel's direct call (``kind``, ``tensors``) and, eagerly, its module."""

    kind: str  # a key of ARITY, or "module": no direct form, the module alone
    tensors: list[torch.Tensor]
    module: nn.Module | None = None

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """``x`` [rows, in]; ``wide`` (many rows) goes through the module, which runs a dense GEMM."""
        if self.module is not None and (wide or self.kind == "module"):
            return self.module(x)
        return kernel_product(self.kind, self.tensors, x)


def projection(module: nn.Module) -> Projection:
    """``module`` as a :class:`Projection`."""
    bias = getattr(module, "bias", None)
    if isinstance(module, Int4Linear) and bias is None:
        return Projection("int4", [module.packed, module.scale_zero], module)
    if isinstance(module, Int8Linear) and bias is None:
        return Projection("int8", [module.high.packed, module.high.scale_zero, module.low.packed,
                                   module.low.scale_zero], module)
    if isinstance(module, Int8RowLinear) and bias is None:
        return Projection("int8_rows", [module.qweight, module.scales], module)
    if type(module) is nn.Linear:
        return Projection("dense" if bias is None else "dense_bias",
                          [module.weight] if bias is None else [module.weight, bias], module)
    return Projection("module", [], module)


def embedding(module: nn.Module) -> Projection:
    """A token embedding as a lookup of ``kind`` (``int8_rows`` or ``dense``)."""
    if isinstance(module, Int8Embedding):
        return Projection("int8_rows", [module.qweight, module.scales], module)
    return Projection("dense" if type(module) is nn.Embedding else "module",
                      [module.weight] if type(module) is nn.Embedding else [], module)


def kernel_product(kind: str, ts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` (+ bias) for a projection of ``kind`` held in ``ts``; x is 2-D with few rows."""
    mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    if kind == "int4":
        return mm4(x, ts[0], GROUP, ts[1])
    if kind == "int8":  # the high and low nibbles of the 8-bit codes, each an int4 product
        return mm4(x, ts[0], GROUP, ts[1]) + mm4(x, ts[2], GROUP, ts[3])
    if kind == "int8_rows":
        return torch.ops.aten._weight_int8pack_mm(x, ts[0], ts[1])
    return F.linear(x, ts[0], ts[1] if kind == "dense_bias" else None)


def lookup(kind: str, ts: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings of ``ids`` from a table of ``kind``."""
    if kind == "int8_rows":
        return ts[0][ids].to(ts[1].dtype) * ts[1][ids].unsqueeze(-1)
    return F.embedding(ids, ts[0])


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` (the final norm): normalized in float32, scaled in the input dtype."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


@dataclass
class LayerWeights:
    """One decoder layer: norms, q/k/v joined, o, gate/up joined, down."""

    ln1: torch.Tensor
    qkv: Projection  # [(H + 2 Hkv) * D] outputs
    o: Projection
    ln2: torch.Tensor
    gate_up: Projection  # [2 * I] outputs
    down: Projection
    eps: float
    scaling: float


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def layer(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: LayerWeights, heads: int, kv_heads: int,
          attend: Attend, wide: bool = False) -> torch.Tensor:
    """One layer over ``h`` [T, hidden]. ``cos``, ``sin`` [T, 1, D]: the rotation of each row's position,
    the sine negated on its first half. ``attend(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D])`` returns
    [T, H, D]. ``wide``: many rows (the modules' dense GEMMs instead of the kernels)."""
    t, dim = h.shape
    x = F.rms_norm(h, (dim,), w.ln1, w.eps)
    qkv = w.qkv(x, wide).view(t, heads + 2 * kv_heads, 2, -1)  # [T, heads, 2 halves, D / 2]
    qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :].flatten(2)
    # RoPE on queries and keys together: x * cos + swap_halves(x) * signed sin.
    qk = qk.flatten(2) * cos + qk.flip(2).flatten(2) * sin
    out = attend(qk[:, :heads], qk[:, heads:], v)
    h = h + w.o(out.reshape(t, -1), wide)
    x = F.rms_norm(h, (dim,), w.ln2, w.eps)
    gate, up = w.gate_up(x, wide).chunk(2, dim=-1)
    return h + w.down(F.silu(gate) * up, wide)
