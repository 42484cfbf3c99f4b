"""Compact weight modules (int8 per row, int4 and int8 in groups of 32) and the quantizers that make them.

Decode multiplies through PyTorch's weight-only CPU kernels
(``aten._weight_int4pack_mm_for_cpu``, ``aten._weight_int8pack_mm``); from
:data:`DENSE_ROWS` rows on (prefill) a weight is de-quantized for a dense GEMM.
"""

from __future__ import annotations

from functools import cache, lru_cache

import torch
from torch import nn

GROUP = 32  # values per int4 group: a GGUF Q4_1 block
DENSE_ROWS = 32  # from this many rows on, int8/int4 de-quantize and run a dense GEMM (measured crossover)
INT8_DENSE_ROWS = 64  # the same for grouped int8, whose two kernel calls cost twice per row (measured)


class Int8RowLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` and one scale per output row.

    The output projection's layout (an int8 table shared with the token
    embedding), and decoder linears whose shape the grouped :class:`Int8Linear`
    cannot tile.

    Few rows (decode) go through the weight-only kernel, which reads a quarter
    of float32's bytes; from :data:`DENSE_ROWS` rows on (prefill, wide decode
    batches) de-quantizing once and running a dense GEMM is faster, as the
    kernel's cost grows with every row.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= DENSE_ROWS:
            y = nn.functional.linear(rows, self.qweight.to(rows.dtype) * self.scales[:, None])
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """A token embedding over an int8 table with one scale per row (shared with a tied :class:`Int8RowLinear`)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


class Int4Linear(nn.Module):
    """Weight-only int4 linear: groups of 32 input values share a scale and a minimum.

    Weight value = ``scale * code + minimum`` with ``code`` in 0..15 (GGUF
    Q4_1). PyTorch's kernel computes ``(code - 8) * scale + zero``, so it is
    given ``zero = minimum + 8 * scale``. From :data:`DENSE_ROWS` rows on the
    weight is de-quantized from the packed codes and a dense GEMM runs, as in
    :class:`Int8RowLinear`; with ``dense`` (the weight in the activation dtype, kept
    beside the codes) that GEMM reads it instead.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, dtype: torch.dtype,
                 bias: torch.Tensor | None = None, dense: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        scales, minimums = scales.float(), minimums.float()
        self.register_buffer("packed", _pack_int4(codes))
        # [groups, out, 2]: scale and zero of each group, in the activation dtype (the kernel's contract).
        self.register_buffer("scale_zero", torch.stack([scales, minimums + 8 * scales], -1)
                             .transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("bias", bias)
        self.register_buffer("dense", dense)
        self.unpackable = _unpack_order(self.out_features, self.in_features) is not None  # codes can be read back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= DENSE_ROWS and self.dense is not None:
            y = nn.functional.linear(rows, self.dense.to(rows.dtype))
        elif rows.shape[0] >= DENSE_ROWS and self.unpackable:
            y = nn.functional.linear(rows, self.dequantize().to(rows.dtype))
        else:
            y = _int4_mm(rows, self)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def codes_scales_minimums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The codes [out, in], scales and minimums [out, in / 32] this module was built from."""
        codes = _in_weight_order(_nibbles(self.packed), self.out_features, self.in_features)
        scale, zero = self.scale_zero.float().transpose(0, 1).unbind(-1)
        return codes.to(torch.uint8), scale, zero - 8 * scale

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(code - 8) * scale + zero``, [out, in]."""
        return dequantize_int4(*self.codes_scales_minimums())


class Int8Linear(nn.Module):
    """Weight-only int8 in groups of 32 input values: weight = ``scale * code + minimum``, code in 0..255.

    PyTorch's int8 weight-only CPU kernel takes one scale per output row, which
    costs ~1 % weight error (and, on a model already quantized in groups, the
    groups' own numbers). Here each code is split into its high and low nibble,
    held as two :class:`Int4Linear` (scales ``16 * scale`` and ``scale``, the
    minimum with the high half), and a decode step runs the int4 kernel on both
    and adds: int8's bytes, with a scale and a minimum per 32 values. From
    :data:`INT8_DENSE_ROWS` rows on the weight is de-quantized for a dense GEMM.
    """

    def __init__(self, high: Int4Linear, low: Int4Linear, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = high.out_features, high.in_features
        self.high, self.low = high, low
        self.register_buffer("bias", bias)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> Int8Linear:
        """From 8-bit ``codes`` [out, in] and ``scales``, ``minimums`` [out, in / 32] (see :func:`quantize_int8`)."""
        codes, scales = codes.to(torch.uint8), scales.float()
        return cls(Int4Linear(codes >> 4, 16 * scales, minimums, dtype),
                   Int4Linear(codes & 0x0F, scales, torch.zeros_like(scales), dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= INT8_DENSE_ROWS:
            y = nn.functional.linear(rows, self.dequantize().to(rows.dtype))
        else:
            y = _int4_mm(rows, self.high) + _int4_mm(rows, self.low)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, [out, in]: one pass over the joined codes (both halves share a layout)."""
        high, low = self.high.packed, self.low.packed  # each byte: two codes' high (low) nibbles
        joined = torch.stack([(high << 4) | (low & 0x0F), (high & 0xF0) | (low >> 4)], -1).reshape(-1)
        codes = _in_weight_order(joined, self.out_features, self.in_features)
        scale = self.low.scale_zero[..., 0].float().transpose(0, 1)
        high_scale, high_zero = self.high.scale_zero.float().transpose(0, 1).unbind(-1)
        return dequantize_int4(codes, scale, high_zero - 8 * high_scale)


def _int4_mm(x: torch.Tensor, lin: Int4Linear) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.packed, GROUP, lin.scale_zero)


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([lin(x) for lin in linears], -1)`` (for q/k/v, or gate/up), in the
    linears' own format: their output rows side by side, so no number changes. None if they differ
    in format or cannot be joined. The linears keep working on views of the joined tensors (their
    own copies are freed); int4's (and int8's) packed codes too where the packing's row blocks
    split at the linears' boundaries (64 rows here), and their scales stay their own."""
    kinds = {type(m) for m in linears}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if kind is nn.Linear:
        w = torch.cat([m.weight.detach() for m in linears])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        fused.weight.data = w
        if bias is not None:
            fused.bias.data = bias
        shared = ("weight",)
    elif kind is Int8RowLinear:
        fused = Int8RowLinear(torch.cat([m.qweight for m in linears]), torch.cat([m.scales for m in linears]), bias)
        shared = ("qweight", "scales")
    elif kind is Int8Linear:
        high, low = fuse_linears([m.high for m in linears]), fuse_linears([m.low for m in linears])
        if high is None or low is None:
            return None
        fused, shared = Int8Linear(high, low, bias), ()
    elif kind is Int4Linear and all(m.unpackable for m in linears):
        parts = [m.codes_scales_minimums() for m in linears]
        dense = None if any(m.dense is None for m in linears) else torch.cat([m.dense for m in linears])
        fused = Int4Linear(*(torch.cat(x) for x in zip(*parts)), dtype=linears[0].scale_zero.dtype, bias=bias,
                           dense=dense)
        shared = ("dense",) if dense is not None else ()
        if _holds_rows(fused.packed, [m.packed for m in linears]):  # rows packed in blocks that split there
            shared += ("packed",)
    else:
        return None
    for name in (*shared, *(("bias",) if bias is not None else ())):
        _share_rows(linears, name, getattr(fused, name))
    return fused


def _holds_rows(joined: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    """Whether ``joined`` is ``parts`` stacked row after row, so each part can be a view of it."""
    start = 0
    for part in parts:
        if not torch.equal(joined[start : start + part.shape[0]], part):
            return False
        start += part.shape[0]
    return start == joined.shape[0]


def _share_rows(linears: list[nn.Module], name: str, joined: torch.Tensor) -> None:
    """Point each linear's ``name`` tensor at its rows of ``joined`` (one copy of the weights, not two)."""
    start = 0
    for m in linears:
        t = getattr(m, name)
        t.data = joined[start : start + t.shape[0]]
        start += t.shape[0]


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], -1).reshape(-1)


def _in_weight_order(nibbles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Packed-order nibbles (or per-nibble values) of an [n, k] int4 weight, as [n, k] in weight order."""
    if _blocks_of_64(n, k):  # a reshape and a transpose instead of a gather of n * k indices
        return nibbles.reshape(n // 64, k, 32, 2).permute(0, 3, 2, 1).reshape(n, k)
    return nibbles[_unpack_order(n, k)].reshape(n, k)


@cache
def _blocks_of_64(n: int, k: int) -> bool:
    """Whether this PyTorch packs an [n, k] weight in blocks of 64 rows, row ``r`` and ``r + 32`` of a
    block sharing a byte (its AVX512 layout): checked against :func:`_unpack_order`, not assumed."""
    if n % 64 or _unpack_order(n, k) is None:
        return False
    blocked = torch.arange(n * k).reshape(n // 64, k, 32, 2).permute(0, 3, 2, 1).reshape(-1)
    return torch.equal(blocked, _unpack_order(n, k))


@lru_cache(maxsize=4)  # an int64 per weight: kept for the few shapes in use, not for every shape seen
def _unpack_order(n: int, k: int) -> torch.Tensor | None:
    """For each weight position of an [n, k] int4 weight, the packed nibble that holds it (None: not a permutation).

    Found by packing probe codes that spell out each position's index four
    bits at a time, so it follows whatever layout this PyTorch packs into.
    """
    index = torch.arange(n * k)
    held = torch.zeros(n * k, dtype=torch.int64)  # position held by each nibble
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        held |= _nibbles(_pack_int4(((index >> shift) & 0x0F).reshape(n, k))).long() << shift
    if held.numel() != n * k or not torch.equal(held.sort().values, index):
        return None
    order = torch.empty_like(held)
    order[held] = index
    return order


# -- quantizers ---------------------------------------------------------------------------------
def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(codes, scales)`` with ``w ≈ codes * scales[:, None]``."""
    w = w.float()
    scales = (w.abs().amax(1) / 127).clamp_min(1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit in groups of 32 along the input (GGUF Q4_1's rule): ``(codes, scales, minimums)``."""
    return _quantize_groups(w, 15)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit in groups of 32 along the input: ``(codes, scales, minimums)``.

    A group already on a 4-bit grid (a GGUF Q4_1 block, whose minimum and
    maximum are codes 0 and 15) maps to codes ``17 * q``: its numbers are kept.
    """
    return _quantize_groups(w, 255)


def _quantize_groups(w: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = (hi - lo) / top
    inv = torch.where(scales == 0, 0.0, 1 / scales)
    codes = torch.floor((g - lo[..., None]) * inv[..., None] + 0.5).clamp(0, top).to(torch.uint8)
    return codes.reshape(n, k), scales, lo


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``scale * code + minimum`` per group of 32, [out, in] (for 4-bit codes, the
    GGUF's own de-quantization)."""
    n, k = codes.shape
    w = scales.float()[..., None] * codes.reshape(n, k // GROUP, GROUP).float() + minimums.float()[..., None]
    return w.reshape(n, k)


def model_bytes(*modules: nn.Module) -> int:
    """Bytes held by the modules' parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in (t for m in modules for t in [*m.parameters(), *m.buffers()]):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
